"""The test-time probe: which test samples make a checkpoint's forward non-finite, where, and
which setting makes them finite.

    python -m src.probe checkpoint=outputs/runs/<run> data.padding_side=left softmax=naive
    python -m src.probe -m checkpoint=<dir> precision=bf16,fp32 softmax=naive,safe \\
        data.padding_side=left,right            # one table per job, then the combined verdict
    python -m src.probe --combine outputs/probe_sweeps/<time>   # combine a finished sweep again

`checkpoint` is a directory written by `save.hf=true` (a run dir, or its `hf/`) or any
`save_pretrained` Qwen2.5-VL directory. The test split is collated as inference would see
it (`batch_size`, `data.padding_side`, `stress=masked_rows` builds summed-plane masks), then:

1. one batched teacher-forced forward, as a user runs it: per row, whether its logits or
   text hidden states came out non-finite (`batch_nonfinite`);
2. every row again on its own, *keeping the padding it got in the batch* (its slice of
   the batch and its own images' patches), under the monitor's hooks
   (`monitor.AttentionStats` via `attention.OBSERVERS`, `monitor.first_nonfinite_forward`).
   The vision tower's attention runs per image/window chunk with no sample dimension, so a
   batched forward cannot say which sample a vision chunk belongs to; a row alone can, for
   both towers, with no second set of hooks. Masks, positions and every op of the model
   are per row, so the row alone computes what its row of the batch computed, up to the
   summation order a GPU kernel may pick for another batch size (the summary counts any
   row where the two disagree);
3. optionally (`probe.max_new_tokens` > 0) greedy `generate` from the row's prompt (the
   row cut before its last assistant reply, left padding kept), under the same hooks.

Outputs in `probe.out` (default: the Hydra output dir): `samples.parquet` and `samples.csv`
(one row per sample), `probe.json` (the settings and counts), and a rich summary. After a
multirun, `combined.parquet` and `fixes.csv` in the sweep dir say, for every sample that
failed in some job, under which settings it was finite.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hydra.experimental.callback import Callback

import src  # noqa: F401  (sets the offline environment before anything else loads)

from .attention import SoftmaxSpec
from .data import DataSpec
from .precision import PrecisionSpec
from .serve import (  # noqa: F401  (locate, split_rows: the probe's API, tested as such)
    IGNORE_INDEX,
    locate,
    nonfinite,
    properties,
    scan_row,
    short,
    split_rows,
    summarize,
    verdict,
)
from .stress import StressSpec

TABLE = "samples"            # samples.parquet / samples.csv in each job's dir
SETTINGS = "probe.json"
SPLITS = ("train", "val", "test")
AXES = ("precision", "softmax", "padding_side", "stress")  # what a probe sweep varies


@dataclass
class ProbeOptions:
    max_new_tokens: int = 0      # > 0: also generate this many tokens per sample
    out: str | None = None       # where the table goes (default: the Hydra output dir)
    limit: int | None = None     # only the first N samples of the split
    batched: bool = True         # the batched forward (step 1); False: rows alone only
    show: int = 20               # non-finite samples listed in the printed summary


@dataclass
class ProbeSpec:
    checkpoint: str = ""
    data: DataSpec = field(default_factory=DataSpec)
    precision: PrecisionSpec = field(default_factory=PrecisionSpec)
    softmax: SoftmaxSpec = field(default_factory=SoftmaxSpec)
    stress: StressSpec = field(default_factory=StressSpec)
    probe: ProbeOptions = field(default_factory=ProbeOptions)
    split: str = "test"
    batch_size: int = 8
    seed: int = 0                # the data seed: shapes' splits depend on it (train's seed)
    device: str = "auto"         # auto | cpu | cuda


# --- config -> spec -------------------------------------------------------------------------

def spec_from_config(cfg: dict) -> ProbeSpec:
    """The resolved config (a plain dict) as a ProbeSpec; one-line errors for bad values."""
    from . import attention, precision, stress
    from .train import _build

    top = {f.name for f in dataclasses.fields(ProbeSpec)} - {"data", "precision", "softmax",
                                                             "stress", "probe"}
    unknown = sorted(set(cfg) - top - {"data", "precision", "softmax", "stress", "probe",
                                       "hydra"})
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key; allowed: {', '.join(sorted(top))}")
    spec = ProbeSpec(
        data=_build(DataSpec, cfg.get("data"), "data"),
        precision=_build(PrecisionSpec, cfg.get("precision"), "precision"),
        softmax=_build(SoftmaxSpec, cfg.get("softmax"), "softmax"),
        stress=_build(StressSpec, cfg.get("stress"), "stress"),
        probe=_build(ProbeOptions, cfg.get("probe"), "probe"),
        **{k: cfg[k] for k in top if k in cfg},
    )
    rules = [
        (not spec.checkpoint, "checkpoint: required (a save.hf / save_pretrained directory)"),
        (spec.split not in SPLITS, f"split={spec.split}: allowed {', '.join(SPLITS)}"),
        (spec.batch_size <= 0, f"batch_size={spec.batch_size}: must be > 0"),
        (spec.probe.max_new_tokens < 0,
         f"probe.max_new_tokens={spec.probe.max_new_tokens}: must be >= 0"),
        (spec.device not in ("auto", "cpu", "cuda"),
         f"device={spec.device}: allowed auto, cpu, cuda"),
        (spec.softmax.name not in attention.VARIANTS,
         f"softmax={spec.softmax.name}: allowed {', '.join(attention.VARIANTS)}"),
        (spec.precision.name not in precision.PRECISIONS,
         f"precision={spec.precision.name}: allowed {', '.join(precision.PRECISIONS)}"),
        (spec.stress.name not in stress.STRESSES,
         f"stress={spec.stress.name}: allowed {', '.join(stress.STRESSES)}"),
    ]
    for bad, message in rules:
        if bad:
            raise ValueError(message)
    return spec


# --- data --------------------------------------------------------------------------------

def load_samples(spec: ProbeSpec) -> list[dict]:
    from .data import JsonlDataset, shapes_splits

    data = spec.data
    if data.name == "shapes":
        # splits are slices of one seeded shuffle: the training run's seed and split sizes
        # (data.num_train, data.num_val) give back its test split
        data.check()
        samples = shapes_splits(data, spec.seed)[spec.split]
    else:
        path = getattr(data, f"{spec.split}_file")
        if not path:
            raise ValueError(f"data.{spec.split}_file={path}: split={spec.split} needs it")
        dataclasses.replace(data, train_file=data.train_file or path).check()
        dataset = JsonlDataset(path, data.image_root, data.skip_bad)
        samples = [dataset[i] for i in range(len(dataset))]
    if spec.probe.limit is not None:
        samples = samples[: spec.probe.limit]
    if not samples:
        raise ValueError(f"split={spec.split}: no samples")
    return samples


def _prompt(row: dict) -> dict:
    """The row cut before its last assistant reply (its left padding kept)."""
    labels = row["labels"][0]
    supervised = set((labels != IGNORE_INDEX).nonzero().flatten().tolist())
    start = max(supervised) if supervised else labels.numel()
    while start - 1 in supervised:
        start -= 1
    length = labels.numel()
    return {k: (v[:, :start] if k != "pixel_values" and k != "image_grid_thw"
                and v.dim() == 2 and v.shape[1] == length else v)
            for k, v in row.items() if k not in ("labels", "sample_ids")}


# --- the probe ---------------------------------------------------------------------------

def _device(spec: ProbeSpec) -> str:
    import torch

    if spec.device != "auto":
        return spec.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _to(batch: dict, device: str) -> dict:
    import torch

    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def probe(spec: ProbeSpec, out_dir: str | Path | None = None, quiet: bool = False):
    """Run the probe; returns the per-sample table (a DataFrame) and writes it to out_dir."""
    import pandas as pd
    import torch

    from . import attention, precision, stress
    from .checkpoint import resolve
    from .data import Collator
    from .model import ModelSpec, build_model
    from .module import NanLabModule, OptimSpec
    from .monitor import AttentionStats
    from .processing import load_processor

    path = resolve(spec.checkpoint)
    device = _device(spec)
    torch.manual_seed(spec.seed)
    processor = load_processor(spec.data.processor_spec(), str(path))
    model = build_model(ModelSpec(path=str(path)), spec.seed).eval()
    attention.apply(model, spec.softmax, spec.stress.mask)
    collate = Collator(processor, spec.data.padding_side, spec.data.max_length,
                       spec.data.pixel_max)
    transform = stress.batch_transform(spec.stress, processor.tokenizer.pad_token_id)
    samples = load_samples(spec)
    batches = []
    for start in range(0, len(samples), spec.batch_size):
        batch = collate(samples[start:start + spec.batch_size])
        batches.append(transform(batch, len(batches)) if transform else batch)
    if spec.stress.name in stress.NEEDS_MODEL:
        with torch.no_grad():  # calibrated in fp32 on the first batch, as training does
            stress.apply_to_model(spec.stress, model, batches[0],
                                  NanLabModule(model, OptimSpec()).compute_loss,
                                  processor.tokenizer.convert_tokens_to_ids(spec.stress.token))
    plugin, _ = precision.build_plugin(spec.precision, device)
    if isinstance(plugin, precision.ProgressiveMixed):
        plugin.active = True  # a fine-tuned checkpoint is past the fp32 warm-up
    model = plugin.convert_module(model.to(device))
    config = model.config
    image_token_id = config.image_token_id
    merge = config.vision_config.spatial_merge_size
    stats = AttentionStats(model)
    tokenizer = processor.tokenizer

    records = []
    with torch.no_grad():
        for b, batch in enumerate(batches):
            batch = plugin.convert_input(_to(batch, device))
            batch_bad = [None] * batch["input_ids"].shape[0]
            if spec.probe.batched:
                inputs = {k: v for k, v in batch.items() if k not in ("labels", "sample_ids")}
                with plugin.forward_context():
                    out = model(**inputs, use_cache=False, output_hidden_states=True)
                batch_bad = [nonfinite(out.logits[i])
                             or any(nonfinite(h[i]) for h in out.hidden_states)
                             for i in range(len(batch_bad))]
                del out
            for r, row in enumerate(split_rows(batch, image_token_id, merge)):
                rec = {**properties(row, spec.data.padding_side, merge), "batch": b, "row": r,
                       **scan_row(model, plugin.forward_context, stats, row),
                       "batch_nonfinite": batch_bad[r]}
                if spec.probe.max_new_tokens > 0:
                    rec.update(_generate(model, plugin, _prompt(row), spec.probe.max_new_tokens,
                                         tokenizer))
                records.append(rec)
    table = pd.DataFrame.from_records(records)
    settings = settings_of(spec, str(path), table, getattr(plugin, "half_gemm", "native"))
    if out_dir is not None:
        write(table, settings, out_dir)
    if not quiet:
        print_summary(table, settings, spec.probe.show)
    return table


def _generate(model, plugin, prompt: dict, max_new_tokens: int, tokenizer) -> dict:
    """Greedy generation from the row's prompt under the same hooks."""
    import torch

    from .monitor import first_nonfinite_forward

    def run():
        with plugin.forward_context():
            return model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id, output_logits=True,
                                  return_dict_in_generate=True)

    name, _, out = first_nonfinite_forward(model, run)
    logits_bad = any(not torch.isfinite(step).all() for step in out.logits)
    new = out.sequences[0, prompt["input_ids"].shape[1]:]
    return {"gen_nonfinite": name is not None or logits_bad, "gen_first_module": name,
            "gen_text": tokenizer.decode(new, skip_special_tokens=False)}


