"""NanMonitorCallback's per-step cost on a real transformers.Trainer: the same Trainer
(experiments/hf_trainer.py: the tiny model, the project's data, loss, optimizer and
schedule; fp32, CPU, one torch thread) with and without the callback, interleaved step by
step in one run (experiments/bench_wrappers.run_round: each config in its own thread, one
step at a time, so both see the same load). Target: the callback within 3%.

    python -m experiments.bench_hf                   # 40 steps x 5 rounds
    python -m experiments.bench_hf --steps 20 --rounds 3

The lead wires it into `make bench`: `print(bench_hf.part(steps, rounds))`. Attention
statistics are sampled every 10 steps with the callback on: keep `steps` a multiple of 10.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from experiments import bench_wrappers as wrappers

OFF, ON = "Trainer", "Trainer + NanMonitorCallback"
TARGET = 0.03


def _job(monitor: bool):
    def train(spec_overrides, timing):
        from transformers import TrainerCallback

        from experiments.hf_trainer import train as train_hf

        class StepEnds(TrainerCallback):  # after the monitor's on_step_end
            def on_step_end(self, args, state, control, **kwargs):
                timing.step_end(state.global_step, 0.0)

        with tempfile.TemporaryDirectory() as tmp:
            train_hf(spec_overrides, tmp, callbacks=[StepEnds()], verbose=False, monitor=monitor)

    return train


def measure(
    steps: int = 40, rounds: int = 5, warmup: int = 3, log=print, extra: tuple = ()
) -> dict:
    total = warmup + steps
    compose_spec, _ = wrappers.api()
    batch = compose_spec(*wrappers.BASE).batch_size
    overrides = [*wrappers.BASE, f"max_steps={total}", f"data.num_train={total * batch}", *extra]
    jobs = {OFF: (_job(False), overrides), ON: (_job(True), overrides)}
    per_step = {n: [] for n in jobs}
    ratios = []
    for r, order in enumerate(wrappers.orders(jobs, rounds)):
        timings = wrappers.run_round({n: jobs[n] for n in order}, total)
        for n in order:
            per_step[n].append(timings[n].per_step(warmup))
            log(f"  round {r + 1}/{rounds} {n}: {per_step[n][-1]:.4f} s/step")
        ratios.append(per_step[ON][-1] / per_step[OFF][-1])
    return {
        "s/step": {n: statistics.median(t) for n, t in per_step.items()},
        "cost": statistics.median(ratios) - 1,
    }


def part(steps: int = 40, rounds: int = 5, extra: tuple = ()) -> str:
    res = measure(steps, rounds, extra=extra)
    lines = [
        (
            f"\nNanMonitorCallback on transformers.Trainer (fp32, CPU, 1 thread, interleaved; "
            f"median of {rounds} rounds of {steps} steps{', ' + ' '.join(extra) if extra else ''})"
        ),
        f"{'config':<34}{'s/step':>9}",
    ]
    lines += [f"{n:<34}{t:>9.4f}" for n, t in res["s/step"].items()]
    lines.append(
        f"callback cost {res['cost']:+.2%} (target within {TARGET:.0%}): "
        + ("PASS" if res["cost"] <= TARGET else "MISS")
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("overrides", nargs="*", help="extra overrides, e.g. monitor.every=0")
    args = ap.parse_args()
    print(part(args.steps, args.rounds, tuple(args.overrides)))


if __name__ == "__main__":
    main()
