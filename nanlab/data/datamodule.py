"""Data: JSONL readers for three fine-tuning formats, the collator that masks labels to the
assistant's tokens, and the LightningDataModule tying them to the shapes set (nanlab/data/shapes.py).

A sample is a plain dict, whatever its source:
    {"id": str, "images": [PIL RGB images],
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ...}]},
                  {"role": "assistant", "content": [{"type": "text", "text": ...}]}, ...]}
The image entries sit where the `<image>` placeholders were, in the order of "images".
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from nanlab.config.options import DATA
from nanlab.config.specs import PADDING_SIDES, DataSpec
from nanlab.data.shapes import shapes_splits

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # what the loss skips (torch's cross_entropy default)
PLACEHOLDER = "<image>"


# ----------------------------------------------------------------------------------------------
# JSONL: Qwen-VL, LLaMA-Factory and ms-swift records, detected per record
#   Qwen-VL:       {"image": str | [str], "conversations": [{"from": "human", "value": "<image>\n..."}]}
#   LLaMA-Factory: {"images": [str], "conversations": [{"from": "human"|"gpt", "value": ...}]}
#                  (or "messages" with role/content, its sharegpt-with-openai-tags style)
#   ms-swift:      {"messages": [{"role": "user", "content": "<image>..."}], "images": [str]}

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def parse_record(obj, root: Path) -> tuple[list[Path], list[dict]]:
    """(image paths, messages) of one record, or a Value/TypeError with a one-line reason."""
    if not isinstance(obj, dict):
        raise TypeError(f"unknown format: a {type(obj).__name__}, not a JSON object")
    if "conversations" in obj:  # Qwen-VL or LLaMA-Factory
        turns, role_key, text_key = obj["conversations"], "from", "value"
    elif "messages" in obj:  # ms-swift or LLaMA-Factory with openai-style tags
        turns, role_key, text_key = obj["messages"], "role", "content"
    else:
        raise ValueError(
            f"unknown format: keys {sorted(obj)}, expected 'conversations' "
            "(Qwen-VL, LLaMA-Factory) or 'messages' (ms-swift)"
        )
    if "image" in obj and "images" in obj:
        raise ValueError("unknown format: both 'image' and 'images'")
    images = obj.get("images", obj.get("image")) or []
    images = [images] if isinstance(images, (str, dict)) else images
    paths = []
    for image in images:
        image = image.get("path") if isinstance(image, dict) else image  # ms-swift allows dicts
        if not isinstance(image, str):
            raise TypeError(f"image entry {image!r} is not a path")
        paths.append(root / image)
    if not isinstance(turns, list) or not turns:
        raise ValueError("no turns in the conversation")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or turn.get(role_key) not in ROLES:
            raise ValueError(
                f"unknown format: turn {turn!r} needs '{role_key}' in {', '.join(ROLES)}"
            )
        text = turn.get(text_key)
        if not isinstance(text, str):
            raise TypeError(f"unknown format: turn '{text_key}' is not a string")
        # The image entries go where the placeholders were; text around them stays as is.
        content = []
        for i, piece in enumerate(text.split(PLACEHOLDER)):
            if i > 0:
                content.append({"type": "image"})
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": ROLES[turn[role_key]], "content": content})
    placeholders = sum(t[text_key].count(PLACEHOLDER) for t in turns)
    if placeholders != len(paths):
        raise ValueError(
            f"{placeholders} {PLACEHOLDER} placeholders but {len(paths)} "
            f"image{'s' if len(paths) != 1 else ''}"
        )
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        # No answer tokens means a loss over zero tokens: NaN by construction.
        raise ValueError("no non-empty assistant turn to learn from")
    for path in paths:
        if not path.is_file():
            raise ValueError(f"missing image {path}")
    return paths, messages


class JsonlDataset(Dataset):
    """Map-style: records are parsed and checked up front, images decoded on access."""

    def __init__(
        self, path: str | Path, image_root: str | Path | None = None, skip_bad: bool = False
    ):
        self.path = Path(path)
        root = Path(image_root) if image_root is not None else self.path.parent
        self.records: list[tuple] = []  # (line number, image paths, messages)
        self.skipped = 0
        first_error = None
        for label, obj, bad_json in read_objects(self.path):
            where = f"{self.path}:{label}"
            try:
                if bad_json:
                    raise ValueError(bad_json)
                paths, messages = parse_record(obj, root)
                for p in paths:  # reads the header only: catches non-images cheaply
                    Image.open(p).close()
            except (ValueError, TypeError, OSError) as e:
                error = f"{where}: {str(e).splitlines()[0]}"
                if not skip_bad:
                    raise ValueError(error) from None
                self.skipped += 1
                first_error = first_error or error
                continue
            self.records.append((label, paths, messages))
        if self.skipped:
            log.warning(
                "skipped %d bad records of %d in %s (data.skip_bad=true); first: %s",
                self.skipped,
                self.skipped + len(self.records),
                self.path,
                first_error,
            )
        if not self.records:
            raise ValueError(f"{self.path}: no usable records")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        label, paths, messages = self.records[i]
        try:
            images = [Image.open(p).convert("RGB") for p in paths]
        except OSError as e:  # changed on disk since it was checked
            raise ValueError(f"{self.path}:{label}: {str(e).splitlines()[0]}") from None
        return {"id": f"{self.path.name}:{label}", "images": images, "messages": messages}


def read_objects(path: Path):
    """Yield (line number, object, None) per record, or (line number, None, why) for bad JSON.
    A .json file holds one list; its records are numbered "item 1", "item 2", ..."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:  # the whole file is unusable: never skipped
            raise ValueError(f"{path}:{e.lineno}: bad JSON: {e.msg}") from None
        if not isinstance(items, list):
            raise ValueError(f"{path}: a .json file must hold a list of records")
        for i, obj in enumerate(items, 1):
            yield f"item {i}", obj, None
        return
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield n, json.loads(line), None
            except json.JSONDecodeError as e:
                yield n, None, f"bad JSON: {e.msg} at column {e.colno}"


