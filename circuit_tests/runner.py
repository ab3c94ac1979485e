"""Run a spec at one checkpoint: load once, build the task once, evaluate the circuit once, measure each claim.

Why a separate layer: the pytest items stay thin (one call each), and the same code serves the CLI and the public
API (``circuit_tests.run``). State is cached per process: evaluations per (spec, checkpoint); a checkpoint's model
is released when its last item is done. Faults stay with their checkpoint (``evaluate_checkpoint``): a checkpoint
that cannot be hashed, loaded or trusted gives its claims an ``error`` record, never an exception that takes the
spec's other checkpoints down. Progress goes to ``logging.getLogger("circuit_tests")``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CircuitTestsError, GraphError, ModelLoadError, SpecError
from .graph import Circuit, Graph, resolve_circuit
from .results import Record, finite, pytest_outcome
from .spec import LoadedSpec

log = logging.getLogger("circuit_tests")


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
    circuit = resolve_circuit(graph, c.roles, c.nodes, c.edges, c.resolved_level)
    if getattr(c, "graph", None):
        circuit = _with_graph_json(loaded, graph, circuit, c.graph)
    return circuit


def _with_graph_json(loaded: LoadedSpec, graph: Graph, circuit: Circuit, rel: str) -> Circuit:
    """Add the in-graph edges of the EAP-IG / MIB graph JSON named by ``circuit.graph`` (relative to the spec)."""
    from .graph import circuit_from_json

    where = loaded.located.where(("circuit", "graph"))
    path = (Path(loaded.dir) / rel).resolve()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{where}: circuit.graph: no such file {path}") from None
    except (OSError, ValueError) as e:
        raise SpecError(f"{where}: circuit.graph: cannot read {path} as JSON: {e}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{where}: circuit.graph: {path} is not a JSON object (EAP-IG Graph.to_json format)")
    try:
        loaded_edges = circuit_from_json(graph, data, where=str(path)).edges
    except GraphError as e:
        raise SpecError(f"{where}: circuit.graph: {e}") from None
    return Circuit(graph, circuit.edges | loaded_edges, circuit.roles, "edge", circuit.named_nodes)


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
    evaluations: dict[str, Any] = field(default_factory=dict)
    store: Any = None  # cross-run weights-hash cache (pytest's config.cache): get(key, default) / set(key, value)
    not_evaluated: str = "skip"  # --circuit-not-evaluated: how a not_evaluated verdict is reported (skip | fail)
    strict: bool = False  # --circuit-strict: an uncertain verdict fails instead of being skipped
    _dups: Any = None
    gate_default: str | None = None  # --circuit-gate: the gate of claims whose spec and claim name none

    def gate_of(self, claim: Any) -> str:
        """A claim's gate: its own, else the spec's explicit one, else the run's, else point."""
        spec = self.loaded.spec
        if getattr(claim, "gate", None):
            return claim.gate
        return spec.gate if "gate" in spec.model_fields_set else (self.gate_default or "point")

    def duplicates(self) -> Any:
        """Lazy per-checkpoint hashing and duplicate detection (``integrity.DuplicateFinder``): a checkpoint is
        hashed when one of its items runs (or a later checkpoint needs it as a candidate original), never all
        up front, so one unreadable checkpoint cannot take the others down and xdist workers hash what they run."""
        if self._dups is None:
            from .integrity import DuplicateFinder

            self._dups = DuplicateFinder(self.refs, self.store)
        return self._dups


@dataclass
class CheckpointResult:
    """What the claims of one checkpoint need: the evaluation (or why there is none) and the task data."""

    evaluation: Any = None
    task: Any = None
    circuit: Circuit | None = None
    unavailable: str | None = None
    error: str | None = None  # the checkpoint could not be hashed / loaded / evaluated: its claims fail with this
    duplicate_of: str | None = None
    sha256: str | None = None
    warnings: list[str] = field(default_factory=list)
    bridge: Any = None
    prepend_bos: bool = True
    cache: dict[Any, Any] = field(default_factory=dict)  # role scores and path patching, per checkpoint


