"""Edge attribution: EAP and EAP-IG scores for every edge of the graph (reference/metrics.md §4).

``score(s→r) = (h_s(x') - h_s(x)) · mean_k ∂L/∂x_r`` summed over positions and d_model and averaged over
examples, with ``L = -metric`` (so a positive score means the edge helps the task: corrupting it lowers the
metric). EAP takes the gradient once, on the clean run. EAP-IG (Hanna et al. 2024, "inputs" variant) averages
it over ``m`` runs whose token embeddings (``hook_embed``, the ``input`` node) are
``e(x') + (k/m)(e(x) - e(x'))`` for ``k = 0..m-1`` — EAP-IG's code convention (the corrupted point included,
the clean one not); everything downstream, positional embeddings included, is recomputed on clean tokens.

Cost: one no-grad pass over clean+corrupted (the activation differences) plus one forward and one backward per
step. Parameters are frozen during the backward, so it computes activation gradients only. The differences do
not change between steps, so each receiver group's gradients are summed over the steps and contracted with the
differences once per batch (one GEMM per group; per step when the sums would exceed ``GRAD_SUM_BYTES``); nothing
of size ``[senders, receivers, positions, d_model]`` is ever materialised.

Graph conventions are the engine's (graph.py): heads send ``z @ W_O`` (no ``b_O``), receivers are the q/k/v
inputs per head, ``m{l}``'s input and the residual stream before the final LayerNorm. Grouped-query attention:
the gradient passes run the model ungrouped (``gqa.ungrouped``), so k/v receivers are per query head (MIB).

Scale: the metric is summed (not averaged) over a batch and the total divided by N, so scores are per-example
means and do not depend on the batch size (EAP-IG's code carries an extra 1/batch factor; rankings agree).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch  # noqa: E402  (no process settings on import: runtime.EvaluationScope applies them)

from .gqa import ungrouped
from .graph import Graph
from .metrics import metric_values
from .tasks.base import TaskData

METHODS = ("eap", "eap-ig")
GRAD_SUM_BYTES = 512 * 2**20  # largest per-batch gradient sum kept to contract once (else: contract every step)
FINAL = "ln_final.hook_in"  # the logits receiver (as in engine.py)


class _Stop(Exception):
    """Raised after the logits receiver: the unembedding of every position is not needed."""


@dataclass
class EdgeScores:
    """Scores ``[senders, receivers]`` (0 where there is no edge) and how they were computed."""

    graph: Graph
    scores: torch.Tensor  # float64 [S, R]
    method: str
    steps: int
    metric: str
    n_examples: int
    info: dict[str, Any] = field(default_factory=dict)

    def real_edges(self) -> torch.Tensor:
        """Bool ``[S, R]``: True where the edge exists in the graph."""
        return real_edge_mask(self.graph)

    def score(self, sender: str, receiver: str) -> float:
        g = self.graph
        return float(self.scores[g.sender_index[sender], g.receiver_index[receiver]])

    def ranked(self, absolute: bool = True) -> list[tuple[str, str, float]]:
        """Every real edge, best first (by |score| when ``absolute``)."""
        g = self.graph
        mask = self.real_edges()
        key = self.scores.abs() if absolute else self.scores
        key = key.masked_fill(~mask, float("-inf")).flatten()
        order = torch.argsort(key, descending=True, stable=True)[: int(mask.sum())]
        R = len(g.receivers)
        return [(g.senders[i // R], g.receivers[i % R], float(self.scores.flatten()[i])) for i in order.tolist()]


def real_edge_mask(graph: Graph) -> torch.Tensor:
    """Bool ``[S, R]``: True where sender ``s`` is upstream of receiver ``r``."""
    m = torch.zeros(len(graph.senders), len(graph.receivers), dtype=torch.bool)
    for j, r in enumerate(graph.receivers):
        m[: graph.n_upstream(r), j] = True
    return m


def alphas(method: str, steps: int) -> list[float]:
    """Interpolation points of the input embedding: 1 = clean, 0 = corrupted."""
    if method == "eap":
        return [1.0]
    if method == "eap-ig":
        if steps < 1:
            raise ValueError(f"EAP-IG needs steps >= 1, got {steps}")
        return [k / steps for k in range(steps)]
    raise ValueError(f"unknown attribution method {method!r}; expected one of {', '.join(METHODS)}")


def attribute(bridge: Any, task: TaskData, *, method: str = "eap-ig", steps: int = 5, metric: str | None = None,
              batch_size: int = 16) -> EdgeScores:
    """EAP (``method='eap'``) or EAP-IG scores of every edge for ``task`` on ``bridge`` (interchange ablation)."""
    metric = metric or task.default_metric
    if metric == "kl":
        raise ValueError("attribution with the kl metric is not supported; use logit_diff or prob_diff")
    pts = alphas(method, steps)
    bridge = bridge.eval()
    graph = Graph.from_bridge(bridge)
    scores = torch.zeros(len(graph.senders), len(graph.receivers), dtype=torch.float64)
    frozen = [p for p in bridge.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        for start in range(0, len(task), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(task)))
            D, e_clean, e_corr = _differences(bridge, graph, task.clean[idx], task.corrupted[idx])
            # D is the same at every step, so Σ_k D·g_k = D·Σ_k g_k: sum the gradients, contract once per batch
            # (m-fold fewer GEMMs; the sums take one [b*p*d] row per receiver, so only when that fits)
            fits = len(pts) > 1 and len(graph.receivers) * D.shape[1] * D.element_size() <= GRAD_SUM_BYTES
            gsum: dict[str, list[Any]] | None = {} if fits else None
            for a in pts:
                _accumulate(bridge, graph, task, idx, metric, D, e_corr + a * (e_clean - e_corr), scores, gsum)
            for cols, n_prev, g in (gsum or {}).values():
                scores[:n_prev, cols] -= (D[:n_prev] @ g.T).double()  # L = -metric
    finally:
        for p in frozen:
            p.requires_grad_(True)
        _flags(bridge, False)
    scores /= len(task) * len(pts)
    return EdgeScores(graph, scores, method, len(pts), metric, len(task), {"alphas": pts, "batch_size": batch_size})


def _flags(bridge: Any, on: bool) -> None:
    bridge.set_use_split_qkv_input(on)
    bridge.set_use_hook_mlp_in(on)


@torch.no_grad()
def _differences(bridge: Any, graph: Graph, clean: torch.Tensor, corr: torch.Tensor):
    """``D[s] = h_s(x') - h_s(x)`` as ``[S, b*p*d]`` plus both token embeddings, from one clean+corrupted pass."""
    _flags(bridge, False)
    b = clean.shape[0]
    L = graph.n_layers
    cache: dict[str, torch.Tensor] = {}

    def keep(t: torch.Tensor, hook: Any, name: str) -> None:
        cache[name] = t.detach()

    names = ["hook_embed"] + [f"blocks.{l}.attn.hook_z" for l in range(L)] + [f"blocks.{l}.hook_mlp_out" for l in range(L)]

    def stop(x: torch.Tensor, hook: Any) -> None:
        raise _Stop

    try:
        with bridge.hooks(fwd_hooks=[(n, partial(keep, name=n)) for n in names] + [(FINAL, stop)]):
            bridge(torch.cat([clean, corr]))
    except _Stop:
        pass
    W_O = bridge.W_O.detach()  # [L, H, d_head, d_model]
    e = cache["hook_embed"]
    rows = [(e[b:] - e[:b]).reshape(1, -1)]
    for layer in range(L):
        z = cache[f"blocks.{layer}.attn.hook_z"]
        rows.append(torch.einsum("bphk,hkd->hbpd", z[b:] - z[:b], W_O[layer]).reshape(graph.n_heads, -1))
        m = cache[f"blocks.{layer}.hook_mlp_out"]
        rows.append((m[b:] - m[:b]).reshape(1, -1))
    return torch.cat(rows), e[:b], e[b:]  # model dtype: [S, b*p*d] is the largest tensor attribution holds


def _accumulate(bridge: Any, graph: Graph, task: TaskData, idx: torch.Tensor, metric: str, D: torch.Tensor,
                embed: torch.Tensor, scores: torch.Tensor, gsum: dict[str, list[Any]] | None = None) -> None:
    """One forward with the given input embedding and one backward; adds ``D · ∂L/∂x_r`` into ``scores``
    (or, with ``gsum``, adds ``∂L/∂x_r`` into its per-receiver-group sums for one contraction later)."""
    _flags(bridge, True)
    H = graph.n_heads
    leaf = embed.detach().clone().requires_grad_(True)
    box: dict[str, torch.Tensor] = {}

    def contract(grad: torch.Tensor, cols: list[int], n_prev: int) -> None:
        g = grad.to(D.dtype)
        if g.dim() == 4:  # [b, p, H, d] -> one row per head
            if g.shape[2] != H:
                raise ValueError(f"receiver gradient has {g.shape[2]} heads but the graph has {H}: this attention "
                                 "layout gives no per-query-head q/k/v input, so edge scores cannot be attributed")
            g = g.permute(2, 0, 1, 3).reshape(H, -1)
        else:
            g = g.reshape(1, -1)
        if gsum is None:
            scores[:n_prev, cols] -= (D[:n_prev] @ g.T).double()  # L = -metric
            return
        key = str(cols[0])
        if key in gsum:
            gsum[key][2] += g
        else:
            gsum[key] = [cols, n_prev, g.clone()]

    def on_embed(t: torch.Tensor, hook: Any) -> torch.Tensor:
        return leaf.to(t.dtype)

    def receiver(x: torch.Tensor, hook: Any, cols: list[int], n_prev: int) -> torch.Tensor:
        # mlp_in / logits: a new tensor, since the hook may be handed the residual stream itself, whose gradient
        # also carries the skip path; q/k/v inputs are already this receiver's own per-head copies
        if x.dim() == 3:
            x = x.clone()
        x.register_hook(partial(contract, cols=cols, n_prev=n_prev))
        return x

    def final(x: torch.Tensor, hook: Any) -> None:
        box["x"] = receiver(x, hook, [graph.receiver_index["logits"]], len(graph.senders))
        raise _Stop

    hooks: list[tuple[str, Any]] = [("hook_embed", on_embed)]
    for layer in range(graph.n_layers):
        n_prev = graph.n_upstream(f"a{layer}.h0<q>")
        for c in "qkv":
            cols = [graph.receiver_index[f"a{layer}.h{h}<{c}>"] for h in range(H)]
            hooks.append((f"blocks.{layer}.hook_{c}_input", partial(receiver, cols=cols, n_prev=n_prev)))
        hooks.append((f"blocks.{layer}.hook_mlp_in", partial(receiver, cols=[graph.receiver_index[f"m{layer}"]],
                                                             n_prev=graph.n_upstream(f"m{layer}"))))
    clean, end = task.clean[idx], task.end[idx]
    with ungrouped(bridge):  # GQA: one k/v input per query head (MIB's convention; a no-op otherwise)
        try:
            with bridge.hooks(fwd_hooks=hooks + [(FINAL, final)]):
                bridge(clean)
        except _Stop:
            pass
        x = box["x"][torch.arange(clean.shape[0]), end]
        logits = bridge.unembed(bridge.ln_final(x[:, None, :]))[:, 0]
        m = metric_values(metric, logits, task.targets[idx], task.signs[idx])
        m.sum().backward()  # ∂(metric)/∂x; contract() subtracts, giving ∂L/∂x with L = -metric
