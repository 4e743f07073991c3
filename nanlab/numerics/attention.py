"""Attention softmax variants, plugged into every attention layer of both Qwen2.5-VL towers.

Each variant is registered with transformers' `AttentionInterface` under `nanlab_<name>`
(and an eager-style additive mask under the same name, since custom names get no mask
otherwise). The variants know nothing of monitoring: after every attention call the
registered function hands (module, query, key, mask, weights, output) to `OBSERVERS`,
plain callables that the monitor adds and removes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import eager_attention_forward, repeat_kv

from nanlab.config.options import SOFTMAX
from nanlab.config.specs import MASKS, SoftmaxSpec

OBSERVERS: list[Callable] = []


# --- softmax functions: scores (with the additive mask already applied) -> probabilities ----


def naive_softmax(scores: torch.Tensor) -> torch.Tensor:
    """exp / sum in the compute dtype, no max subtraction: overflows once a logit passes
    log(max float) (88.7 in fp32 and bf16, 11.1 in fp16)."""
    e = scores.exp()
    return e / e.sum(dim=-1, keepdim=True)


def stable_softmax(scores: torch.Tensor) -> torch.Tensor:
    """The max-subtracted softmax in the compute dtype, as commonly recommended. A row whose
    entries are all -inf still gives NaN (-inf - -inf)."""
    e = (scores - scores.amax(dim=-1, keepdim=True)).exp()
    return e / e.sum(dim=-1, keepdim=True)


def safe_softmax(scores: torch.Tensor, masked: torch.Tensor | None) -> torch.Tensor:
    """Max-subtracted, accumulated in fp32, and a fully masked row gives zeros, not NaN."""
    s = scores.float()
    if masked is not None:
        s = s.masked_fill(masked, float("-inf"))
    row_max = s.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = (s - row_max).exp()
    denom = e.sum(dim=-1, keepdim=True)
    return torch.where(
        denom > 0, e / denom.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(e)
    ).to(scores.dtype)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on (queries themselves are fp32 there,
    since Qwen's rotary embedding promotes them), else the tensor's."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def _scores(module, query, key, attention_mask, scaling):
    key = repeat_kv(key, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        # The mask is built in the embedding dtype (fp32 under autocast); adding it promotes
        # the scores, so cast back to the compute dtype, where a float32-min mask entry
        # becomes -inf in fp16 and bf16.
        scores = scores + attention_mask
    return scores.to(compute_dtype(query))


def _masked(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    if attention_mask.dtype == torch.bool:
        return ~attention_mask
    return attention_mask <= torch.finfo(attention_mask.dtype).min / 2


def _finish(module, weights, value, dropout):
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, repeat_kv(value, module.num_key_value_groups))
    return out.transpose(1, 2).contiguous(), weights


def _variant(softmax: Callable) -> Callable:
    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        scores = _scores(module, query, key, attention_mask, scaling)
        return _finish(module, softmax(scores, attention_mask), value, dropout)

    return attention


def _softcap(cap: float) -> Callable:
    def softmax(scores, attention_mask):
        # Gemma 2: cap the logits, then a fp32 softmax. The mask is re-applied after capping,
        # since tanh would pull masked entries back into range.
        capped = cap * torch.tanh(scores.float() / cap)
        m = _masked(attention_mask)
        if m is not None:
            capped = capped.masked_fill(m, float("-inf"))
        return torch.softmax(capped, dim=-1).to(scores.dtype)

    return softmax


def _zeroed(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention (fp32 softmax of scores + mask), with the rows that came
    out NaN patched to 0 afterwards, as many codebases do for fully masked rows. The forward
    is finite; the softmax's backward at those rows is 0 x NaN = NaN (PyTorch issue 41508)."""
    k = repeat_kv(key, module.num_key_value_groups)
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : k.shape[-2]]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
    weights = weights.nan_to_num(0.0).to(query.dtype)
    return _finish(module, weights, value, dropout)


