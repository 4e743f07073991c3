"""Helpers shared by the tests: compose the real Hydra config into a RunSpec."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from nanlab.config.compose import CONF_DIR, compose_spec
from nanlab.config.specs import RunSpec

ROOT = Path(__file__).resolve().parent.parent
# Small and fast: a few steps on a few shapes samples, no logger, no progress bar.
FAST = [
    "data.num_train=16",
    "data.num_val=4",
    "data.num_test=4",
    "max_steps=3",
    "logger=none",
    "trainer.progress=false",
    "monitor.every=1",
]


def spec(*overrides: str, fast: bool = True) -> RunSpec:
    return compose_spec(*(FAST if fast else []), *overrides)


def cli(*args: str, module: str = "src.train", timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def hydra_cfg(*overrides: str):
    """The composed config with its `hydra` node (run dir, sweeper), as a multirun sees it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def plain(cfg) -> dict:
    """The resolved job config without the hydra node, as src.train.hydra_job sees it."""
    from omegaconf import OmegaConf, open_dict

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return OmegaConf.to_container(cfg, resolve=True)
