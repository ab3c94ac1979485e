"""Task library: each module registers one task builder in ``base.TASKS`` (see ``base.TaskData``).

Public API:
- ``task_names()``: the registered task names, sorted.
- ``validate_params(name, raw)``: the task's validated ``TaskParams``; a TaskError otherwise, whose
  ``__cause__`` is the pydantic ``ValidationError`` (its ``errors()[i]["loc"]`` are keys under ``params``).
- ``build_task(name, tokenizer, raw_params, ctx)``: the task's ``TaskData``, built once per process for each
  (task, tokenizer content, validated params, context) and shared afterwards: treat it as read-only.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from typing import Any

from pydantic import ValidationError

from ..errors import TaskError
from .base import TASKS, BuildContext, TaskData, TaskParams, TaskSpec, register
from . import colored_objects, custom, gendered_pronoun, greater_than, induction, ioi, sva  # noqa: F401  (register)

__all__ = ["TASKS", "BuildContext", "TaskData", "TaskParams", "TaskSpec", "register", "task_names",
           "validate_params", "build_task", "tokenizer_fingerprint", "clear_cache"]


def task_names() -> list[str]:
    return sorted(TASKS)


def _spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    return TASKS[name]


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(params)"
        lines.append(f"{loc}: {e['msg']}")
    return "; ".join(lines)


def validate_params(name: str, raw: dict[str, Any] | None) -> TaskParams:
    """Validate a spec's raw ``params`` mapping for task ``name``; TaskError (cause: ValidationError) if invalid."""
    spec = _spec(name)
    if raw is None:
        raw = {}
    if isinstance(raw, TaskParams):
        if not isinstance(raw, spec.params):
            raise TaskError(f"task {name!r}: params are a {type(raw).__name__}, expected {spec.params.__name__}")
        return raw
    if not isinstance(raw, dict):
        raise TaskError(f"task {name!r}: params must be a mapping, got {type(raw).__name__}")
    try:
        return spec.params.model_validate(raw)
    except ValidationError as e:
        raise TaskError(f"task {name!r}: invalid params: {_format_errors(e)}") from e


_FP_CACHE: "weakref.WeakKeyDictionary[Any, tuple[int, str]]" = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's full definition (vocab, merges, normalizer, pre-tokenizer) and special tokens."""
    n = len(tokenizer) if hasattr(tokenizer, "__len__") else -1
    try:
        hit = _FP_CACHE.get(tokenizer)
    except TypeError:
        hit = None
    if hit is not None and hit[0] == n:
        return hit[1]
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    elif callable(getattr(tokenizer, "get_vocab", None)):
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    else:
        raise TaskError(f"tasks need a Hugging Face fast tokenizer, got {type(tokenizer).__name__}")
    specials = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    h.update(json.dumps(specials, sort_keys=True).encode())
    fp = h.hexdigest()
    try:
        _FP_CACHE[tokenizer] = (n, fp)
    except TypeError:
        pass
    return fp


_CACHE: dict[tuple, TaskData] = {}


def clear_cache() -> None:
    _CACHE.clear()


def _file_stamp(params: TaskParams, ctx: BuildContext) -> tuple:
    """For tasks reading a file: its resolved path, size and mtime (a rewritten file is rebuilt)."""
    p = getattr(params, "path", None)
    if not isinstance(p, str):
        return ()
    full = p if os.path.isabs(p) else os.path.join(ctx.spec_dir, p)
    try:
        st = os.stat(full)
        return (os.path.abspath(full), st.st_size, st.st_mtime_ns)
    except OSError:
        return (os.path.abspath(full),)


def build_task(name: str, tokenizer: Any, raw_params: dict[str, Any] | TaskParams | None,
               ctx: BuildContext | None = None) -> TaskData:
    """Build (or fetch from the per-process cache) task ``name`` on ``tokenizer``."""
    spec = _spec(name)
    params = validate_params(name, raw_params)
    ctx = ctx or BuildContext()
    key = (name, tokenizer_fingerprint(tokenizer), params.model_dump_json(),
           os.path.abspath(ctx.spec_dir), bool(ctx.prepend_bos), _file_stamp(params, ctx))
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    data = spec.build(tokenizer, params, ctx)
    _CACHE[key] = data
    return data