def evaluate_checkpoint(run: SpecRun, ref: Any) -> CheckpointResult:
    """Load the checkpoint, build the task, evaluate the circuit (all once per process).

    Faults stay with their checkpoint: anything that goes wrong here (unreadable or tampered weights, weights
    that do not cover the config, NaN/inf, a garbage config or tokenizer, a node this checkpoint lacks) is kept
    as ``res.error`` and fails this checkpoint's claims with that reason; other checkpoints are unaffected."""
    if ref.label in run.evaluations:
        return run.evaluations[ref.label]
    res = CheckpointResult()
    run.evaluations[ref.label] = res
    reason = ref.fetch_missing() if hasattr(ref, "fetch_missing") else ref.unavailable_reason()
    if reason:
        res.unavailable = reason
        log.info("%s @ %s: not available: %s", run.loaded.spec.name, ref.label, reason)
        return res
    try:
        _evaluate_into(run, ref, res)
    except CircuitTestsError as e:
        res.error = str(e)
    except Exception as e:  # a library failure on hostile files: reported on the checkpoint, not as a traceback
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        res.error = f"{ref.display}: {type(e).__name__}: {first}"
        log.debug("evaluating %s failed", ref.display, exc_info=True)
    if res.error:
        log.warning("%s @ %s: checkpoint error: %s", run.loaded.spec.name, ref.label, res.error)
        res.bridge = res.evaluation = None
    return res


def _nonfinite_logits(evaluation: Any) -> str | None:
    """Which of the engine's logits hold NaN/inf ("the full model on clean prompts", ...), or None."""
    import torch

    names = {"clean": "the full model on clean prompts", "corrupted": "the full model on corrupted prompts",
             "circuit": "the circuit run", "baseline": "the empty-circuit baseline"}
    bad = [text for attr, text in names.items()
           if isinstance(getattr(evaluation, attr, None), torch.Tensor) and not torch.isfinite(getattr(evaluation, attr)).all()]
    return ", ".join(bad) or None


def _evaluate_into(run: SpecRun, ref: Any, res: CheckpointResult) -> None:
    import time

    from .integrity import check_loaded

    spec_name = run.loaded.spec.name
    dups = run.duplicates()
    res.sha256 = dups.sha256(ref)
    original = dups.original_of(ref)
    if original is not None:
        res.duplicate_of = original
        log.info("%s @ %s: duplicate of %s (identical weights)", spec_name, ref.label, original)
        return
    from .engine import PatchingEngine
    from .tasks import build_task
    from .tasks.base import BuildContext

    spec = run.loaded.spec
    t0 = time.perf_counter()
    log.info("%s @ %s: loading %s", spec_name, ref.label, ref.display)
    bridge = ref.load()
    check_loaded(ref, bridge)
    log.info("%s @ %s: loaded in %.1f s", spec_name, ref.label, time.perf_counter() - t0)
    graph = Graph.from_bridge(bridge)
    res.circuit = circuit_for(run.loaded, graph)
    res.warnings = [f"dangling: {d}" for d in res.circuit.dangling()]
    prepend = prepend_bos(spec, ref, bridge)
    ctx = BuildContext(spec_dir=str(run.loaded.dir), prepend_bos=prepend)
    res.task = build_task(spec.task.name, bridge.tokenizer, spec.task.params, ctx)
    res.bridge, res.prepend_bos = bridge, prepend
    if any(c.type == "faithfulness" for c in spec.claims):
        t0 = time.perf_counter()
        engine = PatchingEngine(bridge, graph)
        res.evaluation = engine.evaluate(res.task, res.circuit, spec.ablation, spec.task.batch_size)
        bad = _nonfinite_logits(res.evaluation)
        if bad:
            raise ModelLoadError(f"{ref.display}: non-finite activations: NaN/inf in the logits of {bad} "
                                 f"(task {spec.task.name}); no faithfulness number can be trusted")
        log.info("%s @ %s: circuit evaluated (%d examples, ablation %s) in %.1f s", spec_name, ref.label, len(res.task),
                 spec.ablation, time.perf_counter() - t0)


def _claim_measurement(run: SpecRun, res: CheckpointResult, claim: Any, rec: Record) -> Any:
    """Dispatch one claim to its type's measure (``claims.CLAIM_TYPES``); expensive intermediate results are
    cached per checkpoint in ``res.cache``."""
    from .claims import claim_type

    return claim_type(claim.type).measure(run, res, claim, rec)


def measure_claim(run: SpecRun, ref: Any, index: int) -> Record:
    """The record for claim ``index`` of the spec at checkpoint ``ref`` (expectation applied)."""
    loaded, spec = run.loaded, run.loaded.spec
    claim = spec.claims[index]
    cid = spec.claim_ids()[index]
    rec = Record(spec=spec.name, spec_file=str(loaded.path), line=loaded.line_of("claims", index), model=spec.model.source,
                 checkpoint=ref.label, step=ref.step, claim=cid, claim_type=claim.type, outcome="skipped",
                 measured="not_evaluated", ablation=spec.ablation)
    try:
        _measure_into(run, ref, index, rec)
    except CircuitTestsError as e:  # e.g. a GGUF source whose provenance cannot be read: still one failed record
        rec.measured = rec.verdict = "error"
        rec.reason = f"checkpoint error: {e}"
    rec.outcome = pytest_outcome(rec.verdict, rec.expected, not_evaluated=run.not_evaluated, strict=run.strict)  # type: ignore[assignment]
    log.info("%s @ %s: %s: %s%s", spec.name, ref.label, cid, rec.outcome,
             "" if rec.value is None else f" (value {rec.value:.4g})")
    return rec


