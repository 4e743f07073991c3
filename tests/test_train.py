"""The Hydra entry: one-line config errors, records for every outcome, W&B offline runs."""
import os

import pytest

from helpers import FAST, cli, spec
from nanlab.config.compose import validate_cli
from nanlab.record import find_records, read_record
from nanlab.run.runner import run


def test_unknown_group_option_is_one_line_listing_the_allowed():
    assert validate_cli(["precision=fp8"]) == (
        "precision=fp8: unknown option; allowed: bf16, bf16_true, fp16, fp32, progressive")
    assert validate_cli(["-m", "softmax=naive,bogus"]).startswith("softmax=bogus: unknown")
    assert validate_cli(["precision=fp16", "softmax=safe", "lr=0.1"]) is None


def test_cli_bad_option_exits_2_with_one_line():
    out = cli("precision=fp8")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: precision=fp8: unknown option; allowed: bf16, bf16_true, fp16, fp32, progressive"]


def test_cli_negative_lr_is_one_line_error_and_an_error_record(tmp_path):
    out = cli(*FAST, "lr=-1", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: lr=-1.0: must be a positive number"]
    rec = read_record(tmp_path / "record.json")
    assert rec.status == "error" and rec.error.endswith("lr=-1.0: must be a positive number")


@pytest.mark.parametrize("override,message", [
    ("+model.depth=3", "model.depth: unknown key; allowed:"),
    ("warmup_steps=-2", "warmup_steps=-2: must be >= 0"),
    ("data.padding_side=middle", "data.padding_side=middle: allowed left, right"),
])
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


@pytest.mark.slow
def test_wandb_offline_one_run_dir_per_job_with_outcome_summary(tmp_path):
    sweep = tmp_path / "sweep"
    out = cli("-m", *[a for a in FAST if not a.startswith("logger")], "logger=wandb",
              "max_steps=2", "lr=1e-3,0.3", f"hydra.sweep.dir={sweep}")
    assert out.returncode == 0, out.stderr[-3000:]
    records = find_records(sweep)
    assert len(records) == 2
    run_dirs = []
    for path in records:
        offline = list((path.parent / "wandb").glob("offline-run-*"))
        assert len(offline) == 1, offline  # never shared between jobs
        run_dirs.append(offline[0].name)
        # offline runs keep the summary inside the run's protobuf log, which `wandb sync`
        # uploads; the field names and JSON values are stored as plain bytes there
        log = (offline[0] / ("run-" + offline[0].name.split("-")[-1] + ".wandb")).read_bytes()
        at = log.find(b"outcome/status")
        # 2 steps: finite; trained (ok) or not (stalled) depending on the lr
        assert at > 0 and (b'"ok"' in log[at:at + 32] or b'"stalled"' in log[at:at + 32])
        assert log.count(b"outcome/") >= 20  # every record field
    assert len(set(run_dirs)) == 2
    assert "WANDB_MODE" not in os.environ


@pytest.mark.slow
def test_default_run_loss_falls(tmp_path):
    """The README's main job, shortened: the loss on the assistant's answers falls."""
    # logger=none: an in-process W&B run would leave wandb's global state to later tests
    rec = run(spec("max_steps=80", "trainer.progress=false", "logger=none", fast=False),
              tmp_path)
    assert rec.status == "ok"
    losses = [float(line.split(",")[1]) for line in
              (tmp_path / "history.csv").read_text().splitlines()[1:]]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 3, (first, last)
