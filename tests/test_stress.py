"""Each stress does what its YAML claims, on the real tiny base and a real batch, through
transformers' own code path."""

import pytest
import torch

from helpers import spec
from nanlab.config.compose import compose_spec
from nanlab.data.datamodule import Collator, DataSpec, NanDataModule, shapes_splits
from nanlab.diagnosis.attention_stats import AttentionStats
from nanlab.model.qwen_vl import build_model
from nanlab.numerics import attention, stress
from nanlab.numerics.attention import SoftmaxSpec
from nanlab.numerics.stress import StressSpec
from nanlab.run.module import NanLabModule, OptimSpec

IM_START = 151644


@pytest.fixture(scope="module")
def map_batch(processor):
    """The first batch of the map's runs (experiment=nan_map_base)."""
    s = compose_spec("experiment=nan_map_base", "logger=none")
    dm = NanDataModule(s.data, processor, s.batch_size, s.seed)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


@pytest.fixture(scope="module")
def left_batch(processor):
    """Samples of different lengths, left-padded: some query rows see only padding."""
    samples = shapes_splits(DataSpec(num_train=8, num_val=0, num_test=0), 0)["train"]
    b = Collator(processor, "left")(samples)
    assert (b["attention_mask"] == 0).any()
    return b


def _model(softmax="sdpa", mask="transformers"):
    model = build_model(spec().model, seed=0)
    attention.apply(model, SoftmaxSpec(softmax), mask)
    return model, NanLabModule(model, OptimSpec())


def _attention_stats(model, module, batch, dtype=None):
    stats = AttentionStats(model)
    with (
        stats.active(),
        torch.no_grad(),
        torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None),
    ):
        loss = module.compute_loss(batch)
    return stats.summary(), loss


def test_logit_growth_starts_every_layer_at_the_target(batch):
    model, module = _model()
    before, _ = _attention_stats(model, module, batch)
    assert max(s["max_logit"] for s in before.values()) < 12  # the base's logits are small
    stress.apply_to_model(
        StressSpec("logit_growth", target_logit=60.0), model, batch, module.compute_loss
    )
    after, _ = _attention_stats(model, module, batch)
    assert set(after) == set(before)  # both towers, every layer
    for name, s in after.items():
        assert s["max_logit"] == pytest.approx(60.0, rel=0.02), name


def test_logit_growth_breaks_naive_but_not_stable(map_batch):
    """On the map's batch some vision rows end below ln(smallest bf16): 0/0 in naive."""
    for softmax, finite in (("naive", False), ("stable", True)):
        model, module = _model(softmax)
        stress.apply_to_model(
            StressSpec("logit_growth", target_logit=12.0), model, map_batch, module.compute_loss
        )
        _, loss = _attention_stats(model, module, map_batch, torch.bfloat16)
        assert bool(torch.isfinite(loss)) is finite, softmax


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_transformers_masks_stay_finite_with_left_padding(left_batch, dtype):
    """Pinned: transformers' eager (one fp32 float-min plane) and sdpa (safe softmax) give
    finite attention on fully masked rows; only the summed planes make them NaN."""
    for softmax in ("eager", "sdpa"):
        model, module = _model(softmax)
        summary, loss = _attention_stats(model, module, left_batch, dtype)
        assert torch.isfinite(loss) and all(s["nonfinite"] == 0 for s in summary.values())


@pytest.mark.parametrize(
    "softmax,finite", [("eager", False), ("stable", False), ("safe", True), ("sdpa", True)]
)
def test_summed_planes_break_eager_in_fp32_too(left_batch, softmax, finite):
    model, module = _model(softmax, mask="summed_planes")
    _, loss = _attention_stats(model, module, left_batch)  # fp32: -inf rows all the same
    assert bool(torch.isfinite(loss)) is finite


def test_zeroed_softmax_is_finite_forward_nan_backward(left_batch):
    model, module = _model("zeroed", mask="summed_planes")
    loss = module.compute_loss(left_batch)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    bad = sum(int((~torch.isfinite(g)).sum()) for g in grads)
    assert 0 < bad < sum(g.numel() for g in grads)  # some elements, not all: before clipping


def test_grad_poison_pads_one_sample_every_few_steps(batch):
    poison = stress.batch_transform(StressSpec("grad_poison", pad=3, every=4), 151643)
    assert poison(batch, 0) is batch and poison(batch, 2) is batch
    padded = poison(batch, 3)
    assert (padded["attention_mask"][0, :3] == 0).all()  # sample 0: on the left
    assert (padded["attention_mask"][1:, -3:] == 0).all()  # the others: on the right
    assert (padded["attention_mask"][1:, :3] == batch["attention_mask"][1:, :3]).all()


def test_fp16_overflow_is_born_in_the_down_projection_of_one_token(batch):
    model, module = _model()
    stress.apply_to_model(
        StressSpec("fp16_overflow", magnitude=1e5, channels=2),
        model,
        batch,
        module.compute_loss,
        IM_START,
    )
    mlp = model.model.language_model.layers[0].mlp
    assert mlp.down_proj.weight.abs().max() < 65504  # finite in fp16 as weights
    outs = {}
    mlp.down_proj.register_forward_hook(lambda m, a, out: outs.setdefault(out.dtype, out))
    for dtype in (torch.bfloat16, torch.float16):
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            module.compute_loss(batch)
    at = batch["input_ids"] == IM_START
    assert torch.isinf(outs[torch.float16][at][:, :2]).all()
    # the system-prompt tokens right after it attend to it and carry it too (as real
    # massive activations sit on the first tokens); the answer tokens stay finite
    inf_rows = ~torch.isfinite(outs[torch.float16]).all(-1)
    assert inf_rows.float().mean() < 0.3
    assert not inf_rows[batch["labels"] != -100].any()
    bf16 = outs[torch.bfloat16][at][:, :2].float()
    assert torch.isfinite(bf16).all() and (bf16 > 6.5e4).all()


def test_pixel_range_overflows_the_patch_embedding_in_fp16_only(processor):
    samples = shapes_splits(DataSpec(num_train=4, num_val=0, num_test=0), 0)["train"]
    from nanlab.model.processing import ProcessorSpec, load_processor

    raw = load_processor(ProcessorSpec(normalize=False))
    b = Collator(raw, pixel_max=65535)(samples)
    assert b["pixel_values"].max() > 5e4  # 16-bit pixels, unrescaled
    model, _ = _model()
    proj = model.model.visual.patch_embed.proj
    for dtype, finite in ((torch.bfloat16, True), (torch.float16, False)):
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            out = proj(b["pixel_values"].view(-1, 3, 2, 14, 14))
        assert bool(torch.isfinite(out).all()) is finite, dtype


def test_lr_spike_multiplier():
    mult = stress.lr_multiplier(StressSpec("lr_spike", factor=30.0, at=5, length=2))
    assert [mult(s) for s in range(4, 9)] == [1.0, 30.0, 30.0, 1.0, 1.0]
    assert stress.lr_multiplier(StressSpec("none")) is None


def test_unknown_stress_is_one_line_error():
    with pytest.raises(
        ValueError, match=r"^stress=heat: unknown option; allowed: empty_targets, fp16_overflow"
    ):
        StressSpec("heat").check()
