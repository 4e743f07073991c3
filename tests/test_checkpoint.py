"""Checkpoints: the Hugging Face export reloads in plain transformers with the same logits
(LoRA merged or as an adapter), and a run resumed from its Lightning checkpoint continues
the loss curve of an uninterrupted one (fp32, CPU)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from nanlab.config.compose import compose_spec
from nanlab.data.datamodule import Collator, DataSpec, shapes_splits
from nanlab.model.checkpoint import resolve, save_pretrained
from nanlab.model.processing import ProcessorSpec, load_processor
from nanlab.model.qwen_vl import LoraSpec, ModelSpec, build_model
from nanlab.run.runner import run


def _samples(n: int = 3) -> list[dict]:
    return shapes_splits(DataSpec(num_train=1, num_val=0, num_test=n), 0)["test"]


def _logits(model, batch: dict) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "sample_ids")}
    with torch.no_grad():
        return model.eval()(**inputs, use_cache=False).logits


@pytest.mark.slow
def test_save_pretrained_reloads_in_plain_transformers(tmp_path, processor):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = build_model(ModelSpec(), seed=0)
    out = save_pretrained(model, processor, tmp_path / "hf", lora_merged=True)
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")), "weights must be safetensors"

    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, local_files_only=True)
    plain_processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    assert type(plain_processor).__name__ == "Qwen2_5_VLProcessor"
    samples = _samples()
    ours, theirs = Collator(processor)(samples), Collator(plain_processor)(samples)
    for key, value in ours.items():  # tokenizer, chat template and image processor round-trip
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, theirs[key]), key
    reference = _logits(model, ours)
    assert torch.equal(reference, _logits(plain, theirs))

    # this project's loader: model.path=DIR, and the tokenizer from the same dir
    again = build_model(ModelSpec(path=str(out)), seed=123)
    assert torch.equal(
        reference, _logits(again, Collator(load_processor(ProcessorSpec(), str(out)))(samples))
    )


@pytest.mark.slow
@pytest.mark.parametrize("merged", [True, False], ids=["merged", "adapter"])
def test_lora_saves_merged_or_adapter(tmp_path, processor, merged):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = build_model(ModelSpec(lora=LoraSpec(r=4)), seed=0)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained adapter: B is zero at init, which would hide a bug
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = Collator(processor)(_samples(2))
    reference = _logits(model, batch)
    out = save_pretrained(model, processor, tmp_path / "hf", lora_merged=merged)

    assert (out / "adapter_config.json").is_file() != merged
    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, local_files_only=True)
    project = build_model(ModelSpec(path=str(out)), seed=0)
    for reloaded in (plain, project):
        # merging reorders the fp32 arithmetic (W + BA instead of Wx + B(Ax)): close, not equal
        torch.testing.assert_close(
            _logits(reloaded, batch),
            reference,
            atol=1e-4 if merged else 0,
            rtol=1e-4 if merged else 0,
        )


def test_resolve_finds_a_run_dirs_hf_export(tmp_path):
    (tmp_path / "run" / "hf").mkdir(parents=True)
    (tmp_path / "run" / "hf" / "config.json").write_text("{}")
    assert resolve(tmp_path / "run") == tmp_path / "run" / "hf"
    assert resolve(tmp_path / "run" / "hf") == tmp_path / "run" / "hf"
    with pytest.raises(ValueError, match="no config.json"):
        resolve(tmp_path)
    with pytest.raises(ValueError, match="no such directory"):
        resolve(tmp_path / "missing")


# --- resuming ---------------------------------------------------------------------------

STEPS, CUT = 6, 3
RESUME = [
    "precision=fp32",
    "logger=none",
    f"max_steps={STEPS}",
    "batch_size=2",
    "lr=1e-3",
    "data.num_val=0",
    "data.num_test=0",
    "trainer.progress=false",
    "trainer.accelerator=cpu",
    "monitor.every=0",
]


def _history(run_dir: Path) -> dict[str, list[float]]:
    with open(run_dir / "history.csv") as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows] for k in ("step", "loss", "grad_norm", "lr")}


@pytest.fixture
def fast_processor(monkeypatch, processor):
    """run() loads the default processor each time (~5 s): hand it the session's."""
    import nanlab.model.processing

    real = nanlab.model.processing.load_processor

    def load(spec, tokenizer_path=None):
        if spec == ProcessorSpec() and tokenizer_path is None:
            return processor
        return real(spec, tokenizer_path)

    monkeypatch.setattr(nanlab.model.processing, "load_processor", load)


# finite: a short run (or its resumed half) need not drop the loss by the ok margin
FINITE = ("ok", "stalled")


class StopAt(Callback):
    """Stops the run after `CUT` steps, as a killed job would have stopped (its newest
    checkpoint is the step-CUT one)."""

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= CUT:
            trainer.should_stop = True


def _resume_case(tmp_path, num_train: int, save_hf: bool = False):
    base = [*RESUME, f"data.num_train={num_train}"]
    full = run(compose_spec(*base), tmp_path / "full")
    assert full.status in FINITE, full.error
    cut = run(
        compose_spec(*base, "save.checkpoint=true"), tmp_path / "cut", extra_callbacks=[StopAt()]
    )
    assert cut.status in FINITE and cut.steps_done == CUT, cut.error
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    extra = ["save.checkpoint=true", f"save.hf={str(save_hf).lower()}", f"ckpt_path={last}"]
    resumed = run(compose_spec(*base, *extra), tmp_path / "resumed")
    assert resumed.status in FINITE and resumed.steps_done == STEPS, resumed.error
    return [_history(tmp_path / d) for d in ("full", "cut", "resumed")]


def _assert_same_curve(full, cut, resumed):
    assert cut["step"] == full["step"][:CUT]
    assert resumed["step"] == full["step"][CUT:] == list(range(CUT, STEPS))
    # scheduler and step restored: the same learning rate at every step
    assert resumed["lr"] == full["lr"][CUT:]
    for key in ("loss", "grad_norm"):
        assert cut[key] == pytest.approx(full[key][:CUT], rel=1e-6)
        assert resumed[key] == pytest.approx(full[key][CUT:], rel=1e-5), key
    assert all(math.isfinite(x) for x in full["loss"])


@pytest.mark.slow
def test_resumed_run_continues_the_loss_curve(tmp_path, fast_processor):
    """Optimizer, scheduler, step and weights come back from last.ckpt: steps CUT.. of the
    resumed run match the uninterrupted run. One batch per epoch, so the data order is the
    same whatever the loader does on resume (see the mid-epoch test below); the resumed run
    also exports hf/, which must hold its final weights."""
    full, cut, resumed = _resume_case(tmp_path, num_train=2, save_hf=True)
    _assert_same_curve(full, cut, resumed)

    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path / "resumed" / "hf", local_files_only=True
    )
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == STEPS
    trained = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    exported = hf.state_dict()
    assert set(exported) <= set(trained)
    for name, value in exported.items():
        assert torch.equal(value, trained[name]), name


@pytest.mark.slow
def test_resumed_run_mid_epoch_continues_the_loss_curve(tmp_path, fast_processor):
    full, cut, resumed = _resume_case(tmp_path, num_train=8)  # 4 steps an epoch
    _assert_same_curve(full, cut, resumed)
