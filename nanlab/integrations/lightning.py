"""The monitor for a LightningModule of your own, without Hydra or the project's runner:

    from nanlab.integrations.lightning import nan_monitor

    trainer = L.Trainer(..., callbacks=[nan_monitor(out_dir="nan", every=10)])
    trainer.fit(MyModule(), ...)

(or `NanMonitor.for_lightning(out_dir=..., every=...)`, the same). The callback is the
project's NanMonitor (nanlab/diagnosis/monitor.py, on the step judge of
nanlab/diagnosis/judge.py): the loss, the gradients and the weights checked each step; on
the first non-finite value it replays the step with module hooks (which module first, in
which dtype), names the cause, stops the run cleanly (`trainer.should_stop`), and at the end
of training writes `out_dir/record.json` (nanlab.record.Record, `trainer: lightning`) and
`history.csv` and prints the one-paragraph verdict.

What it needs of your module: nothing beyond a LightningModule. Where the module has the
project's `model` and `compute_loss(batch)` (NanLabModule) the replay uses them; otherwise
the module itself is the model and the replay's loss is your `training_step(batch, 0)`
(a tensor, or a dict with "loss"). The sync-mode weight window and deferred checks re-run
steps through `compute_loss`: a module without one has its weights checked every step and
its checks read every step (`monitor.sync_every=1`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from nanlab.config.specs import MonitorSpec
from nanlab.diagnosis.monitor import NanMonitor
from nanlab.record import Record, write_record


class UserModule:
    """A LightningModule as the replay sees the project's: `.model`, `.compute_loss`."""

    def __init__(self, pl_module):
        self._m = pl_module
        self.model = pl_module

    def compute_loss(self, batch):
        out = self._m.training_step(batch, 0)
        return out["loss"] if isinstance(out, dict) else out

    def parameters(self):
        return self._m.parameters()

    def named_parameters(self):
        return self._m.named_parameters()

    def __getattr__(self, name):
        return getattr(self._m, name)


def as_project_module(pl_module):
    if hasattr(pl_module, "compute_loss") and hasattr(pl_module, "model"):
        return pl_module
    return UserModule(pl_module)


class LightningNanMonitor(NanMonitor):
    """NanMonitor that writes its own record at the end of training (the project's runner
    writes it otherwise)."""

    def __init__(self, spec: MonitorSpec, out_dir=None, verbose: bool = True, **kw):
        super().__init__(spec, **kw)
        self.out_dir = out_dir
        self.verbose = verbose
        self.final: Record | None = None

    def on_train_start(self, trainer, pl_module):
        if not hasattr(pl_module, "compute_loss"):
            self.params_every = 1  # re-runs need compute_loss: every step, read at once
            self.spec.sync_every = 1
        super().on_train_start(trainer, as_project_module(pl_module))

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, as_project_module(pl_module))
        import torch
        import transformers

        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        lr = optimizer.defaults.get("lr", float("nan")) if optimizer is not None else float("nan")
        rec = Record(
            trainer="lightning",
            model=type(pl_module).__name__,
            lr=float(lr),
            clip=float(trainer.gradient_clip_val or 0),
            max_steps=trainer.max_steps,
            precision=str(trainer.precision),
            torch_version=torch.__version__,
            transformers_version=transformers.__version__,
        )
        self.fill_record(rec)
        self.final = rec
        out = Path(self.out_dir or trainer.default_root_dir)
        rec.run_dir = str(out)
        write_record(rec, out)
        (out / "history.csv").write_text(self.judge.history_csv())
        if self.verbose:
            print(
                rec.verdict(),
                file=sys.stderr if rec.status in ("nonfinite", "diverged") else sys.stdout,
            )

    # the hooks that replay or re-run get the module as the project's
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        super().on_train_batch_start(trainer, as_project_module(pl_module), batch, batch_idx)

    def on_before_backward(self, trainer, pl_module, loss):
        super().on_before_backward(trainer, as_project_module(pl_module), loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        super().on_before_optimizer_step(trainer, as_project_module(pl_module), optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, as_project_module(pl_module), outputs, batch, batch_idx)


def nan_monitor(
    out_dir=None, every: int = 10, verbose: bool = True, **options
) -> LightningNanMonitor:
    """The monitor for any Lightning Trainer: `every` = attention statistics every N steps
    (the project's attention variants only; 0: never); `options`: MonitorSpec's fields
    (locate, check_params, diverge_factor, patience, spike_factor, sync_every, ...)."""
    return LightningNanMonitor(
        MonitorSpec(every=every, **options), out_dir=out_dir, verbose=verbose
    )
