"""The wrapper comparison of `make bench`: one training job, six ways to run it.

- bare loop: a plain PyTorch loop (forward, backward, clip, AdamW step, schedule step);
- src.train, monitor off / monitor on (the default run, out of the box): `src.train.run`
  through Lightning, and src.train with `optim.impl=foreach` (the default before fused);
- transformers.Trainer out of the box: a real `Trainer` with `TrainingArguments`, its own
  loop and its own default optimizer and schedule (`adamw_torch_fused` on torch >= 2.8);
- transformers.Trainer given src.train's optimizer and schedule (the same-optimizer pairing).

All train the same tiny model (the same init and seed), on the same batches in the same
order (the datamodule's dataloader: its sampler and collator, collated on the fly in every
config), with the same loss (`NanLabModule.compute_loss`), the same optimizer and schedule
(`NanLabModule.configure_optimizers`: fused AdamW, lr, eps, betas, weight decay, the cosine
schedule; Trainer's own: the same hyperparameters) and the same gradient-norm clip; fp32 on
the CPU, one torch thread, no logger, no progress bar. The loss at the last step must agree
across all, or the comparison is not of the same computation (the table says so).

A step's time runs from the end of the step before to its own end, so everything a wrapper
does between steps counts (the dataloader, callbacks, logging bookkeeping, and periodic work
such as the monitor's attention statistics every 10 steps: keep `steps` a multiple of 10).
The ends are stamped by a Lightning callback (src.train), a `TrainerCallback`
(transformers.Trainer) and the loop itself (bare). Seconds per step = the mean over the
steps after `warmup`.

Interleaved step by step: each config trains in its own thread, and only one runs at a time,
handing over to the next after every step (a baton passed at the step-end stamp; setup and
teardown happen in a thread's turn too). So the four see the same load on a shared machine
within a second of each other, where whole runs in turn drift apart by +-20% here. Rounds
vary the order. Seconds per step: the median over rounds; ratios: the median over rounds of
each round's ratio (side by side, under one load). Every stamp also reads this process's
CPU time, shown next to wall time: it leaves out time other jobs hold the core.
"""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field

warnings.filterwarnings("ignore", message=".*`srun` command is available.*")  # Lightning

BARE, OFF, ON, FOREACH, HF_OOB, HF_OWN, HF = (
    "bare loop",
    "src.train monitor off",
    "src.train (default)",
    "src.train foreach AdamW",
    "Trainer (out of the box)",
    "Trainer default optimizer",
    "Trainer, same optimizer",
)
CONFIGS = (BARE, OFF, ON, FOREACH, HF_OOB, HF_OWN, HF)
# (label, numerator, denominator, target or None: the number only): speed ratios (steps/s
# over steps/s). ON is src.train out of the box (fused AdamW, the monitor on); BARE and HF
# train with the optimizer src.train builds.
# HF_OOB is Trainer as a user gets it: its default optimizer (adamw_torch_fused) and the
# model's own loss (labels in the batch: logits at every position through the 151,936-way
# lm_head); src.train computes logits only where a label is supervised (nanlab/loss.py),
# which is the same mean cross-entropy and most of the difference.
TARGETS = (
    ("src.train default / Trainer out of the box", ON, HF_OOB, 1.1),
    ("src.train default / Trainer default optimizer, same loss", ON, HF_OWN, None),
    ("src.train default / bare loop (same optimizer)", ON, BARE, 0.98),
    # The monitor's own cost: experiments/bench_monitor.py (the monitor's engineer)
    # measures it at more steps; this row is the same ratio inside this table.
    ("monitor on / monitor off", ON, OFF, 0.98),
    ("src.train default / Trainer same optimizer", ON, HF, None),
    ("fused AdamW / foreach AdamW (src.train)", ON, FOREACH, None),
)
# A plain fp32 CPU run; serving, val/test splits and checkpoints come after training or not
# at all: left out so the rounds cost less, the same for all four.
BASE = [
    "precision=fp32",
    "logger=none",
    "trainer.progress=false",
    "trainer.accelerator=cpu",
    "trainer.cpu_threads=1",
    "serve.enabled=false",
    "save.checkpoint=false",
    "data.num_val=0",
    "data.num_test=0",
]