# ----------------------------------------------------------------------------------------------
# collation: chat template -> processor -> labels on the assistant's tokens only


def assistant_labels(input_ids: torch.Tensor, header: list[int], end_id: int) -> torch.Tensor:
    """-100 everywhere except each assistant reply: from just after `<|im_start|>assistant\\n`
    through its closing `<|im_end|>`. Works on token ids, so padding side does not matter."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    h = len(header)
    for row, ids in enumerate(input_ids.tolist()):
        i = 0
        while i + h <= len(ids):
            if ids[i : i + h] != header:
                i += 1
                continue
            start = end = i + h
            while end < len(ids) and ids[end] != end_id:
                end += 1
            labels[row, start : end + 1] = input_ids[row, start : end + 1]  # includes <|im_end|>
            i = end + 1
    return labels


class Collator:
    def __init__(
        self,
        processor,
        padding_side: str = "right",
        max_length: int | None = None,
        pixel_max: int = 255,
    ):
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"data.padding_side={padding_side}: allowed left, right")
        self.processor = processor
        self.padding_side = padding_side
        self.max_length = max_length
        # normalize=false: the processor gives 0-255; 16-bit files read without rescaling
        # give 0-65535 (pixel_max), the same picture 257x larger
        self.pixel_scale = pixel_max / 255
        tokenizer = processor.tokenizer
        self.header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
        self.end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        # vision tokens never carry loss, even if a reply holds an image
        self.vision_ids = torch.tensor(
            tokenizer.convert_tokens_to_ids(
                [
                    "<|vision_start|>",
                    "<|vision_end|>",
                    "<|vision_pad|>",
                    "<|image_pad|>",
                    "<|video_pad|>",
                ]
            )
        )

    @classmethod
    def for_data(cls, processor, spec: DataSpec, padding_side: str | None = None) -> Collator:
        """The collator of a data spec: training, the probe and the serving pass (which pads
        as it serves, `padding_side`) batch through this one mapping of data.* keys."""
        return cls(processor, padding_side or spec.padding_side, spec.max_length, spec.pixel_max)

    def __call__(self, samples: list[dict]) -> dict:
        texts = [self.processor.apply_chat_template(s["messages"], tokenize=False) for s in samples]
        images = [image for s in samples for image in s["images"]]
        batch = self.processor(
            text=texts,
            images=images or None,
            padding=True,
            padding_side=self.padding_side,
            return_tensors="pt",
        )
        batch = dict(batch)
        if "pixel_values" in batch:  # normalize=False gives uint8; keep one float dtype
            batch["pixel_values"] = batch["pixel_values"].float()
            if not self.processor.image_processor.do_rescale:
                batch["pixel_values"] = batch["pixel_values"] * self.pixel_scale
        labels = assistant_labels(batch["input_ids"], self.header, self.end_id)
        labels[torch.isin(batch["input_ids"], self.vision_ids)] = IGNORE_INDEX
        batch["labels"] = labels
        if self.max_length is not None:
            batch = truncate(
                batch,
                self.max_length,
                self.padding_side,
                self.vision_ids,
                [s["id"] for s in samples],
                self.processor.tokenizer.pad_token_id,
            )
        batch["sample_ids"] = [s["id"] for s in samples]
        return batch


SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels", "mm_token_type_ids")


def truncate(
    batch: dict, max_length: int, side: str, vision_ids: torch.Tensor, ids: list[str], pad_id: int
) -> dict:
    """Keep the first `max_length` real tokens of each sequence (what a fine-tuning
    framework's cutoff_len does before padding), re-padded on the same side. Cutting into
    the image tokens is refused: the model needs one token per image feature."""
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(1)
    kept = lengths.clamp(max=max_length)
    width = int(kept.max())
    out = dict(batch)
    for key in SEQUENCE_KEYS:
        if key not in batch:
            continue
        t = batch[key]
        fill = {"input_ids": pad_id, "labels": IGNORE_INDEX}.get(key, 0)
        new = t.new_full((t.shape[0], width), fill)
        for row in range(t.shape[0]):
            real = t[row][mask[row]][: int(kept[row])]
            if side == "left":
                new[row, width - len(real) :] = real
            else:
                new[row, : len(real)] = real
        out[key] = new
    cut_vision = [
        i
        for i, row in enumerate(batch["input_ids"])
        if torch.isin(row[mask[i]][int(kept[i]) :], vision_ids).any()
    ]
    if cut_vision:
        i = cut_vision[0]
        raise ValueError(
            f"data.max_length={max_length}: cuts into the image tokens of sample "
            f"{ids[i]} ({int(lengths[i])} tokens)"
        )
    return out


# ----------------------------------------------------------------------------------------------


class EpochSampler(torch.utils.data.Sampler):
    """Shuffles with seed + epoch (Lightning calls set_epoch) and skips the first `skip`
    samples of its next pass: the same seed gives the same order, epoch by epoch, and a run
    resumed mid-epoch gets the batches it had not trained on."""

    def __init__(self, n: int, seed: int, skip: int = 0):
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, skip

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n  # a full epoch: Lightning sizes its epoch loop from this

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        skip, self.skip = self.skip, 0
        return iter(order[skip:])


def shapes_dataset(spec: DataSpec, seed: int) -> tuple:
    """data=shapes: the synthetic splits of `seed` (nanlab.data.shapes)."""
    splits = shapes_splits(spec, seed)
    return splits["train"], splits["val"], splits["test"]


def jsonl_dataset(spec: DataSpec, seed: int) -> tuple:
    """data=jsonl: the user's files (a split without a file is empty)."""

    def read(path):
        return [] if path is None else JsonlDataset(path, spec.image_root, spec.skip_bad)

    return read(spec.train_file), read(spec.val_file), read(spec.test_file)


class NanDataModule(L.LightningDataModule):
    def __init__(self, spec: DataSpec, processor, batch_size: int, seed: int):
        super().__init__()
        spec.check()
        self.spec, self.batch_size, self.seed = spec, batch_size, seed
        self.collate = Collator.for_data(processor, spec)
        # the splits (a Dataset or a list of samples), set by setup()
        self.train: Any = None
        self.val: Any = None
        self.test: Any = None

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        self.train, self.val, self.test = DATA[self.spec.name].resolve("dataset")(
            self.spec, self.seed
        )
        if len(self.train) < self.batch_size:  # drop_last would leave zero training steps
            raise ValueError(
                f"data: {len(self.train)} training samples < batch_size {self.batch_size}"
            )

    def loader(self, dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            collate_fn=self.collate,
            num_workers=self.spec.num_workers,
            persistent_workers=self.spec.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        # ckpt_path=: Lightning has restored global_step before it asks for the loader, so a
        # run resumed mid-epoch skips the batches it already trained on (one step a batch).
        per_epoch = len(self.train) // self.batch_size
        trainer = getattr(self, "trainer", None)
        done = trainer.global_step % per_epoch if trainer is not None and per_epoch else 0
        sampler = EpochSampler(len(self.train), self.seed, skip=done * self.batch_size)
        return DataLoader(
            self.train,
            batch_size=self.batch_size,
            drop_last=True,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.spec.num_workers,
            persistent_workers=self.spec.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.test, shuffle=False)
