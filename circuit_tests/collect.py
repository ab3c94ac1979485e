"""pytest nodes: SpecFile → CheckpointNode (one per checkpoint) → ClaimItem (one per claim).

Node ids look like ``specs/induction.circuit.yaml::step2000::faithfulness[step2000]``: ``-k`` selects by claim,
checkpoint or both, and ``--dist loadscope`` keeps a checkpoint's claims on one worker (one load per checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from .errors import CircuitTestsError, SpecError
from .plugin import RECORD_KEY
from .results import Record
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
        try:  # check node names now when a checkpoint's shape is available locally
            for ref in refs:
                g = graph_from_dir(ref.local_dir()) if ref.unavailable_reason() is None else None
                if g is not None:
                    circuit_for(loaded, g)
                    break
        except SpecError as e:
            raise self.CollectError(str(e)) from None
        run = SpecRun(loaded, refs)
        for ref in refs:
            yield CheckpointNode.from_parent(self, name=ref.label, run=run, ref=ref)


class CheckpointNode(pytest.Collector):
    def __init__(self, *, run: SpecRun, ref: Any, **kw: Any):
        super().__init__(**kw)
        self.run, self.ref = run, ref
        self.add_marker(pytest.mark.circuit(spec=run.loaded.spec.name, model=run.loaded.spec.model.source,
                                            task=run.loaded.spec.task.name, checkpoint=ref.label))

    def collect(self) -> Iterator[pytest.Item]:
        for i, cid in enumerate(self.run.loaded.spec.claim_ids()):
            yield ClaimItem.from_parent(self, name=f"{cid}[{self.ref.label}]", index=i)

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
        try:
            rec = measure_claim(node.run, node.ref, self.index)
        except CircuitTestsError as e:
            raise ClaimError(str(e)) from None
        self.user_properties.append((RECORD_KEY, rec.to_json()))
        if rec.outcome == "pass":
            if rec.expected == "absent":
                pytest.xfail(rec.reason)
            return
        if rec.outcome == "not_evaluated":
            if self.config.getoption("circuit_not_evaluated") == "fail":
                raise ClaimFailed(rec)
            pytest.skip(f"not_evaluated: {rec.reason}")
        raise ClaimFailed(rec)

    def repr_failure(self, excinfo: Any, style: Any = None) -> str:
        if isinstance(excinfo.value, ClaimFailed):
            return failure_text(excinfo.value.record)
        if isinstance(excinfo.value, ClaimError):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int, str]:
        loaded = self._node.run.loaded
        return self.path, loaded.line_of("claims", self.index) - 1, f"{loaded.spec.name} @ {self._node.ref.label}: {self.name}"


class ClaimError(Exception):
    """A user-facing error while evaluating (bad task for this tokenizer, model that fails to load…)."""


def _f(x: float | None) -> str:
    return "—" if x is None else f"{x:.4g}"


def failure_text(r: Record) -> str:
    """The failure message: what was measured, against what, where it is declared."""
    verdict = "not evaluated" if r.outcome == "not_evaluated" else "does not hold"
    lines = [f"{r.spec_file}:{r.line}: claim {r.claim!r} {verdict} at {r.checkpoint}" + (f" (expected {r.expected})" if r.expected != "present" else ""),
             f"  reason:        {r.reason}"]
    bounds = f">= {_f(r.threshold_min)}" + (f" and <= {_f(r.threshold_max)}" if r.threshold_max is not None else "")
    x = r.extra
    if r.claim_type == "faithfulness" and (r.value is not None or r.m_M is not None):
        lines += [f"  measured:      {_f(r.value)} ({r.normalization}, {r.metric})   threshold: {bounds}",
                  f"  95% CI:        [{_f(r.ci_low)}, {_f(r.ci_high)}] over {r.n_examples} examples (bootstrap)",
                  f"  m(M) = {_f(r.m_M)}   m(M') = {_f(r.m_Mprime)}   m(C) = {_f(r.m_C)}   ablation: {r.ablation}"]
        if r.kl is not None:
            lines.append(f"  KL(full || circuit) = {_f(r.kl)}   max_kl: {_f(r.max_kl)}")
    elif r.claim_type == "role_score" and "per_head" in x:
        lines += [f"  measured:      {_f(r.value)} ({x.get('score')} score, {x.get('quantifier')}; {x.get('unit')})   threshold: {bounds}",
                  "  per head:      " + ", ".join(f"{h} {_f(v)}" for h, v in x["per_head"].items())]
    elif r.claim_type == "path_ratio" and "signed" in x:
        lines += [f"  measured:      {_f(r.value)} ({x.get('measure')} path ratio into {x.get('receivers')})   threshold: {bounds}",
                  f"  signed {_f(x.get('signed'))}, absolute {_f(x.get('absolute'))}; numerator {_f(x.get('numerator'))}, "
                  f"denominator {_f(x.get('denominator'))} ({x.get('denominator_set')} senders)",
                  f"  m(clean) = {_f(x.get('m_clean'))}   m(corrupted) = {_f(x.get('m_corrupted'))}   ({x.get('metric')})",
                  "  sender effects: " + ", ".join(f"{h} {_f(v)}" for h, v in x.get("effects", {}).items())]
    lines.append(f"  model: {r.model} @ {r.checkpoint}" + (f"   weights sha256 {r.weights_sha256[:16]}…" if r.weights_sha256 else ""))
    return "\n".join(lines)
