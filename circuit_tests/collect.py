"""pytest nodes: SpecFile → CheckpointNode (one per checkpoint) → ClaimItem (one per claim).

Node ids look like ``specs/induction.circuit.yaml::step2000::faithfulness[step2000]``: ``-k`` selects by claim,
checkpoint or both, and ``--dist loadscope`` keeps a checkpoint's claims on one worker (one load per checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from .claims import CLAIM_TYPES, fmt
from .errors import CircuitTestsError, SpecError
from .state import RECORD_KEY, RESULT_CACHE, SCOPE
from .results import Record, pytest_outcome
from .runner import SpecRun, circuit_for, graph_from_dir, measure_claim
from .spec import load_spec


class ClaimFailed(Exception):
    """Raised by an item whose claim does not hold; carries the record for the failure report."""

    def __init__(self, record: Record):
        super().__init__(record.reason)
        self.record = record


class SpecFile(pytest.File):
    def collect(self) -> Iterator[pytest.Collector]:
        try:
            loaded = load_spec(self.path)
        except SpecError as e:
            raise self.CollectError(str(e)) from None
        m = loaded.spec.model
        try:
            from .sources import resolve_checkpoints

            refs = resolve_checkpoints(m.source, m.revision, m.checkpoints, loaded.dir)
        except CircuitTestsError as e:
            raise self.CollectError(f"{loaded.where('model', 'source')}: model: {e}") from None
        for ref in refs:  # check node names now, against the first checkpoint whose shape is available locally
            try:
                g = graph_from_dir(ref.local_dir()) if ref.unavailable_reason() is None else None
            except Exception:  # an unreadable config.json is that checkpoint's fault: its items report it
                continue
            if g is not None:
                try:
                    circuit_for(loaded, g)
                except SpecError as e:
                    raise self.CollectError(str(e)) from None
                break
        cfg = self.config
        run = SpecRun(loaded, refs, gate_default=cfg.getoption("circuit_gate", None), store=getattr(cfg, "cache", None),
                      not_evaluated=cfg.getoption("circuit_not_evaluated", "skip"),
                      strict=bool(cfg.getoption("circuit_strict", False)))
        for ref in refs:
            yield CheckpointNode.from_parent(self, name=ref.label, nodeid=_child_id(self, ref.label), run=run, ref=ref)


class CheckpointNode(pytest.Collector):
    def __init__(self, *, run: SpecRun, ref: Any, **kw: Any):
        super().__init__(**kw)
        self.run, self.ref = run, ref
        self.add_marker(pytest.mark.circuit(spec=run.loaded.spec.name, model=run.loaded.spec.model.source,
                                            task=run.loaded.spec.task.name, checkpoint=ref.label))

    def collect(self) -> Iterator[pytest.Item]:
        for i, cid in enumerate(self.run.loaded.spec.claim_ids()):
            name = f"{cid}[{self.ref.label}]"
            yield ClaimItem.from_parent(self, name=name, nodeid=_child_id(self, name), index=i)

    def teardown(self) -> None:
        self.run.evaluations.pop(self.ref.label, None)
        if hasattr(self.ref, "release"):
            self.ref.release()


class ClaimItem(pytest.Item):
    def __init__(self, *, index: int, **kw: Any):
        super().__init__(**kw)
        self.index = index
        loaded = self._node.run.loaded
        self.circuit_location = (str(loaded.path), loaded.line_of("claims", index))

    @property
    def _node(self) -> CheckpointNode:
        return self.parent  # type: ignore[return-value]

    def runtest(self) -> None:
        node = self._node
        cache = self.config.stash.get(RESULT_CACHE, None)  # --circuit-cache / --circuit-cache-dir
        try:
            key, rec = cache.lookup(node.run, node.ref, self.index) if cache else (None, None)
            if rec is None:
                rec = measure_claim(node.run, node.ref, self.index)
                if cache:
                    cache.store_record(key, rec)
        except CircuitTestsError as e:
            raise ClaimError(str(e)) from None
        run = node.run  # the outcome follows this run's options, also for a record reused from a cache
        rec.outcome = pytest_outcome(rec.verdict or rec.measured, rec.expected, not_evaluated=run.not_evaluated,
                                     strict=run.strict)  # type: ignore[assignment]
        setattr(self, RECORD_KEY, rec.to_json())  # copied onto the call report by plugin.pytest_runtest_makereport
        if rec.outcome == "passed":
            return
        if rec.outcome == "xfailed":
            pytest.xfail(rec.reason)
        if rec.outcome == "skipped":
            if rec.verdict == "uncertain":
                pytest.skip(f"uncertain: {rec.reason} (fails under --circuit-strict)")
            pytest.skip(f"not_evaluated: {rec.reason}")
        raise ClaimFailed(rec)

    def setup(self) -> None:
        """Apply the evaluation settings (threads, offline hub, quiet libraries) when the first spec item runs;
        the plugin restores them at the end of the session (runtime.EvaluationScope)."""
        scope = self.config.stash.get(SCOPE, None)
        if scope is not None:
            scope.enter()

    def repr_failure(self, excinfo: Any, style: Any = None) -> str:
        if isinstance(excinfo.value, ClaimFailed):
            return failure_text(excinfo.value.record)
        if isinstance(excinfo.value, ClaimError):
            return str(excinfo.value)
        if isinstance(excinfo.value, pytest.xfail.Exception):  # absent as declared: the reason says it all, and a
            return str(excinfo.value)                           # traceback repr costs ~0.5 s per item
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int, str]:
        loaded = self._node.run.loaded
        return self.path, loaded.line_of("claims", self.index) - 1, f"{loaded.spec.name} @ {self._node.ref.label}: {self.name}"


def _child_id(parent: pytest.Node, name: str) -> str:
    """The child's node id as a string, so pytest parses it the way it parses ids read back from its cache.

    pytest >= 9.2 keeps structured ids and compares them field by field: the default ``parent.id.child(name)``
    puts ``faithfulness[step2000]`` whole into the names, while the id ``--lf``/``--ff``/``--sw`` read back from
    ``.pytest_cache`` parses ``[step2000]`` as parameters, so no spec item matched its own recorded failure. A string
    id is parsed the same way on both sides (and is what pytest < 9.2 stores anyway)."""
    return f"{parent.nodeid}::{name}"


class ClaimError(Exception):
    """A user-facing error while evaluating (bad task for this tokenizer, model that fails to load…)."""


def failure_text(r: Record) -> str:
    """The failure message: what was measured, against what, where it is declared."""
    verdict = {"not_evaluated": "not evaluated", "uncertain": "is uncertain (interval straddles the threshold)",
               "error": "could not be evaluated"}.get(r.verdict or r.measured, "does not hold")
    lines = [f"{r.spec_file}:{r.line}: claim {r.claim!r} {verdict} at {r.checkpoint}" + (f" (expected {r.expected})" if r.expected != "present" else ""),
             f"  reason:        {r.reason}"]
    bounds = f">= {fmt(r.threshold_min)}" + (f" and <= {fmt(r.threshold_max)}" if r.threshold_max is not None else "")
    kind = CLAIM_TYPES.get(r.claim_type)  # the type's own report lines (claims.py)
    if kind is not None and (r.verdict or r.measured) != "error":
        lines += kind.details(r, bounds)
    lines.append(f"  model: {r.model} @ {r.checkpoint}" + (f"   weights sha256 {r.weights_sha256[:16]}…" if r.weights_sha256 else ""))
    return "\n".join(lines)
