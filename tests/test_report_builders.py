"""Constructed records for the report tests (and the notebook test), written the way a run
writes them: nanlab.record.Record instances through write_record, with a resolved `config`, the
`cell` hash (config without the seed) and the mechanism YAML under config["stress"]. A run
that stays finite gets a test-time pass as the runner gives it (test_status, failing ids,
cause): finite by default, or as an outcome tuple's fifth field says (served_bad, ...).

Nothing here uses src.report: overrides are applied, and cells hashed, by this file's own
small code, so the tests compare the engine against an independent construction.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import yaml

from nanlab.record import Record, write_record

GROUPS = ("model", "data", "precision", "softmax", "stress", "guard")
GROUP_OPTIONS = {  # option -> the subtree Hydra would compose (name added)
    "precision": {"progressive": {"switch_step": 20, "half_gemm": "auto"}},
    "softmax": {"softcap": {"cap": 50.0}},
}
GROUP_DEFAULT = {"precision": {"switch_step": 0, "half_gemm": "auto"}, "softmax": {}}

BASE = {
    "model": {"name": "tiny", "ref_lr": 1e-3, "hidden_size": 64},
    "data": {
        "name": "shapes",
        "padding_side": "right",
        "normalize": True,
        "max_length": None,
        "image_size": 56,
    },
    "precision": {"name": "bf16", "switch_step": 0, "half_gemm": "auto"},
    "softmax": {"name": "sdpa"},
    "stress": {"name": "none"},
    "guard": {"name": "none"},
    "monitor": {"every": 5, "train_margin": 0.1},
    "serve": {"enabled": True, "precision": "bf16", "padding_side": "left", "batch_size": 8},
    "lr": 1e-3,
    "lr_x": 1,
    "warmup_steps": 0,
    "clip": 1.0,
    "max_steps": 20,
    "seed": 0,
}
TEST_SAMPLES = 8
TEST_IDS = [f"shapes/test/{i}" for i in range(TEST_SAMPLES)]


def mech(name: str, cause: str, baseline: list[str], predictions: list[dict], **extra) -> dict:
    """A mechanism YAML as it lands in config["stress"]."""
    return {
        "name": name,
        "mechanism": f"the {name} mechanism",
        "reference": "a paper",
        "cause": cause,
        "baseline": baseline,
        "predictions": predictions,
        **extra,
    }


def pred(advice: str, mitigation: list[str], effect: str, **kw) -> dict:
    return {
        "advice": advice,
        "mitigation": mitigation,
        "effect": effect,
        "why": kw.pop("why", f"{advice} {effect}"),
        **kw,
    }


def apply(config: dict, overrides: list[str], stress: dict | None = None) -> dict:
    """Hydra-like composition for the keys the tests use."""
    cfg = copy.deepcopy(config)
    for o in overrides:
        key, value = o.split("=", 1)
        value = yaml.safe_load(value)
        path = key.split(".")
        if len(path) == 1 and key in GROUPS:
            if key == "stress":
                cfg["stress"] = copy.deepcopy(stress) if stress else {"name": value}
                continue
            sub = GROUP_OPTIONS.get(key, {}).get(value, GROUP_DEFAULT.get(key))
            cfg[key] = (
                {"name": value, **copy.deepcopy(sub)}
                if sub is not None
                else {**cfg[key], "name": value}
            )
            continue
        node = cfg
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
    return cfg


def config_for(spec: dict | None, overrides: list[str]) -> dict:
    """BASE under a mechanism (its stress subtree) with overrides applied."""
    cfg = copy.deepcopy(BASE)
    if spec is not None:
        cfg["stress"] = copy.deepcopy(spec)
    return apply(cfg, overrides)


def cfg(spec: dict, *changes: str) -> dict:
    """A mechanism's baseline overrides with `changes` (same key replaced, new key added)."""
    over = {o.split("=", 1)[0]: o for o in spec["baseline"]}
    over.update({o.split("=", 1)[0]: o for o in changes})
    return config_for(spec, list(over.values()))


