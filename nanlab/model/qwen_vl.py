"""Build the tiny Qwen2.5-VL (real architecture, random init) or load a local checkpoint.

`model.qk_norm=true` changes the architecture (Dehghani et al. 2023, ViT-22B; Wortsman et al.
2023): a per-head RMSNorm with a learnable gain on the queries and keys of every attention
layer of both towers, before RoPE. The norms are children of the attention modules
(`self_attn.q_norm`, `attn.k_norm`, ...), so checkpoints keep their weights, and act through
forward hooks on the q/k projections (the vision blocks' fused qkv), so transformers' own
attention code runs unchanged. A model with them is built, never from_pretrained'ed as a
vanilla class: `load_checkpoint` builds it from the saved config and loads the saved tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nanlab.config.specs import LoraSpec, ModelSpec  # noqa: F401  (this module's specs)

QK_NORM_KEY = "nanlab_qk_norm"  # set in a checkpoint's config.json when it has qk-norm
QK_NORM_EPS = 1e-6


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
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": mrope,
            },
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


def fresh_tiny(spec: ModelSpec):
    """The tiny model as initialised from the current torch seed (qk-norm added if asked)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration(tiny_config(spec))
    if spec.qk_norm:
        apply_qk_norm(model)
    return model


def build_model(spec: ModelSpec, seed: int):
    """The model in fp32 (precision plugins decide compute dtypes), with freezing and LoRA."""

    if spec.path is not None:
        path = Path(spec.path)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model.path={spec.path}: no config.json there (a local checkpoint dir)"
            )
        has_norm = has_qk_norm(path)
        if spec.qk_norm and not has_norm:
            raise ValueError(
                f"model.qk_norm=true: {spec.path} was not trained with qk-norm "
                f"(no {QK_NORM_KEY} in its config.json); it changes the "
                "architecture, allowed only with a checkpoint pretrained with it"
            )
        model = load_checkpoint(path)
    elif spec.init == "base":
        from nanlab.model.base import load_base

        model = load_base(spec, fresh=lambda: fresh_tiny(spec), load=load_checkpoint)
    elif spec.init == "random":
        torch.manual_seed(seed)
        model = fresh_tiny(spec)
    else:
        raise ValueError(f"model.init={spec.init}: allowed base, random")
    model.train()  # from_pretrained returns eval mode
    apply_freezing(model, spec)
    if spec.lora.r > 0:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=spec.lora.r,
                lora_alpha=spec.lora.alpha,
                lora_dropout=spec.lora.dropout,
                target_modules=spec.lora.target_modules,
            ),
        )
        attach_qk_norm_hooks(model)  # onto the LoRA layers that replaced q_proj / k_proj
    return model


# --- qk-norm (an architecture change) -------------------------------------------------------


def _head_norm(head_dim: int):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm

    return Qwen2_5_VLRMSNorm(head_dim, eps=QK_NORM_EPS)  # transformers' RMSNorm, gain = 1


def _norm_heads(norm, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(..., heads * head_dim) -> the same with every head RMS-normalized, in x's dtype."""
    shape = x.shape
    return norm(x.reshape(*shape[:-1], -1, head_dim)).reshape(shape).to(x.dtype)


def _text_hook(norm, head_dim: int):
    def hook(module, args, out):
        return _norm_heads(norm, out, head_dim)

    return hook


def _vision_hook(attn):
    def hook(module, args, out):
        # the fused projection's rows are q | k | v (the vision attention splits them so)
        q, k, v = out.chunk(3, dim=-1)
        return torch.cat(
            [
                _norm_heads(attn.q_norm, q, attn.head_dim),
                _norm_heads(attn.k_norm, k, attn.head_dim),
                v,
            ],
            dim=-1,
        )

    return hook


def _attention_layers(model):
    """(attention module, is_vision) for every attention layer of both towers."""
    for _, m in model.named_modules():
        if hasattr(m, "qkv") and hasattr(m, "num_heads") and hasattr(m, "head_dim"):
            yield m, True
        elif hasattr(m, "q_proj") and hasattr(m, "k_proj") and hasattr(m, "head_dim"):
            yield m, False


def apply_qk_norm(model) -> None:
    """Add q_norm / k_norm (RMSNorm over each head, learnable gain) to every attention layer
    and hook them onto the projections' outputs; marks the config (saved with it)."""
    for attn, _ in _attention_layers(model):
        if not hasattr(attn, "q_norm"):
            ref = next(attn.parameters())
            attn.q_norm = _head_norm(attn.head_dim).to(ref.device, ref.dtype)
            attn.k_norm = _head_norm(attn.head_dim).to(ref.device, ref.dtype)
    setattr(model.config, QK_NORM_KEY, True)
    attach_qk_norm_hooks(model)


def attach_qk_norm_hooks(model) -> int:
    """(Re)register the hooks on whatever module now computes q and k (a LoRA layer after
    peft wraps q_proj); returns the number of attention layers hooked."""
    n = 0
    for attn, vision in _attention_layers(model):
        if not hasattr(attn, "q_norm"):
            continue
        for handle in getattr(attn, "_qk_norm_handles", []):
            handle.remove()
        if vision:
            handles = [attn.qkv.register_forward_hook(_vision_hook(attn))]
        else:
            handles = [
                attn.q_proj.register_forward_hook(_text_hook(attn.q_norm, attn.head_dim)),
                attn.k_proj.register_forward_hook(_text_hook(attn.k_norm, attn.head_dim)),
            ]
        attn._qk_norm_handles = handles
        n += 1
    return n


def has_qk_norm(path: str | Path) -> bool:
    config = json.loads((Path(path) / "config.json").read_text())
    return bool(config.get(QK_NORM_KEY))


def load_checkpoint(path: str | Path):
    """A local checkpoint in fp32: from_pretrained, or, for one with qk-norm, the model built
    from its config with the norms added and every saved tensor loaded (strictly: only the
    tied lm_head may be absent from the file)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    path = Path(path)
    if not has_qk_norm(path):
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(path), local_files_only=True, dtype=torch.float32
        )
    from safetensors.torch import load_file

    config = Qwen2_5_VLConfig.from_pretrained(str(path), local_files_only=True)
    model = Qwen2_5_VLForConditionalGeneration(config)
    apply_qk_norm(model)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model.path={path}: no *.safetensors there")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    state = {_checkpoint_key(k): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(
            f"model.path={path}: the qk-norm checkpoint does not fit the model "
            f"(missing {sorted(set(missing) - tied)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]})"
        )
    model.tie_weights()
    return model.float()


def _checkpoint_key(key: str) -> str:
    """A saved tensor's name as the model's state_dict names it: save_pretrained writes
    Qwen2.5-VL in the legacy layout (`model.layers.*`, `visual.*`), which from_pretrained
    maps back (its checkpoint conversion mapping); this is that mapping."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + key[len("model.") :]
    return key


def apply_freezing(model, spec: ModelSpec) -> None:
    inner = model.model
    groups = {
        "vision": (
            spec.freeze_vision,
            [p for n, p in inner.visual.named_parameters() if not n.startswith("merger.")],
        ),
        "merger": (spec.freeze_merger, list(inner.visual.merger.parameters())),
        "llm": (
            spec.freeze_llm,
            list(inner.language_model.parameters()) + list(model.lm_head.parameters()),
        ),
    }
    for frozen, params in groups.values():
        if frozen:
            for p in params:
                p.requires_grad_(False)


def is_vision_param(name: str) -> bool:
    return ".visual." in f".{name}" and ".merger." not in name