def api():
    """(compose_spec, run), imported on first use: torch loads with them."""
    from nanlab.config.compose import compose_spec
    from nanlab.run.runner import run

    return compose_spec, run


def stamp() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()  # (wall, this process's CPU time)


class Baton:
    """Threads in a ring, one running at a time; each hands over after every step."""

    def __init__(self, names):
        self.ring, self.turn, self.cond = list(names), 0, threading.Condition()

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.ring[self.turn] == name)

    def hand_over(self, name: str, leave: bool = False) -> None:
        with self.cond:
            i = self.ring.index(name)
            if leave:
                self.ring.pop(i)
                self.turn = i % len(self.ring) if self.ring else 0
            else:
                self.turn = (i + 1) % len(self.ring)
            self.cond.notify_all()


@dataclass
class Timing:
    """Step k ran from starts[k] (the end of step k-1, or the thread's next turn after it)
    to ends[k]. `sync` (CUDA) makes the stamps at the window's edges wait for the device."""

    name: str
    steps: int  # the run's last step: no hand-over there
    baton: Baton | None = None
    edges: tuple = ()
    sync: object = None
    starts: dict[int, tuple] = field(default_factory=dict)
    ends: dict[int, tuple] = field(default_factory=dict)
    losses: list = field(default_factory=list)  # loss tensors, detached

    def step_end(self, k: int, loss) -> None:
        if self.sync is not None and k in self.edges:
            self.sync()
        self.losses.append(loss)
        self.ends[k] = stamp()
        if self.baton is not None and k < self.steps:
            self.baton.hand_over(self.name)
            self.baton.wait(self.name)
        self.starts[k + 1] = stamp()

    def times(self, warmup: int) -> list[tuple]:
        """(wall, CPU) seconds of each step after warm-up."""
        return [
            tuple(e - s for e, s in zip(self.ends[k], self.starts[k]))
            for k in range(warmup + 1, self.steps + 1)
        ]

    def per_step(self, warmup: int, clock: int = 0) -> float:
        """Mean seconds per step over steps warmup+1..steps; clock 0 wall, 1 CPU."""
        return statistics.fmean(t[clock] for t in self.times(warmup))


def wrapper_spec(total: int, *extra: str):
    """The run every config trains: `total` steps, all in one epoch of the data."""
    compose_spec, _ = api()
    batch_size = compose_spec(*BASE, *extra).batch_size
    return compose_spec(*BASE, f"max_steps={total}", f"data.num_train={total * batch_size}", *extra)


def _parts(spec):
    """What the bare loop and transformers.Trainer train, built as `src.train.run` builds it."""
    import lightning as L
    import torch

    from nanlab.data.datamodule import NanDataModule
    from nanlab.model.processing import load_processor
    from nanlab.model.qwen_vl import build_model
    from nanlab.numerics import attention, stress
    from nanlab.run.module import NanLabModule

    L.seed_everything(spec.seed, workers=True, verbose=False)
    torch.set_num_threads(spec.trainer.cpu_threads)
    try:  # the runner's own build path, where there is one
        from nanlab.run.build import build_parts
    except ImportError:
        processor = load_processor(spec.data.processor_spec(), spec.model.path)
        model = build_model(spec.model, spec.seed)
        attention.apply(model, spec.softmax, spec.stress.mask)
        transform = stress.batch_transform(spec.stress, processor.tokenizer.pad_token_id)
    else:
        parts = build_parts(
            spec.model, spec.data, spec.softmax, spec.stress, spec.precision, spec.seed, "cpu"
        )
        processor, model, transform = parts.processor, parts.model, parts.batch_transform
    data = NanDataModule(spec.data, processor, spec.batch_size, spec.seed)
    data.setup("fit")
    module = NanLabModule(model, spec.optim, stress.lr_multiplier(spec.stress), transform)
    conf = module.configure_optimizers()
    return data, module, conf["optimizer"], conf["lr_scheduler"]["scheduler"]


