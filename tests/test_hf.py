"""NanMonitorCallback (nanlab/integrations/hf.py) on a real transformers.Trainer
(experiments/hf_trainer.py): the same record as nanlab's own runner for the same cell, the
non-finite loss Trainer's logging_nan_inf_filter hides, skip_step, and W&B (offline)."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import ROOT
from nanlab.config.compose import compose_spec
from nanlab.record import read_record
from nanlab.run.runner import run

MAP = ["experiment=nan_map_base", "logger=none", "serve.enabled=false"]
FIELDS = (
    "status",
    "first_bad_step",
    "phase",
    "module",
    "dtype",
    "cause",
    "cause_detail",
    "cause_value",
    "replay_agrees",
    "steps_done",
    "nonfinite_grad_frac",
    "nonfinite_param_frac",
    "initial_loss",
    "final_loss",
    "max_grad_norm",
    "max_attn_logit",
    "empty_target_steps",
)


def cell(name: str, *extra: str) -> list[str]:
    base = yaml.safe_load((ROOT / "conf" / "stress" / f"{name}.yaml").read_text())["baseline"]
    return [*MAP, f"stress={name}", *base, *extra]


def train_hf(overrides, out, **kw):
    from experiments.hf_trainer import train

    return train(overrides, out, verbose=False, **kw)


@pytest.mark.parametrize("name", ["masked_rows", "grad_poison", "fp16_overflow"])
def test_the_trainer_callback_makes_nanlabs_record(name, tmp_path):
    overrides = cell(name)
    ours = run(compose_spec(*overrides), tmp_path / "nanlab")
    theirs, callback = train_hf(overrides, tmp_path / "hf")
    assert ours.status == "nonfinite", ours.verdict()
    for field in FIELDS:
        assert getattr(theirs, field) == getattr(ours, field), field
    on_disk = read_record(tmp_path / "hf" / "record.json")
    assert on_disk.trainer == "transformers" and ours.trainer == "nanlab"
    assert on_disk.status == ours.status and on_disk.cause == ours.cause
    assert (tmp_path / "hf" / "history.csv").read_text() == (
        tmp_path / "nanlab" / "history.csv"
    ).read_text()
    # the same paragraph as src.train's, for the same failure
    assert ours.verdict().split(" Cause: ")[1] in callback.verdict
    assert f"step {ours.first_bad_step} in the {ours.phase} pass" in callback.verdict


def test_it_says_when_logging_nan_inf_filter_hid_the_loss(tmp_path):
    """masked_rows: the loss of step 0 is NaN; Trainer's filter (default on) leaves it out of
    the logged loss, and the logged line shows a finite loss (0.0 here: no finite loss yet)."""
    from transformers import TrainerCallback

    logs = []

    class Logs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                seen.append(dict(logs))

    seen = logs
    rec, callback = train_hf(cell("masked_rows"), tmp_path, callbacks=[Logs()])
    assert rec.status == "nonfinite" and rec.first_bad_step == 0
    assert callback.hidden_steps == [0]
    assert "logging_nan_inf_filter" in callback.verdict
    assert seen and all(isinstance(x["loss"], float) and x["loss"] == x["loss"] for x in seen)


def test_skip_step_drops_the_poisoned_updates_and_trains_on(tmp_path):
    """grad_poison with guard=skip_step (the callback's on_failure="skip_step"): the rare
    poisoned step's update is dropped, the weights stay finite, the run goes on."""
    overrides = cell("grad_poison", "guard=skip_step")
    ours = run(compose_spec(*overrides), tmp_path / "nanlab")
    theirs, callback = train_hf(overrides, tmp_path / "hf")
    assert theirs.status == ours.status and theirs.status in ("ok", "stalled")
    assert callback.fired == ours.guard_fired >= 1
    assert theirs.final_loss == ours.final_loss


def test_empty_targets_is_counted_and_the_run_goes_on(tmp_path):
    overrides = cell("empty_targets")
    ours = run(compose_spec(*overrides), tmp_path / "nanlab")
    theirs, _ = train_hf(overrides, tmp_path / "hf")
    assert ours.empty_target_steps > 0
    for field in ("status", "cause", "first_bad_step", "empty_target_steps", "steps_done"):
        assert getattr(theirs, field) == getattr(ours, field), field


def test_wandb_gets_the_record_and_one_alert(tmp_path, monkeypatch):
    """report_to=wandb, offline: the record in the run summary, wandb.alert raised once. In
    offline mode alert() only writes the alert into the run's local .wandb file (it is sent
    on `wandb sync`); what is tested is that it is called, once, with the verdict."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    from wandb.sdk.wandb_run import Run

    alerts = []
    real = Run.alert

    def alert(self, *args, **kwargs):  # wandb.init rebinds wandb.alert to the run's method
        alerts.append(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Run, "alert", alert)
    rec, _ = train_hf(cell("masked_rows"), tmp_path / "hf", report_to="wandb")
    try:
        assert rec.status == "nonfinite"
        assert len(alerts) == 1 and "masked_row" in alerts[0]["text"]
        summary = (
            dict(wandb.run.summary)
            if wandb.run is not None
            else json.loads(next(tmp_path.rglob("wandb-summary.json")).read_text())
        )
        assert summary["outcome/status"] == "nonfinite"
        assert summary["outcome/trainer"] == "transformers"
    finally:
        if wandb.run is not None:
            wandb.finish()
        # wandb's process-wide settings are read from the environment once, at the first
        # init: tear them down, or a later test's WANDB_RUN_ID would be ignored
        wandb.teardown()


# --- a plain Trainer: the model's own loss, Trainer's own autocast, no project parts -----------


def _plain_trainer(tmp_path, callbacks, max_steps=8, empty_at=(), poison_at=None):
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16)
    )
    g = torch.Generator().manual_seed(0)
    rows = []  # batches of one, one epoch: each row trains once, in Trainer's shuffled order
    for i in range(max_steps):
        ids = torch.randint(0, 64, (8,), generator=g)
        labels = torch.full_like(ids, -100) if i in empty_at else ids.clone()
        rows.append({"input_ids": ids, "labels": labels})

    class Poison(TrainerCallback):  # an inf written into a weight after update `poison_at`
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step - 1 == poison_at:
                with torch.no_grad():
                    model.transformer.h[0].mlp.c_fc.weight.view(-1)[0] = float("inf")

    args = TrainingArguments(
        output_dir=str(tmp_path / "t"),
        max_steps=max_steps,
        per_device_train_batch_size=1,
        learning_rate=1e-3,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
    )
    extra = [Poison()] if poison_at is not None else []
    trainer = Trainer(
        model=model, args=args, train_dataset=rows, callbacks=[*extra, *callbacks]
    )  # the poison first: a user's write
    trainer.train()
    return trainer


def test_a_plain_trainer_counts_empty_targets_and_goes_on(tmp_path):
    from nanlab.integrations.hf import NanMonitorCallback

    callback = NanMonitorCallback(out_dir=tmp_path / "nan", every=0, verbose=False)
    trainer = _plain_trainer(tmp_path, [callback], empty_at=(2,))
    rec = read_record(tmp_path / "nan" / "record.json")
    assert trainer.state.global_step == 8  # a NaN over zero targets does not stop the run
    assert rec.empty_target_steps == 1 and rec.cause == "empty_targets"
    assert rec.status == "nonfinite" and rec.trainer == "transformers"  # as src.train's
    assert callback.hidden_steps == [rec.first_bad_step]  # Trainer's filter hid that NaN
    assert "logging_nan_inf_filter" in callback.verdict


@pytest.mark.parametrize("params_every", [1, 32])
def test_a_plain_trainer_finds_a_poisoned_update(tmp_path, params_every):
    """Weights made non-finite by update 3: every update checked, the record names step 3
    and the module; checked every 32 updates (the default), the next step's non-finite
    loss makes the callback look at the weights first, and the record dates the update to
    the window since the last good check, saying so."""
    from nanlab.integrations.hf import NanMonitorCallback

    callback = NanMonitorCallback(
        out_dir=tmp_path / "nan", every=0, verbose=False, params_every=params_every
    )
    trainer = _plain_trainer(tmp_path, [callback], poison_at=3)
    rec = read_record(tmp_path / "nan" / "record.json")
    assert rec.status == "nonfinite" and rec.phase == "optimizer"
    assert rec.cause == "optimizer_poison" and rec.module == "transformer.h.0.mlp.c_fc"
    # stopped after step 3 (its check), or after step 4 (whose non-finite loss looked)
    assert trainer.state.global_step == (4 if params_every == 1 else 5)
    if params_every == 1:
        assert rec.first_bad_step == 3 and "checked every" not in rec.cause_detail
    else:
        assert rec.first_bad_step == 0 and "steps 0..3" in rec.cause_detail
