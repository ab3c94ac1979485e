"""EAP / EAP-IG edge scores against independent computations.

- EAP == the derivative, by plain autograd, of the metric w.r.t. a scalar ``eps`` that adds ``eps * D_s`` to one
  receiver's input (``D_s`` from the library's per-head ``hook_result`` on separate clean / corrupted runs).
- EAP-IG with many steps == the exact effect of patching the edge, on a model where the edge's effect runs
  along the interpolation path only (every head and MLP writes nothing), so integrated gradients are exact.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from circuit_tests.attribution import alphas, attribute, real_edge_mask
from circuit_tests.engine import PatchingEngine
from circuit_tests.graph import Circuit, full_circuit
from circuit_tests.metrics import metric_values

from .helpers import random_task, tiny_bridge

KINDS = ("gpt2", "neox")


@pytest.fixture(scope="module")
def bridges():
    return {k: tiny_bridge(k, layers=2, heads=3, d_model=24) for k in KINDS}


@pytest.fixture(scope="module")
def task():
    return random_task(n=4, seq=6, ragged=True)


def _sender_outputs(bridge, tokens):
    """Every sender's output from the library's own per-head ``hook_result`` (not attribution's z @ W_O)."""
    bridge.set_use_attn_result(True)
    out: dict[str, torch.Tensor] = {}
    L, H = bridge.cfg.n_layers, bridge.cfg.n_heads

    def keep(t, hook, name):
        out[name] = t.detach().clone()

    names = ["hook_embed"] + [f"blocks.{l}.attn.hook_result" for l in range(L)] + [f"blocks.{l}.hook_mlp_out" for l in range(L)]
    try:
        with torch.no_grad(), bridge.hooks(fwd_hooks=[(n, partial(keep, name=n)) for n in names]):
            bridge(tokens)
    finally:
        bridge.set_use_attn_result(False)
    res = {"input": out["hook_embed"]}
    for l in range(L):
        for h in range(H):
            res[f"a{l}.h{h}"] = out[f"blocks.{l}.attn.hook_result"][:, :, h]
        res[f"m{l}"] = out[f"blocks.{l}.hook_mlp_out"]
    return res


def _naive_eap(bridge, task, sender, receiver):
    """-(1/N) d/d eps of Σ metric, where receiver input += eps * (h_s(x') - h_s(x)), at eps = 0 (clean run)."""
    D = _sender_outputs(bridge, task.corrupted)[sender] - _sender_outputs(bridge, task.clean)[sender]
    eps = torch.zeros((), dtype=torch.float32, requires_grad=True)
    node, _, qkv = receiver.partition("<")
    if node == "logits":
        hook, head = "ln_final.hook_in", None
    elif node.startswith("m"):
        hook, head = f"blocks.{node[1:]}.hook_mlp_in", None
    else:
        layer, h = node[1:].split(".h")
        hook, head = f"blocks.{layer}.hook_{qkv[0]}_input", int(h)

    def add(x, hook):
        if head is None:
            return x + eps * D
        x = x.clone()
        x[:, :, head] = x[:, :, head] + eps * D
        return x

    bridge.set_use_split_qkv_input(True)
    bridge.set_use_hook_mlp_in(True)
    try:
        with bridge.hooks(fwd_hooks=[(hook, add)]):
            logits = bridge(task.clean)[torch.arange(len(task)), task.end]
    finally:
        bridge.set_use_split_qkv_input(False)
        bridge.set_use_hook_mlp_in(False)
    m = metric_values("logit_diff", logits, task.targets, task.signs).sum()
    (g,) = torch.autograd.grad(m, eps)
    return -float(g) / len(task)


@pytest.mark.parametrize("kind", KINDS)
def test_eap_equals_gradient_times_difference(bridges, task, kind):
    b = bridges[kind]
    s = attribute(b, task, method="eap", batch_size=3)  # two batches: the sum over batches is per-example
    picks = [("input", "a0.h1<q>"), ("a0.h2", "a1.h0<k>"), ("a0.h0", "a1.h2<v>"), ("m0", "a1.h1<q>"),
             ("a0.h2", "m1"), ("m0", "m1"), ("m1", "logits"), ("input", "logits")]
    if kind == "gpt2":
        picks += [("a0.h1", "m0"), ("a1.h2", "m1")]  # sequential blocks: m{l} reads layer-l heads
    for sender, receiver in picks:
        naive = _naive_eap(b, task, sender, receiver)
        got = s.score(sender, receiver)
        assert got == pytest.approx(naive, rel=1e-3, abs=1e-5), (sender, receiver)
    # scores exist exactly on the graph's edges and are not all zero
    assert (s.scores[~real_edge_mask(s.graph)] == 0).all()
    assert s.scores.abs().max() > 1e-4


def test_ig_alphas_follow_eap_ig_code():
    assert alphas("eap", 7) == [1.0]
    assert alphas("eap-ig", 4) == [0.0, 0.25, 0.5, 0.75]
    with pytest.raises(ValueError, match="unknown attribution method"):
        alphas("acdc", 3)


@pytest.mark.parametrize("kind", KINDS)
def test_eap_ig_approaches_exact_patching_effect_when_the_path_is_the_edge(kind, task):
    """Heads and MLPs write nothing, so the only live edge is input->logits and IG along the embedding path
    integrates its gradient exactly: score(m) -> L(edge corrupted) - L(clean) as m grows, O(1/m)."""
    b = tiny_bridge(kind, layers=2, heads=3, d_model=24, seed=3)
    with torch.no_grad():
        for name, p in b.named_parameters():
            if any(k in name for k in (".o.", "c_proj", "dense_4h_to_h")):  # attention output and MLP output
                p.zero_()
    eng = PatchingEngine(b)
    g = eng.graph
    ev_full = eng.evaluate(task, full_circuit(g))
    # the heads really are silent: the full run equals a run with input->logits alone
    assert torch.allclose(ev_full.clean, eng.evaluate(task, Circuit(g, frozenset({("input", "logits")}))).circuit, atol=1e-4)
    minus = Circuit(g, frozenset(e for e in g.edges() if e != ("input", "logits")))
    ev = eng.evaluate(task, minus)
    t, sg = task.targets, task.signs
    exact = float(-(metric_values("logit_diff", ev.circuit, t, sg) - metric_values("logit_diff", ev.clean, t, sg)).mean())
    assert abs(exact) > 0.05  # the edge matters
    errs = {m: abs(attribute(b, task, method="eap-ig", steps=m).score("input", "logits") - exact) for m in (1, 4, 64)}
    eap_err = abs(attribute(b, task, method="eap").score("input", "logits") - exact)
    assert errs[64] < 0.02 * abs(exact)
    assert errs[64] < errs[4] / 4  # a Riemann sum: the error shrinks ~1/m (16x here; 4x asked)
    assert eap_err > 5 * errs[64]  # the first-order estimate is not already exact here


def test_attribution_is_deterministic(bridges, task):
    a = attribute(bridges["neox"], task, method="eap-ig", steps=3)
    b = attribute(bridges["neox"], task, method="eap-ig", steps=3)
    assert torch.equal(a.scores, b.scores)
    assert all(p.requires_grad for p in bridges["neox"].parameters())  # parameters are unfrozen afterwards


def test_eap_ig_on_gqa_equals_the_ungrouped_model_with_per_query_head_kv():
    """LLaMA with grouped-query attention (4 query heads over 2 k/v heads): scores equal those of the same model
    rebuilt as multi-head attention with per-query-head k/v weights (MIB's ungrouping), and an EAP score of a
    k edge equals the naive derivative on that model."""
    from circuit_tests.models import bridge_from_hf

    from .reference import ungrouped_copy
    from .test_llama import llama_hf

    hf = llama_hf(2, True)
    ref = bridge_from_hf(ungrouped_copy(hf))
    gqa = bridge_from_hf(hf)
    task = random_task(vocab=64, n=4, seq=6, ragged=True)
    for method in ("eap", "eap-ig"):
        a, b = attribute(gqa, task, method=method, steps=3), attribute(ref, task, method=method, steps=3)
        assert torch.allclose(a.scores, b.scores, atol=1e-5, rtol=1e-3), method
    s = attribute(gqa, task, method="eap")
    for sender, receiver in [("a0.h1", "a1.h2<k>"), ("a0.h3", "a2.h0<v>"), ("input", "a1.h1<q>")]:
        assert s.score(sender, receiver) == pytest.approx(_naive_eap(ref, task, sender, receiver), rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("kind", KINDS + ("llama",))
def test_unforked_qkv_gradients_equal_the_forked_inputs(bridges, task, kind, monkeypatch):
    """The q/k/v receiver gradients rebuilt through ln1's Jacobian (LayerNorm with bias; RMSNorm with GQA) equal
    autograd's through the bridge's per-head forked inputs, and GQA settings are restored afterwards."""
    import circuit_tests.attribution as A

    if kind == "llama":
        from circuit_tests.models import bridge_from_hf

        from .test_llama import llama_hf

        b = bridge_from_hf(llama_hf(2, True))
        task = random_task(vocab=64, n=4, seq=6, ragged=True)
    else:
        b = bridges[kind]
    assert A._qkv_layers(b, A.Graph.from_bridge(b)) is not None  # the unforked path is the one under test
    groups = [blk.attn.original_component.num_key_value_groups for blk in b.blocks] if kind == "llama" else None
    fast = attribute(b, task, method="eap-ig", steps=3, batch_size=3)
    monkeypatch.setattr(A, "_qkv_layers", lambda *a: None)
    forked = attribute(b, task, method="eap-ig", steps=3, batch_size=3)
    assert torch.allclose(fast.scores, forked.scores, rtol=1e-4, atol=1e-6 * float(forked.scores.abs().max()))
    assert fast.scores.abs().max() > 1e-4
    if groups is not None:
        assert [blk.attn.original_component.num_key_value_groups for blk in b.blocks] == groups == [2] * len(groups)
