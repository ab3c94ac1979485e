"""Edge attribution: EAP and EAP-IG scores for every edge of the graph (reference/metrics.md §4).

``score(s→r) = (h_s(x') - h_s(x)) · mean_k ∂L/∂x_r`` summed over positions and d_model and averaged over
examples, with ``L = -metric`` (so a positive score means the edge helps the task: corrupting it lowers the
metric). EAP takes the gradient once, on the clean run. EAP-IG (Hanna et al. 2024, "inputs" variant) averages
it over ``m`` runs whose token embeddings (``hook_embed``, the ``input`` node) are
``e(x') + (k/m)(e(x) - e(x'))`` for ``k = 0..m-1`` — EAP-IG's code convention (the corrupted point included,
the clean one not); everything downstream, positional embeddings included, is recomputed on clean tokens.

Cost: one no-grad pass over clean+corrupted (the activation differences) plus one forward and one backward per
step. Parameters are frozen during the backward, so it computes activation gradients only. The differences do
not change between steps, so the receivers' gradients are summed over the steps and contracted with the
differences once per batch (one GEMM per receiver group; every few steps when the sums would exceed
``GRAD_SUM_BYTES``); nothing of size ``[senders, receivers, positions, d_model]`` is ever materialised.

q/k/v receivers without forking (``_QKVLayer``): the receiver of head ``h``'s q/k/v is its own copy of the
pre-``ln1`` residual stream (``hook_{c}_input``). Attribution never patches those copies, so the forward runs
unforked — one ``ln1``, the model's own projections — and the per-head input gradient is rebuilt from the
projection-output gradient through ``ln1``'s Jacobian (LayerNorm / RMSNorm, exact). Forking costs H copies of
``ln1`` and per-head projections forward and backward per q/k/v (1.42x the passes on a SmolLM2-135M shape,
1.06x without). Other ``ln1`` kinds fall back to the bridge's forked inputs.

Graph conventions are the engine's (graph.py): heads send ``z @ W_O`` (no ``b_O``), receivers are the q/k/v
inputs per head, ``m{l}``'s input and the residual stream before the final LayerNorm. Grouped-query attention:
k/v receivers are per query head (MIB): the unforked pass computes each k/v projection once per k/v head and
repeats its output per query head (``_kv_per_query_head``); the forked fallback runs ``gqa.ungrouped``.

Scale: the metric is summed (not averaged) over a batch and the total divided by N, so scores are per-example
means and do not depend on the batch size (EAP-IG's code carries an extra 1/batch factor; rankings agree).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator

import torch  # noqa: E402  (no process settings on import: runtime.EvaluationScope applies them)

from .gqa import kv_groups, ungrouped
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
        fast = _qkv_layers(bridge, graph)
        for start in range(0, len(task), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(task)))
            D, e_clean, e_corr = _differences(bridge, graph, task.clean[idx], task.corrupted[idx])
            # D is the same at every step, so Σ_k D·g_k = D·(Σ_k g_k): the steps' gradients are summed and
            # contracted with D once per batch, or every few steps when the sums would exceed GRAD_SUM_BYTES
            sums = _Sums(graph, fast, D)
            every = sums.steps_per_flush()
            for k, a in enumerate(pts):
                _accumulate(bridge, graph, task, idx, metric, e_corr + a * (e_clean - e_corr), sums)
                if (k + 1) % every == 0 or k + 1 == len(pts):
                    sums.flush(scores)
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


def _repeat_heads(mod: Any, inputs: Any, out: torch.Tensor, groups: int, d_head: int) -> torch.Tensor:
    return out.unflatten(-1, (-1, d_head)).repeat_interleave(groups, dim=-2).flatten(-2)


@contextlib.contextmanager
def _kv_per_query_head(bridge: Any) -> Iterator[None]:
    """Grouped-query attention run as its ungrouped equivalent, for the unforked gradient pass: each k/v
    projection is computed once per k/v head and its output repeated per query head (``repeat_kv`` order), so
    ``k/v.hook_out`` and their gradients have one slot per query head, as under ``gqa.ungrouped``, at 1/G of
    its k/v projection cost (the inputs of a group's heads are equal here, so the products are too). No-op for
    multi-head attention; hooks and settings are restored on exit, also on error."""
    G = kv_groups(bridge)
    if G == 1:
        yield
        return
    H = int(bridge.cfg.n_heads)
    handles: list[Any] = []
    restore: list[tuple[Any, str, Any]] = []
    try:
        for blk in bridge.blocks:
            attn = blk.attn
            hf_attn = attn.original_component
            if not all(isinstance(getattr(attn, n, None), torch.nn.Module) for n in ("k", "v")) or \
                    getattr(hf_attn, "num_key_value_groups", None) != G:
                raise ValueError(f"{type(hf_attn).__name__}: grouped-query attention without separate k/v "
                                 f"projections or with num_key_value_groups != {G}; cannot give per-query-head "
                                 "k/v receivers for this architecture")
            d_head = int(hf_attn.head_dim)
            for lin in (attn.k, attn.v):
                handles.append(lin.original_component.register_forward_hook(
                    partial(_repeat_heads, groups=G, d_head=d_head)))
            restore.append((hf_attn, "num_key_value_groups", G))
            hf_attn.num_key_value_groups = 1
            restore.append((attn.config, "n_key_value_heads", attn.config.n_key_value_heads))
            attn.config.n_key_value_heads = H
        yield
    finally:
        for h in handles:
            h.remove()
        for obj, name, value in reversed(restore):
            setattr(obj, name, value)


@dataclass
class _QKVLayer:
    """One block's q/k/v projections seen from the pre-``ln1`` residual stream, for per-head input gradients.

    ``ln1`` is ``y = w ⊙ x̂ + b`` with ``x̂ = (x - mean(x)) / s`` (RMSNorm: no mean, no ``b``) and
    ``s = sqrt(mean((x - mean)²) + eps)``; head ``h`` of part ``c`` projects ``q = y @ W[h] + b_c[h]``. With
    ``g = ∂L/∂q`` and ``u = (g / s) @ Wp[h]`` (``Wp[h] = (w ⊙ W[h])^T``), the gradient w.r.t. that head's own copy
    of the residual (the ``hook_{c}_input`` slot) is ``u - mean(u) - x̂ (x̂·u) / d`` (RMSNorm: no ``mean(u)``),
    where ``x̂·u = (g / s)·(q - const[h])`` and ``mean(u) = (g / s)·rowsum[h] / d`` need only ``[d_head]`` vectors.
    So the forward runs unforked (no per-head copies, norms or projections), and since ``Wp`` does not change
    between steps, the ``[H, positions, d_model]`` product is formed once per flush instead of once per step.
    """

    rms: bool
    eps: float
    Wp: torch.Tensor  # [3H, d_head, d_model]: q, k, v heads (k/v per query head)
    const: torch.Tensor  # [3, H, d_head]: b_c[h] + b_ln @ W[h]
    rowsum: torch.Tensor | None  # [3, H, d_head]: Wp summed over d_model (LayerNorm only)


def _qkv_layers(bridge: Any, graph: Graph) -> list[_QKVLayer] | None:
    """The per-layer constants of the unforked gradient, or None when some block's ``ln1`` is not a LayerNorm /
    RMSNorm that the split q/k/v inputs re-apply (then the per-head forked forward is used, as the bridge runs it)."""
    from .gqa import head_weights

    out = []
    hw = None
    for blk in bridge.blocks:
        ln = getattr(blk, "ln1", None)
        mod = getattr(ln, "original_component", None)
        if mod is None or getattr(blk.attn, "_ln1_module", None) is not mod:
            return None  # the split inputs are not "pre-ln1 residual, re-normed by ln1": keep the bridge's fork
        rms = getattr(ln, "uses_rms_norm", None)
        if isinstance(mod, torch.nn.LayerNorm) and not rms:
            eps = float(mod.eps)
        elif rms and "RMSNorm" in type(mod).__name__:
            eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", None))
            if eps is None:
                return None
        else:
            return None
        w = getattr(mod, "weight", None)
        if hw is None:
            hw = head_weights(bridge)
        d = int(hw.W_Q.shape[2])
        w = torch.ones(d, dtype=hw.W_Q.dtype) if w is None else w.detach().to(hw.W_Q.dtype)
        if getattr(ln, "uses_weight_offset", False):
            w = 1.0 + w
        b = getattr(mod, "bias", None)
        b = None if (rms or b is None) else b.detach().to(hw.W_Q.dtype)
        l = len(out)
        Ws = [hw.W_Q[l], hw.W_K[l], hw.W_V[l]]  # [H, d_model, d_head] each
        bs = [hw.b_Q[l], hw.b_K[l], hw.b_V[l]]  # [H, d_head]
        Wp = torch.cat([(W * w[:, None]).transpose(1, 2) for W in Ws])  # [3H, d_head, d_model]
        const = torch.stack([bc + (0 if b is None else torch.einsum("d,hde->he", b, W)) for W, bc in zip(Ws, bs)])
        rowsum = None if rms else Wp.sum(-1).view(3, -1, Wp.shape[1])
        out.append(_QKVLayer(rms, float(eps), Wp.contiguous(), const, rowsum))
    return out


class _Sums:
    """What one batch's receiver gradients are made of, summed over the steps since the last ``flush``."""

    def __init__(self, graph: Graph, fast: list[_QKVLayer] | None, D: torch.Tensor):
        self.graph, self.fast, self.D = graph, fast, D
        self.rows: dict[int, list[Any]] = {}  # first column -> [cols, n_prev, Σ grad [len(cols), n*d]]
        self.G: dict[int, torch.Tensor] = {}  # layer -> Σ_k g_k / s_k, [n, 3H, d_head]
        self.A: dict[int, torch.Tensor] = {}  # layer -> Σ_k mean(u_k), [n, 3H] (LayerNorm only)
        self.B: dict[int, list[torch.Tensor]] = {}  # layer -> per step (x̂·u)/d, [n, 3H]
        self.X: dict[int, list[torch.Tensor]] = {}  # layer -> per step x̂, [n, d]

    def steps_per_flush(self) -> int:
        """Steps whose sums fit in GRAD_SUM_BYTES (at least 1). Unforked: one sum per m{l}/logits receiver, one
        layer's ``[3H, n, d]`` gradient while flushing, and one ``x̂`` per layer per step; forked: one sum per
        receiver (all fit: flush once per batch; else every step)."""
        g, row = self.graph, self.D.shape[1] * self.D.element_size()
        fixed = (g.n_layers + 1 + 3 * g.n_heads) * row if self.fast else len(g.receivers) * row
        per_step = g.n_layers * row if self.fast else 0
        if per_step == 0:
            return 1 << 30 if fixed <= GRAD_SUM_BYTES else 1
        return max(1, (GRAD_SUM_BYTES - fixed) // per_step)

    def add_rows(self, cols: list[int], n_prev: int, g: torch.Tensor) -> None:
        key = cols[0]
        if key in self.rows:
            self.rows[key][2] += g
        else:
            self.rows[key] = [cols, n_prev, g.clone()]

    def flush(self, scores: torch.Tensor) -> None:
        """``scores[s, r] -= D[s] · Σ grad_r`` for everything summed so far (``L = -metric``); resets the sums."""
        D, g = self.D, self.graph
        for cols, n_prev, grad in self.rows.values():
            scores[:n_prev, cols] -= (D[:n_prev] @ grad.T).double()
        for layer, G in self.G.items():
            f = self.fast[layer]  # type: ignore[index]
            grad = torch.bmm(G.transpose(0, 1), f.Wp)  # [3H, n, d]
            if layer in self.A:
                grad -= self.A[layer].T[:, :, None]
            grad -= torch.einsum("knh,knd->hnd", torch.stack(self.B[layer]), torch.stack(self.X[layer]))
            H = g.n_heads
            cols = [g.receiver_index[f"a{layer}.h{h}<{c}>"] for c in "qkv" for h in range(H)]
            n_prev = g.n_upstream(f"a{layer}.h0<q>")
            scores[:n_prev, cols] -= (D[:n_prev] @ grad.reshape(3 * H, -1).T).double()
        self.rows, self.G, self.A, self.B, self.X = {}, {}, {}, {}, {}


def _accumulate(bridge: Any, graph: Graph, task: TaskData, idx: torch.Tensor, metric: str, embed: torch.Tensor,
                sums: _Sums) -> None:
    """One forward with the given input embedding and one backward; adds every receiver's ``∂(metric)/∂x_r``
    (in the pieces ``_Sums`` keeps) into ``sums``."""
    fast = sums.fast
    bridge.set_use_split_qkv_input(fast is None)
    bridge.set_use_hook_mlp_in(True)
    H = graph.n_heads
    dtype = sums.D.dtype
    leaf = embed.detach().clone().requires_grad_(True)
    box: dict[str, torch.Tensor] = {}
    clean, end = task.clean[idx], task.end[idx]
    n = clean.numel()

    def on_embed(t: torch.Tensor, hook: Any) -> torch.Tensor:
        return leaf.to(t.dtype)

    def full_grad(grad: torch.Tensor, cols: list[int], n_prev: int) -> None:
        g = grad.to(dtype)
        if g.dim() == 4:  # forked q/k/v input [b, p, H, d] -> one row per head
            if g.shape[2] != H:
                raise ValueError(f"receiver gradient has {g.shape[2]} heads but the graph has {H}: this attention "
                                 "layout gives no per-query-head q/k/v input, so edge scores cannot be attributed")
            g = g.permute(2, 0, 1, 3).reshape(H, -1)
        else:
            g = g.reshape(1, -1)
        sums.add_rows(cols, n_prev, g)

    def receiver(x: torch.Tensor, hook: Any, cols: list[int], n_prev: int) -> torch.Tensor:
        # mlp_in / logits: a new tensor, since the hook may be handed the residual stream itself, whose gradient
        # also carries the skip path; forked q/k/v inputs are already this receiver's own per-head copies
        if x.dim() == 3:
            x = x.clone()
        x.register_hook(partial(full_grad, cols=cols, n_prev=n_prev))
        return x

    def final(x: torch.Tensor, hook: Any) -> None:
        box["x"] = receiver(x, hook, [graph.receiver_index["logits"]], len(graph.senders))
        raise _Stop

    inv_s: dict[int, torch.Tensor] = {}

    def on_ln1(x: torch.Tensor, hook: Any, layer: int) -> None:
        f = fast[layer]  # type: ignore[index]
        if layer in inv_s:  # the q/k/v gradients would not know which x̂ they belong to
            raise RuntimeError(f"blocks.{layer}.ln1 ran twice in one forward; the unforked q/k/v gradient "
                               "assumes one ln1 per block")
        x = x.detach().to(dtype).reshape(n, -1)
        if not f.rms:
            x = x - x.mean(-1, keepdim=True)
        s = (x.pow(2).mean(-1, keepdim=True) + f.eps).sqrt()
        inv_s[layer] = 1.0 / s  # [n, 1]
        sums.X.setdefault(layer, []).append(x / s)
        sums.B.setdefault(layer, []).append(torch.zeros(n, 3 * H, dtype=dtype))  # this step's (x̂·u)/d
        if layer not in sums.G:
            sums.G[layer] = torch.zeros(n, 3 * H, fast[layer].Wp.shape[1], dtype=dtype)  # type: ignore[index]
            if f.rowsum is not None:
                sums.A[layer] = torch.zeros(n, 3 * H, dtype=dtype)

    def proj_grad(grad: torch.Tensor, layer: int, part: int, val: torch.Tensor, r: torch.Tensor) -> None:
        f = fast[layer]  # type: ignore[index]
        g = grad.to(dtype).reshape(n, H, -1) * r[:, :, None]  # g / s
        d = sums.D.shape[1] // n
        sl = slice(part * H, (part + 1) * H)
        sums.G[layer][:, sl] += g
        sums.B[layer][-1][:, sl] = (g * (val - f.const[part])).sum(-1) / d
        if f.rowsum is not None:
            sums.A[layer][:, sl] += (g * f.rowsum[part]).sum(-1) / d

    def on_proj(t: torch.Tensor, hook: Any, layer: int, part: int) -> torch.Tensor:
        val = t.detach().to(dtype).reshape(n, H, -1)
        t.register_hook(partial(proj_grad, layer=layer, part=part, val=val, r=inv_s[layer]))
        return t

    hooks: list[tuple[str, Any]] = [("hook_embed", on_embed)]
    for layer in range(graph.n_layers):
        n_prev = graph.n_upstream(f"a{layer}.h0<q>")
        if fast is None:
            for c in "qkv":
                cols = [graph.receiver_index[f"a{layer}.h{h}<{c}>"] for h in range(H)]
                hooks.append((f"blocks.{layer}.hook_{c}_input", partial(receiver, cols=cols, n_prev=n_prev)))
        else:
            hooks.append((f"blocks.{layer}.ln1.hook_in", partial(on_ln1, layer=layer)))
            hooks += [(f"blocks.{layer}.attn.{c}.hook_out", partial(on_proj, layer=layer, part=i))
                      for i, c in enumerate("qkv")]
        hooks.append((f"blocks.{layer}.hook_mlp_in", partial(receiver, cols=[graph.receiver_index[f"m{layer}"]],
                                                             n_prev=graph.n_upstream(f"m{layer}"))))
    # GQA: one k/v input per query head (MIB's convention; a no-op otherwise)
    with (ungrouped(bridge) if fast is None else _kv_per_query_head(bridge)):
        try:
            with bridge.hooks(fwd_hooks=hooks + [(FINAL, final)]):
                bridge(clean)
        except _Stop:
            pass
        x = box["x"][torch.arange(clean.shape[0]), end]
        logits = bridge.unembed(bridge.ln_final(x[:, None, :]))[:, 0]
        m = metric_values(metric, logits, task.targets[idx], task.signs[idx])
        m.sum().backward()  # ∂(metric)/∂x; flush() subtracts, giving ∂L/∂x with L = -metric
