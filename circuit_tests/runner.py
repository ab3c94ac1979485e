"""Run a spec at one checkpoint: load once, build the task once, evaluate the circuit once, measure each claim.

Why a separate layer: the pytest items stay thin (one call each), and the same code serves the CLI. State is
cached per process: tasks per (spec, tokenizer), evaluations per (spec, checkpoint); a checkpoint's model is
released when its last item is done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import GraphError, ModelLoadError, SpecError
from .graph import Circuit, Graph, resolve_circuit
from .results import Record
from .spec import LoadedSpec


def circuit_for(loaded: LoadedSpec, graph: Graph) -> Circuit:
    """Resolve the spec's circuit against ``graph``; a bad name becomes a SpecError at its file:line."""
    c = loaded.spec.circuit
    for role, nodes in c.roles.items():
        for i, n in enumerate(nodes):
            _check(loaded, graph.check_node, n, ("circuit", "roles", role, i))
    for i, n in enumerate(c.nodes):
        _check(loaded, graph.check_node, n, ("circuit", "nodes", i))
    for i, e in enumerate(c.edges):
        _check(loaded, graph.parse_edge, e, ("circuit", "edges", i))
    return resolve_circuit(graph, c.roles, c.nodes, c.edges, c.resolved_level)


def _check(loaded: LoadedSpec, fn: Any, value: str, path: tuple[Any, ...]) -> None:
    try:
        fn(value)
    except GraphError as e:
        from ._yaml import format_path

        raise SpecError(f"{loaded.located.where(path)}: {format_path(path)}: {e}") from None


def graph_from_dir(model_dir: Path | None) -> Graph | None:
    """Model shape from a checkpoint's config.json (cheap: no torch), or None when it is not local."""
    if model_dir is None or not (Path(model_dir) / "config.json").exists():
        return None
    return Graph.from_hf_config(json.loads((Path(model_dir) / "config.json").read_text()))


def prepend_bos(spec: Any, ref: Any, bridge: Any) -> bool:
    """The spec's ``task.prepend_bos``, else True for zoo models (trained with BOS), else the model's convention."""
    if spec.task.prepend_bos is not None:
        return spec.task.prepend_bos
    return True if ref.kind == "zoo" else bool(getattr(bridge.cfg, "default_prepend_bos", True))


@dataclass
class SpecRun:
    """Everything shared by the items of one spec file."""

    loaded: LoadedSpec
    refs: list[Any]
    hashes: dict[str, str] | None = None
    duplicates: dict[str, str] | None = None
    evaluations: dict[str, Any] = field(default_factory=dict)

    def integrity(self) -> tuple[dict[str, str], dict[str, str]]:
        """sha256 of every available checkpoint's weights, and later-duplicate → earlier label."""
        if self.hashes is None:
            from .integrity import find_duplicates

            avail = [r for r in self.refs if r.unavailable_reason() is None]
            self.hashes = {r.label: r.weights_sha256() for r in avail}
            self.duplicates = find_duplicates(avail, self.hashes)
        return self.hashes, self.duplicates or {}


@dataclass
class CheckpointResult:
    """What the claims of one checkpoint need: the evaluation (or why there is none) and the task data."""

    evaluation: Any = None
    task: Any = None
    circuit: Circuit | None = None
    unavailable: str | None = None
    duplicate_of: str | None = None
    sha256: str | None = None
    warnings: list[str] = field(default_factory=list)
    bridge: Any = None
    prepend_bos: bool = True
    cache: dict[Any, Any] = field(default_factory=dict)  # role scores and path patching, per checkpoint


def evaluate_checkpoint(run: SpecRun, ref: Any) -> CheckpointResult:
    """Load the checkpoint, build the task, evaluate the circuit (all once per process)."""
    if ref.label in run.evaluations:
        return run.evaluations[ref.label]
    res = CheckpointResult()
    reason = ref.unavailable_reason()
    if reason:
        res.unavailable = reason
        run.evaluations[ref.label] = res
        return res
    hashes, dups = run.integrity()
    res.sha256 = hashes.get(ref.label)
    if ref.label in dups:
        res.duplicate_of = dups[ref.label]
        run.evaluations[ref.label] = res
        return res
    from .engine import PatchingEngine
    from .tasks import build_task
    from .tasks.base import BuildContext

    spec = run.loaded.spec
    bridge = ref.load()
    graph = Graph.from_bridge(bridge)
    res.circuit = circuit_for(run.loaded, graph)
    res.warnings = [f"dangling: {d}" for d in res.circuit.dangling()]
    prepend = prepend_bos(spec, ref, bridge)
    ctx = BuildContext(spec_dir=str(run.loaded.dir), prepend_bos=prepend)
    res.task = build_task(spec.task.name, bridge.tokenizer, spec.task.params, ctx)
    res.bridge, res.prepend_bos = bridge, prepend
    if any(c.type == "faithfulness" for c in spec.claims):
        engine = PatchingEngine(bridge, graph)
        res.evaluation = engine.evaluate(res.task, res.circuit, spec.ablation, spec.task.batch_size)
    run.evaluations[ref.label] = res
    return res


