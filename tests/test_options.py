"""The registries of nanlab/config/options.py are the one list of each axis's options."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nanlab.config.compose import CONF_DIR, validate_cli
from nanlab.config.options import REGISTRIES, STRESS

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("axis", sorted(REGISTRIES))
def test_each_option_has_its_yaml_and_each_yaml_its_option(axis):
    yamls = {p.stem for p in (CONF_DIR / axis).glob("*.yaml")}
    assert yamls == set(REGISTRIES[axis].names), (
        f"conf/{axis}/ and options.{axis.upper()} disagree: {sorted(yamls ^ set(REGISTRIES[axis].names))}"
    )


@pytest.mark.parametrize("axis", sorted(REGISTRIES))
def test_every_role_resolves_to_code(axis):
    """A typo in a "module:attribute" string fails here, not in the middle of a sweep."""
    for option in REGISTRIES[axis]:
        for role in option.impl:
            assert callable(option.resolve(role)), f"{axis}={option.name}: {role}"


def test_the_cli_check_reads_the_registry():
    assert validate_cli(["stress=heat"]) == (
        "stress=heat: unknown option; allowed: " + ", ".join(sorted(STRESS.names))
    )
    assert validate_cli(["stress=" + ",".join(STRESS.names)]) is None


def test_no_stress_name_is_compared_outside_its_registry():
    """grep: a mechanism's name appears in nanlab's code only in its registry entry (and in
    comments and docstrings), so adding a mechanism touches no dispatch."""
    from nanlab.record import CAUSES  # empty_targets is also the cause the monitor records

    pattern = "|".join(re.escape(n) for n in STRESS.names if n != "none" and n not in CAUSES)
    hits = subprocess.run(
        ["grep", "-rnE", f"[\"']({pattern})[\"']", "nanlab", "hydra_plugins", "--include=*.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    code = [h for h in hits.splitlines() if not h.startswith("nanlab/config/options.py:")]
    assert not code, "stress names compared outside options.STRESS:\n" + "\n".join(code)


def test_registries_import_no_torch():
    """The CLI check reads them before torch loads (a typo costs a fraction of a second)."""
    code = "import sys, nanlab.config.compose; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
    importlib.import_module("nanlab.config.options")
