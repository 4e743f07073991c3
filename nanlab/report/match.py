"""Hydra overrides against a record's resolved config: match, touch, compare.

An override "key=value" is read the way Hydra writes it: the value with yaml.safe_load
("null" -> None, "10" -> 10, "1.0" -> 1.0). Dotted keys walk the nested config
("data.padding_side"); a key whose config value is a config group (a dict with a "name",
e.g. precision, softmax, stress) compares that group's name. Numbers compare numerically.

Two cells "differ in one setting only" when their configs are equal everywhere except under
the keys an override list touches: a group override (softmax=sdpa) touches the whole group
subtree, a dotted key that leaf. The seed is never compared.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import yaml

_MISSING = object()
NEVER_COMPARED = ("seed",)


def parse_override(text: str) -> tuple[tuple[str, ...], object]:
    """'data.padding_side=left' -> (('data', 'padding_side'), 'left').

    Hydra's '+' / '++' prefixes are dropped; '~key' (delete) gives the value _MISSING.
    """
    text = str(text).strip()
    if text.startswith("~"):
        key = text[1:].split("=", 1)[0]
        return tuple(key.split(".")), _MISSING
    key, sep, raw = text.lstrip("+").partition("=")
    if not sep:
        raise ValueError(f"{text!r}: not a key=value override")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return tuple(key.strip().split(".")), value


def override_key(text: str) -> str:
    return ".".join(parse_override(text)[0])


def lookup(config: dict, path: Sequence[str]):
    """The config value at a dotted path, or _MISSING."""
    node: object = config
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def get(config: dict, key: str, default=None):
    """config value at a dotted key ('precision.switch_step'); a group gives its name."""
    v = lookup(config or {}, key.split("."))
    if v is _MISSING:
        return default
    if isinstance(v, dict) and "name" in v:
        return v["name"]
    return v


def same_value(a, b) -> bool:
    """Equal, numbers compared numerically; a bool equals only a bool."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return True
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return a is b
    if isinstance(a, (str, int, float)) and isinstance(b, (str, int, float)):
        return str(a) == str(b)  # "16" and 16: Hydra would have read them alike
    return a == b


def matches(config: dict, override: str) -> bool:
    """Does the config hold this override's value?"""
    path, value = parse_override(override)
    have = lookup(config or {}, path)
    if value is _MISSING:
        return have is _MISSING
    if have is _MISSING:
        return False
    if isinstance(have, dict) and "name" in have:
        have = have["name"]
    return same_value(have, value)


def matches_all(config: dict, overrides: Iterable[str]) -> bool:
    return all(matches(config, o) for o in overrides)


def updated(base: Sequence[str], changes: Sequence[str]) -> list[str]:
    """The base overrides with `changes` applied: the same key replaced, a new key added."""
    out = {override_key(o): o for o in base}
    for o in changes:
        out[override_key(o)] = o
    return list(out.values())


def _without(config: dict, paths: Iterable[tuple[str, ...]]) -> dict:
    """A deep copy of config with the subtrees at `paths` removed."""

    def strip(node, todo):
        if not isinstance(node, dict):
            return node
        heads = {p[0] for p in todo if len(p) == 1}
        out = {}
        for k, v in node.items():
            if k in heads:
                continue
            sub = [p[1:] for p in todo if len(p) > 1 and p[0] == k]
            out[k] = strip(v, sub) if sub else v
        return out

    return strip(config or {}, [tuple(p) for p in paths])


def equal_except(a: dict, b: dict, touched: Iterable[str]) -> bool:
    """Configs equal everywhere but under the touched keys (and the seed)."""
    paths = [tuple(k.split(".")) for k in touched] + [(k,) for k in NEVER_COMPARED]
    return same_value(_without(a, paths), _without(b, paths))


def touched_keys(overrides: Iterable[str]) -> list[str]:
    return [override_key(o) for o in overrides]


def differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted leaf keys where two configs differ (a group whose name differs: the group)."""
    keys = sorted(set(a or {}) | set(b or {}))
    out = []
    for k in keys:
        if not prefix and k in NEVER_COMPARED:
            continue
        x, y = (a or {}).get(k, _MISSING), (b or {}).get(k, _MISSING)
        name = f"{prefix}{k}"
        if isinstance(x, dict) and isinstance(y, dict):
            if "name" in x and "name" in y and x["name"] != y["name"]:
                out.append(name)
            else:
                out += differing_keys(x, y, name + ".")
        elif x is _MISSING or y is _MISSING or not same_value(x, y):
            out.append(name)
    return out


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """Dotted leaves of a nested config; a group's name under 'group' itself."""
    out: dict[str, object] = {}
    for k, v in (config or {}).items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            if "name" in v:
                out[name] = v["name"]
            for kk, vv in flatten({x: y for x, y in v.items() if x != "name"}, name + ".").items():
                out[kk] = vv
        else:
            out[name] = v
    return out
