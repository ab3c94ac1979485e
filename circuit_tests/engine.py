"""The patching engine: evaluate a circuit in one cached pass plus one patched pass.

Edge level (EAP-IG's difference trick, reference/metrics.md §3.2): during the patched run on the clean
prompts every sender ``s`` records ``D_s = h_s(replacement) - h_s(current)``; each receiver input ``r`` gets
``input_r += Σ_{s upstream of r, (s→r) ∉ C} D_s``. Per receiver group we sum over whichever side is smaller:
the out-of-circuit senders, or ``Σ_all D - Σ_in-circuit D`` — so a sparse circuit costs a handful of small
matmuls per layer and the full circuit costs nothing (it reproduces the clean run exactly).
Node level: every node outside the circuit has its output replaced (heads via ``hook_z``, MLPs via
``hook_mlp_out``), which equals the edge-level evaluation of all edges among the nodes.

Replacement (the ablation): ``corrupted`` = the same example's corrupted prompt (interchange), ``mean`` =
per-node mean over the real positions of all corrupted prompts, ``mean_per_position`` = per-node,
per-position mean, ``zero`` = 0. Positional embeddings and attention output biases are never ablated.

Shapes: tokens ``[b, p]``; per-head outputs ``[b, p, h, d_model]``; logits returned at END only, ``[N, V]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from .runtime import configure

configure()

import torch  # noqa: E402

from .graph import Circuit, Graph  # noqa: E402
from .tasks.base import TaskData  # noqa: E402

ABLATIONS = ("corrupted", "mean", "mean_per_position", "zero")
FINAL = "ln_final.hook_in"  # the residual stream after the last block: the logits receiver


class _Stop(Exception):
    """Raised from the final hook: the rest of the forward (the full-vocabulary unembedding) is not needed."""


@dataclass
class Evaluation:
    """Logits at END for the full model on clean and corrupted prompts and for the circuit run ([N, V] each).

    ``baseline`` is the empty circuit under the same ablation: equal to ``corrupted`` for interchange
    ablation (by construction), computed by an extra patched pass for mean/zero ablation.
    """

    clean: torch.Tensor
    corrupted: torch.Tensor
    circuit: torch.Tensor
    baseline: torch.Tensor
    ablation: str


@dataclass
class _Group:
    """How one receiver group (q, k or v of a layer's heads; an MLP input; the logits) gets its adjustment.

    ``out``: ``adj = W_out @ D[:n_prev]`` with the dense out-of-circuit mask (a GEMM on a view, no copy);
    ``in``: ``adj = total - W_in @ D[idx]`` over the few senders with an in-circuit edge (a small gather);
    ``none``: every upstream edge is in the circuit.
    """

    n_prev: int
    mode: str  # "none" | "out" | "in"
    idx: torch.Tensor | None  # sender indices gathered in "in" mode
    weights: torch.Tensor  # [R, n_prev] out-mask ("out") or [R, len(idx)] in-mask ("in")
    per_head: bool


GATHER_FRACTION = 0.25  # use the gather ("in") form when at most this share of upstream senders is in the circuit


def _plan(circuit: Circuit) -> dict[str, _Group]:
    """Choose, per receiver group, the cheaper of the two exact formulations."""
    g = circuit.graph
    ing = circuit.in_graph()  # [S, R]
    plans: dict[str, _Group] = {}

    def group(key: str, cols: list[int], n_prev: int, per_head: bool) -> None:
        sub_in = ing[:n_prev, cols]  # [n_prev, R]
        if bool(sub_in.all()):
            plans[key] = _Group(n_prev, "none", None, torch.empty(0), per_head)
            return
        rows = sub_in.any(1).nonzero().flatten()
        if len(rows) <= GATHER_FRACTION * n_prev:
            plans[key] = _Group(n_prev, "in", rows, sub_in[rows].T.float().contiguous(), per_head)
        else:
            plans[key] = _Group(n_prev, "out", None, (~sub_in).T.float().contiguous(), per_head)

    H = g.n_heads
    for layer in range(g.n_layers):
        # q, k and v of a layer read the same senders: one GEMM over D serves all three (one read of D)
        cols = [g.receiver_index[f"a{layer}.h{h}<{c}>"] for c in "qkv" for h in range(H)]
        group(f"blocks.{layer}.qkv", cols, g.n_upstream(f"a{layer}.h0<q>"), True)
        group(f"blocks.{layer}.hook_mlp_in", [g.receiver_index[f"m{layer}"]], g.n_upstream(f"m{layer}"), False)
    group(FINAL, [g.receiver_index["logits"]], len(g.senders), False)
    return plans


class PatchingEngine:
    """Evaluates circuits on one model (a TransformerBridge in eval mode)."""

    def __init__(self, bridge: Any, graph: Graph | None = None):
        self.bridge = bridge.eval()
        shape = Graph.from_bridge(bridge)
        self.graph = graph or shape
        if self.graph != shape:
            raise ValueError(f"graph {self.graph} does not match the model {shape}")
        self.W_O = bridge.W_O.detach()  # [L, H, d_head, d_model]
        self._plan_key: frozenset | None = None
        self._plan: dict[str, _Group] = {}

    # ------------------------------------------------------------------ public API
    def evaluate(self, task: TaskData, circuit: Circuit, ablation: str = "corrupted", batch_size: int = 32) -> Evaluation:
        """Full model (clean, corrupted) and circuit logits at END over the whole task, in batches."""
        if ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {ablation!r}; expected one of {ABLATIONS}")
        if circuit.graph != self.graph:
            raise ValueError("circuit was resolved against a different graph")
        means = self._means(task, batch_size) if ablation.startswith("mean") else None
        out: dict[str, list[torch.Tensor]] = {"clean": [], "corrupted": [], "circuit": [], "baseline": []}
        empty = Circuit(self.graph, frozenset(), level="edge")  # no edge at all: not even input->logits
        for start in range(0, len(task), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(task)))
            clean, corr, end = task.clean[idx], task.corrupted[idx], task.end[idx]
            cache, clean_end, corr_end = self._cached_pass(clean, corr, end)
            repl = self._replacement(cache, ablation, means, clean.shape)
            out["clean"].append(clean_end)
            out["corrupted"].append(corr_end)
            out["circuit"].append(self._patched(clean, end, circuit, repl))
            out["baseline"].append(corr_end if ablation == "corrupted" else self._patched(clean, end, empty, repl))
        cat = {k: torch.cat(v) for k, v in out.items()}
        return Evaluation(cat["clean"], cat["corrupted"], cat["circuit"], cat["baseline"], ablation)

    # ------------------------------------------------------------------ passes
    def _logits_at(self, tokens: torch.Tensor, end: torch.Tensor | None, hooks: list, final: Callable | None = None) -> torch.Tensor | None:
        """Run ``tokens`` with ``hooks``; logits at rows' END positions only (unembedding just those rows).

        The forward stops at the final LayerNorm's input (``final`` may adjust it first: the logits receiver),
        which skips the unembedding of every other position — about a third of a GPT-2 forward.
        """
        box: dict[str, torch.Tensor] = {}

        def grab(x: torch.Tensor, hook: Any) -> None:
            if final is not None:
                x = final(x, hook)
            box["x"] = x
            raise _Stop

        try:
            with self.bridge.hooks(fwd_hooks=hooks + [(FINAL, grab)]):
                self.bridge(tokens)
        except _Stop:
            pass
        if end is None:
            return None
        x = box["x"][torch.arange(tokens.shape[0]), end]
        return self.bridge.unembed(self.bridge.ln_final(x[:, None, :]))[:, 0]

    def _sender_names(self) -> list[str]:
        L = self.graph.n_layers
        return ["hook_embed"] + [f"blocks.{l}.attn.hook_z" for l in range(L)] + [f"blocks.{l}.hook_mlp_out" for l in range(L)]

    def _set_flags(self, on: bool) -> None:
        self.bridge.set_use_split_qkv_input(on)
        self.bridge.set_use_hook_mlp_in(on)

    @torch.no_grad()
    def _cached_pass(self, clean: torch.Tensor, corr: torch.Tensor, end: torch.Tensor):
        """One batched pass over clean+corrupted; keeps sender activations of the corrupted half."""
        self._set_flags(False)
        b = clean.shape[0]
        names = set(self._sender_names())
        cache: dict[str, torch.Tensor] = {}

        def keep(t: torch.Tensor, hook: Any, name: str) -> None:
            cache[name] = t[b:].detach()

        hooks = [(n, partial(keep, name=n)) for n in names]
        logits = self._logits_at(torch.cat([clean, corr]), torch.cat([end, end]), hooks)
        return cache, logits[:b], logits[b:]

    @torch.no_grad()
    def _means(self, task: TaskData, batch_size: int) -> dict[str, torch.Tensor]:
        """Per-node sums over the real positions of every corrupted prompt → means (and per-position means)."""
        self._set_flags(False)
        sums: dict[str, torch.Tensor] = {}
        counts = torch.zeros(task.corrupted.shape[1], dtype=torch.float64)
        names = self._sender_names()
        for start in range(0, len(task), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(task)))
            toks, end = task.corrupted[idx], task.end[idx]
            mask = (torch.arange(toks.shape[1])[None, :] <= end[:, None]).double()  # [b, p]
            counts += mask.sum(0)
            cache: dict[str, torch.Tensor] = {}

            def keep(t: torch.Tensor, hook: Any, name: str) -> None:
                cache[name] = t.detach()

            self._logits_at(toks, None, [(n, partial(keep, name=n)) for n in names])
            for n, t in cache.items():
                m = mask.view(*mask.shape, *([1] * (t.dim() - 2)))
                s = (t.double() * m).sum(0)  # [p, ...]
                sums[n] = s if n not in sums else sums[n] + s
        per_pos = {n: (s / counts.clamp_min(1).view(-1, *([1] * (s.dim() - 1)))).float() for n, s in sums.items()}
        overall = {n: (s.sum(0) / counts.sum()).float() for n, s in sums.items()}
        return {"per_position": per_pos, "overall": overall}  # type: ignore[return-value]

    def _replacement(self, cache: dict[str, torch.Tensor], ablation: str, means: Any, shape: torch.Size) -> dict[str, torch.Tensor]:
        """Sender replacements for one batch, broadcastable to ``[b, p, ...]``."""
        b, p = shape
        if ablation == "corrupted":
            return cache
        if ablation == "zero":
            return {n: torch.zeros_like(t) for n, t in cache.items()}
        if ablation == "mean":
            return {n: t.view(1, 1, *t.shape).expand(b, p, *t.shape) for n, t in means["overall"].items()}
        return {n: t[:p].unsqueeze(0).expand(b, *t[:p].shape) for n, t in means["per_position"].items()}

    @torch.no_grad()
    def _patched(self, clean: torch.Tensor, end: torch.Tensor, circuit: Circuit, repl: dict[str, torch.Tensor]) -> torch.Tensor:
        if circuit.level == "node" and circuit.named_nodes:
            return self._node_pass(clean, end, circuit, repl)
        return self._edge_pass(clean, end, circuit, repl)

    def _node_pass(self, clean: torch.Tensor, end: torch.Tensor, circuit: Circuit, repl: dict[str, torch.Tensor]) -> torch.Tensor:
        """Replace the outputs of nodes outside the circuit (input is always kept)."""
        self._set_flags(False)
        g, keep = self.graph, circuit.nodes
        hooks: list[tuple[str, Callable]] = []
        for layer in range(g.n_layers):
            drop = [h for h in range(g.n_heads) if f"a{layer}.h{h}" not in keep]
            if drop:
                hooks.append((f"blocks.{layer}.attn.hook_z", partial(_replace_heads, heads=torch.tensor(drop), src=repl[f"blocks.{layer}.attn.hook_z"])))
            if f"m{layer}" not in keep:
                hooks.append((f"blocks.{layer}.hook_mlp_out", partial(_replace_all, src=repl[f"blocks.{layer}.hook_mlp_out"])))
        return self._logits_at(clean, end, hooks)

    def _edge_pass(self, clean: torch.Tensor, end: torch.Tensor, circuit: Circuit, repl: dict[str, torch.Tensor]) -> torch.Tensor:
        """The difference trick: senders record replacement - current, receivers add the out-of-circuit sum.

        ``D`` is sender-major ``[S, b*p*d]`` so every group's matmul is one GEMM over a contiguous prefix;
        ``totals[n]`` is the running sum of the first ``n`` senders' differences (for the "in" form).
        """
        g = self.graph
        if self._plan_key is not circuit.edges and self._plan_key != circuit.edges:
            self._plan_key, self._plan = circuit.edges, _plan(circuit)  # one circuit at a time is the common case
        plans = self._plan
        self._set_flags(True)
        b, p = clean.shape
        H = g.n_heads
        d = self.W_O.shape[-1]
        D = torch.empty(len(g.senders), b * p * d, dtype=self.W_O.dtype)
        running = torch.zeros(b * p * d, dtype=self.W_O.dtype)
        totals: dict[int, torch.Tensor] = {}
        need_total = {pl.n_prev for pl in plans.values() if pl.mode == "in"}

        def record(i: int, diff: torch.Tensor, n: int) -> None:
            """Senders fire in graph order, so after this call the first i+n senders are in D."""
            D[i:i + n] = diff
            if need_total:
                running.add_(diff.sum(0))
                if i + n in need_total:
                    totals[i + n] = running.clone()

        def on_embed(t: torch.Tensor, hook: Any) -> None:
            record(0, (repl["hook_embed"] - t).reshape(1, -1), 1)

        def on_z(z: torch.Tensor, hook: Any, layer: int) -> None:
            diff = torch.einsum("bphk,hkd->hbpd", repl[f"blocks.{layer}.attn.hook_z"] - z, self.W_O[layer])
            record(g.head_sender(layer, 0), diff.reshape(H, -1), H)

        def on_mlp(t: torch.Tensor, hook: Any, layer: int) -> None:
            record(g.mlp_sender(layer), (repl[f"blocks.{layer}.hook_mlp_out"] - t).reshape(1, -1), 1)

        def adjustment(plan: _Group) -> torch.Tensor:
            if plan.mode == "out":
                return plan.weights @ D[: plan.n_prev]  # [R, b*p*d]
            return totals[plan.n_prev].unsqueeze(0) - plan.weights @ D[plan.idx]

        def on_recv(x: torch.Tensor, hook: Any, plan: _Group) -> torch.Tensor:
            return x if plan.mode == "none" else x + adjustment(plan).view(b, p, d)

        qkv_adj: dict[int, torch.Tensor] = {}

        def on_qkv(x: torch.Tensor, hook: Any, layer: int, part: int) -> torch.Tensor:
            plan = plans[f"blocks.{layer}.qkv"]
            if plan.mode == "none":
                return x
            if part == 0 or layer not in qkv_adj:  # q fires first; k and v reuse the same GEMM
                qkv_adj[layer] = adjustment(plan).view(3, H, b, p, d)
            return x + qkv_adj[layer][part].permute(1, 2, 0, 3)

        hooks: list[tuple[str, Callable]] = [("hook_embed", on_embed)]
        for layer in range(g.n_layers):
            hooks.append((f"blocks.{layer}.attn.hook_z", partial(on_z, layer=layer)))
            hooks.append((f"blocks.{layer}.hook_mlp_out", partial(on_mlp, layer=layer)))
            hooks += [(f"blocks.{layer}.hook_{c}_input", partial(on_qkv, layer=layer, part=i)) for i, c in enumerate("qkv")]
            hooks.append((f"blocks.{layer}.hook_mlp_in", partial(on_recv, plan=plans[f"blocks.{layer}.hook_mlp_in"])))
        try:
            return self._logits_at(clean, end, hooks, final=partial(on_recv, plan=plans[FINAL]))
        finally:
            self._set_flags(False)


def _replace_heads(z: torch.Tensor, hook: Any, heads: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    z = z.clone()
    z[:, :, heads] = src[:, :, heads].to(z.dtype)
    return z


def _replace_all(t: torch.Tensor, hook: Any, src: torch.Tensor) -> torch.Tensor:
    return src.to(t.dtype).expand_as(t).clone()
