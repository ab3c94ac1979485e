"""The task contract: what every task builder returns and how tasks are registered.

A task turns (tokenizer, params) into a ``TaskData``: clean and corrupted token batches of equal
shape, the position whose next-token prediction is scored (END), and the scored tokens with signs.
Signs generalise every metric of the papers: logit diff is ``(+1 answer, -1 wrong)``; group prob diff
(greater-than, SVA) is many ``+1`` and ``-1`` tokens; padding entries have sign 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator


@dataclass(frozen=True)
class TaskData:
    """A task's dataset on one tokenizer. All tensors live on CPU.

    clean, corrupted: ``[N, T]`` long, right-padded with the tokenizer's pad id; row i of both has the
        same real length, and END[i] is its last real position (the token whose prediction is scored).
    targets: ``[N, K]`` token ids scored at END; signs: ``[N, K]`` float, +1 correct, -1 incorrect, 0 pad.
    positions: named per-example positions ``[N]`` (e.g. IO, S1, S2, END for IOI) used by role scores.
    """

    name: str
    clean: torch.Tensor
    corrupted: torch.Tensor
    end: torch.Tensor
    targets: torch.Tensor
    signs: torch.Tensor
    default_metric: str
    positions: dict[str, torch.Tensor] = field(default_factory=dict)
    clean_text: tuple[str, ...] = ()
    corrupted_text: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    def subset(self, idx: torch.Tensor) -> "TaskData":
        """Rows ``idx`` (a 1-D long tensor) of every per-example field, e.g. for batching."""
        rows = [int(i) for i in idx]
        return TaskData(
            name=self.name, clean=self.clean[idx], corrupted=self.corrupted[idx], end=self.end[idx],
            targets=self.targets[idx], signs=self.signs[idx], default_metric=self.default_metric,
            positions={k: v[idx] for k, v in self.positions.items()},
            clean_text=tuple(self.clean_text[i] for i in rows) if self.clean_text else (),
            corrupted_text=tuple(self.corrupted_text[i] for i in rows) if self.corrupted_text else (),
            info=self.info,
        )


MAX_SIZE = 100_000  # examples per task: a spec's dataset is built in memory at collection time


class TaskParams(BaseModel):
    """Base of every task's parameter model: unknown keys are spec errors; numbers are real numbers (no
    ``"64"``, no ``true``, no NaN) and sizes are bounded, so a typo cannot ask for unbounded work."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
    size: int = Field(64, ge=1, le=MAX_SIZE, description="number of examples")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the example sampling")
    min_size: int | None = Field(None, ge=1, le=MAX_SIZE, description="fewer surviving examples than this is an "
                                                                      "error (default: size)")

    @model_validator(mode="after")
    def _min_size_at_most_size(self):
        size = getattr(self, "size", None)
        if self.min_size is not None and size is not None and self.min_size > size:
            raise ValueError(f"min_size ({self.min_size}) cannot exceed size ({size})")
        return self


Builder = Callable[[Any, Any, "BuildContext"], TaskData]


@dataclass(frozen=True)
class BuildContext:
    """What a builder may know besides its params: where the spec lives and the model's BOS convention."""

    spec_dir: str = "."
    prepend_bos: bool = True


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its name, parameter model, default metric and builder."""

    name: str
    params: type[TaskParams]
    default_metric: str
    build: Builder
    doc: str = ""
    positions: tuple[str, ...] | None = None  # named positions every example has (None: not declared)


TASKS: dict[str, TaskSpec] = {}


def register(name: str, params: type[TaskParams], default_metric: str, doc: str = "",
             positions: tuple[str, ...] | None = None) -> Callable[[Builder], Builder]:
    """Decorator: ``@register("ioi", IOIParams, "logit_diff", positions=("IO", "S1", "S2", "END"))`` on
    ``build(tokenizer, params, ctx) -> TaskData``. ``positions`` lets the spec check, before any model is
    loaded, that a role score which reads positions (name_mover reads IO/S1/S2) fits the task."""

    def deco(fn: Builder) -> Builder:
        TASKS[name] = TaskSpec(name=name, params=params, default_metric=default_metric, build=fn,
                               doc=doc or (fn.__doc__ or ""), positions=positions)
        return fn

    return deco

