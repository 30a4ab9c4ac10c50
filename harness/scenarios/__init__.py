"""Scenario registry: name -> module. A scenario module defines PARAMS (its schema), KEY_METRICS and run()."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

REQUIRED = object()  # Param.default for parameters a suite must give


@dataclass(frozen=True)
class Param:
    type: type  # int | float | str | bool
    default: Any = REQUIRED
    sweep: bool = False  # a list value expands into one cell per element
    min: float | None = None  # inclusive lower bound for numbers
    help: str = ""



class Skip(Exception):  # noqa: N818 - it is a verdict, not an error
    """Raised by a scenario's run() for a cell that must not run here (e.g. a prompt past the model's context):
    the runner records it as skipped with the message as the reason."""

SCENARIOS: dict[str, str] = {
    "parity": "harness.scenarios.parity",
    "throughput": "harness.scenarios.throughput",
    "latency": "harness.scenarios.latency",
    "long_context": "harness.scenarios.long_context",
    "serving": "harness.scenarios.serving",
}


def get(name: str) -> ModuleType:
    if name not in SCENARIOS:
        raise KeyError(f"unknown scenario {name!r}; known scenarios: {', '.join(sorted(SCENARIOS))}")
    return importlib.import_module(SCENARIOS[name])
