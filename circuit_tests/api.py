"""The public API for notebooks and scripts: run a spec's claims without pytest and get the records back.

``run`` evaluates exactly what ``pytest SPEC`` evaluates (same runner, same records, same outcome names), inside an
``EvaluationScope``: torch threads and offline hub mode are set for the call and restored afterwards, so a notebook's
own settings survive. Progress goes to ``logging.getLogger("circuit_tests")`` (checkpoint loads, evaluations, one
line per claim): ``logging.basicConfig(level="INFO")`` shows it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from .results import Record

log = logging.getLogger("circuit_tests")


def _select(refs: list[Any], checkpoints: Sequence[int | str] | int | str | None) -> list[Any]:
    """The refs named by ``checkpoints`` (steps or labels), in the spec's order; an unknown one is an error."""
    from .errors import ModelLoadError

    if checkpoints is None:
        return refs
    wanted = [checkpoints] if isinstance(checkpoints, (int, str)) else list(checkpoints)
    out, missing = [], []
    for w in wanted:
        hit = [r for r in refs if r.label == str(w) or (r.step is not None and str(r.step) == str(w).removeprefix("step"))]
        (out.extend(hit) if hit else missing.append(str(w)))
    if missing:
        raise ModelLoadError(f"checkpoint(s) {', '.join(missing)} not among the spec's checkpoints "
                             f"({', '.join(r.label for r in refs)})")
    return [r for r in refs if r in out]


def run(spec: str | Path | Any, checkpoints: Sequence[int | str] | int | str | None = None, *, threads: int = 1,
        online: bool | None = None, not_evaluated: str = "skip", store: Any = None) -> list[Record]:
    """Evaluate every claim of ``spec`` (a path or a ``LoadedSpec``) at ``checkpoints`` (steps or labels; default:
    the spec's checkpoints) and return one ``Record`` per (checkpoint, claim), in order.

    ``threads``: torch threads during the call (restored after). ``online``: allow hub downloads (default: offline
    unless the environment says otherwise). ``not_evaluated``: ``skip`` or ``fail`` (how such records' ``outcome``
    reads). ``store``: a ``get(key, default)``/``set(key, value)`` cache for weight hashes across calls.
    Raises SpecError / ModelLoadError for a bad spec or model block; a broken checkpoint gives failed records.
    """
    from .runner import SpecRun, measure_claim
    from .runtime import EvaluationScope
    from .sources import resolve_checkpoints
    from .spec import LoadedSpec, load_spec

    loaded = spec if isinstance(spec, LoadedSpec) else load_spec(spec)
    m = loaded.spec.model
    refs = _select(resolve_checkpoints(m.source, m.revision, m.checkpoints, loaded.dir), checkpoints)
    records: list[Record] = []
    with EvaluationScope(threads=threads, online=online):
        spec_run = SpecRun(loaded, refs, store=store, not_evaluated=not_evaluated)
        for ref in refs:
            for i in range(len(loaded.spec.claims)):
                records.append(measure_claim(spec_run, ref, i))
            spec_run.evaluations.pop(ref.label, None)
            ref.release()
    return records
