"""Helpers shared by the tests: compose the real Hydra config into a RunSpec."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from src.train import RunSpec, compose_spec

ROOT = Path(__file__).resolve().parent.parent
# Small and fast: a few steps on a few shapes samples, no logger, no progress bar.
FAST = ["data.num_train=16", "data.num_val=4", "data.num_test=4", "max_steps=3",
        "logger=none", "trainer.progress=false", "monitor.every=1"]


def spec(*overrides: str, fast: bool = True) -> RunSpec:
    return compose_spec(*(FAST if fast else []), *overrides)


def cli(*args: str, module: str = "src.train", timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
