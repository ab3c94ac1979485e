"""Slow, naive references, written straight from the definitions (tests and benchmarks compare against them).

``naive_circuit_logits``: the edge-by-edge definition of circuit evaluation.
``ungrouped_copy``: a grouped-query-attention HF model rebuilt as the equivalent multi-head model (each
query head gets its own copy of its key/value head's weights), as MIB evaluates GQA models
(TransformerLens ``ungroup_grouped_query_attention=True``). The naive references run on that copy, where
every q/k/v input is per query head by construction: independent of the library's ``gqa.ungrouped``.

For every receiver slot (each head's q/k/v input, each MLP input, the logits) it rebuilds the input from
scratch in a Python loop over its upstream senders: ``x - Σ_s h_s(current) + Σ_s (h_s(current) if (s→r) ∈ C
else h_s(replacement))``, using the library's per-head ``hook_result`` (not the engine's z @ W_O route).
"""

from __future__ import annotations

from functools import partial

import time

import torch

from circuit_tests.graph import Circuit
from circuit_tests.metrics import metric_values
from circuit_tests.path_patching import split_qkv_inputs


def ungrouped_copy(hf_model):
    """The multi-head equivalent of a grouped-query HF model (LLaMA family), built from its config and
    state dict (call before the original is wrapped in a bridge: wrapping mutates it). Query head ``h``
    reads key/value head ``h // (n_heads // n_kv_heads)``, as ``repeat_kv`` does."""
    import copy

    cfg = copy.deepcopy(hf_model.config)
    H, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    G = H // kv
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    cfg.num_key_value_heads = H
    state = {}
    for k, v in hf_model.state_dict().items():
        if k.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
            v = v.reshape(kv, d_head, *v.shape[1:]).repeat_interleave(G, 0).reshape(H * d_head, *v.shape[1:])
        state[k] = v.clone()
    out = type(hf_model)(cfg).to(next(hf_model.parameters()).dtype)
    out.load_state_dict(state)
    return out.eval()


def _sender_hooks(graph):
    L, H = graph.n_layers, graph.n_heads
    return ["hook_embed"] + [f"blocks.{l}.attn.hook_result" for l in range(L)] + [f"blocks.{l}.hook_mlp_out" for l in range(L)]


