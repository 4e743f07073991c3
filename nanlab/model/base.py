"""The tiny base: a tiny Qwen2.5-VL that the project pretrains itself, so that the map
fine-tunes a trained model (as users do) rather than a random one.

Pretrained in fp32, seeded, on a task other than the map's: captions of the shapes images
("A small red circle in the top left."), where the map fine-tunes on questions about shape,
colour and position. Built on first use (about a minute on 2 CPU cores) and cached under
$NANLAB_CACHE/base/<key>, like the tokenizer; parallel jobs wait for one build (a file lock).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

BASE_SEED = 1234  # one base for every run: the run's seed varies the fine-tuning only
BASE_LR = 1e-3
BASE_BATCH = 8


# What changes the base, field by field of ModelSpec: the architecture and the pretraining
# steps. Every other field is named in NOT_IN_KEY (a fine-tuning or loading setting), and a
# test fails on a field in neither, so a new ModelSpec field cannot silently rebuild (or
# wrongly share) every cached base.
KEY_FIELDS = (
    "base_steps",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "intermediate_size",
    "vision_hidden_size",
    "vision_depth",
    "vision_heads",
    "vision_intermediate_size",
    "window_size",
    "fullatt_block_indexes",
    "mrope_section",
)
# Architecture options that are off by default: in the key only when on, so adding one
# keeps the key (and the cached base) of every model without it.
ARCH_OPTIONS = ("qk_norm",)
NOT_IN_KEY = (
    "name",
    "path",
    "init",
    "ref_lr",
    "freeze_vision",
    "freeze_merger",
    "freeze_llm",
    "vision_lr",
    "lora",
)


def base_key(spec) -> str:
    """Everything that changes the base: the architecture (sizes, qk_norm) and the
    pretraining steps."""
    sizes = {name: getattr(spec, name) for name in KEY_FIELDS}
    sizes.update({k: True for k in ARCH_OPTIONS if getattr(spec, k, False)})
    blob = json.dumps(
        {"sizes": sizes, "seed": BASE_SEED, "lr": BASE_LR, "batch": BASE_BATCH},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def base_dir(spec) -> Path:
    root = Path(os.environ.get("NANLAB_CACHE", Path.home() / ".cache" / "nanlab"))
    return root / "base" / base_key(spec)


def load_base(spec, fresh, load):
    """The cached base (built first if missing), in fp32: `fresh()` makes the untrained tiny
    model (qk-norm included), `load(dir)` reads the saved one (qwen_vl.load_checkpoint).
    The model room hands both in, so this module imports none of it."""
    from filelock import FileLock
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    target = base_dir(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            build_base(spec, target, fresh)
    return load(target)


def build_base(spec, target: Path, fresh, log=print) -> dict:
    """Pretrain the tiny model on captions in fp32 and save it (save_pretrained; the qk-norm
    weights are children of the attention modules, so they are saved with it)."""
    from transformers import get_cosine_schedule_with_warmup

    from nanlab.config.specs import DataSpec
    from nanlab.data.datamodule import Collator
    from nanlab.data.shapes import shapes_splits
    from nanlab.loss import supervised_loss
    from nanlab.model.processing import load_processor

    started = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runs do: faster on 2 shared cores
    torch.manual_seed(BASE_SEED)
    data = DataSpec(
        tasks=["caption"], num_train=BASE_BATCH * spec.base_steps, num_val=0, num_test=0
    )
    n = min(data.num_train, 720)  # the distinct caption samples (4x6x2x5x3); cycled
    data.num_train = n
    processor = load_processor(data.processor_spec())
    samples = shapes_splits(data, BASE_SEED)["train"]
    collate = Collator(processor)
    model = fresh()
    model.set_attn_implementation("sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=BASE_LR, foreach=True)
    sched = get_cosine_schedule_with_warmup(opt, spec.base_steps // 20, spec.base_steps)
    g = torch.Generator().manual_seed(BASE_SEED)
    order = torch.randperm(n, generator=g).tolist()
    losses = []
    log(f"building the tiny base: {spec.base_steps} fp32 steps on captions -> {target}")
    for step in range(spec.base_steps):
        idx = [order[(step * BASE_BATCH + i) % n] for i in range(BASE_BATCH)]
        loss = supervised_loss(model, collate([samples[i] for i in idx]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            log(f"  base step {step + 1}/{spec.base_steps}: loss {sum(losses[-50:]) / 50:.3f}")
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    model.save_pretrained(str(tmp))
    info = {
        "steps": spec.base_steps,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "seconds": round(time.time() - started, 1),
        "task": "caption",
        "lr": BASE_LR,
        "batch": BASE_BATCH,
        "seed": BASE_SEED,
        "qk_norm": bool(getattr(spec, "qk_norm", False)),
    }
    (tmp / "nanlab_base.json").write_text(json.dumps(info, indent=2))
    tmp.rename(target)
    torch.set_num_threads(threads)
    log(f"built the tiny base in {info['seconds']} s (loss {losses[0]:.2f} -> {losses[-1]:.2f})")
    return info
