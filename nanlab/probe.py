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
   (`attention_stats.AttentionStats` via `attention.OBSERVERS`, `locate.first_nonfinite_forward`).
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
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

import nanlab  # noqa: F401  (sets the offline environment before anything else loads)
from nanlab.config.compose import CONF_DIR, probe_spec_from_config, validate_cli
from nanlab.config.specs import SPLITS, ModelSpec, ProbeOptions, ProbeSpec  # noqa: F401  (the probe's specs)
from nanlab.run.probe_tables import SETTINGS, TABLE, combine, print_summary

# --- data --------------------------------------------------------------------------------


def load_samples(spec: ProbeSpec) -> list[dict]:
    from nanlab.data.datamodule import JsonlDataset
    from nanlab.data.shapes import shapes_splits

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
    from nanlab.data.datamodule import IGNORE_INDEX

    labels = row["labels"][0]
    supervised = set((labels != IGNORE_INDEX).nonzero().flatten().tolist())
    start = max(supervised) if supervised else labels.numel()
    while start - 1 in supervised:
        start -= 1
    length = labels.numel()
    return {
        k: (
            v[:, :start]
            if k != "pixel_values"
            and k != "image_grid_thw"
            and v.dim() == 2
            and v.shape[1] == length
            else v
        )
        for k, v in row.items()
        if k not in ("labels", "sample_ids")
    }


# --- the probe ---------------------------------------------------------------------------


def _to(batch: dict, device: str) -> dict:
    import torch

    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def probe(spec: ProbeSpec, out_dir: str | Path | None = None, quiet: bool = False):
    """Run the probe; returns the per-sample table (a DataFrame) and writes it to out_dir."""
    import pandas as pd
    import torch

    from nanlab.data.datamodule import Collator
    from nanlab.diagnosis.attention_stats import AttentionStats
    from nanlab.model.checkpoint import resolve
    from nanlab.numerics import precision
    from nanlab.run.build import build_parts, pick_device
    from nanlab.run.serve import nonfinite, properties, scan_row, split_rows

    path = resolve(spec.checkpoint)
    torch.manual_seed(spec.seed)
    samples = load_samples(spec)
    batches: list[dict] = []

    def first_batch(parts):  # the probe's batches, as training pads them; calibrate on the first
        collate = Collator.for_data(parts.processor, spec.data)
        for start in range(0, len(samples), spec.batch_size):
            batch = collate(samples[start : start + spec.batch_size])
            batches.append(
                parts.batch_transform(batch, len(batches)) if parts.batch_transform else batch
            )
        return batches[0]

    # the checkpoint's own model and processor, through training's build path
    parts = build_parts(
        ModelSpec(path=str(path)),
        spec.data,
        spec.softmax,
        spec.stress,
        spec.precision,
        spec.seed,
        spec.device if spec.device != "auto" else pick_device("auto"),
        first_batch,
    )
    if not batches:
        first_batch(parts)
    processor, model, plugin = parts.processor, parts.model.eval(), parts.plugin
    if isinstance(plugin, precision.ProgressiveMixed):
        plugin.active = True  # a fine-tuned checkpoint is past the fp32 warm-up
    device = parts.device
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
            batch_bad: list[bool | None] = [None] * batch["input_ids"].shape[0]
            if spec.probe.batched:
                inputs = {k: v for k, v in batch.items() if k not in ("labels", "sample_ids")}
                with plugin.forward_context():
                    out = model(**inputs, use_cache=False, output_hidden_states=True)
                batch_bad = [
                    nonfinite(out.logits[i]) or any(nonfinite(h[i]) for h in out.hidden_states)
                    for i in range(len(batch_bad))
                ]
                del out
            for r, row in enumerate(split_rows(batch, image_token_id, merge)):
                rec = {
                    **properties(row, spec.data.padding_side, merge),
                    "batch": b,
                    "row": r,
                    **scan_row(model, plugin.forward_context, stats, row),
                    "batch_nonfinite": batch_bad[r],
                }
                if spec.probe.max_new_tokens > 0:
                    rec.update(
                        _generate(model, plugin, _prompt(row), spec.probe.max_new_tokens, tokenizer)
                    )
                records.append(rec)
    table = pd.DataFrame.from_records(records)
    settings = settings_of(spec, str(path), table, parts.half_gemm)
    if out_dir is not None:
        write(table, settings, out_dir)
    if not quiet:
        print_summary(table, settings, spec.probe.show)
    return table


def _generate(model, plugin, prompt: dict, max_new_tokens: int, tokenizer) -> dict:
    """Greedy generation from the row's prompt under the same hooks."""
    import torch

    from nanlab.diagnosis.locate import first_nonfinite_forward

    def run():
        with plugin.forward_context():
            return model.generate(
                **prompt,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                output_logits=True,
                return_dict_in_generate=True,
            )

    out: Any
    name, _, out = first_nonfinite_forward(model, run)
    logits_bad = any(not torch.isfinite(step).all() for step in out.logits)
    new = out.sequences[0, prompt["input_ids"].shape[1] :]
    return {
        "gen_nonfinite": name is not None or logits_bad,
        "gen_first_module": name,
        "gen_text": tokenizer.decode(new, skip_special_tokens=False),
    }


# --- outputs ---------------------------------------------------------------------------


def settings_of(spec: ProbeSpec, checkpoint: str, table, half_gemm: str = "native") -> dict:
    from nanlab.run.serve import summarize, verdict

    n_bad = int(table["nonfinite"].sum())
    return {
        "checkpoint": checkpoint,
        "split": spec.split,
        "batch_size": spec.batch_size,
        "precision": spec.precision.name,
        "softmax": spec.softmax.name,
        "padding_side": spec.data.padding_side,
        "stress": spec.stress.name,
        "data": spec.data.name,
        "samples": len(table),
        "nonfinite": n_bad,
        "batch_nonfinite": int(table["batch_nonfinite"].eq(True).sum()),
        "max_new_tokens": spec.probe.max_new_tokens,
        "half_gemm": half_gemm,
        # the same test-time verdict a training run records (nanlab/run/serve.py)
        "verdict": verdict(
            summarize(table.to_dict("records"), spec.precision.name, spec.data.padding_side, 0.0)
        ),
    }


def write(table, settings: dict, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out_dir / f"{TABLE}.parquet", index=False)
    table.to_csv(out_dir / f"{TABLE}.csv", index=False)
    (out_dir / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
    return out_dir


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
            raise ValueError(
                "checkpoint=???: required: a run dir trained with save.hf=true, "
                "its hf/, or a save_pretrained directory"
            )
        spec = probe_spec_from_config(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
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

    problem = validate_cli(args, ProbeSpec)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    hydra.main(config_path=str(CONF_DIR), config_name="probe", version_base="1.3")(hydra_job)()
    if FAILED and not any(a in ("-m", "--multirun") for a in args):
        sys.exit(1)


if __name__ == "__main__":
    main()
