"""Build the tiny Qwen2.5-VL (real architecture, random init) or load a local checkpoint."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class LoraSpec:
    r: int = 0  # 0 turns LoRA off
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelSpec:
    name: str = "tiny"
    path: str | None = None  # a local directory: loads from_pretrained instead of building
    init: str = "random"     # tiny only: random | base (the project's pretrained tiny base)
    base_steps: int = 300    # init=base: pretraining steps of the base (src/base.py)
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
    window_size: int = 56                  # vision window in pixels (112 in the real models)
    fullatt_block_indexes: list[int] | None = None  # default: the last vision block
    mrope_section: list[int] | None = None          # default: split from the head size
    freeze_vision: bool = False
    freeze_merger: bool = False
    freeze_llm: bool = False
    vision_lr: float | None = None
    lora: LoraSpec = field(default_factory=LoraSpec)


def tiny_config(spec: ModelSpec):
    """A Qwen2_5_VLConfig with both towers: windowed and full vision attention, the merger,
    a GQA text decoder with M-RoPE, and the real 151,936-entry vocabulary."""
    from transformers import Qwen2_5_VLConfig

    head_dim = spec.hidden_size // spec.num_heads
    # M-RoPE splits each head's rotary half into temporal/height/width sections.
    half = head_dim // 2
    mrope = spec.mrope_section or [half - 2 * (half // 4), half // 4, half // 4]
    return Qwen2_5_VLConfig(
        text_config=dict(  # noqa: C408 - keyword form mirrors Qwen2_5_VLConfig's arguments
            vocab_size=151936,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                             "mrope_section": mrope},
            tie_word_embeddings=True,
        ),
        vision_config=dict(  # noqa: C408
            depth=spec.vision_depth,
            hidden_size=spec.vision_hidden_size,
            intermediate_size=spec.vision_intermediate_size,
            num_heads=spec.vision_heads,
            out_hidden_size=spec.hidden_size,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=spec.window_size,
            fullatt_block_indexes=spec.fullatt_block_indexes or [spec.vision_depth - 1],
        ),
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=True,
    )


def build_model(spec: ModelSpec, seed: int):
    """The model in fp32 (precision plugins decide compute dtypes), with freezing and LoRA."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    if spec.path is not None:
        path = Path(spec.path)
        if not (path / "config.json").is_file():
            raise ValueError(f"model.path={spec.path}: no config.json there (a local checkpoint dir)")
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(path), local_files_only=True, dtype=torch.float32
        )
    elif spec.init == "base":
        from .base import load_base

        model = load_base(spec)
    elif spec.init == "random":
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(tiny_config(spec))
    else:
        raise ValueError(f"model.init={spec.init}: allowed base, random")
    model.train()  # from_pretrained returns eval mode
    apply_freezing(model, spec)
    if spec.lora.r > 0:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
            target_modules=spec.lora.target_modules,
        ))
    return model


def apply_freezing(model, spec: ModelSpec) -> None:
    inner = model.model
    groups = {
        "vision": (spec.freeze_vision, [p for n, p in inner.visual.named_parameters()
                                        if not n.startswith("merger.")]),
        "merger": (spec.freeze_merger, list(inner.visual.merger.parameters())),
        "llm": (spec.freeze_llm, list(inner.language_model.parameters())
                + list(model.lm_head.parameters())),
    }
    for frozen, params in groups.values():
        if frozen:
            for p in params:
                p.requires_grad_(False)


def is_vision_param(name: str) -> bool:
    return ".visual." in f".{name}" and ".merger." not in name
