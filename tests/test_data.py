"""nanlab/data/datamodule.py: shapes, JSONL readers, label masking, the data module. Real processor only."""

import json
import logging

import pytest
import torch
from PIL import Image

from nanlab.data.datamodule import (
    IGNORE_INDEX,
    Collator,
    DataSpec,
    JsonlDataset,
    NanDataModule,
    shapes_splits,
)

IMAGE_PAD = 151655


def fingerprint(sample):
    user, assistant = sample["messages"]
    return (
        sample["images"][0].tobytes(),
        user["content"][1]["text"],
        assistant["content"][0]["text"],
    )


def sample(sid, answers, n_images=1, system=None, question="What is it?"):
    """A sample with one user/assistant exchange per answer (multi-turn when several)."""
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    for i, answer in enumerate(answers):
        content = [{"type": "image"}] * (n_images if i == 0 else 0)
        messages.append({"role": "user", "content": content + [{"type": "text", "text": question}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    images = [Image.new("RGB", (56, 56), (40 * i, 100, 200)) for i in range(n_images)]
    return {"id": sid, "images": images, "messages": messages}


# ---------------------------------------------------------------------------------- shapes


def test_shapes_deterministic_from_seed():
    spec = DataSpec(num_train=32, num_val=8, num_test=8)
    a, b, c = shapes_splits(spec, seed=0), shapes_splits(spec, seed=0), shapes_splits(spec, 1)
    for split in ("train", "val", "test"):
        assert [fingerprint(s) for s in a[split]] == [fingerprint(s) for s in b[split]]
        assert [s["id"] for s in a[split]] == [s["id"] for s in b[split]]
    assert [fingerprint(s) for s in a["train"]] != [fingerprint(s) for s in c["train"]]


def test_shapes_splits_disjoint_and_well_formed():
    spec = DataSpec()  # the default sizes: 512 / 64 / 64
    splits = shapes_splits(spec, seed=3)
    assert {k: len(v) for k, v in splits.items()} == {"train": 512, "val": 64, "test": 64}
    prints = [{fingerprint(s) for s in splits[k]} for k in ("train", "val", "test")]
    assert sum(len(p) for p in prints) == 640  # no duplicates within or across splits
    assert not (prints[0] & prints[1] or prints[0] & prints[2] or prints[1] & prints[2])
    ids = [s["id"] for split in splits.values() for s in split]
    assert len(set(ids)) == 640
    s = splits["train"][0]
    assert set(s) == {"id", "images", "messages"}
    assert s["images"][0].mode == "RGB" and s["images"][0].size == (56, 56)
    assert len(s["images"][0].getcolors()) >= 2  # a shape on a background
    assert [m["role"] for m in s["messages"]] == ["user", "assistant"]
    assert s["messages"][0]["content"][0] == {"type": "image"}
    answers = {m["messages"][1]["content"][0]["text"] for m in splits["train"]}
    assert {"circle", "red", "top left"} <= answers
    # captions are the base's task, not the fine-tuning one
    assert not any(a.startswith("A ") and a.endswith(".") for a in answers)
    captions = shapes_splits(DataSpec(num_train=8, num_val=0, num_test=0, tasks=["caption"]), 0)
    assert all(s["messages"][1]["content"][0]["text"].startswith("A ") for s in captions["train"])


def test_shapes_too_many_requested():
    with pytest.raises(ValueError, match="distinct samples"):
        shapes_splits(DataSpec(num_train=100_000), seed=0)


# -------------------------------------------------------------------------- label masking


@pytest.mark.parametrize("side", ["left", "right"])
def test_labels_only_on_assistant_tokens(processor, side):
    tok = processor.tokenizer
    samples = [
        sample("a", ["a red circle"], system="Be brief."),
        sample("b", ["no"], question="Is there a very long and winding question here?"),
        sample("c", ["two", "a blue square at the top"], n_images=2),  # multi-turn
    ]
    batch = Collator(processor, side)(samples)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert labels.shape == ids.shape == mask.shape
    assert batch["sample_ids"] == ["a", "b", "c"]
    # padding sits on the requested side
    pad_col = 0 if side == "left" else -1
    assert mask[:, pad_col].tolist().count(0) == 2
    for row, s in enumerate(samples):
        kept = labels[row] != IGNORE_INDEX
        answers = [m["content"][0]["text"] for m in s["messages"] if m["role"] == "assistant"]
        assert tok.decode(labels[row][kept]) == "".join(a + "<|im_end|>" for a in answers)
        expected = sum(len(tok.encode(a, add_special_tokens=False)) + 1 for a in answers)
        assert kept.sum().item() == expected
        assert torch.equal(labels[row][kept], ids[row][kept])
        assert not kept[mask[row] == 0].any()  # never on padding
        assert not kept[ids[row] == IMAGE_PAD].any()
    # each kept stretch is directly preceded by the "<|im_start|>assistant\n" header
    header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    for row in range(len(samples)):
        kept = (labels[row] != IGNORE_INDEX).tolist()
        starts = [i for i in range(1, len(kept)) if kept[i] and not kept[i - 1]]
        assert starts and all(ids[row, i - 3 : i].tolist() == header for i in starts)


def test_collator_output(processor):
    batch = Collator(processor)(
        shapes_splits(DataSpec(num_train=4, num_val=0, num_test=0), seed=0)["train"]
    )
    assert set(batch) == {
        "input_ids",
        "attention_mask",
        "pixel_values",
        "image_grid_thw",
        "mm_token_type_ids",
        "labels",
        "sample_ids",
    }
    assert batch["pixel_values"].dtype == torch.float32
    grid = batch["image_grid_thw"]
    assert batch["pixel_values"].shape[0] == grid.prod(1).sum().item()
    assert (batch["input_ids"] == IMAGE_PAD).sum().item() == grid.prod(1).sum().item() // 4


# ---------------------------------------------------------------------------------- JSONL


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "img"
    root.mkdir()
    for name, colour in [("a.png", (255, 0, 0)), ("b.jpg", (0, 0, 255))]:
        Image.new("RGB", (40, 30), colour).save(root / name)
    Image.new("L", (20, 20), 128).save(root / "grey.png")  # not RGB on disk
    return root


def write_jsonl(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


QWEN = {
    "image": "a.png",
    "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"},
        {"from": "gpt", "value": "Red."},
    ],
}
LLAMAFACTORY = {
    "images": ["a.png", "b.jpg"],
    "conversations": [
        {"from": "human", "value": "<image><image>Compare."},
        {"from": "gpt", "value": "Red, blue."},
        {"from": "human", "value": "Sure?"},
        {"from": "gpt", "value": "Yes."},
    ],
}
SWIFT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Look: <image> and say."},
        {"role": "assistant", "content": "Grey."},
    ],
    "images": ["grey.png"],
}
LLAMAFACTORY_MESSAGES = {
    "images": ["b.jpg"],
    "messages": [
        {"role": "user", "content": "<image>Colour?"},
        {"role": "assistant", "content": "Blue."},
    ],
}


