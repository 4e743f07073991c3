"""`make bench`: costs measured side by side in one run, printed as ratios.

1. The monitor: off, default (checks every step, attention statistics every 10 steps),
   and every attention statistic on every step.
2. Seconds per step for each precision, and half-precision matmuls on this CPU: native
   kernels vs fp32-accumulate (bf16).
Configs are interleaved over rounds so drift on a shared machine hits all alike; each
figure is the median step time after warm-up steps.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from lightning.pytorch.callbacks import Callback

from src.train import compose_spec, run

QUIET = ["logger=none", "trainer.progress=false"]


def spec(*overrides):
    return compose_spec(*QUIET, *overrides)


class StepTimer(Callback):
    def __init__(self, warmup: int):
        self.warmup, self.times = warmup, []

    def on_train_batch_start(self, trainer, *args):
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self.t0)


def measure(configs: dict[str, list[str]], steps: int, rounds: int, warmup: int = 2):
    times: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(rounds):
        for name, overrides in configs.items():
            timer = StepTimer(warmup)
            with tempfile.TemporaryDirectory() as tmp:
                rec = run(spec(*overrides, f"max_steps={steps + warmup}", "data.num_train=64"),
                          tmp, extra_callbacks=[timer])
            if rec.status != "ok":
                raise SystemExit(f"{name}: {rec.verdict()}")
            times[name] += timer.times
            print(f"  round {r + 1}/{rounds} {name}: {statistics.median(timer.times):.3f} s/step",
                  flush=True)
    return {name: statistics.median(t) for name, t in times.items()}


def check_cost_ms(repeats: int = 20) -> float:
    """The monitor's fixed per-step work, timed alone on the tiny model: the gradient norm
    and the parameter check (the same _foreach_norm calls NanMonitor makes)."""
    import torch

    from src.model import ModelSpec, build_model

    torch.set_num_threads(1)
    params = list(build_model(ModelSpec(), seed=0).parameters())
    for p in params:
        p.grad = torch.randn_like(p)

    def checks():
        grads = torch.stack(torch._foreach_norm([p.grad for p in params]))
        torch.linalg.vector_norm(grads).item()
        torch.isfinite(torch.stack(torch._foreach_norm(params))).all().item()

    checks()
    t0 = time.perf_counter()
    for _ in range(repeats):
        checks()
    return (time.perf_counter() - t0) / repeats * 1000


def table(title: str, medians: dict[str, float], base: str) -> str:
    lines = [f"\n{title}", f"{'config':<28}{'s/step':>10}{'steps/s':>10}{'ratio':>9}"]
    for name, t in medians.items():
        lines.append(f"{name:<28}{t:>10.3f}{1 / t:>10.2f}{t / medians[base]:>9.3f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-gemm", action="store_true")
    args = parser.parse_args(argv)
    monitor = measure({
        "monitor off": ["monitor.enabled=false"],
        "monitor default (every=10)": ["monitor.every=10"],
        "monitor all stats each step": ["monitor.every=1"],
    }, args.steps, args.rounds)
    out = [table("Monitor cost (bf16, sdpa; ratio = step time / monitor off)", monitor,
                 "monitor off")]
    ms = check_cost_ms()
    out.append(f"per-step checks timed alone: {ms:.1f} ms = {ms / 10 / monitor['monitor off']:.2f}% "
               "of a monitor-off step (the end-to-end ratios above also carry this machine's noise)")
    if not args.skip_gemm:
        gemm = measure({
            "fp32": ["precision=fp32", "monitor.every=0"],
            "bf16 fp32_accumulate": ["precision.half_gemm=fp32_accumulate", "monitor.every=0"],
            "bf16_true fp32_accumulate": ["precision=bf16_true", "monitor.every=0"],
            "fp16 fp32_accumulate": ["precision=fp16", "monitor.every=0"],
            "progressive (after switch)": ["precision=progressive", "precision.switch_step=0",
                                           "monitor.every=0"],
            "bf16 native": ["precision.half_gemm=native", "monitor.every=0"],
        }, max(args.steps // 4, 2), 1)
        out.append(table("Precisions on this CPU (ratio = step time / fp32; one torch thread)",
                         gemm, "fp32"))
    print("\n".join(out))


if __name__ == "__main__":
    main()
