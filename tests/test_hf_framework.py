"""NanMonitorCallback inside a real fine-tuning framework: LLaMA-Factory's SFT entry
(`run_exp(args, callbacks=[...])`, experiments/hf_framework.py, `make hf-example`) on the
tiny Qwen2.5-VL checkpoint. The planted masked_rows failure gets the record nanlab's own
runner gives the same mechanism; its control (the same left padding and variant,
transformers' own mask) stays finite.

LLaMA-Factory 0.9.5 pins transformers<=5.6, so it runs in its own environment: the python
in NANLAB_LF_PYTHON, else .venv-lf (`make hf-example` creates it); the test skips, saying
why, when neither is there."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import ROOT
from nanlab.config.compose import compose_spec
from nanlab.record import read_record
from nanlab.run.runner import run

pytestmark = pytest.mark.slow

FIELDS = (
    "status",
    "first_bad_step",
    "phase",
    "module",
    "dtype",
    "cause",
    "replay_agrees",
    "precision",
    "stress",
)


def lf_python() -> str:
    """The python with llamafactory: NANLAB_LF_PYTHON (must work when set), else .venv-lf."""
    given = os.environ.get("NANLAB_LF_PYTHON")
    if given:
        return given
    venv = ROOT / ".venv-lf"
    if not (venv / "bin" / "python").exists():
        pytest.skip(
            "no LLaMA-Factory environment: .venv-lf is missing (make hf-example "
            "creates it) and NANLAB_LF_PYTHON is not set"
        )
    if not (venv / ".installed").exists():
        pytest.skip(".venv-lf is incomplete (no .installed stamp): rerun make hf-example")
    return str(venv / "bin" / "python")


@pytest.fixture(scope="module")
def lf() -> str:
    return lf_python()


@pytest.fixture(scope="module")
def checkpoint(lf, tmp_path_factory) -> Path:
    """The tiny checkpoint as make hf-example builds it: 5 steps from the tiny base,
    save.hf=true (after `lf`: no checkpoint to build when the test skips)."""
    out = tmp_path_factory.mktemp("checkpoint")
    rec = run(
        compose_spec("save.hf=true", "max_steps=5", "logger=none", "serve.enabled=false"), out
    )
    assert rec.status == "ok", rec.verdict()
    return out / "hf"


def llamafactory(py: str, checkpoint: Path, out: Path, *flags: str):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [py, "-m", "experiments.hf_framework", str(checkpoint), str(out), *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return read_record(out / "record.json"), done.stdout


def test_planted_masked_rows_in_llamafactory_gets_nanlabs_record(lf, checkpoint, tmp_path):
    stress = yaml.safe_load((ROOT / "conf" / "stress" / "masked_rows.yaml").read_text())
    ours = run(
        compose_spec(
            "stress=masked_rows",
            *stress["baseline"],
            "max_steps=5",
            "logger=none",
            "serve.enabled=false",
        ),
        tmp_path / "nanlab",
    )
    assert ours.status == "nonfinite" and ours.cause == stress["cause"], ours.verdict()
    theirs, stdout = llamafactory(lf, checkpoint, tmp_path / "lf")
    assert theirs.trainer == "transformers" and ours.trainer == "nanlab"
    for field in FIELDS:
        assert getattr(theirs, field) == getattr(ours, field), field
    assert theirs.cause_detail.endswith("have every key masked (mask float32, min -inf)")
    assert f"Cause: {ours.cause} (" in stdout and "logging_nan_inf_filter" in stdout
    assert f"record: {tmp_path / 'lf' / 'record.json'} (status nonfinite" in stdout


def test_its_control_in_llamafactory_stays_finite(lf, checkpoint, tmp_path):
    """The same left padding and eager variant with transformers' own mask: no failure, so
    the masked_row above is the summed planes', not LLaMA-Factory's or the monitor's."""
    rec, _ = llamafactory(lf, checkpoint, tmp_path / "lf", "--control")
    assert rec.status in ("ok", "stalled"), rec.verdict()
    assert rec.cause is None and rec.first_bad_step is None and rec.steps_done == 3