def test_jsonl_three_formats(tmp_path, images):
    path = write_jsonl(
        tmp_path / "train.jsonl", [QWEN, "", LLAMAFACTORY, SWIFT, LLAMAFACTORY_MESSAGES]
    )
    ds = JsonlDataset(path, image_root=images)
    assert len(ds) == 4 and ds.skipped == 0
    qwen, llf, swift, llf_messages = (ds[i] for i in range(4))
    assert qwen["id"] == "train.jsonl:1" and llf["id"] == "train.jsonl:3"  # line numbers
    assert qwen["messages"] == [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "\nWhat colour?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
    ]
    assert qwen["images"][0].getpixel((0, 0)) == (255, 0, 0)
    assert [m["role"] for m in llf["messages"]] == ["user", "assistant"] * 2
    assert llf["messages"][0]["content"] == [
        {"type": "image"},
        {"type": "image"},
        {"type": "text", "text": "Compare."},
    ]
    assert [im.getpixel((0, 0))[2] > 200 for im in llf["images"]] == [False, True]
    assert swift["messages"][0] == {
        "role": "system",
        "content": [{"type": "text", "text": "Be brief."}],
    }
    assert swift["messages"][1]["content"] == [
        {"type": "text", "text": "Look: "},
        {"type": "image"},
        {"type": "text", "text": " and say."},
    ]
    assert swift["images"][0].mode == "RGB"
    assert llf_messages["messages"][1]["content"][0]["text"] == "Blue."


def test_json_list_and_default_root(tmp_path, images):
    path = images / "train.json"  # image paths relative to the file's directory by default
    path.write_text(json.dumps([QWEN, SWIFT], indent=2))
    ds = JsonlDataset(path)
    assert len(ds) == 2 and ds[1]["id"] == "train.json:item 2"


