"""Every setting of a run and of the probe, with its default and its allowed values: the one
place they live. No torch here, so a bad option is refused in a fraction of a second.

The YAMLs under conf/ list only what differs from these defaults: `compose.py` registers
`RunConfig` and `ProbeConfig` below as the schemas `conf/config.yaml` and `conf/probe.yaml`
start from (Hydra structured configs), and the modules that use a spec import it from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from nanlab.config.options import DATA, GUARD, MODEL, PRECISION, SOFTMAX, STRESS

# --- the option lists of the keys that are not an axis ----------------------------------------
# The axes' options (precision, softmax, stress, guard, data, model) are the registries of
# nanlab/config/options.py, which the checks below, the CLI check and the dispatch all read.
# How the 4D mask is built: transformers' own (one float-min plane, or sdpa's boolean mask),
# or the sum of a causal plane and query- and key-padding planes of float-min, which is
# -inf wherever two planes meet (stress=masked_rows, grad_poison).
MASKS = ("transformers", "summed_planes")
HALF_GEMMS = ("auto", "fp32_accumulate", "native")
OPTIMIZERS = ("adamw", "stable_adamw")
SERVE_PRECISIONS = ("bf16", "fp16", "fp32", "bf16_autocast")
PADDING_SIDES = ("left", "right")
TASKS = ("shape", "colour", "position", "caption")  # shapes' question kinds
INITS = ("random", "base")
LOGGERS = ("wandb", "csv", "none")
LOGGER_MODES = ("offline", "online")
SPLITS = ("train", "val", "test")
DEVICES = ("auto", "cpu", "cuda")


def _one_of(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value}: allowed {', '.join(map(str, allowed))}")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --- the groups (one conf/ folder each) --------------------------------------------------------


@dataclass
class LoraSpec:
    r: int = 0  # 0 turns LoRA off; > 0 wraps the model with a peft LoRA adapter
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )


@dataclass
class ModelSpec:
    name: str = "tiny"
    path: str | None = None  # a local directory: loads from_pretrained instead of building
    init: str = "random"  # tiny only: random | base (the project's pretrained tiny base)
    base_steps: int = 300  # init=base: pretraining steps of the base (nanlab/model/base.py)
    ref_lr: float | None = None  # the reference fine-tuning lr: records give lr_x = lr / ref_lr
    # tiny-model sizes (ignored when loading a checkpoint)
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vision_hidden_size: int = 64
    vision_depth: int = 2
    vision_heads: int = 2
    vision_intermediate_size: int = 128
    window_size: int = 56  # vision window in pixels (112 in the real models)
    fullatt_block_indexes: list[int] | None = None  # default: the last vision block
    mrope_section: list[int] | None = None  # default: split from the head size
    # architecture change (Dehghani et al. 2023; Wortsman et al. 2023): per-head RMSNorm on q
    # and k before RoPE, both towers; needs a base pretrained with it (built and cached apart)
    qk_norm: bool = False
    freeze_vision: bool = False
    freeze_merger: bool = False
    freeze_llm: bool = False
    vision_lr: float | None = None
    lora: LoraSpec = field(default_factory=LoraSpec)

    def check(self) -> None:
        MODEL.check(self.name)
        _one_of("model.init", self.init, INITS)


@dataclass
class ProcessorSpec:
    min_pixels: int = 56 * 56
    max_pixels: int = 56 * 56
    normalize: bool = True  # False feeds raw 0-255 pixels: the "data preprocessing" factor


@dataclass
class DataSpec:
    name: str = "shapes"  # shapes | jsonl
    num_train: int = 512  # shapes only: split sizes
    num_val: int = 64
    num_test: int = 64
    image_size: int = 56  # shapes only: 56x56 -> 4 image tokens
    train_file: str | None = None  # jsonl only: .jsonl (one object a line) or .json (a list)
    val_file: str | None = None
    test_file: str | None = None
    image_root: str | None = None  # image paths are relative to this (default: the file's dir)
    skip_bad: bool = False  # skip and count bad records instead of raising
    padding_side: str = "right"  # left | right
    normalize: bool = True  # False feeds raw pixels (0..pixel_max) to the vision tower
    pixel_max: int = 255  # normalize=false: 255 (8-bit) or 65535 (16-bit files)
    max_length: int | None = None  # truncate each sequence to this many tokens (a cutoff_len)
    tasks: list[str] | None = None  # shapes only: question kinds (default: shape, colour,
    #                                   position; the tiny base is pretrained on captions)
    min_pixels: int = 3136  # 56*56: 4 image tokens per image
    max_pixels: int = 3136
    num_workers: int = 0

    def check(self) -> None:
        DATA.check(self.name)
        _one_of("data.padding_side", self.padding_side, PADDING_SIDES)
        if self.name == "jsonl" and not self.train_file:
            raise ValueError(f"data.train_file={self.train_file}: data=jsonl needs data.train_file")
        for key in ("num_train", "image_size", "min_pixels", "max_pixels"):
            if getattr(self, key) < 1:
                raise ValueError(f"data.{key}={getattr(self, key)}: must be >= 1")
        for key in ("num_val", "num_test", "num_workers"):
            if getattr(self, key) < 0:
                raise ValueError(f"data.{key}={getattr(self, key)}: must be >= 0")
        for task in self.tasks or ():
            _one_of("data.tasks", task, TASKS)
        _one_of("data.pixel_max", self.pixel_max, (255, 65535))
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"data.max_length={self.max_length}: must be >= 1 (or null)")
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"data.min_pixels={self.min_pixels}: must be <= data.max_pixels={self.max_pixels}"
            )

    def processor_spec(self) -> ProcessorSpec:
        return ProcessorSpec(
            min_pixels=self.min_pixels, max_pixels=self.max_pixels, normalize=self.normalize
        )


@dataclass
class PrecisionSpec:
    name: str = "bf16"
    switch_step: int = 20  # progressive only: fp32 steps before bf16
    half_gemm: str = "auto"  # auto: fp32_accumulate on CPUs without native half GEMM

    def check(self) -> None:
        PRECISION.check(self.name)
        _one_of("precision.half_gemm", self.half_gemm, HALF_GEMMS)
        if self.switch_step < 0:
            raise ValueError(f"precision.switch_step={self.switch_step}: must be >= 0")


@dataclass
class SoftmaxSpec:
    name: str = "sdpa"
    cap: float = 50.0  # softcap only: logits become cap * tanh(logits / cap)

    def check(self) -> None:
        SOFTMAX.check(self.name)


@dataclass
class StressSpec:
    name: str = "none"
    # the study's data (conf/stress/<name>.yaml); the map and the report read them
    mechanism: str = ""
    reference: str = ""
    cause: Any = None  # what the monitor records when it fires (a name or a list)
    baseline: list[str] = field(default_factory=list)  # overrides under which it fails
    predictions: list[dict] = field(default_factory=list)  # {advice, mitigation, effect, why}
    judged_on: str = "training"  # or "test": the run's test pass (serve.*) shows the failure
    # the baseline with the mechanism's trigger removed (overrides on top of `baseline`); the
    # map runs it and counts the mechanism only if it does not fail with `cause`
    control: list[str] = field(default_factory=list)
    # the mechanisms' parameters
    target_logit: float = 60.0  # logit_growth
    token: str = "<|im_start|>"  # fp16_overflow: the token that carries the massive activation
    magnitude: float = 1e5  # fp16_overflow: above fp16's 65,504, far below bf16's max
    channels: int = 2  # fp16_overflow
    mask: str = "transformers"  # masked_rows, grad_poison: summed_planes
    pad: int = 6  # grad_poison: extra left padding of one sample ...
    every: int = 4  # ... every this many batches
    factor: float = 30.0  # lr_spike
    at: int = 8  # lr_spike
    length: int = 3  # lr_spike

    def check(self) -> None:
        STRESS.check(self.name)
        _one_of("stress.mask", self.mask, MASKS)
        _one_of("stress.judged_on", self.judged_on, ("training", "test"))


@dataclass
class GuardSpec:
    name: str = "none"

    def check(self) -> None:
        GUARD.check(self.name)


@dataclass
class MonitorSpec:
    enabled: bool = True
    every: int = 10  # attention statistics every N steps (0: never)
    check_params: bool = True  # parameters finite after every optimizer step
    locate: bool = True  # replay the failing step to find the first bad module
    diverge_factor: float = 4.0  # diverged: loss > factor x running min ...
    patience: int = 5  # ... for this many steps in a row
    spike_factor: float = 2.0  # a spike: loss > factor x its moving average
    max_skipped_in_row: int = 10  # fp16 loss scaler or guard=skip_step: this many skipped
    #                               steps in a row is a failure
    train_margin: float = 0.1  # ok needs final loss < initial loss x (1 - margin), else stalled
    sync_every: int = 0  # the host reads the device-side checks every N steps (0:
    #                              auto: 1 on CPU, where reading costs nothing; 32 on CUDA
    #                              where the snapshot of deferred.py fits, else 1)

    def check(self) -> None:
        if self.sync_every < 0:
            raise ValueError(f"monitor.sync_every={self.sync_every}: must be >= 0 (0: auto)")


@dataclass
class OptimSpec:
    lr: float = 1e-3  # the tiny model's fine-tuning needs a large lr (or lr_x=...)
    warmup_steps: int = 0
    clip: float = 1.0  # gradient-norm clip; 0 turns it off (the Trainer applies it)
    max_steps: int = 200
    weight_decay: float = 0.0
    vision_lr: float | None = None
    name: str = "adamw"  # adamw | stable_adamw: AdamW with update clipping, each tensor's
    #                            step divided by max(1, sqrt(mean(g^2 / v_hat))) (Wortsman 2023)
    eps: float = 1e-8  # AdamW's epsilon (torch's default; 1e-6 in some recipes)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # [0.9, 0.95] vs spikes
    z_loss: float = 0.0  # PaLM's z-loss coefficient (1e-4 there); 0 = off
    impl: str = "fused"  # torch AdamW's kernel: fused | foreach (fp16's scaler: foreach)

    def check(self) -> None:
        _one_of("optim.name", self.name, OPTIMIZERS)
        _one_of("optim.impl", self.impl, ("fused", "foreach"))
        rules = [
            (not (_number(self.lr) and self.lr > 0), f"lr={self.lr}: must be a positive number"),
            (self.warmup_steps < 0, f"warmup_steps={self.warmup_steps}: must be >= 0"),
            (self.clip < 0, f"clip={self.clip}: must be >= 0 (0 turns clipping off)"),
            (self.max_steps <= 0, f"max_steps={self.max_steps}: must be > 0"),
            (
                not (_number(self.eps) and self.eps > 0),
                f"optim.eps={self.eps}: must be a positive number",
            ),
            (
                not (_number(self.z_loss) and self.z_loss >= 0),
                f"optim.z_loss={self.z_loss}: must be a number >= 0 (0 turns it off)",
            ),
        ]
        betas = list(self.betas) if isinstance(self.betas, (list, tuple)) else None
        rules.append(
            (
                not (betas and len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas)),
                f"optim.betas={self.betas}: must be two numbers in [0, 1), e.g. [0.9,0.95]",
            )
        )
        for bad, message in rules:
            if bad:
                raise ValueError(message)


@dataclass
class OptimSwitches:
    """conf/config.yaml's `optim:` node: the optimizer's switches. lr, warmup_steps, clip,
    max_steps and weight_decay are top-level keys (lr=... on the command line)."""

    name: str = OptimSpec.name
    eps: float = OptimSpec.eps
    betas: list[float] = field(default_factory=lambda: list(OptimSpec().betas))
    z_loss: float = OptimSpec.z_loss
    impl: str = OptimSpec.impl


@dataclass
class ServeSpec:
    enabled: bool = True  # after a run that stayed finite: scan the test split
    precision: str = "bf16"  # the weights' dtype (bf16 | fp16 | fp32), or bf16_autocast
    padding_side: str = "left"  # batched generation pads on the left
    batch_size: int = 8

    def check(self) -> None:
        _one_of("serve.precision", self.precision, SERVE_PRECISIONS)
        _one_of("serve.padding_side", self.padding_side, PADDING_SIDES)
        if self.batch_size < 1:
            raise ValueError(f"serve.batch_size={self.batch_size}: must be >= 1")


@dataclass
class LoggerSpec:
    name: str = "wandb"  # wandb | csv | none
    mode: str = "offline"  # wandb only: offline | online (needs an account and network)
    project: str = "nanlab"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)

    def check(self) -> None:
        _one_of("logger", self.name, LOGGERS)
        _one_of("logger.mode", self.mode, LOGGER_MODES)


@dataclass
class TrainerSpec:
    accelerator: str = "auto"  # cpu here; cuda where there is a GPU
    devices: Any = 1
    strategy: str = "auto"  # ddp / fsdp pass through for real-size models
    val_every: int = 0  # validate every N steps (0: never)
    progress: bool = True  # Lightning's progress bar (multirun cells never show it)
    verbose: bool = False  # multirun: keep Lightning's banners and warnings per cell
    log_every: int = 1
    cpu_threads: int = 1  # one thread: on 2 shared cores, OpenMP's second thread made
    #                              steps 3x slower; run cells side by side instead (joblib)


@dataclass
class SaveSpec:
    checkpoint: bool = False  # Lightning checkpoint (last.ckpt) for resuming
    hf: bool = False  # save_pretrained (safetensors) + tokenizer + processor at the end
    lora_merged: bool = True


# --- the entry points' configs ----------------------------------------------------------------


@dataclass
class Groups:
    """The config groups (one conf/ folder and one spec each) a run is made of."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    precision: PrecisionSpec = field(default_factory=PrecisionSpec)
    softmax: SoftmaxSpec = field(default_factory=SoftmaxSpec)
    stress: StressSpec = field(default_factory=StressSpec)
    guard: GuardSpec = field(default_factory=GuardSpec)
    monitor: MonitorSpec = field(default_factory=MonitorSpec)
    logger: LoggerSpec = field(default_factory=LoggerSpec)
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    serve: ServeSpec = field(default_factory=ServeSpec)
    save: SaveSpec = field(default_factory=SaveSpec)
    batch_size: int = 4
    seed: int = 0
    ckpt_path: str | None = None  # resume from a Lightning checkpoint


