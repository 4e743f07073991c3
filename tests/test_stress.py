"""Each stress does what its YAML claims, on the real tiny model and a real batch."""
import pytest
import torch

from helpers import spec
from src import attention, stress
from src.attention import SoftmaxSpec
from src.data import NanDataModule
from src.model import build_model
from src.module import NanLabModule, OptimSpec
from src.monitor import AttentionStats
from src.stress import StressSpec


@pytest.fixture(scope="module")
def batch(processor):
    s = spec()
    dm = NanDataModule(s.data, processor, 4, 0)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def _model(softmax="sdpa"):
    model = build_model(spec().model, seed=0)
    attention.apply(model, SoftmaxSpec(softmax))
    return model, NanLabModule(model, OptimSpec())


def _attention_stats(model, module, batch, dtype=None):
    stats = AttentionStats(model)
    with stats.active(), torch.no_grad(), torch.autocast(
            "cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = module.compute_loss(batch)
    return stats.summary(), loss


def test_logit_growth_starts_every_layer_at_the_target(batch):
    model, module = _model()
    before, _ = _attention_stats(model, module, batch)
    assert max(s["max_logit"] for s in before.values()) < 5  # random init: small logits
    stress.apply_to_model(StressSpec("logit_growth", target_logit=60.0), model, batch,
                          module.compute_loss)
    after, _ = _attention_stats(model, module, batch)
    assert set(after) == set(before)  # both towers, every layer
    for name, s in after.items():
        assert s["max_logit"] == pytest.approx(60.0, rel=0.02), name


def test_logit_growth_breaks_naive_but_not_stable_in_fp16(batch):
    for softmax, finite in (("naive", False), ("stable", True)):
        model, module = _model(softmax)
        stress.apply_to_model(StressSpec("logit_growth", target_logit=60.0), model, batch,
                              module.compute_loss)
        _, loss = _attention_stats(model, module, batch, torch.float16)
        assert bool(torch.isfinite(loss)) is finite, softmax


@pytest.mark.parametrize("softmax,nan_weights", [("naive", True), ("stable", True),
                                                 ("safe", False)])
def test_masked_rows_nan_in_naive_not_in_safe(batch, softmax, nan_weights):
    model, module = _model(softmax)
    padded = stress.batch_transform(StressSpec("masked_rows", pad=3), pad_token_id=151643)(batch)
    assert (padded["attention_mask"][:, :3] == 0).all()
    assert (padded["labels"][:, :3] == -100).all()
    summary, _ = _attention_stats(model, module, padded, torch.bfloat16)
    text = {n: s for n, s in summary.items() if "language_model" in n}
    assert (text["model.language_model.layers.0.self_attn"]["nonfinite"] > 0) is nan_weights
    if not nan_weights:
        assert all(s["nonfinite"] == 0 for s in summary.values())


def test_outliers_overflow_fp16_only(batch):
    model, module = _model()
    stress.apply_to_model(StressSpec("outliers", magnitude=1e5, channels=2), model, batch,
                          module.compute_loss)
    peaks = {}
    mlp = model.model.visual.blocks[0].mlp
    mlp.register_forward_hook(lambda m, a, out: peaks.setdefault(out.dtype, out.detach()))
    for dtype in (torch.bfloat16, torch.float16):
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            module.compute_loss(batch)
    assert torch.isinf(peaks[torch.float16][..., :2]).all()
    bf16 = peaks[torch.bfloat16][..., :2].float()
    assert torch.isfinite(bf16).all() and (bf16 > 9e4).all()


def test_lr_spike_multiplier():
    mult = stress.lr_multiplier(StressSpec("lr_spike", factor=30.0, at=5, length=2))
    assert [mult(s) for s in range(4, 9)] == [1.0, 30.0, 30.0, 1.0, 1.0]
    assert stress.lr_multiplier(StressSpec("none")) is None


def test_unknown_stress_is_one_line_error():
    with pytest.raises(ValueError, match=r"^stress=heat: allowed none, logit_growth"):
        stress.check(StressSpec("heat"))
