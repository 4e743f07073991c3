"""Hydra's BasicSweeper, reached here: it lives in `hydra._internal` (no public import path in
hydra-core 1.3). The bisection sweeper and the progress callback expand a grid exactly as it
does through this module; the map's sweeper subclasses it and takes it from Hydra's module
itself (hydra_plugins/nanlab_sweeper/mechanism_sweeper.py).

Looked up at call time, not held: Hydra's plugin scan re-imports its core plugins' modules,
and `BasicSweeper.__init__` calls `super(BasicSweeper, self)` with the module's current class,
so a class object kept from an earlier import would be a stale copy (issubclass fails)."""

from __future__ import annotations

import importlib
from typing import Any

MODULE = "hydra._internal.core_plugins.basic_sweeper"


def basic_sweeper() -> Any:
    return importlib.import_module(MODULE).BasicSweeper


def split_arguments(overrides: list[Any]) -> list[list[list[str]]]:
    """Parsed overrides -> batches of jobs, each job its list of `key=value` strings."""
    return basic_sweeper().split_arguments(overrides, None)
