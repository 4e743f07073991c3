"""Replay a failed run: `python -m src.replay <run dir>`.

Re-runs the recorded config and seed from scratch (same data order, same weights, same
RNG) until it fails again, then checks that the failure is the same (step, phase, module)
and that the batch that broke it equals the saved `failing_batch.pt`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import typing
from pathlib import Path

import torch

from nanlab.record import RECORD_NAME, read_record


def _same_batch(a: dict, b: dict) -> bool:
    keys = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
    return set(keys) <= set(b) and all(torch.equal(a[k], b[k]) for k in keys)


def replay(run_dir: str | Path, out_dir: str | Path | None = None) -> tuple[bool, str]:
    from omegaconf import OmegaConf

    from nanlab.config.compose import spec_from_config
    from nanlab.run.runner import run

    run_dir = Path(run_dir)
    recorded = read_record(run_dir / RECORD_NAME)
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    plain = typing.cast(dict, OmegaConf.to_container(cfg, resolve=True))
    plain["logger"] = {"name": "none"}
    plain.setdefault("trainer", {})["progress"] = False
    spec = spec_from_config(plain, recorded.overrides)
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="nanlab-replay-"))
    again = run(spec, out_dir)
    fields = ("status", "first_bad_step", "phase", "module", "dtype")
    diffs = [
        f"{f}: {getattr(recorded, f)} -> {getattr(again, f)}"
        for f in fields
        if getattr(recorded, f) != getattr(again, f)
    ]
    saved, fresh = run_dir / "failing_batch.pt", out_dir / "failing_batch.pt"
    if saved.exists() and (
        not fresh.exists() or not _same_batch(torch.load(saved), torch.load(fresh))
    ):
        diffs.append("the failing batch differs from the saved one")
    if diffs:
        return False, "replay differs: " + "; ".join(diffs)
    return True, "replay agrees: " + again.verdict()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="where the replay writes (default: a tmp dir)")
    args = parser.parse_args(argv)
    if not (Path(args.run_dir) / RECORD_NAME).exists():
        print(f"error: run_dir={args.run_dir}: no {RECORD_NAME} there", file=sys.stderr)
        return 2
    ok, message = replay(args.run_dir, args.out)
    print(message)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
