"""Circuits from edge scores: top-n and greedy construction, pruning, the smallest faithful circuit, CPR/CMD.

Construction follows EAP-IG's ``Graph`` (reference/metrics.md §2.1, §2.3):

- ``topn``: the n best edges by |score| (or signed score), then pruned (MIB's default).
- ``greedy`` (Tigges et al.): from the logits upward; a max-heap holds edges whose receiver's node is already in
  the circuit; each popped edge adds its sender node, whose incoming edges join the heap. Then pruned.
- ``prune``: repeatedly drop nodes without an in-circuit outgoing edge or without an in-circuit incoming edge
  (``input`` always counts as fed) and the edges that lost an endpoint, until nothing changes. The pruned
  circuit can hold fewer than n edges.

The smallest circuit reaching a faithfulness target: exponential search for a size that reaches it, binary
search below it, then a local scan of ``n ± local`` because faithfulness is not monotone in n; every evaluated
point is kept (``SearchResult.curve``). Faithfulness is evaluated by the patching engine on exactly the pruned
circuit — for interchange ablation the same number EAP-IG's ``evaluate_graph`` reports (it prunes first too).
"""

from __future__ import annotations

import heapq
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import torch

from .graph import Circuit, Graph
from .metrics import metric_values

CONSTRUCTIONS = ("greedy", "topn")
MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


# ------------------------------------------------------------------ masks <-> circuits

def sender_to_receivers(graph: Graph) -> torch.Tensor:
    """Bool ``[S, R]``: sender node s owns receiver slot r (a head's q/k/v, an MLP's input)."""
    m = torch.zeros(len(graph.senders), len(graph.receivers), dtype=torch.bool)
    for i, s in enumerate(graph.senders):
        for r in graph.receivers_of(s):
            m[i, graph.receiver_index[r]] = True
    return m


def mask_to_circuit(graph: Graph, mask: torch.Tensor) -> Circuit:
    S, R = graph.senders, graph.receivers
    edges = frozenset((S[i], R[j]) for i, j in mask.nonzero().tolist())
    return Circuit(graph, edges, level="edge")


def circuit_to_mask(circuit: Circuit) -> torch.Tensor:
    return circuit.in_graph()


def prune(graph: Graph, mask: torch.Tensor) -> torch.Tensor:
    """Drop dangling nodes and their edges until nothing changes (EAP-IG ``Graph.prune``)."""
    f2b = sender_to_receivers(graph).float()
    mask = mask.clone()
    while True:
        has_out = mask.any(1)
        has_in = (f2b @ mask.any(0).float()) > 0
        has_in[0] = True  # input
        alive = has_out & has_in
        recv_alive = (alive.float() @ f2b) > 0
        recv_alive[-1] = True  # logits
        new = mask & alive[:, None] & recv_alive[None, :]
        if torch.equal(new, mask):
            return new
        mask = new


def _key(scores: torch.Tensor, absolute: bool) -> torch.Tensor:
    return scores.abs() if absolute else scores


def topn(graph: Graph, scores: torch.Tensor, real: torch.Tensor, n: int, absolute: bool = True) -> torch.Tensor:
    """The ``n`` best real edges (ties broken by position, stably), then pruned."""
    key = _key(scores, absolute).masked_fill(~real, float("-inf")).flatten()
    mask = torch.zeros(key.numel(), dtype=torch.bool)
    mask[torch.argsort(key, descending=True, stable=True)[:n]] = True
    return prune(graph, mask.view_as(scores))


def greedy(graph: Graph, scores: torch.Tensor, real: torch.Tensor, n: int, absolute: bool = True) -> torch.Tensor:
    """Tigges / EAP-IG ``apply_greedy``: grow from the logits, best candidate edge first, then prune."""
    key = _key(scores, absolute)
    owner = sender_to_receivers(graph)
    mask = torch.zeros_like(real)
    heap: list[tuple[float, int, int]] = []

    def push_into(cols: Sequence[int]) -> None:
        for j in cols:
            for i in real[:, j].nonzero().flatten().tolist():
                heapq.heappush(heap, (-float(key[i, j]), i, j))

    in_graph = {len(graph.senders)}  # logits
    push_into([graph.receiver_index["logits"]])
    added = 0
    while added < n and heap:
        _, i, j = heapq.heappop(heap)
        mask[i, j] = True
        added += 1
        if i not in in_graph:
            in_graph.add(i)
            push_into(owner[i].nonzero().flatten().tolist())
    return prune(graph, mask)


def build(graph: Graph, scores: torch.Tensor, real: torch.Tensor, n: int, how: str = "greedy",
          absolute: bool = True) -> torch.Tensor:
    if how == "greedy":
        return greedy(graph, scores, real, n, absolute)
    if how == "topn":
        return topn(graph, scores, real, n, absolute)
    raise ValueError(f"unknown construction {how!r}; expected one of {', '.join(CONSTRUCTIONS)}")


# ------------------------------------------------------------------ evaluation

