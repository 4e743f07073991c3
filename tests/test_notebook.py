"""notebooks/nan_map.ipynb runs top to bottom on a constructed map's results.parquet
(tests/test_report_builders.py's demo map; nbclient, venv kernel)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient
from test_report_builders import demo_map

from nanlab import report

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "nan_map.ipynb"


def _kernel_name(tmp_path: Path, monkeypatch) -> str:
    """'python3' when it runs this interpreter; else a private spec in tmp (nothing global)."""
    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
        exe = spec.argv[0]
        # jupyter_client swaps a bare "python" for sys.executable when it launches
        if exe in ("python", "python3") or Path(exe).resolve().is_relative_to(
            Path(sys.prefix).resolve()
        ):
            return "python3"
    except NoSuchKernel:
        pass
    kdir = tmp_path / "jupyter" / "kernels" / "nanlab-venv"
    kdir.mkdir(parents=True)
    (kdir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "nanlab venv",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "nanlab-venv"


def _run(nb_path: Path, kernel: str) -> nbformat.NotebookNode:
    nb = nbformat.read(nb_path, as_version=4)
    NotebookClient(
        nb,
        timeout=120,
        kernel_name=kernel,
        allow_errors=False,
        resources={"metadata": {"path": str(nb_path.parent)}},
    ).execute()
    return nb


def _outputs(nb, output_type=None):
    return [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if output_type is None or o.output_type == output_type
    ]


@pytest.mark.slow
def test_notebook_runs_on_the_results_table(tmp_path, monkeypatch):
    demo_map(tmp_path / "runs", history=True)
    df = report.collect(tmp_path / "runs")
    report.write_results(df, tmp_path / "out")
    monkeypatch.setenv("NANLAB_RESULTS", str(tmp_path / "out" / "results.parquet"))
    nb = _run(NOTEBOOK, _kernel_name(tmp_path, monkeypatch))

    assert not _outputs(nb, "error")
    text = "".join(o.get("text", "") for o in _outputs(nb, "stream"))
    assert f"{len(df)} runs" in text and "4 mechanisms" in text
    assert "6 cells finite in training, non-finite at test time" in text
    images = [o for o in _outputs(nb) if "image/png" in o.get("data", {})]
    assert len(images) >= 4, "expected the matrix, the frontier, the map and the loss curves"
    html = "".join(o.get("data", {}).get("text/html", "") for o in _outputs(nb))
    assert "refutes" in html and "masked_rows" in html  # the verdicts table
    assert "serve.padding_side=right" in html and "shapes/test/1 (pad 5)" in html
    md = "".join(o.get("data", {}).get("text/markdown", "") for o in _outputs(nb))
    assert "delays logit_growth" in md and "88.72" in md


@pytest.mark.slow
def test_notebook_without_histories(tmp_path, monkeypatch):
    demo_map(tmp_path / "runs", history=False)
    report.write_results(report.collect(tmp_path / "runs"), tmp_path / "out")
    monkeypatch.setenv("NANLAB_RESULTS", str(tmp_path / "out" / "results.csv"))
    nb = _run(NOTEBOOK, _kernel_name(tmp_path, monkeypatch))
    assert not _outputs(nb, "error")
    text = "".join(o.get("text", "") for o in _outputs(nb, "stream"))
    assert "nothing to plot" in text
