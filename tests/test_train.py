"""The Hydra entry: one-line config errors, records for every outcome, W&B offline runs."""

import os
import struct
import subprocess
import sys

import pytest

from helpers import FAST, ROOT, cli, spec
from nanlab.config.compose import validate_cli
from nanlab.record import find_records, read_record
from nanlab.run.runner import run


def test_unknown_group_option_is_one_line_listing_the_allowed():
    assert validate_cli(["precision=fp8"]) == (
        "precision=fp8: unknown option; allowed: bf16, bf16_true, fp16, fp32, progressive"
    )
    assert validate_cli(["-m", "softmax=naive,bogus"]).startswith("softmax=bogus: unknown")
    assert validate_cli(["precision=fp16", "softmax=safe", "lr=0.1"]) is None


def test_cli_bad_option_exits_2_with_one_line():
    out = cli("precision=fp8")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: precision=fp8: unknown option; allowed: bf16, bf16_true, fp16, fp32, progressive"
    ]


def test_cli_negative_lr_is_one_line_error_and_an_error_record(tmp_path):
    out = cli(*FAST, "lr=-1", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: lr=-1.0: must be a positive number"]
    rec = read_record(tmp_path / "record.json")
    assert rec.status == "error" and rec.error.endswith("lr=-1.0: must be a positive number")


@pytest.mark.parametrize(
    "override,message",
    [
        ("+model.depth=3", "model.depth: unknown key; allowed:"),
        ("warmup_steps=-2", "warmup_steps=-2: must be >= 0"),
        ("data.padding_side=middle", "data.padding_side=middle: allowed left, right"),
    ],
)
def test_bad_values_are_one_line_errors(override, message):
    # every spec is checked when the config becomes specs, before torch loads
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        spec(override)


@pytest.mark.parametrize("softmax", ["sdpa", "eager", "naive", "stable", "safe", "softcap"])
def test_every_softmax_option_trains_a_few_steps(softmax, tmp_path):
    rec = run(spec(f"softmax={softmax}", "max_steps=2"), tmp_path)
    assert rec.status in ("ok", "stalled") and rec.steps_done == 2, rec.error
    # the base answers captions, not these questions: its first loss is well below the
    # random-init ln(151,936) = 11.9 yet far from trained
    assert rec.max_attn_logit is not None and 1 < rec.initial_loss < 11.9


def wandb_records(path):
    """The protobuf records of an offline W&B run's .wandb file (LevelDB's log format: 32 KiB
    blocks of chunks, each a 7-byte header: CRC, length, type; after W&B's 7-byte header),
    read here because wandb 0.2x+ no longer ships a Python reader for it."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunk = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7]) if left >= 7 else (0, 0)
        if kind == 0:  # the block's zero padding
            pos += left
            continue
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


@pytest.mark.slow
def test_wandb_offline_one_run_dir_per_job_with_outcome_summary(tmp_path):
    sweep = tmp_path / "sweep"
    # 80 columns, as a pipe has: the closing panel is as wide as its longest line, no wrap
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", COLUMNS="80")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "src.train",
            "-m",
            *[a for a in FAST if not a.startswith("logger")],
            "logger=wandb",
            "max_steps=2",
            "lr=1e-3,0.3",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # a sweep prints its progress line per cell, as with the other loggers: W&B's banner,
    # run history and summary (~35 lines a cell) stay in its run dirs
    lines = (out.stdout + out.stderr).splitlines()
    assert len(lines) <= 10 and not any(line.startswith("wandb:") for line in lines), lines
    records = find_records(sweep)
    assert len(records) == 2
    run_dirs = []
    for path in records:
        offline = list((path.parent / "wandb").glob("offline-run-*"))
        assert len(offline) == 1, offline  # never shared between jobs
        run_dirs.append(offline[0].name)
        # offline runs keep the summary inside the run's protobuf log, which `wandb sync`
        # uploads; the field names and JSON values are stored as plain bytes there
        log_name = "run-" + offline[0].name.split("-")[-1] + ".wandb"
        log = (offline[0] / log_name).read_bytes()
        at = log.find(b"outcome/status")
        # 2 steps: finite; trained (ok) or not (stalled) depending on the lr
        assert at > 0 and (b'"ok"' in log[at : at + 32] or b'"stalled"' in log[at : at + 32])
        assert log.count(b"outcome/") >= 20  # every record field
        kinds = [r.WhichOneof("record_type") for r in wandb_records(offline[0] / log_name)]
        assert kinds.count("history") >= 2 and "summary" in kinds and kinds[-1] == "exit"
    assert len(set(run_dirs)) == 2
    assert "WANDB_MODE" not in os.environ


@pytest.mark.slow
def test_single_run_prints_its_bar_and_verdict_once_and_logs_the_rest(tmp_path):
    """A user's first run (W&B offline, the progress bar on): no line twice (Lightning's
    INFO lines went to its own console and again through Hydra's), no "Epoch 0/-2"."""
    out = cli(
        *[a for a in FAST if a.split("=")[0] not in ("logger", "trainer.progress")],
        "logger=wandb",
        f"hydra.run.dir={tmp_path}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), lines
    assert lines[-1].startswith("OK: ") or lines[-1].startswith("STALLED: "), lines
    assert any(line.startswith("step ") and "3/3" in line for line in lines), lines
    assert not any(
        "Epoch" in line or "INFO" in line or line.startswith("wandb:") for line in lines
    ), lines
    log = (tmp_path / "train.log").read_text()  # Hydra's job log: the rest, once each
    assert log.count("`Trainer.fit` stopped") == 1 and "W&B run dir:" in log


@pytest.mark.slow
def test_default_run_loss_falls(tmp_path):
    """The README's main job, shortened: the loss on the assistant's answers falls."""
    # logger=none: an in-process W&B run would leave wandb's global state to later tests
    rec = run(spec("max_steps=80", "trainer.progress=false", "logger=none", fast=False), tmp_path)
    assert rec.status == "ok"
    losses = [
        float(line.split(",")[1])
        for line in (tmp_path / "history.csv").read_text().splitlines()[1:]
    ]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 3, (first, last)


class OptimizerSeen:
    """A Lightning callback keeping the optimizer the run trained with."""

    def __new__(cls):
        from lightning.pytorch.callbacks import Callback

        class Seen(Callback):
            optimizer = None

            def on_train_start(self, trainer, pl_module):
                self.optimizer = trainer.optimizers[0]

        return Seen()


@pytest.mark.slow
@pytest.mark.parametrize(
    "precision, fused",
    [("fp32", True), ("bf16", True), ("bf16_true", True), ("progressive", True), ("fp16", False)],
)  # fp16's loss scaler unscales before clip and monitor: foreach
def test_fused_adamw_is_the_default_in_every_precision(precision, fused, tmp_path):
    # the monitor off: clipping goes through Lightning's precision plugin, which refuses
    # fused optimizers under autocast unless the module clips itself
    seen = OptimizerSeen()
    rec = run(
        spec(
            f"precision={precision}",
            "precision.switch_step=1",
            "max_steps=2",
            "monitor.enabled=false",
            "model.vision_lr=1e-4",
        ),
        tmp_path,
        extra_callbacks=[seen],
    )
    assert rec.status in ("ok", "stalled") and rec.steps_done == 2, rec.error
    opt = seen.optimizer
    assert type(opt).__name__ == "AdamW" and len(opt.param_groups) == 2  # vision_lr's group
    assert bool(opt.defaults["fused"]) is fused and bool(opt.defaults["foreach"]) is not fused


@pytest.mark.slow
def test_stable_adamw_and_foreach_still_train(tmp_path):
    for i, override in enumerate(["optim.name=stable_adamw", "optim.impl=foreach"]):
        seen = OptimizerSeen()
        rec = run(spec(override, "max_steps=2"), tmp_path / str(i), extra_callbacks=[seen])
        assert rec.status in ("ok", "stalled"), rec.error
        assert type(seen.optimizer).__name__ == ("StableAdamW" if i == 0 else "AdamW")
        assert i == 0 or seen.optimizer.defaults["foreach"]


def test_optim_impl_is_checked():
    with pytest.raises(ValueError, match="optim.impl"):
        spec("optim.impl=turbo").optim.check()
