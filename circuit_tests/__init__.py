"""circuit_tests: circuit claims about transformer models as pytest tests, checked at each training checkpoint.

Importing this package is cheap and changes nothing (no torch, no environment or thread settings); the names
below load their modules on first use::

    import circuit_tests
    records = circuit_tests.run("specs/induction.circuit.yaml", checkpoints=[3000])
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (imported on first attribute access)
_LAZY = {
    "run": "api",
    "load_spec": "spec",
    "LoadedSpec": "spec",
    "Record": "results",
    "read_json": "results",
    "write_json": "results",
    "resolve_checkpoints": "sources",
    "CheckpointRef": "sources",
    "Graph": "graph",
    "Circuit": "graph",
    "resolve_circuit": "graph",
    "PatchingEngine": "engine",
    "Evaluation": "engine",
    "build_task": "tasks",
    "EvaluationScope": "runtime",
    "CircuitTestsError": "errors",
    "SpecError": "errors",
    "ModelLoadError": "errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'circuit_tests' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