@dataclass
class RunConfig(Groups):
    """The schema of conf/config.yaml: `python -m src.train` composes its groups onto this.
    The optimizer's numbers are top-level keys (lr=1e-5), its switches under `optim.`."""

    optim: OptimSwitches = field(default_factory=OptimSwitches)
    lr: float = OptimSpec.lr
    lr_x: float | None = None  # set: lr = lr_x * model.ref_lr (the lr on the real model's scale)
    warmup_steps: int = OptimSpec.warmup_steps
    clip: float = OptimSpec.clip
    max_steps: int = OptimSpec.max_steps
    weight_decay: float = OptimSpec.weight_decay
    force: bool = False  # rerun a sweep cell whose record already exists


@dataclass
class RunSpec(Groups):
    """One run, resolved and checked: what nanlab.run.runner.run executes."""

    optim: OptimSpec = field(default_factory=OptimSpec)
    config_hash: str = ""
    cell: str = ""  # config_hash without the seed: the report's cell identity
    overrides: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)  # the resolved config, for W&B and the record
    multirun: bool = False  # one cell of a sweep: one line of output, not Lightning's

    def check(self) -> None:
        for part in (
            self.model,
            self.data,
            self.precision,
            self.softmax,
            self.stress,
            self.guard,
            self.monitor,
            self.optim,
            self.logger,
            self.serve,
        ):
            part.check()
        if self.batch_size <= 0:
            raise ValueError(f"batch_size={self.batch_size}: must be > 0")


