"""`make bench`: costs measured side by side in one run, printed as ratios.

1. Wrappers (experiments/bench_wrappers.py): a bare PyTorch loop, `src.train` out of the
   box (fused AdamW, monitor on), with the monitor off and with foreach AdamW, and
   `transformers.Trainer` out of the box (its default optimizer) and given src.train's
   optimizer, training the same model on the same batches with the same loss (fp32, CPU,
   one thread); speeds as ratios to the bare loop, with PASS/MISS against the targets
   (src.train out of the box >= 1.1x Trainer out of the box; >= 0.98x the bare loop with
   the same optimizer; monitor on >= 0.98x monitor off). On a GPU also the monitor's
   host-sync cost (monitor.sync_every=1 vs auto); on CPU one line says it needs one.
2. The monitor: off, default (checks every step, attention statistics every 10 steps),
   and every attention statistic on every step.
3. Seconds per step for each precision, and half-precision matmuls on this CPU: native
   kernels vs fp32-accumulate (bf16).
Configs are interleaved step by step (each in its own thread, one running at a time) so
drift on a shared machine hits all alike. A step's time runs from the end of the step before
to its own end (all the work between steps counts); a config's time per step is the mean
over the steps after warm-up, and each figure is the median over rounds.

    python -m experiments.bench                  # all parts (~4 min on 2 cores)
    python -m experiments.bench --quick          # the wrapper table alone, < 2 min
    python -m experiments.bench --part monitor   # one part (wrapper, sync, monitor, precision)
    python -m experiments.bench --quick --keep-freed-memory   # without glibc's re-mapping
"""

from __future__ import annotations

import argparse
import statistics
import time

from experiments import bench_wrappers as wrappers

QUIET = ["logger=none", "trainer.progress=false", "serve.enabled=false"]
PARTS = ("wrapper", "sync", "monitor", "hf", "precision")
# (steps after warm-up, rounds) per part; --quick: the wrapper table in under two minutes
SIZES = {
    "wrapper": (40, 5),
    "sync": (160, 3),
    "monitor": (10, 3),
    "hf": (40, 3),
    "precision": (3, 1),
}
QUICK = {"wrapper": (10, 4), "sync": (160, 3)}


def measure(configs: dict[str, list[str]], steps: int, rounds: int, warmup: int = 2):
    """Median seconds per step of src.train for each config (Hydra overrides), the configs
    interleaved step by step (bench_wrappers.run_round)."""
    compose_spec, _ = wrappers.api()
    total = warmup + steps
    jobs = {
        name: (
            wrappers.train_src,
            compose_spec(*QUIET, *o, f"max_steps={total}", "data.num_train=64"),
        )
        for name, o in configs.items()
    }
    times: dict[str, list[float]] = {name: [] for name in configs}
    for r, order in enumerate(wrappers.orders(configs, rounds)):
        timings = wrappers.run_round({name: jobs[name] for name in order}, total)
        for name in order:
            times[name].append(timings[name].per_step(warmup))
            print(f"  round {r + 1}/{rounds} {name}: {times[name][-1]:.3f} s/step", flush=True)
    return {name: statistics.median(t) for name, t in times.items()}


def check_cost_ms(repeats: int = 20) -> float:
    """The monitor's fixed per-step work, timed alone on the tiny model: the gradient norm
    and the parameter check (the same _foreach_norm calls NanMonitor makes)."""
    import torch

    from nanlab.model.qwen_vl import build_model

    try:  # the specs' home (nanlab.model.qwen_vl before the split into config modules)
        from nanlab.config.specs import ModelSpec
    except ImportError:
        from nanlab.model.qwen_vl import ModelSpec
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


def wrapper_part(steps: int, rounds: int) -> str:
    res = wrappers.compare(steps, rounds, log=lambda s: print(s, flush=True))
    return wrappers.table(res, 3, steps)