def _split(graph, name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    if name == "hook_embed":
        return {"input": t}
    layer = int(name.split(".")[1])
    if name.endswith("hook_result"):
        return {f"a{layer}.h{h}": t[:, :, h] for h in range(graph.n_heads)}
    return {f"m{layer}": t}


@torch.no_grad()
def naive_circuit_logits(bridge, task, circuit: Circuit, ablation: str = "corrupted") -> torch.Tensor:
    g = circuit.graph
    kv = getattr(bridge.cfg, "n_key_value_heads", None)
    if kv and kv != bridge.cfg.n_heads:
        raise ValueError("naive_circuit_logits needs per-query-head k/v inputs: run it on ungrouped_copy(hf_model)")
    bridge.set_use_attn_result(True)
    bridge.set_use_split_qkv_input(True)
    bridge.set_use_hook_mlp_in(True)
    names = _sender_hooks(g)
    try:
        # replacement values per sender, [N, p, d]
        store: dict[str, torch.Tensor] = {}
        with bridge.hooks(fwd_hooks=[(n, partial(lambda t, hook, n: store.__setitem__(n, t.clone()), n=n)) for n in names]):
            bridge(task.corrupted)
        repl: dict[str, torch.Tensor] = {}
        for n, t in store.items():
            repl.update(_split(g, n, t))
        if ablation == "zero":
            repl = {k: torch.zeros_like(v) for k, v in repl.items()}
        elif ablation in ("mean", "mean_per_position"):
            mask = (torch.arange(task.corrupted.shape[1])[None, :] <= task.end[:, None]).float()  # [N, p]
            new = {}
            for k, v in repl.items():
                if ablation == "mean":
                    m = (v * mask[..., None]).sum((0, 1)) / mask.sum()
                    new[k] = m.expand_as(v)
                else:
                    m = (v * mask[..., None]).sum(0) / mask.sum(0).clamp_min(1)[:, None]
                    new[k] = m.unsqueeze(0).expand_as(v)
            repl = new

        current: dict[str, torch.Tensor] = {}

        def record(t, hook, n):
            current.update(_split(g, n, t))

        def rebuild(x, slot_names, per_head):
            up = g.senders[: g.n_upstream(slot_names[0])]
            outs = []
            for i, slot in enumerate(slot_names):
                xi = x[:, :, i] if per_head else x
                v = xi.clone()
                for s in up:
                    if (s, slot) not in circuit.edges:
                        v = v - current[s] + repl[s]
                outs.append(v)
            return torch.stack(outs, 2) if per_head else outs[0]

        def recv(x, hook, slots, per_head):
            return rebuild(x, slots, per_head)

        hooks = [(n, partial(record, n=n)) for n in names]
        for layer in range(g.n_layers):
            for c in "qkv":
                slots = [f"a{layer}.h{h}<{c}>" for h in range(g.n_heads)]
                hooks.append((f"blocks.{layer}.hook_{c}_input", partial(recv, slots=slots, per_head=True)))
            hooks.append((f"blocks.{layer}.hook_mlp_in", partial(recv, slots=[f"m{layer}"], per_head=False)))
        hooks.append((f"blocks.{g.n_layers - 1}.hook_resid_post", partial(recv, slots=["logits"], per_head=False)))
        with bridge.hooks(fwd_hooks=hooks):
            logits = bridge(task.clean)
        return logits[torch.arange(len(task)), task.end]
    finally:
        bridge.set_use_attn_result(False)
        bridge.set_use_split_qkv_input(False)
        bridge.set_use_hook_mlp_in(False)


@torch.no_grad()
def naive_path_patch(bridge, task, recv, senders, metric: str = "logit_diff", timings: list | None = None):
    """Path patching by its definition, two hooked forwards per sender (metrics.md §6).

    (1) cache clean and corrupted ``hook_z``; (2) run clean with every head frozen to clean except the
    sender, taken from the corrupted run at every position, recording the receivers' inputs; (3) run clean
    again with only the receivers' inputs replaced. Returns ({sender: m_patched - m_clean}, m_clean,
    m_corrupt). ``timings`` (optional) receives ("cache", wall, cpu) and then (sender, wall, cpu) per sender.
    """
    L = bridge.cfg.n_layers
    kv = getattr(bridge.cfg, "n_key_value_heads", None)
    if any(c in ("k", "v") for _, _, c in recv.heads) and kv and kv != bridge.cfg.n_heads:
        raise ValueError("naive_path_patch needs per-query-head k/v inputs: run it on ungrouped_copy(hf_model)")
    rows = torch.arange(len(task))
    m = lambda lg: float(metric_values(metric, lg[rows, task.end], task.targets, task.signs).mean())  # noqa: E731

    def clock():
        return time.perf_counter(), time.process_time()

    w0, c0 = clock()
    lg_c, cc = bridge.run_with_cache(task.clean, names_filter=lambda n: n.endswith("attn.hook_z"))
    lg_k, kc = bridge.run_with_cache(task.corrupted, names_filter=lambda n: n.endswith("attn.hook_z"))
    m_clean, m_corr = m(lg_c), m(lg_k)
    if timings is not None:
        w1, c1 = clock()
        timings.append(("cache", w1 - w0, c1 - c0))
    names = ([f"blocks.{L - 1}.hook_resid_post"] if recv.kind == "logits"
             else sorted({f"blocks.{l}.hook_{c}_input" for l, _, c in recv.heads}))
    out = {}
    with split_qkv_inputs(bridge, recv.kind == "heads"):
        for ls, hs in senders:
            w0, c0 = clock()

            def freeze(z, hook, l):
                z = cc[f"blocks.{l}.attn.hook_z"].clone()
                if l == ls:
                    z[:, :, hs] = kc[f"blocks.{l}.attn.hook_z"][:, :, hs]
                return z

            rec = {}
            hooks = [(f"blocks.{l}.attn.hook_z", lambda z, hook, l=l: freeze(z, hook, l)) for l in range(L)]
            hooks += [(n, lambda x, hook, n=n: rec.__setitem__(n, x.clone())) for n in names]
            bridge.run_with_hooks(task.clean, fwd_hooks=hooks)

            def patch(x, hook, n):
                if recv.kind == "logits":
                    return rec[n]
                x = x.clone()
                l, c = int(n.split(".")[1]), n.split("hook_")[1][0]
                for lr, hr, cr in recv.heads:
                    if (lr, cr) == (l, c):
                        x[:, :, hr] = rec[n][:, :, hr]
                return x

            lg = bridge.run_with_hooks(task.clean, fwd_hooks=[(n, lambda x, hook, n=n: patch(x, hook, n)) for n in names])
            out[(ls, hs)] = m(lg) - m_clean
            if timings is not None:
                w1, c1 = clock()
                timings.append(((ls, hs), w1 - w0, c1 - c0))
    return out, m_clean, m_corr
