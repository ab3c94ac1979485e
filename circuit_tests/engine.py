"""The patching engine: evaluate a circuit in one cached pass plus one patched pass.

Edge level (EAP-IG's difference trick, reference/metrics.md §3.2): during the patched run on the clean
prompts every sender ``s`` records ``D_s = h_s(replacement) - h_s(current)``; each receiver input ``r`` gets
``input_r += Σ_{s upstream of r, (s→r) ∉ C} D_s``. Per receiver group we sum over whichever side is smaller:
the out-of-circuit senders, or ``Σ_all D - Σ_in-circuit D`` — as a sparse (CSR) product when that side is
sparse, so a sparse or near-full circuit costs about one vector add per edge, and the full circuit costs
nothing (no sender records: it is a plain run of the clean prompts).
q/k/v receivers: the engine computes ``lin_h(ln1(x + adj_r))`` itself from the layer's ln1 and q/k/v
linears, standing in for the linears' forward (so their product on the unpatched input is skipped): one
batched product per layer over the ``[3H, b*p, d_model]`` inputs with the norm folded in (its weight and bias
into the product's weights; LayerNorm's centring done in place and both norms' division applied to the
product), instead of the bridge's split-qkv fork, which copies the residual stream per head three times and
normalises each copy; the fork stays the fallback for attention modules without separate q/k/v linears.
The attention output projection is skipped too: ``o(z) = o(z_repl) - Σ_h D_h`` from the head senders'
differences, which the pass computes anyway.
Node level: every node outside the circuit has its output replaced (heads via ``hook_z``, MLPs via
``hook_mlp_out``), which equals the edge-level evaluation of all edges among the nodes.

Replacement (the ablation): ``corrupted`` = the same example's corrupted prompt (interchange), ``mean`` =
per-node mean over the real positions of all corrupted prompts, ``mean_per_position`` = per-node,
per-position mean, ``zero`` = 0. Positional embeddings and attention output biases are never ablated.

Grouped-query attention (LLaMA family): q, k and v receivers are per *query* head (the MIB convention);
the edge pass runs the model as its ungrouped equivalent (``gqa.ungrouped``), so patching ``s->a{l}.h{h}<k>``
changes only query head ``h``'s keys although the model shares them among ``n_heads // n_kv_heads`` heads.
Missing biases read as zeros, so bias-free models need nothing else.

Shapes: tokens ``[b, p]``; per-head outputs ``[b, p, h, d_model]``; logits returned at END only, ``[N, V]``.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

import torch  # noqa: E402  (no process settings on import: runtime.EvaluationScope applies them)

from .gqa import bias_or_zeros, ungrouped  # noqa: E402
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
    """How one receiver group (q, k and v of a layer's heads; an MLP input; the logits) gets its adjustment.

    ``dense``: ``adj = W_out @ D[:n_prev]`` with the dense out-of-circuit mask (a GEMM on a view, no copy);
    ``sparse``: ``adj = M @ D[:n_prev]`` with ``M`` a CSR matrix of whichever mask has fewer entries — the
    out-of-circuit mask, or the in-circuit one with ``adj = total - M @ D[:n_prev]`` (``from_total``), where
    ``total`` is the running sum of the first ``n_prev`` differences. A sparse circuit's in-circuit edges are a
    few per receiver but cover most senders of a 3·H-receiver q/k/v group, so per-receiver sparsity beats
    any dense form: the cost is one axpy per edge instead of one multiply-add per receiver and sender;
    ``none``: every upstream edge is in the circuit.
    """

    n_prev: int
    mode: str  # "none" | "dense" | "sparse"
    weights: torch.Tensor  # [R, n_prev]: dense out-mask ("dense") or CSR mask ("sparse")
    from_total: bool = False  # "sparse" only: weights is the in-circuit mask, subtract from the running total


SPARSE_DENSITY = 0.08  # CSR product when the smaller mask has at most this share of the [R, n_prev] entries


def _plan(circuit: Circuit, dtype: torch.dtype = torch.float32) -> dict[str, _Group]:
    """Choose, per receiver group, the cheaper of the exact formulations (masks in the model's ``dtype``)."""
    g = circuit.graph
    ing = circuit.in_graph()  # [S, R]
    plans: dict[str, _Group] = {}

    def group(key: str, cols: list[int], n_prev: int) -> None:
        sub_in = ing[:n_prev, cols].T  # [R, n_prev]
        n_in = int(sub_in.sum())
        n_out = sub_in.numel() - n_in
        if n_out == 0:
            plans[key] = _Group(n_prev, "none", torch.empty(0))
        elif min(n_in, n_out) <= SPARSE_DENSITY * sub_in.numel():
            from_total = n_in < n_out
            mask = sub_in if from_total else ~sub_in
            with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is stable
                warnings.simplefilter("ignore", UserWarning)
                csr = mask.to(dtype).to_sparse_csr()
            plans[key] = _Group(n_prev, "sparse", csr, from_total)
        else:
            plans[key] = _Group(n_prev, "dense", (~sub_in).to(dtype).contiguous())

    H = g.n_heads
    for layer in range(g.n_layers):
        # q, k and v of a layer read the same senders: one product over D serves all three (one read of D)
        cols = [g.receiver_index[f"a{layer}.h{h}<{c}>"] for c in "qkv" for h in range(H)]
        group(f"blocks.{layer}.qkv", cols, g.n_upstream(f"a{layer}.h0<q>"))
        group(f"blocks.{layer}.hook_mlp_in", [g.receiver_index[f"m{layer}"]], g.n_upstream(f"m{layer}"))
    group(FINAL, [g.receiver_index["logits"]], len(g.senders))
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
        self.b_O = bias_or_zeros(bridge, "b_O", (self.graph.n_layers, self.W_O.shape[-1]))  # [L, d_model]
        self._scratch: dict[str, torch.Tensor] = {}
        self._folded: dict[int, tuple] = {}  # layer -> (dtype, source tensors, their versions, _FoldedQKV)
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

    def _out_names(self) -> list[str]:
        """The attention output projections' outputs: cached so the patched pass can skip that product (``_o_modules``)."""
        return [f"blocks.{l}.attn.o.hook_out" for l in range(self.graph.n_layers)] if self._o_modules() is not None else []

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised scratch tensor kept for the next pass of the same shape.

        Why kept: ``D`` is hundreds of MB (senders x batch x positions x d_model), and a fresh allocation of that
        size is a fresh mapping whose every 4 KiB page faults on first write (~0.05 forwards per pass).
        """
        t = self._scratch.get(name)
        if t is None or t.shape != shape or t.dtype != dtype:
            self._scratch.pop(name, None)  # release the old one before allocating its replacement
            t = self._scratch[name] = torch.empty(shape, dtype=dtype)
        return t

    def _set_flags(self, on: bool, split_qkv: bool | None = None) -> None:
        self.bridge.set_use_split_qkv_input(on if split_qkv is None else split_qkv)
        self.bridge.set_use_hook_mlp_in(on)

    def _qkv_modules(self) -> list[tuple[torch.nn.Module, list[torch.nn.Module]]] | None:
        """Per layer the raw ln1 module and the q/k/v ``nn.Linear``s, or None when some layer lacks them.

        With these the engine computes each q/k/v receiver's projection itself from ``ln1(x + adj_r)`` (the
        same modules the bridge's split-qkv path applies) in place of the linears' own product, instead of
        letting the bridge fork the residual stream into ``[b, p, h, d_model]`` copies three times per layer;
        without them it uses that fork.
        """
        out = []
        for blk in self.bridge.blocks:
            attn = blk.attn
            ln = getattr(attn, "_ln1_module", None)
            lins = [getattr(getattr(attn, c, None), "original_component", None) for c in "qkv"]
            if not isinstance(ln, torch.nn.Module) or not all(isinstance(m, torch.nn.Linear) for m in lins):
                return None
            out.append((ln, lins))
        return out

    def _folded_qkv(self, layer: int, norm: torch.nn.Module, lins: list[torch.nn.Module], dtype: torch.dtype) -> "_FoldedQKV":
        """``_fold_qkv`` for one layer, kept while its source tensors are unchanged (same objects, no in-place
        write since): folding copies 3·d_model² weights per layer, ~0.07 forwards per pass for SmolLM2."""
        sources = [t for m in (norm, *lins) for t in m.parameters(recurse=False)]
        versions = [t._version for t in sources]
        hit = self._folded.get(layer)
        if hit is None or hit[0] != dtype or len(hit[1]) != len(sources) or hit[2] != versions \
                or any(a is not b for a, b in zip(hit[1], sources)):  # identity: the entry holds its sources
            hit = self._folded[layer] = (dtype, sources, versions, _fold_qkv(norm, lins, self.graph.n_heads, dtype))
        return hit[3]

    def _o_modules(self) -> list[torch.nn.Module] | None:
        """Per layer the attention output projection's module, or None when some layer lacks one.

        With these the edge pass skips that product: ``o`` is affine, so ``o(z) = o(z_repl) - Σ_h D_h`` with
        ``D_h = (z_repl,h - z_h) W_O[h]``, the head senders' differences it computes anyway, and ``o(z_repl)``
        cached (interchange), averaged (mean) or the bias (zero).
        """
        out = []
        for blk in self.bridge.blocks:
            o = getattr(blk.attn, "o", None)
            m = getattr(o, "original_component", None)
            if not isinstance(m, torch.nn.Module) or not hasattr(o, "hook_out"):
                return None
            out.append(m)
        return out

    @torch.no_grad()
    def _cached_pass(self, clean: torch.Tensor, corr: torch.Tensor, end: torch.Tensor):
        """One batched pass over clean+corrupted; keeps sender activations of the corrupted half."""
        self._set_flags(False)
        b = clean.shape[0]
        names = self._sender_names() + self._out_names()
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
        names = self._sender_names() + self._out_names()
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
        if ablation == "zero":  # the output projections' bias stays (attention output biases are never ablated)
            bias = {n: self.b_O[l] for l, n in enumerate(self._out_names())}
            return {n: bias[n].to(t.dtype).expand_as(t) if n in bias else torch.zeros_like(t) for n, t in cache.items()}
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

        ``D`` is sender-major ``[S, b*p*d]`` so every group's product reads a contiguous prefix;
        ``totals[n]`` is the running sum of the first ``n`` senders' differences (for ``from_total`` groups).
        Senders write their differences straight into ``D``; all q/k/v groups share one ``[3H, b*p*d]`` buffer.
        Only senders that some not-all-in receiver group reads record (none for the full circuit: a plain run).
        """
        g = self.graph
        if self._plan_key is not circuit.edges and self._plan_key != circuit.edges:
            self._plan_key, self._plan = circuit.edges, _plan(circuit, self.W_O.dtype)  # one circuit at a time is the common case
        plans = self._plan
        b, p = clean.shape
        H = g.n_heads
        d = self.W_O.shape[-1]
        dtype = self.W_O.dtype
        n_needed = max((pl.n_prev for pl in plans.values() if pl.mode != "none"), default=0)
        D = self._buffer("D", (n_needed, b * p * d), dtype)
        running = torch.zeros(b * p * d, dtype=dtype)
        totals: dict[int, torch.Tensor] = {}
        need_total = {pl.n_prev for pl in plans.values() if pl.from_total}

        def record(i: int, n: int, diff_sum: torch.Tensor | None = None) -> None:
            """Senders fire in graph order, so once sender ``i+n-1`` has written ``D[i:i+n]`` the first i+n are in D."""
            if need_total:
                running.add_(D[i] if diff_sum is None else diff_sum)
                if i + n in need_total:
                    totals[i + n] = running.clone()

        def on_embed(t: torch.Tensor, hook: Any) -> None:
            torch.sub(repl["hook_embed"], t, out=D[0].view(t.shape))
            record(0, 1)

        o_out: dict[int, torch.Tensor] = {}

        def on_z(z: torch.Tensor, hook: Any, layer: int) -> None:
            i = g.head_sender(layer, 0)
            dz = (repl[f"blocks.{layer}.attn.hook_z"] - z).permute(2, 0, 1, 3).reshape(H, b * p, -1)
            torch.bmm(dz, self.W_O[layer], out=D[i:i + H].view(H, b * p, d))
            diff_sum = D[i:i + H].sum(0)
            if o_mods is not None:  # o(z) = o(z_repl) - Σ_h D_h
                o_out[layer] = (repl[f"blocks.{layer}.attn.o.hook_out"] - diff_sum.view(b, p, d)).to(z.dtype)
            record(i, H, diff_sum)

        def o_project(inp: torch.Tensor, *args: Any, layer: int, **kwargs: Any) -> torch.Tensor:
            """Stands in for the attention output projection (see ``_o_modules``)."""
            return o_out.pop(layer).view(*inp.shape[:-1], d)

        def on_mlp(t: torch.Tensor, hook: Any, layer: int) -> None:
            i = g.mlp_sender(layer)
            torch.sub(repl[f"blocks.{layer}.hook_mlp_out"], t, out=D[i].view(t.shape))
            record(i, 1)

        def adjusted(plan: _Group, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
            """``x + adj_r`` for every receiver ``r`` of the group (``x``: ``[1, b*p*d]``) as one fused product."""
            if plan.from_total:
                return torch.addmm(x + totals[plan.n_prev], plan.weights, D[: plan.n_prev], alpha=-1, out=out)  # [R, b*p*d]
            return torch.addmm(x, plan.weights, D[: plan.n_prev], out=out)

        def adjustment(plan: _Group) -> torch.Tensor:
            """``adj_r`` alone, ``[R, b*p*d]`` (the sum ``x + adj`` is then taken in the bridge's dtype)."""
            adj = plan.weights @ D[: plan.n_prev]
            return totals[plan.n_prev].unsqueeze(0) - adj if plan.from_total else adj

        def on_recv(x: torch.Tensor, hook: Any, plan: _Group) -> torch.Tensor:
            return x if plan.mode == "none" else x + adjustment(plan).view(b, p, d).to(x.dtype)

        mods = self._qkv_modules()
        o_mods = self._o_modules()
        qkv_layers = [l for l in range(g.n_layers) if plans[f"blocks.{l}.qkv"].mode != "none"]
        resid: dict[int, torch.Tensor] = {}
        projected: dict[int, list] = {}  # layer -> [q/k/v products [3H, b*p, e], parts not yet taken]
        folded = {l: self._folded_qkv(l, *mods[l], dtype) for l in qkv_layers} if mods is not None else {}
        work = self._buffer("qkv", (3 * H, b * p * d), dtype) if folded else None  # the q/k/v inputs of one layer

        def on_ln1_in(x: torch.Tensor, hook: Any, layer: int) -> None:
            resid[layer] = x

        def project(inp: torch.Tensor, *args: Any, layer: int, part: int, **kwargs: Any) -> torch.Tensor:
            """Stands in for the q/k/v ``nn.Linear`` (whose own product on the unpatched input is skipped): on the
            layer's first call computes ``lin_h(ln1(x + adj_r))`` for all 3·H receivers as one batched product."""
            if layer not in projected:
                x = resid.pop(layer).reshape(1, b * p * d).to(dtype)
                y = adjusted(plans[f"blocks.{layer}.qkv"], x, out=work).view(3 * H, b * p, d)
                projected[layer] = [folded[layer].apply(y), 3]
            out, left = projected[layer]
            if left == 1:
                del projected[layer]
            else:
                projected[layer][1] = left - 1
            return out[part * H:(part + 1) * H].view(H, b, p, -1).permute(1, 2, 0, 3).reshape(b, p, -1).to(inp.dtype)

        qkv_adj: dict[int, torch.Tensor] = {}

        def on_qkv(x: torch.Tensor, hook: Any, layer: int, part: int) -> torch.Tensor:
            plan = plans[f"blocks.{layer}.qkv"]
            if plan.mode == "none":
                return x
            if part == 0 or layer not in qkv_adj:  # q fires first; k and v reuse the same GEMM
                qkv_adj[layer] = adjustment(plan).view(3, H, b, p, d)
            return x + qkv_adj[layer][part].permute(1, 2, 0, 3)

        hooks: list[tuple[str, Callable]] = [("hook_embed", on_embed)] if n_needed > 0 else []
        stubs: list[tuple[torch.nn.Module, Callable]] = []
        for layer in range(g.n_layers):
            if g.head_sender(layer, 0) < n_needed:
                hooks.append((f"blocks.{layer}.attn.hook_z", partial(on_z, layer=layer)))
                if o_mods is not None:
                    stubs.append((o_mods[layer], partial(o_project, layer=layer)))
            if g.mlp_sender(layer) < n_needed:
                hooks.append((f"blocks.{layer}.hook_mlp_out", partial(on_mlp, layer=layer)))
            if mods is None:
                hooks += [(f"blocks.{layer}.hook_{c}_input", partial(on_qkv, layer=layer, part=i)) for i, c in enumerate("qkv")]
            elif layer in folded:
                hooks.append((f"blocks.{layer}.ln1.hook_in", partial(on_ln1_in, layer=layer)))
                stubs += [(lin, partial(project, layer=layer, part=i)) for i, lin in enumerate(mods[layer][1])]
            hooks.append((f"blocks.{layer}.hook_mlp_in", partial(on_recv, plan=plans[f"blocks.{layer}.hook_mlp_in"])))
        self._set_flags(True, split_qkv=mods is None)
        try:
            with ungrouped(self.bridge), _forwards_replaced(stubs):  # one k/v input per query head (no-op without GQA)
                return self._logits_at(clean, end, hooks, final=partial(on_recv, plan=plans[FINAL]))
        finally:
            self._set_flags(False)


@contextlib.contextmanager
def _forwards_replaced(stubs: list[tuple[torch.nn.Module, Callable]]) -> Iterator[None]:
    """Modules whose ``forward`` is temporarily ``stub`` (an instance attribute, restored on exit, also on error).

    Why: a forward hook can replace a module's output but not skip its computation; the q/k/v and output
    projections' own products, which the engine would throw away, are ~0.2 of a GPT-2 forward.
    """
    saved = [(m, m.__dict__.get("forward")) for m, _ in stubs]
    try:
        for m, stub in stubs:
            m.__dict__["forward"] = stub
        yield
    finally:
        for m, old in saved:
            if old is None:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = old


@dataclass
class _FoldedQKV:
    """One layer's q, k and v projections per query head with the norm before them folded in (see ``apply``).

    ``W [3H, d, e]``: the linears' weights per head (k/v repeated per query head under GQA) times the norm's
    weight; ``c [3H, 1, e]``: the linears' biases plus the products of the norm's bias, or None.
    ``kind``: ``"rms"`` (LLaMA RMSNorm), ``"ln"`` (``nn.LayerNorm``) or ``"module"`` (any other norm: applied
    as its module, then the plain weights).
    """

    kind: str
    norm: torch.nn.Module
    W: torch.Tensor
    c: torch.Tensor | None
    eps: float

    def apply(self, y: torch.Tensor) -> torch.Tensor:
        """``lin(norm(y))`` per receiver for ``y [3H, b*p, d]``, which this overwrites (a scratch buffer).

        LayerNorm = centring, then RMSNorm; the centring is done in place and the division by the rms applied
        to the ``[3H, b*p, e]`` product, so the ``[3H, b*p, d]`` inputs are not normalised into a second buffer
        of that size (``nn.LayerNorm`` there cost as much as the product itself for GPT-2).
        """
        d = y.shape[-1]
        if self.kind == "module":
            out = torch.bmm(self.norm(y.view(-1, d)).view_as(y), self.W)
        else:
            if self.kind == "ln":
                y.sub_(y.mean(-1, keepdim=True))
            inv = torch.linalg.vector_norm(y, dim=-1, keepdim=True).square_().div_(d).add_(self.eps).rsqrt_()
            out = torch.bmm(y, self.W).mul_(inv)
        return out if self.c is None else out.add_(self.c)


def _fold_qkv(norm: torch.nn.Module, lins: list[torch.nn.Module], H: int, dtype: torch.dtype) -> _FoldedQKV:
    """Read one layer's ln1 and q/k/v linears (grouped or not) into a ``_FoldedQKV``."""
    d = lins[0].weight.shape[1]
    e = lins[0].weight.shape[0] // H
    ws, bs = [], []
    for lin in lins:
        n = lin.weight.shape[0] // e  # H for q; the key/value heads for k and v
        w = lin.weight.detach().view(n, e, d)
        bias = None if lin.bias is None else lin.bias.detach().view(n, 1, e)
        if n != H:  # grouped-query attention: query head h reads key/value head h // (H // n)
            w = w.repeat_interleave(H // n, dim=0)
            bias = None if bias is None else bias.repeat_interleave(H // n, dim=0)
        ws.append(w)
        bs.append(bias)
    W = torch.cat(ws).transpose(1, 2)  # [3H, d, e]
    c = None if all(x is None for x in bs) else torch.cat([torch.zeros(H, 1, e, dtype=W.dtype) if x is None else x for x in bs])
    if _is_llama_rms(norm, dtype):
        return _FoldedQKV("rms", norm, W * norm.weight.detach().view(1, d, 1), c, float(norm.variance_epsilon))
    if _is_layer_norm(norm, d, dtype):
        if norm.bias is not None:  # lin(w * n + b) = (W * w) n + W b
            cb = torch.matmul(W.transpose(1, 2), norm.bias.detach()).unsqueeze(1)  # [3H, 1, e]
            c = cb if c is None else c + cb
        if norm.weight is not None:
            W = W * norm.weight.detach().view(1, d, 1)
        return _FoldedQKV("ln", norm, W, c, float(norm.eps))
    return _FoldedQKV("module", norm, W, c, 0.0)


_LLAMA_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")  # weight * x / rms(x), computed in fp32


def _is_llama_rms(ln: torch.nn.Module, dtype: torch.dtype) -> bool:
    """LLaMA-style RMSNorm on float32 (it computes in float32 whatever its input): the engine applies it as a
    per-token scale after the q/k/v product (HF's module makes ~4 elementwise passes over 3·H copies of the
    residual stream per layer)."""
    return type(ln).__name__ in _LLAMA_RMS_NORMS and dtype == torch.float32 and ln.weight.dtype == torch.float32


def _is_layer_norm(ln: torch.nn.Module, d: int, dtype: torch.dtype) -> bool:
    """``nn.LayerNorm`` over the last axis computing in the model's dtype (float32 or float64, as the engine)."""
    return (type(ln) is torch.nn.LayerNorm and tuple(ln.normalized_shape) == (d,) and dtype in (torch.float32, torch.float64)
            and all(t is None or t.dtype == dtype for t in (ln.weight, ln.bias)))


def _replace_heads(z: torch.Tensor, hook: Any, heads: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    z = z.clone()
    z[:, :, heads] = src[:, :, heads].to(z.dtype)
    return z


def _replace_all(t: torch.Tensor, hook: Any, src: torch.Tensor) -> torch.Tensor:
    return src.to(t.dtype).expand_as(t).clone()
