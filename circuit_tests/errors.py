"""Exception tree: every user-facing failure is a ``CircuitTestsError`` with a message that says what to fix.

CircuitTestsError
├── SpecError        a spec file is malformed (message starts with ``file:line:col: key.path:``)
├── GraphError       a node/edge name does not exist in the model (message names the valid range)
├── TaskError        a task cannot be built on this tokenizer (names the offending examples)
└── ModelLoadError   weights/tokenizer/checkpoint cannot be found or loaded (names where it looked)
"""

from __future__ import annotations


class CircuitTestsError(Exception):
    """Base class: the plugin shows these as short messages, never as tracebacks."""


class SpecError(CircuitTestsError):
    """A spec file is invalid; ``str(err)`` lists every problem, one ``file:line:col: key: msg`` per line."""


class GraphError(CircuitTestsError):
    """A node or edge name is malformed or outside the model."""


class TaskError(CircuitTestsError):
    """A task's dataset cannot be built or validated for this tokenizer."""


class ModelLoadError(CircuitTestsError):
    """A model or checkpoint could not be located or loaded."""