@dataclass
class ProbeOptions:
    max_new_tokens: int = 0  # > 0: also greedy-generate this many tokens per sample
    out: str | None = None  # where the table goes (default: the Hydra output dir)
    limit: int | None = None  # only the first N samples of the split
    batched: bool = True  # the batched forward (step 1); False: rows alone only
    show: int = 20  # non-finite samples listed in the printed summary


@dataclass
class ProbeSpec:
    """The schema of conf/probe.yaml and what `python -m src.probe` runs."""

    checkpoint: str = ""  # a run dir trained with save.hf=true, its hf/, or a
    #                              save_pretrained directory
    data: DataSpec = field(default_factory=DataSpec)
    precision: PrecisionSpec = field(default_factory=PrecisionSpec)
    softmax: SoftmaxSpec = field(default_factory=SoftmaxSpec)
    stress: StressSpec = field(default_factory=StressSpec)
    probe: ProbeOptions = field(default_factory=ProbeOptions)
    split: str = "test"
    batch_size: int = 8  # padding (and so fully masked rows) depends on the batch
    seed: int = 0  # the data seed: shapes' splits depend on it (train's seed)
    device: str = "auto"  # auto | cpu | cuda

    def check(self) -> None:
        if not self.checkpoint:
            raise ValueError("checkpoint: required (a save.hf / save_pretrained directory)")
        _one_of("split", self.split, SPLITS)
        _one_of("device", self.device, DEVICES)
        if self.batch_size <= 0:
            raise ValueError(f"batch_size={self.batch_size}: must be > 0")
        if self.probe.max_new_tokens < 0:
            raise ValueError(f"probe.max_new_tokens={self.probe.max_new_tokens}: must be >= 0")
        for part in (self.precision, self.softmax, self.stress):
            part.check()
