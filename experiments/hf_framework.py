"""A real fine-tuning framework on top of transformers.Trainer, LLaMA-Factory, with
`NanMonitorCallback` (nanlab/integrations/hf.py) added through its own extension point
(`run_exp(args, callbacks=[...])`), on the tiny Qwen2.5-VL checkpoint, with a planted failure:

    PYTHONPATH=. .venv-lf/bin/python -m experiments.hf_framework CHECKPOINT OUT_DIR

(`make hf-example` builds the environment and the checkpoint, then runs this). It writes
OUT_DIR/record.json and prints the callback's verdict.

LLaMA-Factory 0.9.5 pins transformers<=5.6 and accelerate<=1.11, so it runs in its own
environment (.venv-lf), with nanlab importable from the work tree; nanlab's runner is not
needed there (no Lightning, no Hydra).

The planted mechanism is the map's `masked_rows` (conf/stress/masked_rows.yaml), planted by
a second callback, `PlantMaskedRows`, as the map plants it: at train begin it makes every
attention layer use nanlab's `eager` variant with the mask built as summed float-min planes
(nanlab.numerics.attention.apply, registered with transformers' AttentionInterface and
AttentionMaskInterface), and makes LLaMA-Factory's collator pad on the left (its tokenizer's
padding_side; LLaMA-Factory pads on the right in training). The padded query rows of a batch
are then -inf across every key, in bf16 as in fp32, and their softmax is 0/0. Everything
else is LLaMA-Factory's: its argument parser, model loader, template (qwen2_vl), dataset
pipeline (sharegpt + images, dataset_info.json), collator (mrope position ids, pad to a
multiple of 8), CustomSeq2SeqTrainer, and accelerate's bf16 autocast on CPU.

Why not fp16_overflow (tried first, with an fp16_overflow checkpoint): on CPU accelerate
turns fp16 mixed precision off (native_amp only where device.type != "cpu"), so
LLaMA-Factory's fp16=true trains in fp32 and an fp16 overflow cannot fire; bf16 autocast does
run on CPU (accelerate sets native_amp for bf16 on cpu).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import TrainerCallback

SHAPES = ["circle", "square", "triangle"]
COLORS = ["red", "green", "blue", "yellow"]


class PlantMaskedRows(TrainerCallback):
    """stress=masked_rows planted into a framework's run from its callbacks: the model's
    attention -> nanlab's eager variant with summed-planes masks, and the collator's
    tokenizer pads on the left. Put it before the monitor in the callbacks; with `monitor`,
    the monitor's record names what was planted. mask="transformers" is the map's control
    (conf/stress/masked_rows.yaml): the same variant and left padding, transformers' own
    mask (one finite float-min plane), which must stay finite."""

    def __init__(self, monitor=None, softmax: str = "eager", mask: str = "summed_planes"):
        self.monitor, self.softmax, self.mask = monitor, softmax, mask
        self.implementation: str | None = None

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        from nanlab.config.specs import SoftmaxSpec
        from nanlab.integrations.hf import _record_from_args
        from nanlab.numerics import attention

        self.implementation = attention.apply(model, SoftmaxSpec(name=self.softmax), mask=self.mask)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        tokenizer.padding_side = "left"
        if self.monitor is not None and self.monitor.record is None:
            # the monitor's own record (from the TrainingArguments), naming what was planted
            record = _record_from_args(args, model)
            record.stress = "masked_rows" if self.mask == "summed_planes" else "none"
            record.softmax = self.softmax
            record.data = "shapes (LLaMA-Factory sharegpt, padding_side=left)"
            self.monitor.record = record


def write_dataset(data: Path, n: int = 8) -> str:
    """A small shapes dataset in LLaMA-Factory's own format: sharegpt messages with an
    <image>, the images, and dataset_info.json; answers of different lengths, so a batch of
    two pads. Returns the dataset's name."""
    from PIL import Image, ImageDraw

    (data / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        color, shape = COLORS[i % len(COLORS)], SHAPES[i % len(SHAPES)]
        img = Image.new("RGB", (112, 112), "white")
        draw = ImageDraw.Draw(img)
        box = (20, 20, 92, 92)
        if shape == "circle":
            draw.ellipse(box, fill=color)
        elif shape == "square":
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([(56, 20), (92, 92), (20, 92)], fill=color)
        path = data / "images" / f"{i}.png"
        img.save(path)
        answer = f"A {color} {shape}." + " It is alone on a white background." * (i % 3)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": "<image>What is in the image?"},
                    {"role": "assistant", "content": answer},
                ],
                "images": [str(path)],
            }
        )
    (data / "shapes.json").write_text(json.dumps(rows, indent=1))
    (data / "dataset_info.json").write_text(
        json.dumps(
            {
                "nan_shapes": {
                    "file_name": "shapes.json",
                    "formatting": "sharegpt",
                    "columns": {"messages": "messages", "images": "images"},
                    "tags": {
                        "role_tag": "role",
                        "content_tag": "content",
                        "user_tag": "user",
                        "assistant_tag": "assistant",
                    },
                }
            },
            indent=1,
        )
    )
    return "nan_shapes"


def lf_args(checkpoint, out: Path, dataset: str, steps: int = 3, bf16: bool = True) -> dict:
    """LLaMA-Factory's SFT arguments (what a user's YAML holds), for CPU."""
    return {
        "stage": "sft",
        "do_train": True,
        "model_name_or_path": str(checkpoint),
        "dataset": dataset,
        "dataset_dir": str(out / "data"),
        "template": "qwen2_vl",
        "finetuning_type": "full",
        "output_dir": str(out / "lf"),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": 2,
        "max_steps": steps,
        "learning_rate": 1e-4,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "cutoff_len": 512,
        "image_max_pixels": 112 * 112,
        "bf16": bf16,
        "use_cpu": True,
        "preprocessing_num_workers": 1,
        "dataloader_num_workers": 0,
        "overwrite_cache": True,
        "trust_remote_code": True,
    }


def llamafactory_example(
    checkpoint, out_dir, steps: int = 3, mask: str | None = "summed_planes", bf16: bool = True
):
    """LLaMA-Factory's real SFT entry (`llamafactory.train.tuner.run_exp`) with the monitor
    in its callbacks, and PlantMaskedRows(mask=`mask`) before it (None: nothing planted,
    LLaMA-Factory as it comes). Returns the callback (its `final` record and `verdict`)."""
    from llamafactory.train.tuner import run_exp

    from nanlab.integrations.hf import NanMonitorCallback

    out = Path(out_dir)
    dataset = write_dataset(out / "data")
    monitor = NanMonitorCallback(out_dir=out)
    plant = [PlantMaskedRows(monitor, mask=mask)] if mask else []
    callbacks = [*plant, monitor]
    run_exp(lf_args(checkpoint, out, dataset, steps, bf16), callbacks=callbacks)
    return monitor


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        print(
            "usage: python -m experiments.hf_framework CHECKPOINT OUT_DIR [--control | --no-plant]",
            file=sys.stderr,
        )
        return 2
    mask = (
        "transformers" if "--control" in argv else None if "--no-plant" in argv else "summed_planes"
    )
    monitor = llamafactory_example(argv[0], argv[1], mask=mask)
    rec = monitor.final
    print("\n--- nanlab verdict (NanMonitorCallback in LLaMA-Factory's run_exp) ---")
    print(monitor.verdict)
    print(f"record: {Path(argv[1]) / 'record.json'} (status {rec.status}, cause {rec.cause})")
    return 0 if rec.status != "error" else 1


if __name__ == "__main__":
    raise SystemExit(main())