def _measure_into(run: SpecRun, ref: Any, index: int, rec: Record) -> None:
    loaded, spec = run.loaded, run.loaded.spec
    claim = spec.claims[index]
    rec.verdict = "not_evaluated"
    if hasattr(ref, "provenance"):
        prov = ref.provenance()
        rec.gguf_sha256, rec.quantization = prov["gguf_sha256"], prov["quantization"]
    holds_from = getattr(claim, "holds_from", None)
    if holds_from is not None and ref.step is not None and ref.step < holds_from:
        rec.expected = "absent"
    res = evaluate_checkpoint(run, ref)
    rec.weights_sha256, rec.duplicate_of = res.sha256, res.duplicate_of
    if rec.gguf_sha256 and rec.quantization is None:  # a local GGUF converted just now: its record has it
        rec.quantization = ref.provenance()["quantization"]
    if res.unavailable:
        rec.reason = res.unavailable
        return
    if res.error:  # a broken checkpoint turns the build red, whatever the expectation
        rec.measured = rec.verdict = "error"
        rec.reason = f"checkpoint error: {res.error}"
        return
    if res.duplicate_of:
        rec.reason = f"duplicate of {res.duplicate_of}: identical weights (sha256 {res.sha256[:12] if res.sha256 else '?'}…)"
        return
    try:
        m = _claim_measurement(run, res, claim, rec)
    except Exception as e:  # a claim that cannot be measured here fails with why, never as a traceback wall
        rec.measured = rec.verdict = "error"
        what = str(e) if isinstance(e, CircuitTestsError) else f"{type(e).__name__}: {str(e).strip()[:300]}"
        rec.reason = f"claim error: {what}"
        log.debug("measuring %s at %s failed", rec.claim, ref.label, exc_info=True)
        return
    n = m.numbers
    rec.value, rec.measured, rec.reason = m.value, m.outcome, m.reason
    if m.value is not None and not math.isfinite(m.value):  # NaN/inf: an error with its cause, never "fail nan"
        rec.measured = rec.verdict = "error"
        rec.value = None
        rec.reason = (f"measured value is {m.value}: non-finite activations at {ref.label} (NaN/inf in the model's "
                      "outputs for this task)")
        rec.extra.update(finite(dict(m.numbers)))
        return
    rec.metric, rec.normalization = n.get("metric"), n.get("normalization")
    rec.m_M, rec.m_Mprime, rec.m_C = n.get("m_M"), n.get("m_Mprime"), n.get("m_C")
    rec.ci_low, rec.ci_high, rec.kl, rec.n_examples = n.get("ci_low"), n.get("ci_high"), n.get("kl"), n.get("n_examples")
    rec.extra.update({k: v for k, v in n.items() if k not in ("metric", "normalization", "m_M", "m_Mprime", "m_C", "ci_low",
                                                              "ci_high", "kl", "n_examples")})
    if claim.type != "faithfulness":  # no interval over prompts for these yet: gated on the value
        rec.extra["gate"] = "point" + (" (ci asked; no interval for this claim type)" if run.gate_of(claim) == "ci" else "")
    if res.warnings:
        rec.extra["warnings"] = res.warnings
    rec.verdict = _apply_expectation(rec, m.reason_kind, holds_from)  # type: ignore[assignment]


def _apply_expectation(rec: Record, reason_kind: str, holds_from: int | None) -> str:
    if rec.expected == "present":
        return rec.measured
    # expected absent (before the declared formation step)
    if rec.measured == "pass":
        rec.reason = (f"claim already holds at {rec.checkpoint}, before its declared formation step {holds_from}: "
                      "the circuit appeared early (or holds_from is wrong)")
        return "fail"
    if rec.measured == "uncertain":
        return "uncertain"
    if rec.measured == "fail" or reason_kind == "cannot_do_task":
        rec.reason = f"absent as expected before step {holds_from}" + (f" ({rec.reason})" if rec.reason else "")
        return "pass"
    return "not_evaluated"
