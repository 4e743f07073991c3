"""The monitor's cost, side by side in one run: src.train with the monitor off, on with the
weights checked after every step (the old default), and on with the default (the weights
every `monitor.PARAMS_EVERY` steps, sync mode on CPU). Same model, batches, loss and
optimizer (experiments/bench_wrappers.py's fp32 CPU run, one torch thread), interleaved step
by step (bench_wrappers.run_round). Target: the default costs under 2% of a monitor-off step.

    python -m experiments.bench_monitor                  # 40 steps x 5 rounds (~5 min, 2 cores)
    python -m experiments.bench_monitor --steps 20 --rounds 3

Attention statistics are sampled every `monitor.every` (10) steps in both monitor-on
configs: keep `steps` a multiple of 10 (the lead wires this into `make bench`:
`print(bench_monitor.part(steps, rounds))`).
"""

from __future__ import annotations

import argparse
import statistics

from experiments import bench_wrappers as wrappers

OFF, EVERY, DEFAULT = (
    "monitor off",
    "monitor on, weights every step",
    "monitor on, default (weights every N)",
)
CONFIGS = {OFF: (["monitor.enabled=false"], None), EVERY: ([], 1), DEFAULT: ([], None)}
TARGET = 0.02  # the default's step time over monitor off's, minus 1


def _train(params_every: int | None):
    """bench_wrappers.train_src, with the monitor's weight-check interval set per run (a
    callback's setup hook runs before the monitor's on_train_start reads it)."""
    from lightning.pytorch.callbacks import Callback

    from nanlab.diagnosis.monitor import NanMonitor

    def train(spec, timing):
        class Every(Callback):
            def setup(self, trainer, pl_module, stage):
                for c in trainer.callbacks:
                    if isinstance(c, NanMonitor):
                        c.params_every = params_every

        class StepEnds(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                timing.step_end(trainer.global_step, outputs["loss"].detach())

        import tempfile

        _, run = wrappers.api()
        with tempfile.TemporaryDirectory() as tmp:
            rec = run(spec, tmp, extra_callbacks=[Every(), StepEnds()])
        if rec.status not in ("ok", "stalled"):
            raise SystemExit(f"bench_monitor: {rec.verdict()}")

    return train


def measure(steps: int = 40, rounds: int = 5, warmup: int = 3, log=print) -> dict:
    total = warmup + steps
    jobs = {
        name: (_train(every), wrappers.wrapper_spec(total, *o))
        for name, (o, every) in CONFIGS.items()
    }
    per_step: dict[str, list[float]] = {n: [] for n in CONFIGS}
    ratios: dict[str, list[float]] = {n: [] for n in CONFIGS}
    for r, order in enumerate(wrappers.orders(CONFIGS, rounds)):
        timings = wrappers.run_round({n: jobs[n] for n in order}, total)
        off = timings[OFF].per_step(warmup)
        for name in order:
            t = timings[name].per_step(warmup)
            per_step[name].append(t)
            ratios[name].append(t / off)
            log(f"  round {r + 1}/{rounds} {name}: {t:.4f} s/step")
    return {n: (statistics.median(per_step[n]), statistics.median(ratios[n])) for n in CONFIGS}


def part(steps: int = 40, rounds: int = 5) -> str:
    from nanlab.diagnosis import monitor

    res = measure(steps, rounds)
    lines = [
        (
            f"\nMonitor cost (fp32, CPU, 1 thread, interleaved; median of {rounds} rounds of "
            f"{steps} steps; cost = step time / monitor off's - 1, median of the rounds' "
            f"ratios; N = monitor.PARAMS_EVERY = {monitor.PARAMS_EVERY})"
        ),
        f"{'config':<40}{'s/step':>9}{'cost':>9}",
    ]
    for name, (t, ratio) in res.items():
        lines.append(f"{name:<40}{t:>9.4f}{ratio - 1:>+9.2%}")
    cost = res[DEFAULT][1] - 1
    lines.append(
        f"default monitor cost {cost:+.2%} (target < {TARGET:.0%}): "
        + ("PASS" if cost < TARGET else "MISS")
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(part(args.steps, args.rounds))


if __name__ == "__main__":
    main()