def _hash(d: dict) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cell_hash(config: dict) -> str:
    return _hash({k: v for k, v in config.items() if k != "seed"})


def served_fields(cfg: dict, status: str, test: dict | bool | None) -> dict:
    """The record's test_* fields as the runner writes them: only a run that stayed finite
    serves its test split; `test` None: all finite; False: not run; a dict: failing samples
    ({"ids": [...], "pads": [...], "cause": ...}, see served_bad)."""
    serve = cfg.get("serve") or {}
    if status not in ("ok", "stalled") or test is False or not serve.get("enabled", True):
        return {}
    out = {
        "test_samples": TEST_SAMPLES,
        "test_precision": serve.get("precision"),
        "test_padding_side": serve.get("padding_side"),
        "test_wall_s": 0.5,
        "test_status": "finite",
        "test_nonfinite": 0,
    }
    if test and test.get("ids"):
        out.update(
            test_status="nonfinite",
            test_nonfinite=len(test["ids"]),
            test_failing_ids=list(test["ids"]),
            test_failing_pads=list(test["pads"]),
            test_cause=test.get("cause"),
            test_cause_detail="a row of -inf",
            test_module="model.language_model.layers.0.self_attn",
        )
    return out


def run(
    root: Path,
    config: dict,
    seed: int,
    status: str,
    step: int | None = None,
    cause: str | None = None,
    param_frac: float | None = None,
    test: dict | bool | None = None,
    **kw,
) -> Path:
    """One run's record (a run dir under root named by its config hash); initial_loss and
    final_loss may be given (default 3.0, and 1.0 for ok, 2.9 otherwise)."""
    cfg = {**copy.deepcopy(config), "seed": seed}
    kw = {**served_fields(cfg, status, test), **kw}
    initial = kw.pop("initial_loss", 3.0)
    final = kw.pop("final_loss", 1.0 if status == "ok" else 2.9)
    h = _hash(cfg)
    failed = status in ("nonfinite", "diverged")
    ref = cfg["model"].get("ref_lr")
    rec = Record(
        precision=cfg["precision"]["name"],
        softmax=cfg["softmax"]["name"],
        lr=float(cfg["lr_x"] * ref if cfg.get("lr_x") is not None and ref else cfg["lr"]),
        lr_x=cfg.get("lr_x"),
        ref_lr=ref,
        warmup_steps=cfg["warmup_steps"],
        clip=float(cfg["clip"]),
        normalize=cfg["data"]["normalize"],
        stress=cfg["stress"]["name"],
        guard=cfg["guard"]["name"],
        model=cfg["model"]["name"],
        data=cfg["data"]["name"],
        seed=seed,
        status=status,
        first_bad_step=step if failed else None,
        cause=cause if failed else None,
        phase="forward" if status == "nonfinite" else None,
        module="model.layers.0.self_attn" if status == "nonfinite" else None,
        nonfinite_param_frac=param_frac,
        initial_loss=initial,
        final_loss=final,
        steps_done=step or cfg["max_steps"],
        max_steps=cfg["max_steps"],
        wall_time_s=1.0,
        config_hash=h,
        cell=cell_hash(cfg),
        config=cfg,
        overrides=[f"seed={seed}"],
        train_margin=0.1,
        switch_step=(
            cfg["precision"]["switch_step"] if cfg["precision"]["name"] == "progressive" else None
        ),
        error="RuntimeError: boom" if status == "error" else None,
        signal="SIGTERM" if status == "interrupted" else None,
        **kw,
    )
    d = root / (cfg["stress"]["name"]) / h
    write_record(rec, d)
    return d


def seeds(root: Path, config: dict, outcomes: list[tuple]) -> None:
    """One cell: outcomes[i] = (status, step, cause, param_frac, test) for seed i (trailing
    fields optional; test: see served_fields)."""
    for i, o in enumerate(outcomes):
        o = tuple(o) + (None,) * (5 - len(o))
        run(root, config, i, o[0], o[1], o[2], o[3], test=o[4])


