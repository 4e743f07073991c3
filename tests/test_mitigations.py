"""Mitigations as switches (issue 11): each one is wired from the config and acts.

- optim.z_loss (PaLM): keeps log Z of the output logits near 0.
- model.qk_norm (Dehghani et al. 2023; Wortsman et al. 2023): an architecture change; the
  scaled q/k projections of stress=logit_growth cannot push the attention logits up.
- optim.name=stable_adamw (Wortsman et al. 2023): caps the update where the gradient outgrew
  the second-moment estimate (after an lr spike), and is AdamW elsewhere.
- optim.eps / optim.betas: reach the optimizer.
- softmax=fp32_qk (transformers PR 33317's approach): q.k in fp32, finite under fp16 autocast
  where eager's fp16 q.k passes 65,504.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math

import pytest
import torch

from helpers import spec
from hydra_plugins.nanlab_sweeper.mechanism_sweeper import merge_overrides
from nanlab.config.compose import compose_spec
from nanlab.diagnosis.attention_stats import AttentionStats
from nanlab.model.qwen_vl import (
    ModelSpec,
    attach_qk_norm_hooks,
    build_model,
    has_qk_norm,
    load_checkpoint,
)
from nanlab.numerics import attention, stress
from nanlab.numerics.attention import SoftmaxSpec
from nanlab.numerics.precision import Fp32AccumulatedHalfGemm
from nanlab.numerics.stress import StressSpec
from nanlab.run.module import NanLabModule, OptimSpec, StableAdamW, supervised_loss

FP16_MAX = 65504.0


def _random_model(qk_norm: bool = False, softmax: str = "sdpa"):
    model = build_model(ModelSpec(init="random", qk_norm=qk_norm), seed=0)
    attention.apply(model, SoftmaxSpec(softmax))
    return model


def _max_logits(model, module, batch) -> dict[str, float]:
    stats = AttentionStats(model)
    with stats.active(), torch.no_grad():
        module.compute_loss(batch)
    return {n: s["max_logit"] for n, s in stats.summary().items()}


# --- config: optim.* and model.qk_norm --------------------------------------------------------


def test_defaults_are_torch_adamw_and_no_extras():
    s = compose_spec()
    assert (s.optim.name, s.optim.eps, list(s.optim.betas), s.optim.z_loss) == (
        "adamw",
        1e-8,
        [0.9, 0.999],
        0.0,
    )
    assert s.model.qk_norm is False and s.softmax.name == "sdpa"
    assert s.config["optim"] == {
        "name": "adamw",
        "eps": 1e-8,
        "betas": [0.9, 0.999],
        "z_loss": 0.0,
        "impl": "fused",
    }  # hashed: part of a cell


@pytest.mark.parametrize("name,cls", [("adamw", torch.optim.AdamW), ("stable_adamw", StableAdamW)])
def test_eps_and_betas_reach_the_optimizer(name, cls):
    s = compose_spec(
        f"optim.name={name}",
        "optim.eps=1e-6",
        "optim.betas=[0.9,0.95]",
        "weight_decay=0.01",
        "lr=0.02",
    )
    module = NanLabModule(torch.nn.Linear(3, 2), s.optim)
    opt = module.configure_optimizers()["optimizer"]
    assert type(opt) is cls
    g = opt.param_groups[0]
    assert (g["eps"], tuple(g["betas"]), g["weight_decay"], g["lr"]) == (
        1e-6,
        (0.9, 0.95),
        0.01,
        0.02,
    )


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.name=sgd", r"^optim.name=sgd: allowed adamw, stable_adamw$"),
        ("optim.eps=0", r"^optim.eps=0.0: must be a positive number$"),
        ("optim.betas=[0.9]", r"^optim.betas=\[0.9\]: must be two numbers in \[0, 1\)"),
        ("optim.betas=[0.9,1.0]", r"^optim.betas=\[0.9, 1.0\]: must be two numbers"),
        ("optim.z_loss=-1", r"^optim.z_loss=-1.0: must be a number >= 0"),
        ("+optim.lr=1", r"^optim.lr: unknown key \(a top-level key: lr=...\); allowed: name, eps"),
    ],
)
def test_bad_optim_values_are_one_line_errors(override, message):
    with pytest.raises(ValueError, match=message):
        compose_spec(override)


# --- z-loss ----------------------------------------------------------------------------------


def test_z_loss_adds_its_term_over_supervised_positions(batch):
    model = _random_model()
    with torch.no_grad():
        parts: dict = {}
        ce = supervised_loss(model, batch, 0.0, parts)
        total = supervised_loss(model, batch, 0.5)
    assert parts["ce"] == pytest.approx(float(ce))
    # the random model's log Z is log(vocab) + a little: the term is 0.5 * mean(log Z^2)
    assert math.log(151936) - 1 < parts["log_z"] < math.log(151936) + 3
    assert float(total - ce) == pytest.approx(0.5 * parts["log_z"] ** 2, rel=0.02)


def _train_log_z(batch, z_loss: float, steps: int = 10, lr: float = 1e-2) -> list[float]:
    """|mean log Z| over the supervised positions before each of a few AdamW steps on one
    batch, from the tiny base (whose log Z is about 9: far from 0)."""
    model = build_model(spec().model, seed=0)
    attention.apply(model, SoftmaxSpec("sdpa"))
    module = NanLabModule(model, OptimSpec(lr=lr, z_loss=z_loss, max_steps=steps))
    opt = module.configure_optimizers()["optimizer"]
    out = []
    for _ in range(steps):
        parts: dict = {}
        loss = module.compute_loss(batch, parts)
        out.append(abs(parts["log_z"]))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out


def test_z_loss_pulls_log_z_towards_zero(batch):
    """Same batch, same 10 steps at lr 1e-2: with z-loss |mean log Z| falls steadily,
    without it wanders near the base's. The coefficient is 1.0 so that 10 steps show it
    (PaLM's 1e-4 acts over thousands of steps; the map's arm uses 1e-4)."""
    plain, z = _train_log_z(batch, 0.0), _train_log_z(batch, 1.0)
    print(
        f"|mean log Z|: without {[round(x, 2) for x in plain]}, "
        f"with z-loss 1.0 {[round(x, 2) for x in z]}"
    )
    assert plain[0] == pytest.approx(z[0])
    assert z[-1] < 0.6 * plain[-1]
    assert z[-1] < 0.5 * z[0] and all(b < a for a, b in itertools.pairwise(z[1:]))


# --- StableAdamW ------------------------------------------------------------------------------


def _steps(opt_cls, grads, lr=1e-3, **kw):
    kw.setdefault("weight_decay", 0.0)  # torch's AdamW defaults to 0.01
    p = torch.nn.Parameter(torch.zeros(grads[0].shape))
    opt = opt_cls([p], lr=lr, **kw)
    changes = []
    for g in grads:
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        changes.append(float((p.detach() - before).abs().mean()))
    return p.detach(), changes, opt


def test_stable_adamw_is_adamw_while_gradients_do_not_outgrow_v():
    """Shrinking gradients: g^2 / v_hat <= 1 everywhere, so no step is clipped and the
    parameters follow torch's AdamW (weight decay and bias correction included)."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, generator=gen)
    grads = [base * 0.8**t + 0.01 * torch.randn(64, generator=gen) for t in range(8)]
    kw = {"betas": (0.9, 0.95), "eps": 1e-6, "weight_decay": 0.1}
    ref, _, _ = _steps(torch.optim.AdamW, grads, **kw)
    ours, _, opt = _steps(StableAdamW, grads, **kw)
    assert max(opt.last_rms) <= 1.0 + 1e-6
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-8)