def monitor_part(steps: int, rounds: int) -> str:
    """The monitor's cost: the table below, then, where experiments/bench_monitor.py is
    there (the monitor's own bench: off, weights checked every step, the default; its
    "default monitor cost < 2%" PASS/MISS line), its `part(steps, rounds)` at a multiple of
    10 steps (attention statistics every 10)."""
    try:
        from experiments import bench_monitor
    except ImportError:
        bench_monitor = None
    own = (
        bench_monitor.part(max(10, steps // 10 * 10), rounds)
        if bench_monitor is not None and hasattr(bench_monitor, "part")
        else ""
    )
    monitor = measure(
        {
            "monitor off": ["monitor.enabled=false"],
            "monitor default (every=10)": ["monitor.every=10"],
            "monitor all stats each step": ["monitor.every=1"],
        },
        steps,
        rounds,
    )
    ms = check_cost_ms()
    return "\n".join(
        [
            table(
                "Monitor cost (bf16, sdpa; ratio = step time / monitor off)", monitor, "monitor off"
            ),
            (
                f"per-step checks timed alone: {ms:.1f} ms = {ms / 10 / monitor['monitor off']:.2f}% "
                "of a monitor-off step (the end-to-end ratios above also carry this machine's noise)"
            ),
            own,
        ]
    )


def precision_part(steps: int, rounds: int) -> str:
    gemm = measure(
        {
            "fp32": ["precision=fp32", "monitor.every=0"],
            "bf16 fp32_accumulate": ["precision.half_gemm=fp32_accumulate", "monitor.every=0"],
            "bf16_true fp32_accumulate": ["precision=bf16_true", "monitor.every=0"],
            "fp16 fp32_accumulate": ["precision=fp16", "monitor.every=0"],
            "progressive (after switch)": [
                "precision=progressive",
                "precision.switch_step=0",
                "monitor.every=0",
            ],
            "bf16 native": ["precision.half_gemm=native", "monitor.every=0"],
        },
        steps,
        rounds,
    )
    return table(
        "Precisions on this CPU (ratio = step time / fp32; one torch thread)", gemm, "fp32"
    )


def hf_part(steps: int, rounds: int) -> str:
    """NanMonitorCallback's cost on a real transformers.Trainer against the same Trainer
    without it (experiments/bench_hf.py)."""
    from experiments import bench_hf

    return bench_hf.part(max(10, steps), rounds)


RUN = {
    "wrapper": wrapper_part,
    "sync": lambda s, r: wrappers.sync_cost(s, r),
    "monitor": monitor_part,
    "hf": hf_part,
    "precision": precision_part,
}


def keep_freed_memory() -> None:
    """Why: on this CPU a third of a tiny step's CPU time was the kernel mapping and unmapping
    the ~40 MB of gradients freed and re-allocated every step, and glibc's adaptive threshold
    made that cost drift between rounds (±20%). Raising the mmap and trim thresholds to
    glibc's maxima keeps freed blocks in the heap for every config alike."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 32 * 2**20) and libc.mallopt(m_trim_threshold, 2**30)
    print(f"allocator: freed memory kept for reuse ({'set' if ok else 'mallopt refused'})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", *PARTS), default="all")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the wrapper comparison (and, on a GPU, the sync cost) at a "
        "size that prints in under two minutes",
    )
    parser.add_argument("--steps", type=int, help="steps after warm-up (each part's default)")
    parser.add_argument("--rounds", type=int, help="rounds (each part's default)")
    parser.add_argument("--skip-gemm", action="store_true", help="leave out the precision part")
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc keeps freed memory for reuse (mallopt) in this process, so "
        "re-allocating every step's gradients stops costing kernel time: "
        "the wrappers' own cost without the allocator's noise",
    )
    args = parser.parse_args(argv)
    if args.keep_freed_memory:
        keep_freed_memory()
    parts = PARTS if args.part == "all" else (args.part,)
    if args.quick:
        parts = [p for p in parts if p in QUICK] or parts
    if args.skip_gemm:
        parts = [p for p in parts if p != "precision"]
    started, out = time.perf_counter(), []
    for part in parts:
        steps, rounds = (QUICK if args.quick and part in QUICK else SIZES)[part]
        print(f"{part}:", flush=True)
        out.append(RUN[part](args.steps or steps, args.rounds or rounds))
    print("\n".join(out))
    print(f"\n(bench wall time {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
