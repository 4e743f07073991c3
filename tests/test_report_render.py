"""src.report end to end on the demo map (tests/test_report_builders.py): files, report.md,
figures, the CLI, and no heavy import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_report_builders import DEMO_MECHS, DEMO_OUTCOMES, demo_map

from nanlab import report

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
FILES = (
    "results.parquet",
    "results.csv",
    "cells.csv",
    "verdicts.csv",
    "frontier.csv",
    "matrix.png",
    "frontier.png",
    "nan_map.png",
    "report.md",
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return demo_map(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def built(demo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out")
    report.write_report([demo], out)
    return out


def test_writes_every_file(built):
    for name in FILES:
        assert (built / name).stat().st_size > 0, name
    n_runs = sum(len(v) for v in DEMO_OUTCOMES.values()) + 4 * 4 * 3
    assert len(pd.read_csv(built / "results.csv")) == n_runs
    assert len(pd.read_parquet(built / "results.parquet")) == n_runs
    v = pd.read_csv(built / "verdicts.csv")
    assert len(v) == sum(len(m["predictions"]) for m in DEMO_MECHS.values())
    # one row per prediction, with both sides
    row = v[(v["mechanism"] == "masked_rows") & (v["mitigation"] == "softmax=stable")].iloc[0]
    assert (row["predicted"], row["measured"], row["agreement"]) == (
        "fixes",
        "no_effect",
        "refutes",
    )
    # the test-time outcome beside training: cells.csv and verdicts.csv carry it
    row = v[v["mitigation"] == "serve.padding_side=right"].iloc[0]
    assert (row["judged_on"], row["measured"], row["test_seeds_finite"]) == ("test", "fixes", 3)
    cells = pd.read_csv(built / "cells.csv")
    assert (cells["outcome"] == report.TEST_FAILS).sum() == 6
    results = pd.read_csv(built / "results.csv")
    assert results["test_status"].value_counts().to_dict() == {"finite": 49, "nonfinite": 20}


def test_report_md(built):
    md = (built / "report.md").read_text()
    assert md.index("![mechanism x mitigation](matrix.png)") < md.index("## Mechanisms")
    assert report.RULES in md
    assert "## Per advice" in md and "## Stable-lr frontier" in md and "## Appendix" in md
    assert md.index("## Stable-lr frontier") < md.index("![every cell](nan_map.png)")
    # the refutation is highlighted in the mechanism's table
    [row] = [
        x for x in md.splitlines() if x.startswith("| max_subtracted_softmax") and "0 -> 0" in x
    ]
    assert "**refutes**" in row and "| fixes |" in row
    # per advice: the seed's list in its order, with the numbers
    order = [
        md.index(f"**{report.ADVICE[a].text}**")
        for a in (
            "use_fp32",
            "max_subtracted_softmax",
            "lower_lr",
            "warmup",
            "clip",
            "normalize_inputs",
            "progressive",
            "monitor",
            "guard_key_nodes",
        )
    ]
    assert order == sorted(order)
    assert "delays logit_growth (lr_x=1: 0/3 seeds ok, first bad step 8 -> 20, 2.5x)" in md
    assert "already subtract the row max" in md
    assert "bf16 vs fp32 range" in md and "88.72" in md
    assert md.index("Beyond the seed") > md.index("bf16 vs fp32 range")
    # training vs test time, near the top: the demo's 6 cells and what removed it
    assert md.index("## Training vs test time") < md.index("## Verdict rules")
    assert "**6 of the 22 cells that stayed finite in training" in md
    assert (
        "- **serving_masked_rows** (cause `masked_row`): fixes: `softmax=eager`, "
        "`serve.padding_side=right`, `serve.precision=bf16`, `serve.precision=fp32`; "
        "no effect: `precision=fp32`, `lr_x=0.1`"
    ) in md
    assert "### serving_masked_rows (judged at test time)" in md
    assert (
        "not tested in training. Test time: fixes serving_masked_rows "
        "(serve.precision=bf16: 3/3 seeds served finite"
    ) in md
    # frontier table: naive fails from lr_x 3, stable only at 10
    assert "| bf16 | naive |  | 0.3 1 3 10 | 1 | 3 | yes | 2/3 3/3 1/3 0/3 | 0.3 1 |" in md
    assert "| bf16 | stable |  | 0.3 1 3 10 | 3 | 10 | yes |" in md


def _img(path):
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert img[..., :3].std() > 0.05
    return img[..., :3]


def test_figures_are_drawn(built):
    m = _img(built / "matrix.png")
    assert m.shape[1] > 900 and m.shape[0] > 300
    # the disagreement badge: saturated red (#e41a1c) is present
    red = (m[..., 0] > 0.85) & (m[..., 1] < 0.2) & (m[..., 2] < 0.2)
    assert red.sum() > 20
    f = _img(built / "frontier.png")
    assert f.shape[1] > 600
    a = _img(built / "nan_map.png")
    assert a.shape[1] > 800


def test_matrix_without_disagreement_has_no_badge(tmp_path):
    from test_report_builders import config_for, failing, mech, ok, pred, seeds

    spec = mech(
        "toy",
        "exp_overflow",
        ["softmax=naive"],
        [pred("max_subtracted_softmax", ["softmax=stable"], "fixes")],
    )
    seeds(tmp_path, config_for(spec, ["softmax=naive"]), failing(3, 4, "exp_overflow"))
    seeds(tmp_path, config_for(spec, ["softmax=stable"]), ok(3))
    a = report.analyze(report.collect(tmp_path))
    report.draw_matrix(a.mechanisms, tmp_path / "m.png")
    m = _img(tmp_path / "m.png")
    red = (m[..., 0] > 0.85) & (m[..., 1] < 0.2) & (m[..., 2] < 0.2)
    assert red.sum() == 0


def test_empty_inputs_draw_placeholders(tmp_path):
    report.draw_matrix([], tmp_path / "m.png")
    report.draw_frontier([], tmp_path / "f.png")
    report.draw_map([], tmp_path / "n.png")
    for n in ("m", "f", "n"):
        assert (tmp_path / f"{n}.png").stat().st_size > 0


def test_cli_and_no_heavy_import(demo, tmp_path):
    out = tmp_path / "cli"
    p = subprocess.run(
        [PY, "-m", "src.report", str(demo), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert p.returncode == 0, p.stderr + p.stdout
    assert "Verdicts" in p.stdout and "refutes" in p.stdout
    for name in FILES:
        assert (out / name).exists(), name
    code = (
        "import sys, src.report, src.report.__main__; "
        "heavy = [m for m in ('torch', 'transformers', 'hydra', 'omegaconf', 'lightning')"
        " if m in sys.modules]; print('HEAVY', heavy); sys.exit(1 if heavy else 0)"
    )
    p = subprocess.run(
        [PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_cli_no_records(tmp_path):
    from nanlab.report.__main__ import main

    assert main([str(tmp_path)]) == 2


def test_package_modules_stay_small_and_torch_free():
    pkg = ROOT / "src" / "report"
    for f in pkg.glob("*.py"):
        text = f.read_text()
        assert len(text.splitlines()) <= 400, f.name
        for heavy in ("import torch", "from torch", "import transformers", "from transformers"):
            assert heavy not in text, (f.name, heavy)


def test_committed_matrix_reads_at_the_readme_width(tmp_path):
    """The README's headline figure from the committed map (31 mitigations x 8 mechanisms):
    a mitigation a row keeps it within 1,600 px wide, no text under 6 pt (9 px at 110 dpi),
    and every mitigation and mechanism is labelled."""
    from pathlib import Path

    from nanlab.report.collect import load_results

    a = report.analyze(load_results(Path(__file__).parent.parent / "experiments/results/cpu-tiny"))
    fig = report.draw_matrix(a.mechanisms, tmp_path / "m.png")
    width = _img(tmp_path / "m.png").shape[1]
    assert width <= 1600, width
    texts = [t for ax in fig.axes for t in ax.texts] + fig.texts
    assert min(t.get_fontsize() for t in texts) >= 6
    shown = " ".join(t.get_text().replace("\n", " ") for t in texts)
    arms = {arm for m in a.mechanisms for p in m.pairs for arm in [p.arm]}
    assert len(arms) > 20 and all(o in shown for arm in arms for o in arm.split())
    assert all(
        m.label.replace("_", "") in shown.replace("_ ", "").replace("_", "") for m in a.mechanisms
    )