def test_stable_adamw_caps_steps_when_gradients_outgrow_a_stale_v():
    """Wortsman et al.'s case: 300 steps of small, slowly shrinking gradients (no step is
    clipped: both optimizers agree), then gradients 100x larger for 5 steps. beta1 0.9 lets
    m follow within a few steps while v (beta2 0.999) remembers the small ones, so AdamW's
    steps grow to several lr; StableAdamW divides each by RMS = sqrt(mean(g^2 / v_hat))."""
    gen = torch.Generator().manual_seed(0)
    g = 1e-2 * torch.randn(256, generator=gen)
    grads = [g * (1 - t / 1000) for t in range(300)] + [100 * g] * 5
    _, adamw, _ = _steps(torch.optim.AdamW, grads)
    _, stable, opt = _steps(StableAdamW, grads)
    lr = 1e-3
    print(
        f"steps after the jump, mean |dparam| in lr: AdamW "
        f"{[round(c / lr, 2) for c in adamw[300:]]}, StableAdamW "
        f"{[round(c / lr, 3) for c in stable[300:]]} (last RMS {opt.last_rms[0]:.1f})"
    )
    assert adamw[:300] == pytest.approx(stable[:300], rel=1e-4)  # the same until the jump
    assert max(adamw[300:]) > 2.5 * lr  # AdamW: several lr per element
    assert opt.last_rms[0] > 3
    assert max(stable[300:]) < lr  # capped to below one lr
    assert sum(stable[300:]) < sum(adamw[300:]) / 5