@dataclass
class Faithfulness:
    normalized: float | None
    ratio: float | None
    m_C: float
    m_M: float
    m_Mprime: float


class CircuitEvaluator:
    """Faithfulness of circuits on one model and task through the patching engine; counts its evaluations."""

    def __init__(self, bridge: Any, task: Any, *, metric: str | None = None, ablation: str = "corrupted",
                 batch_size: int = 32):
        from .engine import PatchingEngine

        self.engine = PatchingEngine(bridge)
        self.graph = self.engine.graph
        self.task, self.ablation, self.batch_size = task, ablation, batch_size
        self.metric = metric or task.default_metric
        self.n_evaluations = 0
        self._ref: tuple[float, float] | None = None

    def _mean(self, logits: torch.Tensor) -> float:
        return float(metric_values(self.metric, logits, self.task.targets, self.task.signs).mean())

    def __call__(self, circuit: Circuit | torch.Tensor) -> Faithfulness:
        if isinstance(circuit, torch.Tensor):
            circuit = mask_to_circuit(self.graph, circuit)
        ev = self.engine.evaluate(self.task, circuit, self.ablation, self.batch_size)
        self.n_evaluations += 1
        if self._ref is None:
            self._ref = (self._mean(ev.clean), self._mean(ev.baseline))
        m_M, m_B = self._ref
        m_C = self._mean(ev.circuit)
        den = m_M - m_B
        return Faithfulness((m_C - m_B) / den if den != 0 else None, m_C / m_M if m_M != 0 else None, m_C, m_M, m_B)


def faithfulness_value(f: Faithfulness, normalization: str) -> float:
    v = f.normalized if normalization == "normalized" else f.ratio
    return float("nan") if v is None else float(v)


# ------------------------------------------------------------------ search

@dataclass
class CurvePoint:
    n: int  # edges asked for
    edges: int  # edges after pruning
    nodes: int
    faithfulness: float
    m_C: float


@dataclass
class SearchResult:
    """The smallest circuit found with faithfulness >= target (``mask`` None when none reaches it)."""

    target: float
    normalization: str
    construction: str
    mask: torch.Tensor | None
    n: int | None
    point: CurvePoint | None
    curve: list[CurvePoint] = field(default_factory=list)
    n_evaluations: int = 0
    m_M: float = float("nan")
    m_Mprime: float = float("nan")

    @property
    def found(self) -> bool:
        return self.mask is not None


def _count_nodes(graph: Graph, mask: torch.Tensor) -> int:
    return len(mask_to_circuit(graph, mask).nodes)


def search_budget(cap: int, start: int, local: int) -> int:
    """An upper bound on the engine evaluations ``minimal_circuit`` makes (for progress and its ETA): the doublings
    from ``start`` to ``cap``, a binary search below ``cap`` and the ``n ± local`` scan."""
    start = min(max(1, start), cap)
    doublings = math.ceil(math.log2(cap / start)) + 1 if cap > start else 1
    return doublings + math.ceil(math.log2(max(cap, 2))) + 2 * local + 1


def minimal_circuit(evaluator: CircuitEvaluator, scores: torch.Tensor, real: torch.Tensor, *, target: float = 0.8,
                    normalization: str = "normalized", construction: str = "greedy", absolute: bool = True,
                    start: int | None = None, max_edges: int | None = None, local: int = 5,
                    progress: Callable[[CurvePoint, int], None] | None = None) -> SearchResult:
    """Smallest n (edges asked for) whose pruned circuit reaches ``target``; the whole evaluated curve is kept.

    Upper bound: from ``start`` (default 5% of the edges, Tigges' range) doubling up to ``max_edges`` (default
    all edges); binary search between the largest failing and the smallest passing n; then every n within
    ``local`` of the found n, since the curve is not monotone. Circuits identical after pruning are evaluated once.
    Every circuit tried holds at most ``max_edges`` edges (pruning only removes edges). ``progress(point,
    evaluations)`` is called after each engine evaluation, so a long search is not silent.
    """
    if max_edges is not None and max_edges < 1:  # 0 used to mean "no limit" through `max_edges or E`
        raise ValueError(f"max_edges must be >= 1 (a circuit needs an edge), got {max_edges}")
    if start is not None and start < 1:
        raise ValueError(f"start must be >= 1, got {start}")
    if local < 0:
        raise ValueError(f"local must be >= 0, got {local}")
    if not math.isfinite(target):
        raise ValueError(f"target must be a finite number, got {target}")
    g = evaluator.graph
    E = int(real.sum())
    cap = E if max_edges is None else min(max_edges, E)
    memo: dict[int, CurvePoint] = {}
    by_mask: dict[bytes, CurvePoint] = {}
    masks: dict[int, torch.Tensor] = {}
    before = evaluator.n_evaluations
    last: Faithfulness | None = None

    def f(n: int) -> float:
        nonlocal last
        if n in memo:
            return memo[n].faithfulness
        mask = build(g, scores, real, n, construction, absolute)
        k = mask.numpy().tobytes()
        if k in by_mask:
            p = by_mask[k]
            pt = CurvePoint(n, p.edges, p.nodes, p.faithfulness, p.m_C)
        else:
            last = evaluator(mask)
            pt = CurvePoint(n, int(mask.sum()), _count_nodes(g, mask), faithfulness_value(last, normalization), last.m_C)
            by_mask[k] = pt
            if progress is not None:
                progress(pt, evaluator.n_evaluations - before)
        memo[n], masks[n] = pt, mask
        return pt.faithfulness

    ok = lambda n: f(n) >= target  # noqa: E731  (nan never passes)
    hi = min(cap, max(1, start if start is not None else math.ceil(0.05 * E)))
    lo = 0
    while not ok(hi):
        if hi >= cap:
            break
        lo, hi = hi, min(cap, 2 * hi)
    found_n: int | None = hi if ok(hi) else None
    if found_n is not None:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(mid):
                hi = mid
            else:
                lo = mid
        for n in range(max(1, hi - local), min(cap, hi + local) + 1):
            f(n)
        found_n = min(n for n, p in memo.items() if p.faithfulness >= target)
    ref = evaluator._ref or (float("nan"), float("nan"))
    curve = [memo[n] for n in sorted(memo)]
    if found_n is None:
        return SearchResult(target, normalization, construction, None, None, None, curve,
                            evaluator.n_evaluations - before, *ref)
    return SearchResult(target, normalization, construction, masks[found_n], found_n, memo[found_n], curve,
                        evaluator.n_evaluations - before, *ref)


