"""What a faithfulness value is compared against: random circuits of the same size, and other ablations.

Why: a threshold alone does not say whether a circuit is special — in a small model a random set of heads of
the same size can be faithful too. ``baseline: {kind: random, k, seed, match, require}`` draws ``k`` circuits
with the claim's node counts (heads and MLPs, for node-level circuits) or edge count (edge-level) from the same
graph, seeded, never the claimed circuit itself, evaluates each with the engine and records the distribution;
with ``require: p95`` the claim must also exceed its 95th percentile. ``ablations: [corrupted, mean, zero]``
evaluates the claim under each ablation (Miller et al.: faithfulness moves with the ablation), gates on the
first and records the others.
"""

from __future__ import annotations

from math import comb
from typing import Any

import numpy as np

from .graph import Circuit, Graph, node_circuit
from .stats import UNCERTAIN, BootstrapSettings, gate, quantile_rank


def _is_head(n: str) -> bool:
    return n.startswith("a")


def _is_mlp(n: str) -> bool:
    return n.startswith("m")


def random_circuits(circuit: Circuit, k: int, seed: int, match: str | None = None) -> list[Circuit]:
    """``k`` random circuits of ``circuit``'s size from its graph (seeded); distinct from ``circuit`` and from each
    other while the graph has enough of them (then repeats are allowed, so small graphs still give ``k``)."""
    g: Graph = circuit.graph
    match = match or ("nodes" if circuit.level == "node" else "edges")
    rng = np.random.default_rng(seed)
    out: list[Circuit] = []
    seen: set[frozenset] = {circuit.edges}
    if match == "nodes":
        inner = [n for n in circuit.nodes if n not in ("input", "logits")]
        heads = [n for n in g.nodes if _is_head(n)]
        mlps = [n for n in g.nodes if _is_mlp(n)]
        n_h, n_m = sum(map(_is_head, inner)), sum(map(_is_mlp, inner))
        alternatives = comb(len(heads), n_h) * comb(len(mlps), n_m) - 1

        def draw() -> Circuit:
            pick = list(rng.choice(heads, n_h, replace=False)) + list(rng.choice(mlps, n_m, replace=False) if n_m else [])
            return node_circuit(g, [str(x) for x in pick])
    elif match == "edges":
        edges = list(g.edges())
        n_e = len(circuit.edges)
        alternatives = comb(len(edges), n_e) - 1

        def draw() -> Circuit:
            idx = rng.choice(len(edges), n_e, replace=False)
            return Circuit(g, frozenset(edges[i] for i in idx), level="edge")
    else:
        raise ValueError(f"baseline match {match!r}: expected nodes or edges")
    if alternatives < 1:
        raise ValueError(f"no random circuit of this size differs from the claimed one ({match}-matched: the graph "
                         "has no other choice); a random baseline needs a smaller circuit")
    attempts = 0
    while len(out) < k:
        c = draw()
        attempts += 1
        if c.edges in seen and attempts < 50 * k:
            continue
        if c.edges == circuit.edges:  # never the claimed circuit itself, even when repeats are allowed
            continue
        seen.add(c.edges)
        out.append(c)
    return out


def require_level(require: str | None, values: np.ndarray) -> float | None:
    """The baseline value a claim must exceed: ``pNN`` quantile, ``max``, or None for ``none``."""
    if require is None or require == "none":
        return None
    if require == "max":
        return float(values.max())
    return float(np.percentile(values, int(require[1:])))


def evaluation_for(res: Any, ablation: str, batch_size: int) -> Any:
    """The engine evaluation of the spec's circuit under ``ablation`` (cached per checkpoint)."""
    if res.evaluation is not None and res.evaluation.ablation == ablation:
        return res.evaluation
    key = ("evaluation", ablation)
    if key not in res.cache:
        from .engine import PatchingEngine

        res.cache[key] = PatchingEngine(res.bridge, res.circuit.graph).evaluate(res.task, res.circuit, ablation, batch_size)
    return res.cache[key]


def measure_faithfulness(res: Any, claim: Any, spec: Any, gate_mode: str, boot: BootstrapSettings) -> Any:
    """The faithfulness measurement of ``claim`` with its ablation sensitivity and random baseline (if asked)."""
    from . import measures

    ablations = list(claim.ablations or [spec.ablation])
    batch = spec.task.batch_size
    m = measures.faithfulness(evaluation_for(res, ablations[0], batch), res.task, claim, boot, gate_mode)
    if len(ablations) > 1:
        others = {}
        for ab in ablations[1:]:
            o = measures.faithfulness(evaluation_for(res, ab, batch), res.task, claim, boot, gate_mode)
            others[ab] = {"value": o.value, "ci_low": o.numbers.get("ci_low"), "ci_high": o.numbers.get("ci_high"),
                          "outcome": o.outcome, "reason": o.reason}
        m.numbers["ablations"] = others
    if claim.baseline is not None and m.value is not None:
        _apply_baseline(res, claim, spec, m, ablations[0], gate_mode)
    return m


def _apply_baseline(res: Any, claim: Any, spec: Any, m: Any, ablation: str, gate_mode: str) -> None:
    from . import measures
    from .engine import PatchingEngine

    b = claim.baseline
    engine = PatchingEngine(res.bridge, res.circuit.graph)
    values = []
    cheap = BootstrapSettings(method="percentile", resamples=10, seed=0)  # only the point value is used
    for c in random_circuits(res.circuit, b.k, b.seed, b.match):
        ev = engine.evaluate(res.task, c, ablation, spec.task.batch_size)
        values.append(measures.faithfulness(ev, res.task, claim, cheap, "point").value)
    vals = np.array([v for v in values if v is not None], dtype=np.float64)
    need = require_level(b.require, vals) if len(vals) else None
    info: dict[str, Any] = {"kind": b.kind, "k": b.k, "seed": b.seed, "match": b.match or ("nodes" if res.circuit.level == "node" else "edges"),
                            "values": [float(v) for v in vals], "p50": float(np.percentile(vals, 50)) if len(vals) else None,
                            "p95": float(np.percentile(vals, 95)) if len(vals) else None, "require": b.require,
                            "required_value": need, "quantile": quantile_rank(m.value, vals),
                            "margin": None if need is None else float(m.value - need)}
    m.numbers["baseline"] = info
    if need is None or m.outcome == "not_evaluated":
        return
    verdict = gate(m.value, m.numbers.get("ci_low"), m.numbers.get("ci_high"), need, None, gate_mode)
    info["beats"] = verdict
    if verdict == "pass" or m.outcome == "fail":
        return
    word = "does not beat" if verdict == "fail" else "is not clearly above"
    why = f"{m.value:.4g} {word} the random-circuit baseline's {b.require} = {need:.4g} (k = {b.k})"
    m.reason = "; ".join(x for x in (m.reason, why) if x)
    m.outcome = "fail" if verdict == "fail" else (UNCERTAIN if m.outcome == "pass" else m.outcome)