def failing(
    n: int, step: int, cause: str, frac: float | None = None, status: str = "nonfinite"
) -> list[tuple]:
    return [(status, step, cause, frac)] * n


def ok(n: int) -> list[tuple]:
    return [("ok",)] * n


def stalled(n: int) -> list[tuple]:
    return [("stalled",)] * n


def served_bad(
    n: int, pads: dict[int, int], cause: str = "masked_row", status: str = "ok"
) -> list[tuple]:
    """n seeds that trained finite (`status`) and whose test pass was non-finite on the test
    samples `pads` names (index -> its left padding)."""
    test = {"ids": [TEST_IDS[i] for i in pads], "pads": list(pads.values()), "cause": cause}
    return [(status, None, None, None, test)] * n


def not_served(n: int, status: str = "ok") -> list[tuple]:
    """n seeds that trained finite but ran no test pass (serve.enabled=false, old records)."""
    return [(status, None, None, None, False)] * n


# --- a small demo map: a core grid and three mechanisms (figures, CLI, notebook) ----------

DEMO_MECHS = {
    "logit_growth": mech(
        "logit_growth",
        "exp_overflow",
        ["precision=bf16", "softmax=naive", "lr_x=10"],
        [
            pred("use_fp32", ["precision=fp32"], "no_effect"),
            pred("max_subtracted_softmax", ["softmax=stable"], "fixes"),
            pred("lower_lr", ["lr_x=1"], "delays"),
            pred("clip", ["clip=0.1"], "no_effect"),
            pred(
                "progressive",
                ["precision=progressive", "precision.switch_step=2"],
                "no_effect",
                acts_at="precision.switch_step",
            ),
        ],
    ),
    "masked_rows": mech(
        "masked_rows",
        "masked_row",
        ["precision=bf16", "softmax=eager", "data.padding_side=left"],
        [
            pred("use_fp32", ["precision=fp32"], "no_effect"),
            pred("safe_softmax", ["softmax=safe"], "fixes"),
            pred("right_padding", ["data.padding_side=right"], "fixes"),
            pred("max_subtracted_softmax", ["softmax=stable"], "fixes"),
            pred("guard_key_nodes", ["guard=skip_step"], "no_effect"),
        ],
        mask="summed_planes",
    ),
    "lr_spike": mech(
        "lr_spike",
        "divergence",
        ["precision=bf16", "lr_x=1"],
        [
            pred("lower_lr", ["lr_x=0.1"], "fixes"),
            pred("warmup", ["warmup_steps=5"], "no_effect"),
            pred("clip", ["clip=0.1"], "no_effect"),
        ],
    ),
    "serving_masked_rows": mech(
        "serving_masked_rows",
        "masked_row",
        ["precision=bf16", "softmax=stable", "serve.precision=bf16_autocast"],
        [
            pred("use_fp32", ["precision=fp32"], "no_effect"),
            pred("lower_lr", ["lr_x=0.1"], "no_effect"),
            pred("max_subtracted_softmax", ["softmax=eager"], "fixes"),
            pred("right_padding", ["serve.padding_side=right"], "fixes"),
            pred("serve_precision", ["serve.precision=bf16"], "fixes"),
            pred("serve_precision", ["serve.precision=fp32"], "fixes"),
        ],
        judged_on="test",
    ),
}
DEMO_PADS = {1: 5, 4: 3}  # the left-padded test samples (index -> pads) that fail
# (mechanism, mitigation) -> per-seed outcomes; the baseline under key ()
DEMO_OUTCOMES = {
    ("logit_growth", ()): failing(3, 8, "exp_overflow", 0.3),
    ("logit_growth", ("precision=fp32",)): failing(3, 8, "exp_overflow", 0.3),
    ("logit_growth", ("softmax=stable",)): ok(3),
    ("logit_growth", ("lr_x=1",)): failing(3, 20, "exp_overflow", 0.3),
    ("logit_growth", ("clip=0.1",)): failing(3, 9, "exp_overflow", 0.3),
    ("logit_growth", ("precision=progressive", "precision.switch_step=2")): failing(
        3, 8, "exp_overflow", 0.3
    ),
    ("masked_rows", ()): failing(3, 0, "masked_row", 1.0),
    ("masked_rows", ("precision=fp32",)): failing(3, 0, "masked_row", 1.0),
    ("masked_rows", ("softmax=safe",)): ok(3),
    # trains fine with right padding, but the served test split is left-padded
    ("masked_rows", ("data.padding_side=right",)): (
        served_bad(2, DEMO_PADS) + served_bad(1, DEMO_PADS, status="stalled")
    ),
    ("masked_rows", ("softmax=stable",)): failing(3, 0, "masked_row", 1.0),
    ("masked_rows", ("guard=skip_step",)): stalled(3),
    ("lr_spike", ()): failing(2, 9, "divergence", status="diverged") + ok(1),
    ("lr_spike", ("lr_x=0.1",)): ok(3),
    ("lr_spike", ("warmup_steps=5",)): failing(3, 9, "divergence", status="diverged"),
    ("lr_spike", ("clip=0.1",)): failing(3, 10, "divergence", status="diverged"),
    ("serving_masked_rows", ()): served_bad(3, DEMO_PADS),
    ("serving_masked_rows", ("precision=fp32",)): served_bad(3, DEMO_PADS),
    ("serving_masked_rows", ("lr_x=0.1",)): served_bad(3, DEMO_PADS, status="stalled"),
    ("serving_masked_rows", ("softmax=eager",)): ok(3),
    ("serving_masked_rows", ("serve.padding_side=right",)): ok(3),
    ("serving_masked_rows", ("serve.precision=bf16",)): ok(3),
    ("serving_masked_rows", ("serve.precision=fp32",)): ok(2) + served_bad(1, DEMO_PADS),
}
DEMO_CORE_LRX = (0.3, 1, 3, 10)