def train_bare(spec, timing: Timing) -> None:
    import torch

    data, module, optimizer, scheduler = _parts(spec)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    module.train()
    for step, batch in enumerate(data.train_dataloader(), 1):
        loss = module.compute_loss(batch)
        loss.backward()
        if spec.optim.clip:
            torch.nn.utils.clip_grad_norm_(params, spec.optim.clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        timing.step_end(step, loss.detach())
        if step == spec.optim.max_steps:
            break


def train_src(spec, timing: Timing) -> None:
    import lightning
    from lightning.pytorch.callbacks import Callback

    class StepEnds(Callback):  # last in the callback list: after the monitor's own hooks
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            timing.step_end(trainer.global_step, outputs["loss"].detach())

    _, run = api()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # "GPU available: False", tips
    assert lightning  # imported first: it sets its loggers' levels on import
    with tempfile.TemporaryDirectory() as tmp:
        rec = run(spec, tmp, extra_callbacks=[StepEnds()])
    if rec.status not in ("ok", "stalled"):  # stalled: few steps, or no loss history kept
        raise SystemExit(f"src.train: {rec.verdict()}")


def train_hf(spec, timing: Timing, own_optimizer: bool = False, own_loss: bool = False) -> None:
    """transformers.Trainer given src.train's optimizer and schedule, or (own_optimizer)
    its out-of-the-box ones from the same hyperparameters; src.train's loss, or (own_loss)
    the model's own (Trainer's default compute_loss: model(**inputs).loss)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    data, module, optimizer, scheduler = _parts(spec)
    if own_optimizer:
        optimizer = scheduler = None
    o, losses = spec.optim, []

    class SameBatchesSameLoss(Trainer):
        loss_is_scaled_for_ga = False  # a per-batch mean, as in the other three

        def _get_train_sampler(self, train_dataset=None):
            return data.train_dataloader().sampler  # the datamodule's order (EpochSampler)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            assert model is module.model  # one model, no wrapper on one CPU process
            if own_loss:  # the model's loss; sample_ids are the collator's, not the model's
                inputs = {k: v for k, v in inputs.items() if k != "sample_ids"}
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            else:
                loss = module.compute_loss(inputs)
            losses.append(loss.detach())
            return loss

    class StepEnds(TrainerCallback):  # on_step_end: after clip, step, schedule, zero_grad
        def on_step_end(self, args, state, control, **kwargs):
            timing.step_end(state.global_step, losses[-1])

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=o.max_steps,
            per_device_train_batch_size=spec.batch_size,
            learning_rate=o.lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.betas[0],
            adam_beta2=o.betas[1],
            adam_epsilon=o.eps,
            max_grad_norm=o.clip,
            lr_scheduler_type="cosine",
            warmup_steps=o.warmup_steps,
            seed=spec.seed,
            data_seed=spec.seed,
            use_cpu=True,
            report_to="none",
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=spec.data.num_workers,
            dataloader_drop_last=True,
            dataloader_pin_memory=False,
            remove_unused_columns=False,
        )
        trainer = SameBatchesSameLoss(
            model=module.model,
            args=args,
            train_dataset=data.train,
            data_collator=data.collate,
            optimizers=(optimizer, scheduler),
            callbacks=[StepEnds()],
        )
        trainer.remove_callback(PrinterCallback)  # the end-of-training summary line
        trainer.train()


def train_hf_own(spec, timing: Timing) -> None:
    train_hf(spec, timing, own_optimizer=True)


def train_hf_oob(spec, timing: Timing) -> None:
    train_hf(spec, timing, own_optimizer=True, own_loss=True)


RUNNERS = {
    BARE: (train_bare, ()),
    OFF: (train_src, ("monitor.enabled=false",)),
    ON: (train_src, ()),
    FOREACH: (train_src, ("optim.impl=foreach",)),
    HF_OOB: (train_hf_oob, ()),
    HF_OWN: (train_hf_own, ()),
    HF: (train_hf, ()),
}


def run_round(
    jobs: dict[str, tuple], total: int, interleave: bool = True, **timing_kw
) -> dict[str, Timing]:
    """Train each job (name -> (train function, spec)) for `total` steps: step by step in
    turn, in the order given (interleave), or one whole run after another."""
    baton = Baton(jobs) if interleave else None
    timings = {name: Timing(name, total, baton, **timing_kw) for name in jobs}
    errors: list[BaseException] = []

    def body(name):
        try:
            if baton is not None:
                baton.wait(name)
            jobs[name][0](jobs[name][1], timings[name])
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors.append(e)
        finally:
            if baton is not None:
                baton.hand_over(name, leave=True)

    if interleave:
        threads = [threading.Thread(target=body, args=(n,), name=n) for n in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for name in jobs:
            body(name)
    if errors:
        raise errors[0]
    return timings


def orders(names, rounds: int):
    """Round r: the configs rotated by r, every other round reversed (each config follows
    a different one)."""
    names = list(names)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        yield order[::-1] if r % 2 else order


@dataclass
class Result:
    per_step: dict[str, list[tuple]]  # config -> (wall, CPU) seconds per step, one a round
    last_loss: dict[str, float]

    def median(self, name: str, clock: int = 0) -> float:
        return statistics.median(t[clock] for t in self.per_step[name])

    def speed(self, num: str, den: str, clock: int = 0) -> float:
        """steps/s of `num` over steps/s of `den`: the median over rounds of each round's
        ratio (the configs of a round ran side by side, under the same load)."""
        return statistics.median(
            d[clock] / n[clock] for n, d in zip(self.per_step[num], self.per_step[den])
        )


def compare(steps: int, rounds: int, warmup: int = 3, configs=CONFIGS, log=print) -> Result:
    total = warmup + steps
    jobs = {name: (RUNNERS[name][0], wrapper_spec(total, *RUNNERS[name][1])) for name in configs}
    res = Result({name: [] for name in configs}, {})
    for r, order in enumerate(orders(configs, rounds)):
        timings = run_round({name: jobs[name] for name in order}, total)
        for name in order:
            t = timings[name]
            res.per_step[name].append((t.per_step(warmup), t.per_step(warmup, 1)))
            res.last_loss[name] = float(t.losses[-1])
            log(
                f"  round {r + 1}/{rounds} {name}: {res.per_step[name][-1][0]:.3f} s/step "
                f"wall, {res.per_step[name][-1][1]:.3f} CPU; loss at step {total} "
                f"{res.last_loss[name]:.6f}"
            )
    return res


def table(res: Result, warmup: int, steps: int) -> str:
    names = list(res.per_step)
    rounds = len(res.per_step[names[0]])
    lines = [
        (
            f"\nWrappers (fp32, CPU, 1 torch thread, interleaved step by step; median of "
            f"{rounds} round(s) of {steps} steps after {warmup} warm-up)"
        ),
        (
            "s/step: median over rounds; speed: steps/s over the bare loop's, median of the "
            "rounds' ratios; spread: half the range of s/step over rounds; CPU: this "
            "process's CPU time"
        ),
        (
            f"{'config':<24}{'s/step':>8}{'steps/s':>9}{'speed':>8}{'spread':>8}"
            f"{'CPU s/step':>12}{'CPU speed':>11}"
        ),
    ]
    for name in names:
        t, walls = res.median(name), [w for w, _ in res.per_step[name]]
        spread = (max(walls) - min(walls)) / 2 / t
        lines.append(
            f"{name:<24}{t:>8.3f}{1 / t:>9.2f}{res.speed(name, BARE):>7.3f}x"
            f"{spread:>8.1%}{res.median(name, 1):>12.3f}"
            f"{res.speed(name, BARE, 1):>10.3f}x"
        )
    lines += ["", f"{'target (speed ratio)':<58}{'needs':>7}{'wall':>9}{'CPU':>14}"]
    for label, num, den, target in TARGETS:
        if num in names and den in names:
            cells = []
            for clock in (0, 1):
                ratio = res.speed(num, den, clock)
                verdict = "" if target is None else "PASS" if ratio >= target else "MISS"
                cells.append(f"{ratio:>8.3f}x {verdict:<4}")
            needs = f"{target:>6.2f}x" if target is not None else f"{'-':>7}"
            lines.append(f"{label:<58}{needs}{cells[0]}{cells[1]}".rstrip())
    losses = list(res.last_loss.values())
    gap = max(losses) - min(losses) if all(math.isfinite(x) for x in losses) else math.nan
    same = gap <= 1e-4 * max(abs(x) for x in losses) if math.isfinite(gap) else False
    lines.append(
        f"loss at the last step: {min(losses):.6f} .. {max(losses):.6f} "
        + (
            "(the same computation in all configs)"
            if same
            else "DIFFERENT: the configs do not train the same way; the ratios compare "
            "different work"
        )
    )
    return "\n".join(lines)


# --- GPU only: what the monitor's host reads cost --------------------------------------------


def sync_cost(steps: int, rounds: int, warmup: int = 3, log=print) -> str:
    """On CUDA: monitor on with the host reading its checks every step vs the default
    (auto), and monitor off; default precision (bf16 autocast), as a user runs it. Whole
    runs in turn (step-by-step turns would drain the device queue the sync setting is
    about); the stamps at the window's edges wait for the device."""
    import torch

    if not torch.cuda.is_available():
        return "\nMonitor host-sync cost: needs a GPU (torch.cuda.is_available() is false); skipped"
    compose_spec, _ = api()
    total = warmup + steps
    common = [
        "logger=none",
        "trainer.progress=false",
        "serve.enabled=false",
        f"max_steps={total}",
        f"data.num_train={total * 4}",
        "batch_size=4",
    ]
    configs = {
        "monitor off": ["monitor.enabled=false"],
        "monitor on (sync_every auto)": [],
        "monitor on (sync_every=1)": ["monitor.sync_every=1"],
    }
    try:
        jobs = {n: (train_src, compose_spec(*common, *o)) for n, o in configs.items()}
    except ValueError as e:
        return f"\nMonitor host-sync cost: skipped ({e})"
    per_step: dict[str, list[float]] = {n: [] for n in configs}
    for r, order in enumerate(orders(configs, rounds)):
        timings = run_round(
            {n: jobs[n] for n in order},
            total,
            interleave=False,
            edges=(warmup, total),
            sync=torch.cuda.synchronize,
        )
        for name in order:
            per_step[name].append(timings[name].per_step(warmup))
            log(f"  round {r + 1}/{rounds} {name}: {per_step[name][-1] * 1000:.2f} ms/step")
    med = {n: statistics.median(t) for n, t in per_step.items()}
    lines = [
        (
            f"\nMonitor host-sync cost on {torch.cuda.get_device_name()} (bf16; speed = "
            "steps/s / monitor off's)"
        ),
        f"{'config':<32}{'ms/step':>9}{'speed':>8}",
    ]
    lines += [f"{n:<32}{t * 1000:>9.2f}{med['monitor off'] / t:>7.3f}x" for n, t in med.items()]
    ratio = med["monitor on (sync_every auto)"] / med["monitor on (sync_every=1)"]
    lines.append(f"sync_every=1 runs at {ratio:.3f}x the speed of the default (auto)")
    return "\n".join(lines)