def _claim_measurement(run: SpecRun, res: CheckpointResult, claim: Any, rec: Record) -> Any:
    """Dispatch one claim to its measure; expensive intermediate results are cached per checkpoint."""
    from . import measures

    spec = run.loaded.spec
    roles = spec.circuit.roles
    if claim.type == "faithfulness":
        rec.threshold_min, rec.threshold_max, rec.max_kl = claim.min, claim.max, claim.max_kl
        return measures.faithfulness(res.evaluation, res.task, claim)
    if claim.type == "role_score":
        rec.threshold_min = claim.min
        key = measures.role_scores_key(claim, roles)
        if key not in res.cache:
            res.cache[key] = measures.compute_role_scores(res.bridge, res.task, claim, roles, res.prepend_bos)
        return measures.role_score(res.cache[key], claim, roles)
    rec.threshold_min, rec.threshold_max = claim.min, claim.max
    from .path_patching import Receivers, path_patch

    receivers = (Receivers.logits() if claim.receivers == "logits"
                 else Receivers.parse([f"{h}<{claim.input}>" for h in roles[claim.receivers] if h.startswith("a")]))
    key = ("path", receivers.describe())
    if key not in res.cache:
        res.cache[key] = path_patch(res.bridge, res.task, receivers, batch_size=spec.task.batch_size)
    heads = sorted(n for n in res.circuit.nodes if n.startswith("a")) if res.circuit else []
    return measures.path_ratio(res.cache[key], claim, roles, heads, res.task.default_metric)


def measure_claim(run: SpecRun, ref: Any, index: int) -> Record:
    """The record for claim ``index`` of the spec at checkpoint ``ref`` (expectation applied)."""
    loaded, spec = run.loaded, run.loaded.spec
    claim = spec.claims[index]
    cid = spec.claim_ids()[index]
    rec = Record(spec=spec.name, spec_file=str(loaded.path), line=loaded.line_of("claims", index), model=spec.model.source,
                 checkpoint=ref.label, step=ref.step, claim=cid, claim_type=claim.type, outcome="not_evaluated",
                 measured="not_evaluated", ablation=spec.ablation)
    holds_from = getattr(claim, "holds_from", None)
    if holds_from is not None and ref.step is not None and ref.step < holds_from:
        rec.expected = "absent"
    try:
        res = evaluate_checkpoint(run, ref)
    except ModelLoadError as e:  # weights that exist but cannot be loaded: not evaluated, with the reason
        rec.reason = str(e)
        return rec
    rec.weights_sha256, rec.duplicate_of = res.sha256, res.duplicate_of
    if res.unavailable:
        rec.reason = res.unavailable
        return rec
    if res.duplicate_of:
        rec.reason = f"duplicate of {res.duplicate_of}: identical weights (sha256 {res.sha256[:12] if res.sha256 else '?'}…)"
        return rec
    m = _claim_measurement(run, res, claim, rec)
    n = m.numbers
    rec.value, rec.measured, rec.reason = m.value, m.outcome, m.reason
    rec.metric, rec.normalization = n.get("metric"), n.get("normalization")
    rec.m_M, rec.m_Mprime, rec.m_C = n.get("m_M"), n.get("m_Mprime"), n.get("m_C")
    rec.ci_low, rec.ci_high, rec.kl, rec.n_examples = n.get("ci_low"), n.get("ci_high"), n.get("kl"), n.get("n_examples")
    rec.extra.update({k: v for k, v in n.items() if k not in ("metric", "normalization", "m_M", "m_Mprime", "m_C", "ci_low",
                                                              "ci_high", "kl", "n_examples")})
    if res.warnings:
        rec.extra["warnings"] = res.warnings
    rec.outcome = _apply_expectation(rec, m.reason_kind, holds_from)
    return rec


def _apply_expectation(rec: Record, reason_kind: str, holds_from: int | None) -> str:
    if rec.expected == "present":
        return rec.measured
    # expected absent (before the declared formation step)
    if rec.measured == "pass":
        rec.reason = (f"claim already holds at {rec.checkpoint}, before its declared formation step {holds_from}: "
                      "the circuit appeared early (or holds_from is wrong)")
        return "fail"
    if rec.measured == "fail" or reason_kind == "cannot_do_task":
        rec.reason = f"absent as expected before step {holds_from}" + (f" ({rec.reason})" if rec.reason else "")
        return "pass"
    return "not_evaluated"
