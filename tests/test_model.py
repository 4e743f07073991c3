"""The tiny Qwen2.5-VL: real architecture with both towers; freezing, LoRA, local loading."""

import pytest

from nanlab.model.qwen_vl import ModelSpec, build_model, is_vision_param, tiny_config
from nanlab.run.module import NanLabModule, OptimSpec


def test_tiny_config_has_both_towers_and_their_features():
    cfg = tiny_config(ModelSpec())
    v, t = cfg.vision_config, cfg.text_config
    assert v.depth == 2 and v.fullatt_block_indexes == [1]  # block 0 windowed, block 1 full
    assert t.num_key_value_heads < t.num_attention_heads  # GQA
    assert sum(t.rope_parameters["mrope_section"]) * 2 == t.hidden_size // t.num_attention_heads
    assert t.vocab_size >= 151665  # every Qwen2.5 token id fits
    model = build_model(ModelSpec(), seed=0)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert hasattr(model.model.visual, "merger")


def test_same_seed_same_weights():
    a, b, c = (build_model(ModelSpec(), seed=s) for s in (0, 0, 1))
    wa, wb, wc = (m.model.visual.blocks[0].attn.qkv.weight for m in (a, b, c))
    assert (wa == wb).all() and not (wa == wc).all()


def test_freeze_flags():
    model = build_model(ModelSpec(freeze_vision=True, freeze_llm=True), seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".merger." in n for n in trainable)


def test_vision_lr_gets_its_own_param_group():
    model = build_model(ModelSpec(), seed=0)
    module = NanLabModule(model, OptimSpec(lr=1e-3, vision_lr=1e-5, max_steps=10))
    opt = module.configure_optimizers()["optimizer"]
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == [1e-5, 1e-3]
    n_vision = sum(1 for n, _ in model.named_parameters() if is_vision_param(n))
    assert len(opt.param_groups[1]["params"]) == n_vision


def test_lora_wraps_with_peft():
    from nanlab.model.qwen_vl import LoraSpec

    model = build_model(ModelSpec(lora=LoraSpec(r=4)), seed=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_missing_checkpoint_path_is_one_line_error(tmp_path):
    with pytest.raises(ValueError, match=r"^model.path=.*nope: no config.json there"):
        build_model(ModelSpec(path=str(tmp_path / "nope")), seed=0)
