"""Hydra's side of the entry points: the schemas, command-line checks, and config -> specs.

Only the entry points (nanlab/train.py, nanlab/probe.py) and this module see Hydra; everything
below gets the typed specs of nanlab/config/specs.py. Nothing here imports torch: a typo on the
command line costs a fraction of a second, not the 6 s of loading torch and transformers.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from hydra.core.config_store import ConfigStore

from nanlab.config.options import REGISTRIES
from nanlab.config.specs import OptimSpec, ProbeSpec, RunConfig, RunSpec
from nanlab.record import config_hash

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# The top-level keys that are the optimizer's (lr=1e-5 on the command line, not optim.lr=).
OPTIM_TOP = ("lr", "warmup_steps", "clip", "max_steps", "weight_decay")
# The config nodes that become one spec each (RunSpec's fields of the same names).
GROUPS = (
    "model",
    "data",
    "precision",
    "softmax",
    "stress",
    "guard",
    "monitor",
    "logger",
    "trainer",
    "save",
    "serve",
)

# conf/config.yaml and conf/probe.yaml start from these (their first `defaults` entry): every
# key's default lives in the dataclass, the YAMLs list what differs.
ConfigStore.instance().store(name="run_schema", node=RunConfig)
ConfigStore.instance().store(name="probe_schema", node=ProbeSpec)


# --- config -> specs --------------------------------------------------------------------------


def build(cls, node: dict | None, key: str):
    """A dataclass from a config node (nested dataclass fields too); unknown keys are a
    one-line error naming them and the allowed keys."""
    node = dict(node or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(node) - set(fields))
    if unknown:
        where = f"{key}.{unknown[0]}" if key else unknown[0]
        raise ValueError(f"{where}: unknown key; allowed: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    for name, value in node.items():
        if dataclasses.is_dataclass(hints.get(name)) and isinstance(value, dict):
            node[name] = build(hints[name], value, f"{key}.{name}" if key else name)
    return cls(**node)


def optim_spec(cfg: dict) -> OptimSpec:
    """The optimizer's spec: the top-level keys, `optim.*`, and lr = lr_x * model.ref_lr."""
    node = dict(cfg.get("optim") or {})
    for key in node:
        if key in OPTIM_TOP:
            raise ValueError(
                f"optim.{key}: unknown key (a top-level key: {key}=...); allowed: "
                "name, eps, betas, z_loss"
            )
    optim = {**{k: cfg[k] for k in OPTIM_TOP if k in cfg}, **node}
    lr_x, model = cfg.get("lr_x"), cfg.get("model") or {}
    if lr_x is not None:  # the lr as a multiple of the model's reference fine-tuning lr
        if not (isinstance(lr_x, (int, float)) and lr_x > 0):
            raise ValueError(f"lr_x={lr_x}: must be a positive number (lr = lr_x * model.ref_lr)")
        if not model.get("ref_lr"):
            raise ValueError(
                f"lr_x={lr_x}: model.ref_lr is not set for model="
                f"{model.get('name')}; give lr= instead"
            )
        optim["lr"] = float(lr_x) * float(model["ref_lr"])
    optim["vision_lr"] = model.get("vision_lr")
    return build(OptimSpec, optim, "optim")


def spec_from_config(
    cfg: dict, overrides: list[str] | None = None, multirun: bool = False
) -> RunSpec:
    """The resolved config (a plain dict) as a checked RunSpec."""
    hints = typing.get_type_hints(RunSpec)
    parts = {name: build(hints[name], cfg.get(name), name) for name in GROUPS}
    spec = RunSpec(
        **parts,
        optim=optim_spec(cfg),
        batch_size=cfg.get("batch_size", RunSpec.batch_size),
        seed=cfg.get("seed", RunSpec.seed),
        ckpt_path=cfg.get("ckpt_path"),
        config_hash=config_hash(cfg),
        cell=config_hash(cfg, leave_out=("seed",)),
        overrides=list(overrides or []),
        config=cfg,
        multirun=multirun,
    )
    spec.check()
    return spec


def probe_spec_from_config(cfg: dict) -> ProbeSpec:
    cfg = {k: v for k, v in cfg.items() if k != "hydra"}
    spec = build(ProbeSpec, cfg, "")
    spec.check()
    return spec


def compose(config_name: str, overrides: list[str]) -> dict:
    """The resolved config `python -m src.<entry> OVERRIDES...` would run (tests, benchmarks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    return typing.cast(dict, OmegaConf.to_container(cfg, resolve=True))


def compose_spec(*overrides: str) -> RunSpec:
    """The RunSpec that `python -m src.train OVERRIDES...` would run."""
    return spec_from_config(compose("config", list(overrides)), list(overrides))


# --- the command line, checked before anything heavy loads ---------------------------------------


def validate_cli(argv: list[str], schema=RunConfig) -> str | None:
    """The first bad override, as one line naming the key and the allowed values: an unknown
    config-group option, an unknown key, or a value of the wrong type. Hydra's own messages
    span several lines and stop a multirun; this runs before Hydra and before torch."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"}
    parser = OverridesParser.create()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            override = parser.parse_override(arg)
        except HydraException as e:
            return f"{arg}: cannot parse: {str(e).splitlines()[0]}"
        key = override.key_or_group
        if override.is_delete() or key.startswith("hydra") or override.package is not None:
            continue
        values = _values(override)
        if key in groups:
            # an axis's options are its registry's (conf/<axis>/ holds one YAML per option,
            # tests/test_options.py keeps the two equal); other groups' are their YAMLs
            allowed = (
                sorted(REGISTRIES[key].names)
                if key in REGISTRIES
                else sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml"))
            )
            for option in values:
                if option is not None and str(option) not in allowed:
                    return f"{key}={option}: unknown option; allowed: {', '.join(allowed)}"
            continue
        problem = _check_key(schema, key, values)
        if problem:
            return problem
    return None


def _values(override) -> list:
    """The values an override sets: one, or each of a choice sweep (a,b,c); ranges and
    interpolations are left to Hydra."""
    from hydra.core.override_parser.types import ChoiceSweep

    value = override.value()
    if isinstance(value, ChoiceSweep):
        return list(value.list)
    if override.is_sweep_override() or (isinstance(value, str) and "${" in value):
        return []
    return [value]


def _check_key(schema, key: str, values: list) -> str | None:
    from omegaconf import OmegaConf
    from omegaconf.errors import ValidationError

    cls, parts = schema, key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            return None  # inside a free-form value (a dict or list): Hydra checks it
        fields = {f.name for f in dataclasses.fields(cls)}
        if part not in fields:
            where = ".".join(parts[:i])
            if not where and part == "optim":
                return None
            return (
                f"{key}: unknown key; allowed{' in ' + where if where else ''}: "
                f"{', '.join(sorted(fields))}"
            )
        parent, cls = cls, typing.get_type_hints(cls)[part]
    node = OmegaConf.structured(parent)
    for value in values:
        try:
            setattr(node, parts[-1], value)
        except ValidationError:
            return f"{key}={value}: must be {_kind(cls)}"
    return None


def _kind(annotation) -> str:
    """A type as a user reads it: float | None -> a number (or null)."""
    text = str(getattr(annotation, "__name__", annotation))
    optional = "None" in text
    for name, words in (
        ("bool", "true or false"),
        ("float", "a number"),
        ("int", "an integer"),
        ("list", "a list, e.g. [a,b]"),
        ("dict", "a mapping"),
        ("str", "a string"),
    ):
        if text.startswith(name):
            return words + (" (or null)" if optional else "")
    return text