def _fp32_qk(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """q.k in fp32 (the approach of transformers PR 33317, and diffusers' `upcast_attention`,
    PR 1590): q and k upcast to fp32 with autocast off, so the scores, the additive mask and
    the (max-subtracted) softmax are fp32; only the weights are cast to the value dtype for
    the weights x values product. `eager` differs: its q.k runs in the compute dtype (fp16
    under fp16 autocast, where a dot product past 65,504 is inf before the fp32 softmax)."""
    with torch.autocast(query.device.type, enabled=False):
        k = repeat_kv(key, module.num_key_value_groups).float()
        scores = torch.matmul(query.float(), k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, :, : k.shape[-2]].float()
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
    return _finish(module, weights.to(value.dtype), value, dropout)


def summed_planes_mask(
    batch_size,
    q_length,
    kv_length,
    q_offset=0,
    kv_offset=0,
    mask_function=None,
    attention_mask=None,
    dtype=torch.float32,
    device="cpu",
    **kwargs,
):
    """transformers' causal plane (its own `eager_mask`, no padding) plus a key-padding and
    a query-padding plane, each float-min: where two meet the sum is -inf, so a left-padded
    query row is -inf across every key, in fp32 as in bf16."""
    kw = {"mask_function": mask_function} if mask_function is not None else {}
    causal = eager_mask(
        batch_size,
        q_length,
        kv_length,
        q_offset,
        kv_offset,
        attention_mask=None,
        dtype=dtype,
        device=device,
        **kw,
    )
    if attention_mask is None:
        return causal
    pad = ~attention_mask.bool().to(device)
    low = torch.finfo(dtype).min
    zero = torch.zeros((), dtype=dtype, device=device)
    keys = torch.where(pad[:, None, None, kv_offset : kv_offset + kv_length], low, zero)
    queries = torch.where(pad[:, None, q_offset : q_offset + q_length, None], low, zero)
    return causal + keys + queries


def _sdpa(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )


# --- the variants as nanlab.config.options.SOFTMAX names them: spec -> attention function ----


def sdpa_variant(spec: SoftmaxSpec) -> Callable:
    return _sdpa


def eager_variant(spec: SoftmaxSpec) -> Callable:
    return eager_attention_forward  # transformers' own: fp32-upcast torch.softmax


def naive_variant(spec: SoftmaxSpec) -> Callable:
    return _variant(lambda s, m: naive_softmax(s))


def stable_variant(spec: SoftmaxSpec) -> Callable:
    return _variant(lambda s, m: stable_softmax(s))


def safe_variant(spec: SoftmaxSpec) -> Callable:
    return _variant(lambda s, m: safe_softmax(s, _masked(m)))


def softcap_variant(spec: SoftmaxSpec) -> Callable:
    return _variant(_softcap(spec.cap))


def zeroed_variant(spec: SoftmaxSpec) -> Callable:
    return _zeroed


def fp32_qk_variant(spec: SoftmaxSpec) -> Callable:
    return _fp32_qk


def attention_function(spec: SoftmaxSpec) -> Callable:
    """The raw (unobserved) attention function of a variant."""
    return SOFTMAX[spec.name].resolve("attention")(spec)


def _observed(fn: Callable) -> Callable:
    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        out, weights = fn(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        for observe in OBSERVERS:
            observe(module, query, key, attention_mask, scaling, weights, out)
        return out, weights

    return attention


def register(spec: SoftmaxSpec, mask: str = "transformers") -> str:
    """Register the variant with transformers; returns the attn_implementation name."""
    option = SOFTMAX[spec.name]
    if mask not in MASKS:
        raise ValueError(f"stress.mask={mask}: allowed {', '.join(MASKS)}")
    if "kernel" in option.flags:
        return "flash_attention_2"  # transformers' kernel, unobserved; needs flash-attn (GPU)
    name = f"nanlab_{spec.name}" + (f"_{spec.cap:g}" if "uses_cap" in option.flags else "")
    name += "_summed" if mask == "summed_planes" else ""
    AttentionInterface.register(name, _observed(attention_function(spec)))
    # the mask each implementation gets from transformers: boolean for sdpa, additive else
    masks = sdpa_mask if "boolean_mask" in option.flags else eager_mask
    AttentionMaskInterface.register(name, summed_planes_mask if mask == "summed_planes" else masks)
    return name


def apply(model, spec: SoftmaxSpec, mask: str = "transformers") -> str:
    """Make every attention layer of both towers use the variant (and the mask builder)."""
    name = register(spec, mask)
    model.set_attn_implementation(name)
    return name