def demo_core_status(precision: str, softmax: str, lr_x: float, seed: int) -> tuple:
    if softmax == "naive" and lr_x >= 3 and not (lr_x == 3 and seed == 2):
        return ("nonfinite", 12 if lr_x == 3 else 5, "exp_overflow", 0.2)
    if lr_x >= 10:
        return ("diverged", 15, "divergence")
    status = "stalled" if lr_x < 0.5 and seed == 0 else "ok"
    if precision == "bf16" and softmax == "naive":  # finite in training, not at test time
        return served_bad(1, DEMO_PADS, status=status)[0]
    return (status,)


def demo_map(root: Path, n_seeds: int = 3, history: bool = False) -> Path:
    for name, spec in DEMO_MECHS.items():
        base = spec["baseline"]
        for (m, mit), outcomes in DEMO_OUTCOMES.items():
            if m != name:
                continue
            over = list(base)
            for o in mit:
                k = o.split("=", 1)[0]
                over = [x for x in over if x.split("=", 1)[0] != k] + [o]
            seeds(root, config_for(spec, over), outcomes)
    for p in ("fp32", "bf16"):
        for s in ("naive", "stable"):
            for x in DEMO_CORE_LRX:
                cfg = config_for(None, [f"precision={p}", f"softmax={s}", f"lr_x={x}"])
                for seed in range(n_seeds):
                    o = demo_core_status(p, s, x, seed)
                    d = run(root, cfg, seed, *o)
                    if history:
                        n = o[1] if len(o) > 1 and o[1] is not None else 20
                        rows = ["step,loss,grad_norm,lr"] + [
                            f"{k},{3 - k / (n + 1):.3f},{1 + k % 3},{x * 1e-3}" for k in range(n)
                        ]
                        (d / "history.csv").write_text("\n".join(rows) + "\n")
    return root