# ------------------------------------------------------------------ MIB areas

@dataclass
class AreaResult:
    cpr: float
    cmd: float
    fractions: tuple[float, ...]
    faithfulness: list[float]
    edges: list[int]


def mib_areas(evaluator: CircuitEvaluator, scores: torch.Tensor, real: torch.Tensor, *,
              fractions: Sequence[float] = MIB_FRACTIONS, absolute_cpr: bool = False,
              absolute_cmd: bool = True) -> tuple[AreaResult, AreaResult]:
    """MIB's CPR (area under normalized faithfulness; signed top-n) and CMD (area between it and 1; |score|
    top-n), trapezoid rule over the linear fraction-of-edges axis (reference/metrics.md §2.3)."""
    g = evaluator.graph
    E = int(real.sum())
    out = []
    for absolute in (absolute_cpr, absolute_cmd):
        fs, es = [], []
        for k in fractions:
            mask = topn(g, scores, real, int(k * E), absolute)
            fs.append(faithfulness_value(evaluator(mask), "normalized"))
            es.append(int(mask.sum()))
        cpr = sum((fractions[i + 1] - fractions[i]) * (fs[i] + fs[i + 1]) / 2 for i in range(len(fs) - 1))
        cmd = sum((fractions[i + 1] - fractions[i]) * (abs(1 - fs[i]) + abs(1 - fs[i + 1])) / 2 for i in range(len(fs) - 1))
        out.append(AreaResult(cpr, cmd, tuple(fractions), fs, es))
    return out[0], out[1]


# ------------------------------------------------------------------ discover: scores -> circuit -> spec

