"""Softmax variants: against a float64 reference, plugged into both towers, and where
naive fails while safe does not."""

import math

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from nanlab.model.qwen_vl import ModelSpec, build_model, tiny_config
from nanlab.numerics import attention
from nanlab.numerics.attention import SoftmaxSpec


class FakeAttn(torch.nn.Module):
    num_key_value_groups = 2


def reference(q, k, v, mask, scaling):
    """float64 softmax attention: the truth every variant is compared with."""
    k = k.double().repeat_interleave(2, dim=1)
    v = v.double().repeat_interleave(2, dim=1)
    s = q.double() @ k.transpose(2, 3) * scaling + mask.double()
    return (torch.softmax(s, dim=-1) @ v).transpose(1, 2)


def causal_mask(n, dtype=torch.float32):
    m = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return m[None, None]


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 16, generator=g)
    k = torch.randn(2, 2, 7, 16, generator=g)
    v = torch.randn(2, 2, 7, 16, generator=g)
    return q, k, v


@pytest.mark.parametrize("name", ["sdpa", "eager", "naive", "stable", "safe", "softcap"])
def test_variant_matches_float64_reference(name, qkv):
    q, k, v = qkv
    mask = causal_mask(7)
    fn = attention.attention_function(SoftmaxSpec(name, cap=1e4))
    out, _ = fn(FakeAttn().eval(), q, k, v, mask, 0.25)
    torch.testing.assert_close(out.double(), reference(q, k, v, mask, 0.25), atol=1e-5, rtol=1e-4)


def test_softcap_bounds_logits(qkv):
    q, k, v = qkv
    fn = attention.attention_function(SoftmaxSpec("softcap", cap=1.0))
    _, w = fn(FakeAttn().eval(), q * 100, k, v, None, 1.0)
    # logits capped to [-1, 1]: no weight can exceed e^2 times the smallest in its row
    assert (w.amax(-1) / w.amin(-1)).max() <= math.exp(2) * 1.0001


@pytest.mark.parametrize(
    "dtype,logit", [(torch.float32, 100.0), (torch.bfloat16, 100.0), (torch.float16, 20.0)]
)
def test_naive_overflows_where_max_subtraction_does_not(dtype, logit):
    # one logit past log(max float): 88.7 in fp32 and bf16, 11.1 in fp16
    scores = torch.zeros(1, 1, 2, 4, dtype=dtype)
    scores[..., 0] = logit
    assert torch.isnan(attention.naive_softmax(scores)).any()
    for probs in (attention.stable_softmax(scores), attention.safe_softmax(scores, None)):
        assert torch.isfinite(probs).all()
        torch.testing.assert_close(probs.float().sum(-1), torch.ones(1, 1, 2), atol=1e-2, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fully_masked_row_nan_except_safe(dtype):
    # A float32-min mask entry becomes -inf in half precision: a fully masked row is 0/0.
    q = torch.randn(1, 4, 3, 16)
    k = torch.randn(1, 2, 3, 16)
    v = torch.randn(1, 2, 3, 16)
    mask = torch.zeros(1, 1, 3, 3)
    mask[..., 0, :] = torch.finfo(torch.float32).min  # query row 0 sees nothing
    with torch.autocast("cpu", dtype=dtype):
        outs = {
            n: attention.attention_function(SoftmaxSpec(n))(FakeAttn().eval(), q, k, v, mask, 0.25)
            for n in ("naive", "stable", "safe")
        }
    assert torch.isnan(outs["naive"][1][..., 0, :]).all()
    assert torch.isnan(outs["stable"][1][..., 0, :]).all()
    safe_out, safe_w = outs["safe"]
    assert torch.isfinite(safe_w).all() and (safe_w[..., 0, :] == 0).all()
    assert torch.isfinite(safe_out).all()


def test_unknown_variant_is_one_line_error():
    with pytest.raises(
        ValueError, match=r"^softmax=softest: unknown option; allowed: eager, flash, fp32_qk"
    ):
        attention.register(SoftmaxSpec("softest"))


def _images_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (2, 10), generator=g)
    ids[:, 2:6] = 151655  # 4 image tokens each: one 56x56 image per row
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(32, 1176, generator=g),
        "image_grid_thw": torch.tensor([[1, 4, 4], [1, 4, 4]]),
        "mm_token_type_ids": (ids == 151655).long(),
    }


@pytest.mark.parametrize("name", ["sdpa", "eager", "naive", "stable", "safe", "softcap"])
def test_every_attention_layer_of_both_towers_uses_the_variant(name):
    model = build_model(ModelSpec(), seed=0).eval()
    attention.apply(model, SoftmaxSpec(name))
    calls = []

    def observe(module, q, k, mask, scaling, weights, out):
        calls.append(type(module).__name__)

    attention.OBSERVERS.append(observe)
    try:
        with torch.no_grad():
            model(**_images_batch())
    finally:
        attention.OBSERVERS.remove(observe)
    # text: 2 layers; vision: 2 blocks x 2 images (window blocks run one call per window)
    assert calls.count("Qwen2_5_VLAttention") == 2
    assert calls.count("Qwen2_5_VLVisionAttention") >= 4


@pytest.mark.parametrize("name", ["sdpa", "eager"])
def test_plugged_default_is_bit_identical_to_transformers(name):
    """nanlab_sdpa / nanlab_eager change nothing but add the observer hook."""
    torch.manual_seed(0)
    ours = Qwen2_5_VLForConditionalGeneration(tiny_config(ModelSpec())).eval()
    theirs = Qwen2_5_VLForConditionalGeneration(tiny_config(ModelSpec())).eval()
    theirs.load_state_dict(ours.state_dict())
    attention.apply(ours, SoftmaxSpec(name))
    theirs.set_attn_implementation(name)
    batch = _images_batch()
    batch["attention_mask"][0, :2] = 0  # left padding: masks matter
    with torch.no_grad():
        assert torch.equal(ours(**batch).logits, theirs(**batch).logits)
