"""nanlab/probe.py on a constructed case whose answer is known.

The checkpoint is the tiny random model saved with save_pretrained (nothing trained). The
test set holds four samples in one batch: two with the same long answer and two shorter
ones. With left padding the two short ones get padded, and their padded query rows are
fully masked; in bf16 the float32-min additive mask becomes -inf, so softmax=naive gives
0/0 = NaN there (then everywhere in that row, through the values of the next layer), while
softmax=safe gives zeros. Right padding masks no whole row; stress=masked_rows left-pads
every row. The probe must list exactly the padded samples, and none under safe.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from helpers import cli
from nanlab.data.datamodule import DataSpec
from nanlab.data.shapes import draw_shape
from nanlab.model.checkpoint import save_pretrained
from nanlab.model.qwen_vl import ModelSpec, build_model
from nanlab.numerics.attention import SoftmaxSpec
from nanlab.numerics.precision import PrecisionSpec
from nanlab.numerics.stress import StressSpec
from nanlab.probe import ProbeOptions, ProbeSpec, combine, probe
from nanlab.run.serve import locate, split_rows

LONG = "A large red circle in the top left corner of a white picture, drawn with care."
# (shape, question, answer); the line numbers (1-4) are the sample ids
RECORDS = [
    ("circle", "What is in this picture?", LONG),
    ("square", "What shape is this?", "square"),
    ("circle", "What is in this picture?", LONG),
    ("triangle", "What shape is this?", "A small triangle."),
]
PADDED = {"test.jsonl:2", "test.jsonl:4"}  # shorter than the longest: left-padded


@pytest.fixture(scope="module")
def case(tmp_path_factory, processor):
    """(checkpoint dir, data dir): the tiny model as a checkpoint, and the test set."""
    import random

    root = tmp_path_factory.mktemp("probe")
    save_pretrained(build_model(ModelSpec(), seed=0), processor, root / "ckpt")
    data = root / "data"
    data.mkdir()
    lines = []
    for i, (shape, question, answer) in enumerate(RECORDS):
        image = draw_shape(shape, "red", "large", "centre", "white", 56, random.Random(i))
        image.save(data / f"{i}.png")
        lines.append(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"<image>{question}"},
                        {"role": "assistant", "content": answer},
                    ],
                    "images": [f"{i}.png"],
                }
            )
        )
    (data / "test.jsonl").write_text("\n".join(lines) + "\n")
    return root / "ckpt", data


@pytest.fixture
def fast_processor(monkeypatch, processor):
    """The probe loads the checkpoint's tokenizer (~3 s); the case saved the session's."""
    import nanlab.model.processing

    monkeypatch.setattr(
        nanlab.model.processing, "load_processor", lambda *args, **kwargs: processor
    )


def _spec(case, padding_side="left", softmax="naive", stress="none", **kw) -> ProbeSpec:
    ckpt, data = case
    test = str(data / "test.jsonl")
    return ProbeSpec(
        checkpoint=str(ckpt),
        batch_size=4,
        precision=PrecisionSpec("bf16"),
        softmax=SoftmaxSpec(softmax),
        stress=StressSpec(
            stress, mask="summed_planes" if stress == "masked_rows" else "transformers"
        ),
        data=DataSpec(name="jsonl", train_file=test, test_file=test, padding_side=padding_side),
        probe=ProbeOptions(**kw),
    )


def test_probe_lists_exactly_the_failing_samples(case, fast_processor, tmp_path):
    table = probe(_spec(case), tmp_path / "naive", quiet=True)
    assert len(table) == len(RECORDS)
    assert set(table.loc[table["num_pad"] > 0, "id"]) == PADDED  # the construction holds
    failing = table[table["nonfinite"]]
    assert set(failing["id"]) == PADDED
    # where: the first text layer's attention, in bf16; the batched forward agrees
    assert set(failing["first_module"]) == {"model.language_model.layers.0.self_attn"}
    assert set(failing["first_tower"]) == {"text"} and set(failing["first_layer"]) == {0}
    assert set(failing["first_dtype"]) == {"bfloat16"}
    assert (failing["attn_nonfinite"] > 0).all() and failing["logits_nonfinite"].all()
    assert table["batch_nonfinite"].tolist() == table["nonfinite"].tolist()
    finite = table[~table["nonfinite"]]
    assert finite["first_module"].isna().all() and finite["loss"].notna().all()
    # the sample's properties
    assert (table["n_images"] == 1).all() and (table["n_image_tokens"] == 4).all()
    assert (table["pixel_max"] > table["pixel_min"]).all()
    assert (table["seq_len"] + table["num_pad"] == table["padded_len"]).all()
    on_disk = pd.read_parquet(tmp_path / "naive" / "samples.parquet")
    assert on_disk["id"].tolist() == table["id"].tolist()
    assert (tmp_path / "naive" / "samples.csv").is_file()
    assert json.loads((tmp_path / "naive" / "probe.json").read_text())["nonfinite"] == 2

    safe = probe(_spec(case, softmax="safe"), quiet=True)
    assert not safe["nonfinite"].any() and not safe["batch_nonfinite"].any()
    assert safe["num_pad"].tolist() == table["num_pad"].tolist()

    right = probe(_spec(case, padding_side="right"), quiet=True)
    assert not right["nonfinite"].any()
    # transformers' eager keeps its fp32 float-min mask: finite; the summed-planes mask of
    # stress=masked_rows puts -inf on the padded rows: exactly the padded samples break
    eager = probe(_spec(case, softmax="eager"), quiet=True)
    assert not eager["nonfinite"].any()
    masked = probe(_spec(case, softmax="eager", stress="masked_rows"), quiet=True)
    assert set(masked.loc[masked["nonfinite"], "id"]) == PADDED


def test_split_rows_gives_each_row_its_own_images(processor):
    from nanlab.data.datamodule import Collator

    image = draw_shape(
        "circle", "red", "large", "centre", "white", 56, __import__("random").Random(0)
    )
    big = image.resize((112, 56))  # 8 patches -> twice the image tokens

    def sample(i, images):
        content = [{"type": "image"}] * len(images) + [{"type": "text", "text": "Hi?"}]
        return {
            "id": f"s{i}",
            "images": images,
            "messages": [
                {"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
            ],
        }

    samples = [sample(0, [image, big]), sample(1, []), sample(2, [image])]
    batch = Collator(processor, "left")(samples)
    rows = split_rows(batch, image_token_id=151655, merge=2)
    assert [r["sample_ids"] for r in rows] == [["s0"], ["s1"], ["s2"]]
    assert [r.get("image_grid_thw", torch.empty(0, 3)).shape[0] for r in rows] == [2, 0, 1]
    assert torch.equal(
        torch.cat([r["pixel_values"] for r in rows if "pixel_values" in r]), batch["pixel_values"]
    )
    for i, r in enumerate(rows):
        assert torch.equal(r["input_ids"], batch["input_ids"][i : i + 1])  # padding kept
        assert torch.equal(r["attention_mask"], batch["attention_mask"][i : i + 1])


def test_locate_names_tower_layer_and_part():
    assert locate("model.language_model.layers.3.self_attn") == {
        "first_tower": "text",
        "first_layer": 3,
        "first_part": "attention",
    }
    assert locate("model.visual.blocks.0.mlp.down_proj")["first_part"] == "mlp"
    assert locate("model.visual.blocks.1.attn")["first_tower"] == "vision"
    assert locate("model.visual.merger.mlp.0") == {
        "first_tower": "vision",
        "first_layer": None,
        "first_part": "merger",
    }
    assert locate("lm_head")["first_tower"] == "lm_head"
    assert locate(None)["first_tower"] is None


def test_combine_says_which_settings_make_failing_samples_finite(tmp_path):
    def job(n, softmax, side, bad):
        d = tmp_path / str(n)
        d.mkdir()
        pd.DataFrame({"id": ["a", "b", "c"], "nonfinite": [i in bad for i in "abc"]}).to_parquet(
            d / "samples.parquet"
        )
        (d / "probe.json").write_text(
            json.dumps(
                {"precision": "bf16", "softmax": softmax, "padding_side": side, "stress": "none"}
            )
        )

    job(0, "naive", "left", "ab")
    job(1, "naive", "right", "")
    job(2, "safe", "left", "")
    job(3, "stable", "left", "a")
    fixes = combine(tmp_path, quiet=True)
    assert fixes.index.tolist() == ["a", "b"]
    assert fixes.loc["a", "finite_under"] == (
        "softmax=naive padding_side=right; softmax=safe padding_side=left"
    )
    assert "softmax=stable padding_side=left" in fixes.loc["b", "finite_under"]
    assert (tmp_path / "fixes.csv").is_file() and (tmp_path / "combined.parquet").is_file()


@pytest.mark.slow
def test_probe_cli_multirun_writes_one_table_per_job_and_combines(case, tmp_path):
    ckpt, data = case
    test = data / "test.jsonl"
    sweep = tmp_path / "sweep"
    result = cli(
        "-m",
        f"checkpoint={ckpt}",
        "data=jsonl",
        f"data.train_file={test}",
        f"data.test_file={test}",
        "batch_size=4",
        "precision=bf16",
        "softmax=naive,safe",
        "data.padding_side=left",
        "probe.max_new_tokens=2",
        f"hydra.sweep.dir={sweep}",
        module="src.probe",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tables = {
        json.loads((d / "probe.json").read_text())["softmax"]: pd.read_parquet(
            d / "samples.parquet"
        )
        for d in sorted(sweep.iterdir())
        if (d / "probe.json").is_file()
    }
    assert set(tables) == {"naive", "safe"}
    assert set(tables["naive"].loc[tables["naive"]["nonfinite"], "id"]) == PADDED
    assert not tables["safe"]["nonfinite"].any()
    assert set(tables["naive"].loc[tables["naive"]["gen_nonfinite"], "id"]) == PADDED
    fixes = pd.read_csv(sweep / "fixes.csv", index_col="id")
    assert set(fixes.index) == PADDED
    assert (fixes["finite_under"] == "softmax=safe").all()
    assert "2 of 4 samples non-finite" in result.stdout
    assert "failing samples finite here" in result.stdout