@dataclass
class Discovery:
    """One checkpoint's discovered circuit and how it was found."""

    method: str
    steps: int
    search: SearchResult
    circuit: Circuit | None
    scores: torch.Tensor
    seconds_attribution: float
    seconds_search: float
    level: str = "edge"
    claim_value: float | None = None  # faithfulness of the circuit as written (node level may differ)
    roles: dict[str, list[str]] = field(default_factory=dict)
    role_scores: dict[str, dict[str, float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def edge_scores(bridge: Any, task: Any, method: str, *, steps: int = 5, batch_size: int = 16, seed: int = 0,
                sparsity: float = 0.95, train_steps: int = 200,
                progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """``[S, R]`` scores for ranking edges: EAP / EAP-IG attributions or Edge Pruning's learned mask logits.

    With ``progress``, EAP / EAP-IG score one batch at a time and call ``progress(batches_done, batches)`` after
    each; scores are per-example means, so the batches' scores weighted by their sizes are the same scores."""
    if method in ("eap", "eap-ig"):
        from .attribution import attribute

        if progress is None:
            s = attribute(bridge, task, method=method, steps=steps, batch_size=batch_size)
            return s.scores, {"alphas": s.info["alphas"]}
        N = len(task)
        starts = list(range(0, N, batch_size))
        total: torch.Tensor | None = None
        alphas: Any = None
        for i, start in enumerate(starts):
            idx = torch.arange(start, min(start + batch_size, N))
            s = attribute(bridge, task.subset(idx), method=method, steps=steps, batch_size=batch_size)
            part = s.scores * (len(idx) / N)
            total = part if total is None else total + part
            alphas = s.info["alphas"]
            progress(i + 1, len(starts))
        if total is None:
            raise ValueError("the task has no examples to score")
        return total, {"alphas": alphas}
    if method == "edge-pruning":
        from .edge_pruning import prune_edges

        r = prune_edges(bridge, task, target_sparsity=sparsity, steps=train_steps, seed=seed, batch_size=batch_size)
        return r.log_alpha.double(), {"edge_pruning": r}
    raise ValueError(f"unknown discovery method {method!r}; expected eap, eap-ig or edge-pruning")


def _fmt_seconds(t: float) -> str:
    if not math.isfinite(t):
        return "?"
    return f"{t:.1f} s" if t < 60 else f"{int(t // 60)} min {int(t % 60):02d} s"


class Progress:
    """Progress lines on stderr while ``discover`` runs (minutes on a real model), with an ETA; silent when
    ``quiet``. Lines of one stage come at most every ``every`` seconds, plus the first and the last."""

    def __init__(self, quiet: bool = False, stream: TextIO | None = None, every: float = 2.0):
        self.quiet, self.stream, self.every = quiet, stream, every
        self.t0 = self._last = time.perf_counter()

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(f"discover: {msg}", file=self.stream or sys.stderr, flush=True)

    def start(self) -> None:
        """A new stage: elapsed time and ETA count from here."""
        self.t0 = self._last = time.perf_counter()

    def step(self, what: str, done: int, total: int, detail: str = "", *, at_most: bool = False) -> None:
        """``done`` of ``total`` units of the current stage; ``at_most``: total is an upper bound."""
        now = time.perf_counter()
        if 1 < done < total and now - self._last < self.every:
            return
        self._last = now
        el = now - self.t0
        eta = el / done * max(0, total - done) if done else float("nan")
        count = f"{done} (of at most {total})" if at_most else f"{done}/{total}"
        self.say(f"{what} {count}{detail}; {_fmt_seconds(el)} elapsed, ETA {'<= ' if at_most else ''}"
                 f"{_fmt_seconds(eta)}")


def discover(bridge: Any, task: Any, *, method: str = "eap-ig", steps: int = 5, target: float = 0.8,
             normalization: str = "normalized", construction: str = "greedy", level: str = "edge",
             batch_size: int = 16, max_edges: int | None = None, local: int = 5, seed: int = 0,
             sparsity: float = 0.95, train_steps: int = 200, prepend_bos: bool = True,
             progress: Progress | None = None) -> Discovery:
    """Scores, the smallest circuit reaching ``target`` and the roles of its heads, for one checkpoint.

    ``max_edges`` bounds every edge circuit considered, Edge Pruning's own circuit included (at ``level='node'``
    it bounds the edge circuit whose nodes are written)."""
    from .attribution import real_edge_mask

    if max_edges is not None and max_edges < 1:
        raise ValueError(f"max_edges must be >= 1 (a circuit needs an edge), got {max_edges}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pg = progress or Progress(quiet=True)
    t0 = time.perf_counter()
    pg.start()
    if method == "edge-pruning":
        pg.say(f"scoring: training Edge Pruning masks ({train_steps} steps, target sparsity {sparsity:g}) ...")
        on_batch = None
    else:
        what = f"scoring ({'EAP-IG, ' + str(steps) + ' steps' if method == 'eap-ig' else 'EAP'}): batch"
        on_batch = lambda done, total: pg.step(what, done, total)  # noqa: E731
    scores, info = edge_scores(bridge, task, method, steps=steps, batch_size=batch_size, seed=seed,
                               sparsity=sparsity, train_steps=train_steps, progress=on_batch)
    t1 = time.perf_counter()
    pg.say(f"scores done in {_fmt_seconds(t1 - t0)}")
    ev = CircuitEvaluator(bridge, task, batch_size=batch_size)
    real = real_edge_mask(ev.graph)
    E = int(real.sum())
    cap = E if max_edges is None else min(max_edges, E)
    budget = search_budget(cap, math.ceil(0.05 * E), local)
    pg.start()

    def on_eval(pt: CurvePoint, k: int) -> None:
        pg.step("search: evaluation", k, max(budget, k), f": n={pt.n} -> {pt.edges} edges, {normalization} "
                f"faithfulness {pt.faithfulness:.3f}", at_most=True)

    res = minimal_circuit(ev, scores, real, target=target, normalization=normalization, construction=construction,
                          max_edges=max_edges, local=local, progress=on_eval)
    t2 = time.perf_counter()
    pg.say(f"search done in {_fmt_seconds(t2 - t1)} ({res.n_evaluations} evaluations)")
    d = Discovery(method, steps if method == "eap-ig" else 1, res, None, scores, t1 - t0, t2 - t1, level, info=info)
    if "edge_pruning" in info:  # the learned circuit itself (mask > 0.5, pruned), for the record
        ep = info["edge_pruning"]
        ep_mask = prune(ev.graph, ep.mask)
        f = ev(ep_mask)
        fv = faithfulness_value(f, normalization)
        n_ep = int(ep_mask.sum())
        d.info["edge_pruning_circuit"] = {"edges": n_ep, "faithfulness": fv,
                                          "target_sparsity": ep.target_sparsity, "steps": ep.steps}
        # the learned circuit itself competes with the search over its mask logits (many logits saturate, so
        # their order says little among the kept edges): the smaller faithful one is the answer — within max_edges
        if fv >= target and n_ep >= 1 and (max_edges is None or n_ep <= max_edges) and \
                (not res.found or n_ep < res.point.edges):  # type: ignore[union-attr]
            pt = CurvePoint(n_ep, n_ep, _count_nodes(ev.graph, ep_mask), fv, f.m_C)
            res.mask, res.n, res.point = ep_mask, None, pt
            d.info["edge_pruning_circuit"]["chosen"] = True
    if not res.found:
        return d
    circuit = mask_to_circuit(ev.graph, res.mask)
    d.claim_value = res.point.faithfulness  # type: ignore[union-attr]
    if level == "node":
        from .graph import node_circuit

        circuit = node_circuit(ev.graph, circuit.nodes)
        d.claim_value = faithfulness_value(ev(circuit), normalization)
    d.circuit = circuit
    heads = sorted(n for n in circuit.nodes if n.startswith("a"))
    if heads:
        pg.say(f"role scores of {len(heads)} heads ...")
    d.roles, d.role_scores, d.info["unlabelled_strong"] = assign_roles(bridge, task, heads, prepend_bos, batch_size)
    return d


def assign_roles(bridge: Any, task: Any, heads: Sequence[str], prepend_bos: bool = True, batch_size: int = 32
                 ) -> tuple[dict[str, list[str]], dict[str, dict[str, float]], list[str]]:
    """The roles ``heads`` earn by their own scores (``roles.assign_roles``, criteria in docs/roles.md), each labelled
    head's deciding numbers, and the heads with a strong direct effect but no role (for the spec's comments)."""
    from .roles import assign_roles as earned

    if not heads:
        return {}, {}, []
    a = earned(bridge, task, heads, bos=prepend_bos, batch_size=batch_size)
    per_head: dict[str, dict[str, float]] = {}
    for role, hs in a.roles.items():
        for h in hs:
            v = a.evidence.verdicts[(role, h)]
            per_head.setdefault(h, {}).update({f"{role}.{k}": x for k, x in v.scores.items()
                                               if isinstance(x, float) and k != "mean_over_heads"})
    strong = [f"{h} {a.direct_effect[h]:+.3f}" for h in a.unlabelled_strong]
    return a.roles, per_head, strong


def claim_threshold(value: float, margin: float) -> float:
    """``value - margin`` rounded down to 2 decimals: always strictly below the measured value."""
    t = math.floor((value - margin) * 100) / 100
    return t if t < value else t - 0.01


def spec_document(d: Discovery, *, name: str, source: str, checkpoint: Any, task: dict[str, Any], n_examples: int,
                  ablation: str = "corrupted", margin: float = 0.05, min_effect: float | None = None,
                  construction: str = "greedy", how_scored: str = "") -> str:
    """The spec file text: header comments (method, m, n, curve, timings) and the YAML body."""
    import yaml

    if d.circuit is None or d.claim_value is None:
        raise ValueError("no circuit reached the target; nothing to write")
    r = d.search
    p = r.point
    if p is None:
        raise ValueError("the search recorded no circuit point; nothing to write")
    assigned = {h for hs in d.roles.values() for h in hs}
    circ: dict[str, Any] = {"level": d.level}
    if d.roles:
        circ["roles"] = {k: sorted(v) for k, v in sorted(d.roles.items())}
    rest = sorted(n for n in d.circuit.nodes if n not in assigned and n not in ("input", "logits"))
    if d.level == "edge":
        if rest:
            circ["nodes"] = rest
        circ["edges"] = [f"{s}->{rv}" for s, rv in sorted(d.circuit.edges)]
    else:
        circ["nodes"] = rest
        if not rest and not d.roles:
            circ["nodes"] = ["input"]
    claim: dict[str, Any] = {"type": "faithfulness", "id": "discovered_circuit", "normalization": r.normalization,
                             "min": claim_threshold(d.claim_value, margin), "gate": "point"}
    if min_effect is not None:
        claim["min_effect"] = min_effect
    body = {"name": name, "description": f"circuit found by {d.method} at {checkpoint}: {len(d.circuit.edges)} edges, "
                                         f"{len(d.circuit.nodes)} nodes",
            "model": {"source": source, "checkpoints": [checkpoint]}, "task": task, "circuit": circ,
            "ablation": ablation, "claims": [claim]}
    method = {"eap": "EAP (gradient at the clean run; Syed et al.)",
              "eap-ig": f"EAP-IG, m={d.steps} steps interpolating the input embeddings (Hanna et al. 2024)",
              "edge-pruning": "Edge Pruning's learned hard-concrete mask logits (Bhaskar et al. 2024)"}[d.method]
    lines = [
        f"# Discovered by `circuit-tests discover` at {checkpoint} ({source}; task {task.get('name')}, {n_examples} examples).",
        f"# Edge ranking: {method}{how_scored}.",
        f"# Construction: {construction} (then pruned); the smallest n edges asked for whose circuit reaches "
        f"{r.normalization} faithfulness >= {r.target:g}",
        f"# (binary search + local check of n±5; {r.n_evaluations} engine evaluations, {ablation} ablation).",
        f"# Found {'n = ' + str(r.n) if r.n is not None else 'by Edge Pruning'}: {p.edges} edges, {p.nodes} nodes, {r.normalization} faithfulness {p.faithfulness:.4f} "
        f"(m(M) = {r.m_M:.4g}, m(M') = {r.m_Mprime:.4g}, m(C) = {p.m_C:.4g}).",
    ]
    if d.level == "node":
        lines.append(f"# Written at node level (all edges among its nodes): {r.normalization} faithfulness "
                     f"{d.claim_value:.4f}.")
    if "edge_pruning_circuit" in d.info:
        e = d.info["edge_pruning_circuit"]
        lines.append(f"# Edge Pruning's own circuit (mask > 0.5, target sparsity {e['target_sparsity']:g}, "
                     f"{e['steps']} steps): {e['edges']} edges, {r.normalization} faithfulness {e['faithfulness']:.4f}"
                     + (" — smaller than the search's, so it is the circuit written below." if e.get("chosen") else "."))
    lines.append(f"# Claim threshold = measured {d.claim_value:.4f} - margin {margin:g}, rounded down.")
    if d.role_scores:
        lines.append("# Roles earned by each head's own scores (criteria: docs/roles.md; checked at every run by the "
                     "role_check items):")
        for h, vals in sorted(d.role_scores.items()):
            lines.append(f"#   {h}: " + ", ".join(f"{k} {v:.3g}" for k, v in vals.items()))
    if d.info.get("unlabelled_strong"):
        lines.append("# Heads with |direct effect| >= 0.05 and no role: " + ", ".join(d.info["unlabelled_strong"]))
    lines += [f"# Time: scores {d.seconds_attribution:.1f} s, search {d.seconds_search:.1f} s.",
              "# Curve (n asked:edges kept=faithfulness):"]
    for i in range(0, len(r.curve), 8):
        lines.append("#   " + ", ".join(f"{c.n}:{c.edges}={c.faithfulness:.3f}" for c in r.curve[i:i + 8]))
    return "\n".join(lines) + "\n" + yaml.safe_dump(body, sort_keys=False, width=120)


# ------------------------------------------------------------------ the `circuit-tests discover` command

def _parse_task_params(task_params: Sequence[str]) -> dict[str, Any]:
    """``--task-param KEY=VALUE`` items as a dict; VALUE is read as YAML (``32``, ``false``, ``abc``), as in a spec."""
    import yaml

    from .errors import SpecError

    out: dict[str, Any] = {}
    for kv in task_params:
        k, sep, v = kv.partition("=")
        k = k.strip()
        if not sep or not k:
            raise SpecError(f"--task-param {kv!r}: expected KEY=VALUE (e.g. prepend_bos=false, size=32)")
        if k == "name":
            raise SpecError(f"--task-param {kv!r}: the task is named by the spec or by --task, not by a parameter")
        try:
            out[k] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise SpecError(f"--task-param {kv!r}: VALUE is not valid YAML ({getattr(e, 'problem', e)})") from None
    return out


def _task_from_args(spec_or_source: str, task_name: str | None, task_params: Sequence[str]) -> tuple[Any, dict[str, Any], Any]:
    """(model spec, task dict, LoadedSpec or None) from a spec file or from a model source plus --task.

    A spec's task is kept as written — every parameter, ``prepend_bos`` and ``batch_size`` included, so that
    discover measures what the spec measures — and ``--task-param`` overrides single keys of it."""
    from .errors import SpecError
    from .spec import ModelSpec, load_spec

    overrides = _parse_task_params(task_params)
    p = Path(spec_or_source)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise SpecError(f"{p}: no such spec file")
        loaded = load_spec(p)
        if task_name:
            raise SpecError(f"--task is given with a spec file ({p}); the spec's task {loaded.spec.task.name!r} is "
                            "used — drop --task")
        task = loaded.spec.task.model_dump(exclude_none=True)
        if "batch_size" not in loaded.spec.task.model_fields_set:
            task.pop("batch_size", None)  # the default: not written into the discovered spec
        task.update(overrides)
        return loaded.spec.model, task, loaded
    if not task_name:
        raise SpecError(f"{spec_or_source!r} is not a spec file (.yaml); with a model source, --task NAME is required")
    return ModelSpec(source=spec_or_source), {"name": task_name, **overrides}, None


def _task_spec(task: dict[str, Any]) -> Any:
    """The task as a validated ``TaskSpec`` (its parameters checked by the task's own model) before any model loads."""
    from pydantic import ValidationError

    from .errors import SpecError
    from .spec import TaskSpec
    from .tasks import validate_params

    try:
        t = TaskSpec(**task)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        raise SpecError(f"task {task.get('name')!r}: {msgs} (from the spec or --task-param)") from None
    validate_params(t.name, t.params)  # TaskError naming the parameter, e.g. an unknown key or a bad value
    return t


def _same_file(a: Path, b: Path) -> bool:
    """``a`` and ``b`` name one file: the same resolved path (symlinks, ``..``) or the same inode (hard links)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_output(path: Path, flag: str, inputs: Sequence[tuple[str, Path]], force: bool,
                  others: Sequence[tuple[str, Path]] = ()) -> None:
    """Refuse before any work (and again before writing) what discover must not do to ``path``: overwrite one of
    its inputs (never, whatever ``force``), write two outputs to one file, replace an existing file without
    ``--force``, write where it cannot."""
    from .errors import SpecError

    for what, inp in inputs:
        if _same_file(path, inp):
            raise SpecError(f"{flag} {path} is the {what} ({inp}); discover never overwrites its input — write to "
                            "another file")
    for what, other in others:
        if _same_file(path, other):
            raise SpecError(f"{flag} {path} is also the {what} ({other}); each output needs its own file")
    if (path.exists() or path.is_symlink()) and not path.is_dir() and not force:
        raise SpecError(f"{flag} {path} already exists; pass --force to replace it")
    from .outputs import output_path_problem  # the plugin's check: a real probe, not permission bits

    problem = output_path_problem(path, "file")
    if problem is not None:
        raise SpecError(f"{flag} {path}: {problem}")


def _write_atomic(path: Path, text: str) -> None:
    """``path`` gets ``text`` through a temporary file in its directory and ``os.replace``: the old file stays whole
    until the new one is complete (an interrupted run leaves no half-written spec)."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would differ from a file written the ordinary way
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _pick_checkpoints(model: Any, spec_dir: Path, checkpoint: str | None) -> list[Any]:
    """The checkpoints named by ``--checkpoint`` (labels, steps, comma-separated, each once), else the last one."""
    from .errors import ModelLoadError, SpecError
    from .sources import resolve_checkpoints

    wanted = [c.strip() for c in checkpoint.split(",")] if checkpoint is not None else None
    if wanted is not None and (not all(wanted) or not wanted):
        raise SpecError(f"--checkpoint {checkpoint!r}: expected step/label[,step/label...] without empty items")
    refs = resolve_checkpoints(model.source, model.revision, None if wanted else model.checkpoints, spec_dir)
    if not wanted:
        return refs[-1:]
    pick = []
    for w in wanted:
        hit = [r for r in refs if r.label in (w, f"step{w}") or str(r.step) == w]
        if not hit:
            raise ModelLoadError(f"no checkpoint {w!r} in {model.source}; available: {', '.join(r.label for r in refs)}")
        if any(r.label == hit[0].label for r in pick):
            raise SpecError(f"--checkpoint {checkpoint!r} names {hit[0].label} twice")
        pick.append(hit[0])
    return pick


def discover_command(args: Any) -> int:
    """Implementation of ``circuit-tests discover`` (see cli.py for the flags).

    A spec is written only after the text produced validates as a spec at its destination, atomically, never over
    the input spec (or the custom task's data file), and over an existing file only with ``--force``; all of that
    is checked before the model loads, so a bad ``-o`` costs no minutes of scoring."""
    from types import SimpleNamespace

    from .errors import ModelLoadError, SpecError
    from .runner import prepend_bos
    from .spec import ID_RE, loads_spec
    from .tasks import build_task
    from .tasks.base import BuildContext

    force = bool(getattr(args, "force", False))
    pg = Progress(quiet=bool(getattr(args, "quiet", False)))
    given = _parse_task_params(args.task_param or [])
    model, task_dict, loaded = _task_from_args(args.spec, args.task, args.task_param or [])
    tspec = _task_spec(task_dict)
    spec_dir = loaded.dir if loaded else Path(".")
    out = Path(args.out)
    if not out.name.endswith((".yaml", ".yml")):
        raise SpecError(f"-o {out}: the spec file name must end in .yaml (e.g. found.circuit.yaml)")
    if args.name is not None and not re.match(ID_RE, args.name):
        raise SpecError(f"--name {args.name!r}: a spec name is letters, digits, '_', '.' and '-' only")
    inputs: list[tuple[str, Path]] = [("input spec", Path(args.spec))] if loaded else []
    data_path = tspec.params.get("path") if tspec.name == "custom" else None
    if isinstance(data_path, str):
        inputs.append(("custom task's data file", Path(spec_dir, data_path)))
    pick = _pick_checkpoints(model, spec_dir, args.checkpoint)
    plan: list[tuple[Any, Path, Path | None]] = []
    for ref in pick:
        path = out if len(pick) == 1 else out.with_name(out.name.replace(".circuit.yaml", "").rsplit(".", 1)[0]
                                                         + f".{ref.label}.circuit.yaml")
        gj = None
        if args.graph_json:
            gj = Path(args.graph_json) if len(pick) == 1 else Path(args.graph_json).with_suffix(f".{ref.label}.json")
        plan.append((ref, path, gj))

    outputs = [(f"{flag} file for {r.label}", q) for r, a, b in plan for flag, q in (("-o", a), ("--graph-json", b))
               if q is not None]

    def check(path: Path, gj: Path | None) -> None:
        _check_output(path, "-o", inputs, force, [(w, q) for w, q in outputs if q is not path])
        if gj is not None:
            _check_output(gj, "--graph-json", inputs, force, [(w, q) for w, q in outputs if q is not gj])

    for _, path, gj in plan:
        check(path, gj)
    min_effect = None
    if loaded:
        fc = [c for c in loaded.spec.claims if c.type == "faithfulness" and c.min_effect is not None]
        min_effect = fc[0].min_effect if fc else None
    for ref, path, gj in plan:
        reason = ref.unavailable_reason()
        if reason:
            raise ModelLoadError(reason)
        pg.say(f"{model.source} @ {ref.label}: loading ...")
        bridge = ref.load()
        prepend = prepend_bos(SimpleNamespace(task=tspec), ref, bridge)  # the rule the spec run will apply
        task = build_task(tspec.name, bridge.tokenizer, tspec.params, BuildContext(spec_dir=str(spec_dir), prepend_bos=prepend))
        origin = ("--task-param" if "prepend_bos" in given else
                  "the spec" if tspec.prepend_bos is not None else "this model's default; --task-param "
                  f"prepend_bos={'false' if prepend else 'true'} to change")
        pg.say(f"task {tspec.name}, {len(task)} examples, prepend_bos {str(prepend).lower()} ({origin}); "
               f"{args.method}, batch size {args.batch_size}")
        d = discover(bridge, task, method=args.method, steps=args.steps, target=args.target,
                     normalization=args.normalization, construction=args.construction, level=args.level,
                     batch_size=args.batch_size, max_edges=args.max_edges, seed=args.seed, sparsity=args.sparsity,
                     train_steps=args.train_steps, prepend_bos=prepend, progress=pg)
        r = d.search
        best = max(r.curve, key=lambda c: c.faithfulness if c.faithfulness == c.faithfulness else -1e9)
        print(f"{ref.label}: {args.method} scores {d.seconds_attribution:.1f} s, search {d.seconds_search:.1f} s "
              f"({r.n_evaluations} engine evaluations)")
        if not r.found:
            within = f" within --max-edges {args.max_edges}" if args.max_edges is not None else ""
            print(f"  no circuit reached {r.normalization} faithfulness {args.target:g}{within}; best "
                  f"{best.faithfulness:.3f} at {best.edges} edges (n={best.n}); nothing written")
            return 1
        if r.point is None or d.circuit is None:  # found without a point would be a search bug: say so, exit 1
            print("  the search reported success but recorded no circuit; nothing written")
            return 1
        print(f"  smallest circuit: n={r.n} -> {r.point.edges} edges, {r.point.nodes} nodes, {r.normalization} "
              f"faithfulness {r.point.faithfulness:.4f}" + (f" (node level: {d.claim_value:.4f})" if args.level == "node" else ""))
        if d.roles:
            print("  roles: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(d.roles.items())))
        name = (args.name or (loaded.spec.name + "-discovered" if loaded else "discovered")) + \
            ("" if len(pick) == 1 else f"-{ref.label}")
        source = model.source
        if not source.startswith("zoo:") and Path(spec_dir, source).exists():  # a local directory: keep it
            source = os.path.relpath(Path(spec_dir, source).resolve(), path.resolve().parent)  # valid from the new spec
        task_out = dict(task_dict, prepend_bos=prepend)  # recorded, so the spec run measures what discover measured
        if isinstance(data_path, str) and not Path(data_path).is_absolute():
            task_out["path"] = os.path.relpath(Path(spec_dir, data_path).resolve(), path.resolve().parent)
        text = spec_document(d, name=name, source=source, checkpoint=ref.step if ref.step is not None else ref.label,
                             task=task_out, n_examples=len(task), margin=args.margin, min_effect=min_effect,
                             construction=args.construction)
        try:
            loads_spec(text, path)  # what we write must validate, at its destination (relative paths resolve there)
        except SpecError as e:
            raise SpecError(f"the spec discovered at {ref.label} does not validate, so {path} was not written:\n{e}") from None
        check(path, gj)  # again: a file may have appeared while the model ran
        gj_text = None
        if gj is not None:
            import json

            from .graph import circuit_to_json

            g = d.circuit.graph
            sc = {(g.senders[i], g.receivers[j]): float(d.scores[i, j]) for i, j in real_edge_pairs(g)}
            edge_c = mask_to_circuit(g, r.mask)  # type: ignore[arg-type]
            gj_text = json.dumps(circuit_to_json(edge_c, d_model=int(bridge.cfg.d_model), scores=sc))
        _write_atomic(path, text)
        print(f"  wrote {path}")
        if gj is not None and gj_text is not None:
            _write_atomic(gj, gj_text)
            print(f"  wrote {gj} (EAP-IG graph JSON, scores and in_graph)")
    return 0


def real_edge_pairs(graph: Graph) -> list[tuple[int, int]]:
    return [(graph.sender_index[s], graph.receiver_index[r]) for s, r in graph.edges()]