def test_stable_adamw_does_not_hide_a_nan_gradient():
    grads = [torch.ones(4), torch.tensor([1.0, float("nan"), 1.0, 1.0])]
    p, _, _ = _steps(StableAdamW, grads)
    assert torch.isnan(p).all()  # the RMS is NaN, so every step of that tensor is


def _spike_run(
    opt_name: str,
    batch,
    steps: int = 6,
    at: int = 2,
    length: int = 3,
    factor: float = 100.0,
    lr: float = 3e-3,
):
    """The tiny base fine-tuned on one batch with the lr multiplied by `factor` for `length`
    steps from `at` (stress=lr_spike): the mean |parameter change| of each step."""
    model = build_model(spec().model, seed=0)
    attention.apply(model, SoftmaxSpec("sdpa"))
    module = NanLabModule(model, OptimSpec(lr=lr, name=opt_name, max_steps=steps))
    opt = module.configure_optimizers()["optimizer"]
    mult = stress.lr_multiplier(StressSpec("lr_spike", factor=factor, at=at, length=length))
    params = [p for p in model.parameters() if p.requires_grad]
    changes, rms = [], []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * mult(step)
        before = [p.detach().clone() for p in params]
        module.compute_loss(batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            changes.append(
                sum(float((p - b).abs().sum()) for p, b in zip(params, before))
                / sum(p.numel() for p in params)
            )
        rms.append(max(getattr(opt, "last_rms", [0.0]) or [0.0]))
    return changes, rms


def test_stable_adamw_caps_the_steps_that_follow_an_lr_spike(batch):
    """On the real model (lr 3e-3, x100 for steps 2-4): the first spiked step is as large for
    both (its gradients are as before, RMS <= 1: update clipping does not see the lr); the
    next one, whose gradients come from the moved weights, is capped (measured: RMS 2.0,
    0.087 vs 0.162 mean |dparam|). So the spike's first step, ~100 lr-sized, is not."""
    adamw, _ = _spike_run("adamw", batch)
    stable, rms = _spike_run("stable_adamw", batch)
    print("mean |dparam| per step, AdamW:", [f"{c:.2e}" for c in adamw])
    print("mean |dparam| per step, StableAdamW:", [f"{c:.2e}" for c in stable])
    print("largest per-tensor RMS per step:", [f"{r:.2f}" for r in rms])
    assert stable[2] == pytest.approx(adamw[2], rel=0.05)  # the first spiked step
    assert rms[2] <= 1.0 + 1e-3 and rms[3] > 1.5
    assert stable[3] < 0.7 * adamw[3]  # the next one: capped


# --- qk-norm ---------------------------------------------------------------------------------


def test_qk_norm_adds_norms_as_children_and_they_are_checkpointed(tmp_path):
    model = _random_model(qk_norm=True)
    names = [
        n for n, _ in model.named_parameters() if n.endswith(("q_norm.weight", "k_norm.weight"))
    ]
    assert len(names) == 2 * (2 + 2)  # q and k, 2 decoder layers + 2 vision blocks
    with torch.no_grad():  # gains other than 1, so a load that drops them is seen
        for n, p in model.named_parameters():
            if n.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 2.0)
    ids = torch.tensor([[151644, 872, 198, 3838, 374, 419, 30]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    model.save_pretrained(str(tmp_path))
    assert has_qk_norm(tmp_path)
    loaded = load_checkpoint(tmp_path)
    attention.apply(loaded, SoftmaxSpec("sdpa"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref)
    # a checkpoint without qk-norm is refused with qk_norm=true (it would change the model)
    plain = _random_model()
    plain.save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(ValueError, match=r"^model.qk_norm=true: .* was not trained with"):
        build_model(ModelSpec(path=str(tmp_path / "plain"), qk_norm=True), seed=0)


def test_qk_norm_makes_logits_invariant_to_the_qk_projection_scale():
    model = _random_model(qk_norm=True)
    ids = torch.tensor([[151644, 872, 198, 3838, 374, 419, 30]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        for layer in model.model.language_model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight *= 30
                proj.bias *= 30
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert attach_qk_norm_hooks(model) == 4  # re-attaching replaces, never stacks, hooks
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_qk_norm_follows_q_proj_into_lora():
    from nanlab.model.qwen_vl import LoraSpec

    model = build_model(ModelSpec(init="random", qk_norm=True, lora=LoraSpec(r=4)), seed=0)
    attn = model.base_model.model.model.language_model.layers[0].self_attn
    assert type(attn.q_proj).__name__ == "Linear" and hasattr(attn.q_proj, "base_layer")
    assert len(attn.q_proj._forward_hooks) == 1  # on the LoRA layer (base + delta)
    assert len(attn.q_proj.base_layer._forward_hooks) == 0


@pytest.mark.parametrize("qk_norm", [False, True])
def test_qk_norm_bounds_attention_logits_under_logit_growth(batch, qk_norm):
    """stress=logit_growth scales q_proj/k_proj (vision: the qkv's q|k rows) until the
    largest logit of every layer is the target. Without qk-norm it gets there; with it the
    scaling cancels in the norms and every logit stays below sqrt(head_dim) x max gain^2."""
    model = _random_model(qk_norm=qk_norm)
    module = NanLabModule(model, OptimSpec())
    before = _max_logits(model, module, batch)
    stress.apply_to_model(
        StressSpec("logit_growth", target_logit=60.0), model, batch, module.compute_loss
    )
    after = _max_logits(model, module, batch)
    print(
        f"qk_norm={qk_norm}: max logit per layer before {max(before.values()):.2f}, "
        f"after the stress {max(after.values()):.2f} (target 60)"
    )
    if not qk_norm:
        assert all(v == pytest.approx(60.0, rel=0.02) for v in after.values())
        return
    modules = dict(model.named_modules())
    for name, top in after.items():
        attn = modules[name]
        gain = float(torch.cat([attn.q_norm.weight, attn.k_norm.weight]).detach().abs().max())
        bound = math.sqrt(attn.head_dim) * gain * gain  # |q.k| <= d max|g|^2, x 1/sqrt(d)
        assert top <= bound * 1.001, (name, top, bound)
        assert top == pytest.approx(before[name], rel=1e-3)  # the scaling did nothing


@pytest.mark.slow
def test_qk_norm_base_is_its_own_cached_base_with_trained_norms():
    """The base is pretrained with the norms under its own key (slow: built on first use,
    206 s on 2 shared cores); loading builds the norms and loads their trained gains."""
    from nanlab.model.base import base_dir, base_key

    plain, qk = spec().model, dataclasses.replace(spec().model, qk_norm=True)
    assert base_key(plain) != base_key(qk)
    model = build_model(qk, seed=0)
    assert has_qk_norm(base_dir(qk)) and not has_qk_norm(base_dir(plain))
    gains = torch.cat(
        [
            p.detach().flatten()
            for n, p in model.named_parameters()
            if n.endswith(("q_norm.weight", "k_norm.weight"))
        ]
    )
    assert gains.numel() and (gains - 1).abs().max() > 1e-3  # trained, not fresh ones
    print(f"qk-norm base: gains {float(gains.min()):.2f} .. {float(gains.max()):.2f}")


@pytest.mark.slow
def test_logit_growth_cannot_reach_its_target_on_the_qk_norm_base(batch):
    """The map's arm: stress=logit_growth (target 12) on the base pretrained with qk-norm
    (slow: the base is built on first use)."""
    model = build_model(dataclasses.replace(spec().model, qk_norm=True), seed=0)
    attention.apply(model, SoftmaxSpec("naive"))
    module = NanLabModule(model, OptimSpec())
    before = _max_logits(model, module, batch)
    stress.apply_to_model(
        StressSpec("logit_growth", target_logit=12.0), model, batch, module.compute_loss
    )
    after = _max_logits(model, module, batch)
    print(
        "qk-norm base, max logit per layer before / after the stress:",
        {n.split("model.")[-1]: (round(before[n], 2), round(v, 2)) for n, v in after.items()},
    )
    assert all(v == pytest.approx(before[n], rel=1e-3) for n, v in after.items())
    assert max(after.values()) < 12.0


# --- fp32 q.k -----------------------------------------------------------------------------------


class FakeAttn(torch.nn.Module):
    num_key_value_groups = 2


def test_fp32_qk_matches_float64_attention():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 7, 16, generator=gen) for h in (4, 2, 2))
    mask = torch.full((7, 7), torch.finfo(torch.float32).min).triu(1)[None, None]
    out, w = attention.attention_function(SoftmaxSpec("fp32_qk"))(
        FakeAttn().eval(), q, k, v, mask, 0.25
    )
    k2, v2 = (t.double().repeat_interleave(2, dim=1) for t in (k, v))
    ref = torch.softmax(q.double() @ k2.transpose(2, 3) * 0.25 + mask.double(), -1) @ v2
    torch.testing.assert_close(out.double(), ref.transpose(1, 2), atol=1e-5, rtol=1e-4)
    assert w.dtype == v.dtype


def test_fp32_qk_vs_eager_on_a_dot_product_past_fp16_max():
    """One q.k of 2e5 (logit 5e4 at scaling 1/4) under fp16 autocast: eager's fp16 matmul
    gives inf and its softmax NaN; fp32_qk's is finite and puts the weight on that key."""
    q = torch.zeros(1, 2, 3, 16)
    k = torch.zeros(1, 1, 3, 16)
    q[..., 0], k[..., 2, 0] = 400.0, 500.0
    v = torch.randn(1, 1, 3, 16)
    attn = FakeAttn().eval()
    attn.num_key_value_groups = 2
    with torch.autocast("cpu", dtype=torch.float16):
        eager, _ = attention.attention_function(SoftmaxSpec("eager"))(attn, q, k, v, None, 0.25)
        fp32, w = attention.attention_function(SoftmaxSpec("fp32_qk"))(attn, q, k, v, None, 0.25)
    assert torch.isnan(eager).any()
    assert torch.isfinite(fp32).all() and (w[..., 2] == 1).all()


def test_fp32_qk_keeps_fp16_finite_where_eager_overflows(batch):
    """stress=logit_growth at a target of 3e4 (q.k up to 1.2e5 in the decoder at scaling
    1/4, 1.7e5 in the vision tower at 1/sqrt(32): past fp16's 65,504), then the same weights
    under fp16 autocast (fp32-accumulated GEMMs, as the fp16 plugin runs them on this CPU):
    eager's fp16 q.k is inf and its attention NaN; fp32_qk's stays finite."""
    model = build_model(spec().model, seed=0)
    attention.apply(model, SoftmaxSpec("eager"))
    module = NanLabModule(model, OptimSpec())
    stress.apply_to_model(
        StressSpec("logit_growth", target_logit=3e4), model, batch, module.compute_loss
    )
    top = max(_max_logits(model, module, batch).values())
    assert top > FP16_MAX / 4  # some q.k is past fp16's max
    results = {}
    for softmax in ("eager", "fp32_qk"):
        m = copy.deepcopy(model)
        attention.apply(m, SoftmaxSpec(softmax))
        stats = AttentionStats(m)
        with (
            stats.active(),
            torch.no_grad(),
            Fp32AccumulatedHalfGemm(),
            torch.autocast("cpu", dtype=torch.float16),
        ):
            loss = NanLabModule(m, OptimSpec()).compute_loss(batch)
        bad = sum(s["nonfinite"] for s in stats.summary().values())
        results[softmax] = (float(loss), bad)
    print(
        f"largest logit {top:.3g}; fp16 autocast: eager loss {results['eager'][0]}, "
        f"{results['eager'][1]} non-finite attention weights; fp32_qk loss "
        f"{results['fp32_qk'][0]:.3f}, {results['fp32_qk'][1]} non-finite"
    )
    assert not math.isfinite(results["eager"][0]) and results["eager"][1] > 0
    assert math.isfinite(results["fp32_qk"][0]) and results["fp32_qk"][1] == 0


def test_new_prediction_arms_compose():
    """Every mitigation arm of the new switches composes on its mechanism's baseline."""
    import yaml

    from helpers import ROOT

    seen = set()
    for path in sorted((ROOT / "conf" / "stress").glob("*.yaml")):
        m = yaml.safe_load(path.read_text())
        for p in m.get("predictions") or []:
            if p["advice"] in ("z_loss", "qk_norm", "update_clipping", "adam_eps_beta2", "fp32_qk"):
                s = compose_spec(
                    "experiment=nan_map_base",
                    f"stress={path.stem}",
                    *merge_overrides(m["baseline"], p["mitigation"]),
                )
                seen.add(p["advice"])
                if p["advice"] == "adam_eps_beta2":
                    assert (s.optim.eps, list(s.optim.betas)) == (1e-6, [0.9, 0.95])
    assert seen == {"z_loss", "qk_norm", "update_clipping", "adam_eps_beta2", "fp32_qk"}