def test_jsonl_collates_with_real_processor(tmp_path, images, processor):
    path = write_jsonl(tmp_path / "train.jsonl", [QWEN, LLAMAFACTORY, SWIFT])
    ds = JsonlDataset(path, image_root=images)
    batch = Collator(processor)([ds[i] for i in range(3)])
    # smart_resize rounds 40x30 up to 84x56 (6 tokens) and 20x20 up to 56x56 (4 tokens)
    grid = batch["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 6]] * 3 + [[1, 4, 4]]
    assert (batch["input_ids"] == IMAGE_PAD).sum().item() == grid.prod(1).sum().item() // 4
    texts = [processor.tokenizer.decode(row[row != IGNORE_INDEX]) for row in batch["labels"]]
    assert texts == ["Red.<|im_end|>", "Red, blue.<|im_end|>Yes.<|im_end|>", "Grey.<|im_end|>"]


BAD = {
    "bad JSON": '{"image": "a.png", "conversations": [',
    "missing image": {"image": "nope.png", "conversations": QWEN["conversations"]},
    "2 <image> placeholders but 1 image": {
        "images": ["a.png"],
        "conversations": [
            {"from": "human", "value": "<image><image>?"},
            {"from": "gpt", "value": "x"},
        ],
    },
    "unknown format": {"image": "a.png", "text": "hello"},
}


@pytest.mark.parametrize("why", list(BAD))
def test_bad_record_names_file_and_line(tmp_path, images, why):
    path = write_jsonl(tmp_path / "train.jsonl", [QWEN, QWEN, BAD[why]])
    with pytest.raises(ValueError) as info:
        JsonlDataset(path, image_root=images)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ") and why in message and "\n" not in message


def test_skip_bad_counts_and_warns_once(tmp_path, images, caplog):
    path = write_jsonl(tmp_path / "train.jsonl", [QWEN, *BAD.values(), SWIFT])
    with caplog.at_level(logging.WARNING):
        ds = JsonlDataset(path, image_root=images, skip_bad=True)
    assert len(ds) == 2 and ds.skipped == len(BAD)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 4" in warnings[0].getMessage()
    assert f"{path}:2" in warnings[0].getMessage()  # names the first bad line


# ------------------------------------------------------------------ config errors, module


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"padding_side": "middle"}, "data.padding_side=middle: allowed left, right"),
        ({"name": "foo"}, "data=foo: unknown option; allowed: jsonl, shapes"),
        ({"name": "jsonl"}, "data.train_file=None: data=jsonl needs data.train_file"),
    ],
)
def test_bad_values_one_line_errors(processor, kwargs, message):
    with pytest.raises(ValueError) as info:
        DataSpec(**kwargs).check()
    assert str(info.value) == message
    with pytest.raises(ValueError, match="^data[.=]"):
        NanDataModule(DataSpec(**kwargs), processor, batch_size=4, seed=0)


def test_processor_spec():
    spec = DataSpec(normalize=False, min_pixels=784, max_pixels=12544).processor_spec()
    assert (spec.normalize, spec.min_pixels, spec.max_pixels) == (False, 784, 12544)


def ids_in_order(dm, batches=3):
    loader = dm.train_dataloader()
    return [b["sample_ids"] for _, b in zip(range(batches), loader)]


def test_datamodule_batches_and_reproducible_order(processor):
    spec = DataSpec(num_train=40, num_val=10, num_test=6)
    dm = NanDataModule(spec, processor, batch_size=4, seed=7)
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 10 and len(dm.val_dataloader()) == 3
    batch = next(iter(dm.train_dataloader()))
    B, T = batch["input_ids"].shape
    assert B == 4 and len(batch["sample_ids"]) == 4
    for key in ("attention_mask", "labels", "mm_token_type_ids"):
        assert batch[key].shape == (B, T)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 4
    assert batch["pixel_values"].shape == (64, 1176)
    assert (batch["input_ids"] == IMAGE_PAD).sum(1).tolist() == [4] * 4
    assert ((batch["labels"] != IGNORE_INDEX).sum(1) >= 2).all()  # answer + <|im_end|>
    # same seed, same order; another seed, another order; val/test in file order
    again = NanDataModule(spec, processor, batch_size=4, seed=7)
    again.setup("fit")
    other = NanDataModule(spec, processor, batch_size=4, seed=8)
    other.setup("fit")
    first = ids_in_order(dm)
    assert first == ids_in_order(again) == ids_in_order(dm)
    assert first != ids_in_order(other)
    assert first[0] != [f"shapes/train/{i}" for i in range(4)]  # actually shuffled
    val_ids = [i for b in dm.val_dataloader() for i in b["sample_ids"]]
    assert val_ids == [f"shapes/val/{i}" for i in range(10)]


def test_datamodule_jsonl(tmp_path, images, processor):
    train = write_jsonl(tmp_path / "train.jsonl", [QWEN, LLAMAFACTORY, SWIFT, QWEN])
    spec = DataSpec(
        name="jsonl", train_file=str(train), image_root=str(images), padding_side="left"
    )
    dm = NanDataModule(spec, processor, batch_size=2, seed=0)
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 2 and len(dm.val) == 0
    batch = next(iter(dm.train_dataloader()))
    assert batch["attention_mask"][:, -1].tolist() == [1, 1]  # left padding
    small = NanDataModule(spec, processor, batch_size=8, seed=0)
    with pytest.raises(ValueError, match="4 training samples < batch_size 8"):
        small.setup("fit")
