"""A slow, naive, edge-by-edge reference evaluator: the definition of circuit evaluation, written directly.

For every receiver slot (each head's q/k/v input, each MLP input, the logits) it rebuilds the input from
scratch in a Python loop over its upstream senders: ``x - Σ_s h_s(current) + Σ_s (h_s(current) if (s→r) ∈ C
else h_s(replacement))``, using the library's per-head ``hook_result`` (not the engine's z @ W_O route).
"""

from __future__ import annotations

from functools import partial

import torch

from circuit_tests.graph import Circuit


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
