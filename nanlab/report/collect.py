"""Records -> the results table: one row per run, every Record field flattened.

`config` (the resolved config) is a JSON string column, and `overrides`,
`test_failing_ids` and `test_failing_pads` are JSON list strings, so results.parquet and results.csv hold the same table and the report can be redone from
either (the notebook does). Duplicate records of one config_hash (a rerun, a requeue): the
newest non-interrupted one is kept.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path

import pandas as pd

from nanlab.record import Record, find_records, read_record

RECORD_FIELDS = tuple(f.name for f in fields(Record))
EXTRA = ("record_path", "mtime")
STR_FIELDS = (
    "precision",
    "softmax",
    "stress",
    "guard",
    "model",
    "data",
    "status",
    "config_hash",
    "cell",
)
FLOAT_FIELDS = (
    "lr",
    "lr_x",
    "ref_lr",
    "clip",
    "cause_value",
    "initial_loss",
    "final_loss",
    "best_loss",
    "max_grad_norm",
    "max_attn_logit",
    "train_margin",
    "nonfinite_grad_frac",
    "nonfinite_param_frac",
    "wall_time_s",
    "steps_per_s",
    "peak_memory_gb",
    "test_wall_s",
    *(
        f"{what}_{when}_{tower}"
        for what in ("rel_update", "attn_max_logit", "attn_entropy")
        for when in ("first", "last")
        for tower in ("vision", "text")
    ),
)
INT_FIELDS = (
    "warmup_steps",
    "seed",
    "attempt",
    "loss_spikes",
    "guard_fired",
    "scaler_skips",
    "empty_target_steps",
    "steps_done",
    "max_steps",
    "test_samples",
    "test_nonfinite",
)
NULLABLE_INT = ("first_bad_step", "switch_step")
TEXT_FIELDS = (
    "phase",
    "module",
    "dtype",
    "cause",
    "cause_detail",
    "signal",
    "error",
    "run_dir",
    "torch_version",
    "transformers_version",
    "device",
    "half_gemm",
    "test_status",
    "test_module",
    "test_cause",
    "test_cause_detail",
    "test_precision",
    "test_padding_side",
)
LIST_FIELDS = ("overrides", "test_failing_ids", "test_failing_pads")  # JSON list strings


def _row(rec: Record, path: Path) -> dict:
    row = {f: getattr(rec, f) for f in RECORD_FIELDS}
    row["config"] = json.dumps(rec.config or {}, sort_keys=True, default=str)
    row["overrides"] = json.dumps([str(o) for o in (rec.overrides or [])])
    row["test_failing_ids"] = json.dumps([str(i) for i in (rec.test_failing_ids or [])])
    row["test_failing_pads"] = json.dumps([int(k) for k in (rec.test_failing_pads or [])])
    row["record_path"] = str(path)
    row["mtime"] = path.stat().st_mtime
    return row


def collect(*dirs: str | os.PathLike, progress: bool = False) -> pd.DataFrame:
    """Every record.json below `dirs`, one row per run (duplicates resolved).

    `df.attrs["duplicates_dropped"]`: how many older or interrupted duplicates were dropped.
    """
    paths = find_records(*dirs)
    it: Iterable[Path] = paths
    if progress and paths:
        from rich.progress import track

        it = track(paths, description="reading records", transient=True)
    rows = [_row(read_record(p), p) for p in it]
    df = pd.DataFrame(rows, columns=[*RECORD_FIELDS, *EXTRA])
    n_before = len(df)
    df = dedupe(df)
    df = normalize_results(df)
    df.attrs["duplicates_dropped"] = n_before - len(df)
    df.attrs["dirs"] = [str(d) for d in dirs]
    return df


def dedupe(df: pd.DataFrame) -> pd.DataFrame:
    """One row per config_hash: the newest non-interrupted record (else the newest).

    Records without a config_hash are never duplicates of each other.
    """
    if df.empty:
        return df
    key = df["config_hash"].fillna("").astype(str)
    key = key.where(key != "", "<nohash>" + df["record_path"].astype(str))
    usable = (df["status"] != "interrupted").astype(int)
    return (
        df.assign(_key=key, _usable=usable)
        .sort_values(["_usable", "mtime"], kind="stable")
        .drop_duplicates("_key", keep="last")
        .drop(columns=["_key", "_usable"])
        .sort_values("record_path", kind="stable")
        .reset_index(drop=True)
    )


def _json_text(x, empty: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return empty
    if isinstance(x, str):
        return x if x.strip() else empty
    if hasattr(x, "tolist"):
        x = x.tolist()
    return json.dumps(x, sort_keys=True, default=str)


def _overrides_text(x) -> str:
    """Always a JSON list; an old space-joined string is split."""
    if isinstance(x, str) and x.strip() and not x.lstrip().startswith("["):
        return json.dumps(x.split())
    return _json_text(x, "[]")


def normalize_results(df: pd.DataFrame) -> pd.DataFrame:
    """Consistent columns and dtypes, from records, results.csv or results.parquet.

    A CSV round trip turns "" into NaN and ints with gaps into floats; grouping on NaN keys
    would drop rows silently, so string fields are filled with "".
    """
    df = df.copy()
    default = Record()
    for c in RECORD_FIELDS:
        if c not in df.columns:
            v = getattr(default, c)
            df[c] = [v if not isinstance(v, (dict, list)) else type(v)() for _ in range(len(df))]
    for c in EXTRA:
        if c not in df.columns:
            df[c] = None
    for c in STR_FIELDS:
        df[c] = df[c].fillna("").astype(str)
    df["status"] = df["status"].replace("", "error")
    for c in FLOAT_FIELDS:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    for c in INT_FIELDS:
        df[c] = pd.to_numeric(df[c], errors="coerce").fillna(0).astype("int64")
    for c in NULLABLE_INT:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    df["normalize"] = df["normalize"].map(_to_bool).astype(bool)
    df["replay_agrees"] = (
        df["replay_agrees"].astype(object).where(df["replay_agrees"].notna(), None)
    )
    for c in TEXT_FIELDS:
        df[c] = df[c].astype(object).where(df[c].notna(), None)
    df["config"] = [_json_text(x, "{}") for x in df["config"]]
    df["overrides"] = [_overrides_text(x) for x in df["overrides"]]
    for c in LIST_FIELDS[1:]:
        df[c] = [_json_text(x, "[]") for x in df[c]]
    return df


def _to_bool(x) -> bool:
    if isinstance(x, str):
        return x.strip().lower() in ("true", "1", "yes")
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return True  # the Record default
    return bool(x)


def run_config(row) -> dict:
    """The resolved config of one results row (dict or namedtuple)."""
    raw = row["config"] if isinstance(row, dict) else row.config
    return json.loads(raw) if isinstance(raw, str) and raw else (raw or {})


def run_overrides(row) -> list[str]:
    return json_list(row["overrides"] if isinstance(row, dict) else row.overrides)


def json_list(raw) -> list:
    """A list column's value (a JSON list string, or a list) as a list."""
    if isinstance(raw, str):
        return json.loads(raw) if raw.strip() else []
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return []
    return list(raw.tolist() if hasattr(raw, "tolist") else raw)


def load_results(path: str | os.PathLike) -> pd.DataFrame:
    """results.parquet / results.csv (or a folder holding one) -> the normalized table."""
    path = Path(path)
    if path.is_dir():
        for name in ("results.parquet", "results.csv"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"no results.parquet or results.csv in {path}")
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    return normalize_results(df)


def write_results(df: pd.DataFrame, out: str | os.PathLike) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pq, csv = out / "results.parquet", out / "results.csv"
    df.to_parquet(pq, index=False)
    df.to_csv(csv, index=False)
    return pq, csv
