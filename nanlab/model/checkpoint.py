"""The fine-tuned model in Hugging Face format: save it, find it, load it.

`save_pretrained(model, processor, out_dir, lora_merged)` writes a directory that loads with
plain transformers (`Qwen2_5_VLForConditionalGeneration.from_pretrained(out_dir)`,
`AutoProcessor.from_pretrained(out_dir)`) and with this project's `model.path=out_dir`:

    out_dir/config.json, generation_config.json, model.safetensors      the weights (fp32)
    out_dir/tokenizer.json, tokenizer_config.json, chat_template.jinja   the tokenizer
    out_dir/processor_config.json (or preprocessor_config.json)          the image processor

LoRA runs (a peft `PeftModel`):
- lora_merged=True: the adapter is merged into the base weights (`merge_and_unload`), so
  the directory is an ordinary checkpoint. The peft wrapper is consumed doing so: call it
  once, at the end of training.
- lora_merged=False: the unmodified base model and the adapter (`adapter_config.json`,
  `adapter_model.safetensors`) side by side in out_dir, transformers' "local model with an
  embedded adapter": with peft installed, plain `from_pretrained(out_dir)` (and so
  `model.path=out_dir`) loads the base and attaches the adapter; without peft it loads the
  base alone. The directory is self-contained and can be moved.
"""

from __future__ import annotations

from pathlib import Path

import torch

HF_DIR = "hf"  # train.py's save.hf: run_dir / "hf"


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def save_pretrained(model, processor, out_dir: str | Path, lora_merged: bool = True) -> Path:
    """Write the model (safetensors) and the processor (tokenizer, image processor, chat
    template) to out_dir; returns out_dir. See the module docstring for LoRA runs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_peft(model):
        if lora_merged:
            model = model.merge_and_unload()
        else:
            name = model.active_adapter
            # the base sits in the same directory: the path transformers and peft look in
            model.peft_config[name].base_model_name_or_path = str(out_dir.resolve())
            model.save_pretrained(str(out_dir), safe_serialization=True)  # the adapter only
            model = model.unload()  # the base model: LoRA layers removed, weights untouched
    model.save_pretrained(str(out_dir), safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(str(out_dir))
    return out_dir


def resolve(path: str | Path) -> Path:
    """A Hugging Face checkpoint directory: `path` itself, or `path/hf` for a training run
    directory saved with save.hf=true. One-line error otherwise."""
    path = Path(path)
    for candidate in (path, path / HF_DIR):
        if (candidate / "config.json").is_file():
            return candidate
    if not path.exists():
        raise ValueError(f"checkpoint={path}: no such directory")
    raise ValueError(
        f"checkpoint={path}: no config.json there or in {HF_DIR}/ (a directory "
        "written by save.hf=true or save_pretrained)"
    )


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, processor) with plain transformers, as a user of the checkpoint would."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    path = resolve(path)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(path), local_files_only=True, dtype=dtype
    )
    processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    return model, processor