# --- outputs ---------------------------------------------------------------------------

def settings_of(spec: ProbeSpec, checkpoint: str, table, half_gemm: str = "native") -> dict:
    n_bad = int(table["nonfinite"].sum())
    return {
        "checkpoint": checkpoint, "split": spec.split, "batch_size": spec.batch_size,
        "precision": spec.precision.name, "softmax": spec.softmax.name,
        "padding_side": spec.data.padding_side, "stress": spec.stress.name,
        "data": spec.data.name, "samples": len(table), "nonfinite": n_bad,
        "batch_nonfinite": int(table["batch_nonfinite"].eq(True).sum()),
        "max_new_tokens": spec.probe.max_new_tokens, "half_gemm": half_gemm,
        # the same test-time verdict a training run records (src/serve.py)
        "verdict": verdict(summarize(table.to_dict("records"), spec.precision.name,
                                     spec.data.padding_side, 0.0)),
    }


def write(table, settings: dict, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out_dir / f"{TABLE}.parquet", index=False)
    table.to_csv(out_dir / f"{TABLE}.csv", index=False)
    (out_dir / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
    return out_dir


def _buckets(values):
    """A property's values as a few labelled groups: its own values when they are few
    integers, else quartiles."""
    import pandas as pd

    few = values.nunique(dropna=False) <= 6
    if few and (values.dtype.kind in "iub" or values.nunique(dropna=False) <= 2):
        return values.astype(str)
    try:
        return pd.qcut(values, 4, duplicates="drop", precision=3).astype(str)
    except (ValueError, TypeError):
        return values.astype(str)


def _console():
    from rich.console import Console

    # a file or a pipe gets wide tables rather than rich's 80-column default
    return Console(width=None if sys.stdout.isatty() else 160)


def print_summary(table, settings: dict, show: int = 20) -> None:
    from rich.table import Table

    console = _console()
    n, bad = len(table), int(table["nonfinite"].sum())
    cell = " ".join(f"{k}={settings[k]}" for k in ("precision", "softmax", "padding_side",
                                                   "stress"))
    console.print(f"[bold]probe[/bold] {settings['checkpoint']} ({settings['split']}, "
                  f"{n} samples, batch_size={settings['batch_size']}): {cell}")
    colour = "red" if bad else "green"
    console.print(f"[{colour}]{bad} of {n} samples non-finite[/{colour}]")
    console.print(settings["verdict"], markup=False)
    disagree = table["batch_nonfinite"].notna() & (
        table["batch_nonfinite"].astype(bool) != table["nonfinite"].astype(bool))
    if disagree.any():
        console.print(f"[yellow]{int(disagree.sum())} samples differ between the batched "
                      "forward and the row alone[/yellow]")
    failing = table[table["nonfinite"].astype(bool)]
    if bad:
        by_module = Table(title="first non-finite module")
        for col in ("module", "tower", "layer", "part", "dtype", "samples"):
            by_module.add_column(col)
        groups = failing.assign(m=failing["first_module"].map(short)).fillna(
            {"first_dtype": "-", "first_part": "logits"})
        counts = groups.groupby(["m", "first_tower", "first_layer", "first_part", "first_dtype"],
                                dropna=False).size().sort_values(ascending=False)
        for (m, tower, layer, part, dtype), count in counts.items():
            layer = "-" if layer is None or math.isnan(layer) else str(int(layer))
            by_module.add_row(m, str(tower), layer, str(part), str(dtype), str(count))
        console.print(by_module)
    by_prop = Table(title="non-finite by property")
    for col in ("property", "value", "samples", "non-finite", "rate"):
        by_prop.add_column(col)
    for prop in ("num_pad", "seq_len", "n_image_tokens", "pixel_max", "max_attn_logit"):
        groups = table.groupby(_buckets(table[prop]), sort=True)["nonfinite"]
        for value, g in groups:
            k = int(g.astype(bool).sum())
            by_prop.add_row(prop, str(value), str(len(g)), str(k), f"{k / len(g):.0%}")
    console.print(by_prop)
    if bad:
        listed = Table(title=f"non-finite samples (first {min(show, bad)} of {bad})")
        for col in ("id", "num_pad", "seq_len", "image tokens", "first module",
                    "max attn logit"):
            listed.add_column(col)
        for _, r in failing.head(show).iterrows():
            listed.add_row(str(r["id"]), str(r["num_pad"]), str(r["seq_len"]),
                           str(r["n_image_tokens"]), short(r["first_module"]),
                           f"{r['max_attn_logit']:.4g}")
        console.print(listed)


# --- combining a sweep --------------------------------------------------------------------

def collect(sweep_dir: str | Path):
    """Every job's table under sweep_dir, with its settings as columns (one long table)."""
    import pandas as pd

    frames = []
    for settings_path in sorted(Path(sweep_dir).rglob(SETTINGS)):
        table_path = settings_path.with_name(f"{TABLE}.parquet")
        if not table_path.is_file():
            continue
        settings = json.loads(settings_path.read_text())
        table = pd.read_parquet(table_path)
        for axis in AXES:
            table[axis] = settings[axis]
        table["job"] = str(settings_path.parent.relative_to(sweep_dir))
        frames.append(table.dropna(axis=1, how="all"))  # e.g. first_module when all finite
    if not frames:
        raise ValueError(f"{sweep_dir}: no probe tables ({TABLE}.parquet) under it")
    return pd.concat(frames, ignore_index=True)


def combine(sweep_dir: str | Path, quiet: bool = False):
    """For the samples non-finite in some job: under which settings they are finite.
    Writes combined.parquet (every job's rows) and fixes.csv (failing sample x setting)."""
    sweep_dir = Path(sweep_dir)
    long = collect(sweep_dir)
    varied = [a for a in AXES if long[a].nunique() > 1] or ["softmax"]
    long["setting"] = long[varied].apply(
        lambda r: " ".join(f"{a}={r[a]}" for a in varied), axis=1)
    long.to_parquet(sweep_dir / "combined.parquet", index=False)
    bad = long["nonfinite"].astype(bool)
    failing_ids = sorted(long.loc[bad, "id"].unique())
    # True: finite under that setting; empty: the sample was not in that job
    wide = (long.assign(finite=~bad)[long["id"].isin(failing_ids)]
            .pivot_table(index="id", columns="setting", values="finite", aggfunc="all")
            .reindex(failing_ids))
    settings = list(wide.columns)
    wide["finite_under"] = wide.apply(
        lambda r: "; ".join(s for s in settings if r[s] == 1) or "none", axis=1)
    wide.to_csv(sweep_dir / "fixes.csv")
    if not quiet:
        _print_combined(long, wide, settings, failing_ids)
    return wide


def _print_combined(long, wide, settings, failing_ids) -> None:
    from rich.table import Table

    console = _console()
    jobs = long.groupby("setting").agg(samples=("id", "size"), nonfinite=("nonfinite", "sum"))
    t = Table(title=f"probe sweep: {len(failing_ids)} samples non-finite under some setting")
    for col in ("setting", "samples", "non-finite", "failing samples finite here"):
        t.add_column(col)
    for s in settings if failing_ids else jobs.index:
        fixed = int(wide[s].eq(True).sum()) if failing_ids else 0
        t.add_row(s, str(jobs.loc[s, "samples"]), str(int(jobs.loc[s, "nonfinite"])),
                  f"{fixed} of {len(failing_ids)}")
    console.print(t)
    if failing_ids:
        per = Table(title="failing samples: the settings that make them finite")
        per.add_column("id")
        per.add_column("finite under")
        for sample_id, r in wide.head(30).iterrows():
            per.add_row(str(sample_id), r["finite_under"])
        console.print(per)


# --- the Hydra entry ---------------------------------------------------------------------

class CombineOnMultirunEnd(Callback):
    """Hydra callback (conf/probe.yaml): combine the sweep once every job has finished."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            combine(sweep_dir)
        except Exception as e:  # noqa: BLE001 - the jobs' tables are written already
            print(f"warning: could not combine {sweep_dir}: {e}", file=sys.stderr)


FAILED: list[str] = []


def hydra_job(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    try:
        if OmegaConf.is_missing(cfg, "checkpoint"):
            raise ValueError("checkpoint=???: required: a run dir trained with save.hf=true, "
                             "its hf/, or a save_pretrained directory")
        spec = spec_from_config(OmegaConf.to_container(cfg, resolve=True))
        out = spec.probe.out or HydraConfig.get().runtime.output_dir
        probe(spec, out)
    except Exception as e:  # noqa: BLE001 - one line, and the sweep goes on
        message = str(e).splitlines()[0] if str(e) else ""
        print(f"error: {type(e).__name__}: {message}", file=sys.stderr)
        FAILED.append(message)


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] == "--combine":
        if len(args) != 2:
            print("usage: python -m src.probe --combine <sweep dir>", file=sys.stderr)
            sys.exit(2)
        try:
            combine(args[1])
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        return
    import hydra

    from .train import CONF_DIR, validate_cli

    problem = validate_cli(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    hydra.main(config_path=str(CONF_DIR), config_name="probe", version_base="1.3")(hydra_job)()
    if FAILED and not any(a in ("-m", "--multirun") for a in args):
        sys.exit(1)


if __name__ == "__main__":
    main()
