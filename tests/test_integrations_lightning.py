"""nan_monitor / NanMonitor.for_lightning on a real Lightning Trainer, with a user's own
LightningModule (no Hydra, no project runner)."""

from __future__ import annotations

import lightning as L
import torch

from nanlab.diagnosis.monitor import NanMonitor
from nanlab.integrations.lightning import nan_monitor
from nanlab.record import read_record


class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch["x"], batch["y"]
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def loader(bad_at: int | None = None, n: int = 12):
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(n):
        x = torch.randn(8, 4, generator=g)
        if i == bad_at:
            x[3, 1] = float("nan")
        batches.append({"x": x, "y": x.sum(1, keepdim=True)})
    return torch.utils.data.DataLoader(batches, batch_size=None)


def fit(callback, bad_at, tmp_path):
    trainer = L.Trainer(
        max_steps=10,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        gradient_clip_val=1.0,
    )
    trainer.fit(Regression(), train_dataloaders=loader(bad_at))
    return trainer


def test_a_users_module_gets_the_record_and_verdict(tmp_path, capsys):
    monitor = nan_monitor(out_dir=tmp_path / "nan", every=0)
    trainer = fit(monitor, 4, tmp_path)
    rec = read_record(tmp_path / "nan" / "record.json")
    assert rec.trainer == "lightning" and rec.status == "nonfinite"
    assert rec.first_bad_step == 4 and rec.phase == "forward"
    assert rec.cause == "nonfinite_input" and "batch['x']" in rec.cause_detail
    assert rec.module == "net.0" and rec.replay_agrees is True
    assert rec.steps_done == 4 and trainer.global_step == 5  # stopped after the bad step
    assert "NON-FINITE" in capsys.readouterr().err
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())


def test_for_lightning_is_the_same_factory_and_a_finite_run_is_ok(tmp_path):
    monitor = NanMonitor.for_lightning(out_dir=tmp_path / "ok", every=0)
    fit(monitor, None, tmp_path)
    rec = read_record(tmp_path / "ok" / "record.json")
    assert rec.status == "ok" and rec.steps_done == 10 and rec.first_bad_step is None
