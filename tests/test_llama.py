"""The LLaMA family (RMSNorm, rotary, gated MLP, bias-free projections, grouped-query attention) everywhere.

Tiny random-init ``LlamaForCausalLM`` models in four variants: GQA (4 query heads over 2 key/value heads) and
MHA, each bias-free (as SmolLM2) and with ``attention_bias`` + ``mlp_bias``. Independent truth:

- engine and path patching: the naive references of tests/reference.py run on ``ungrouped_copy`` — the
  same model rebuilt by transformers as multi-head attention with each query head's own copy of its
  key/value weights (MIB's ``ungroup_grouped_query_attention``), where every q/k/v input is per query head;
- role scores: the same formulas computed from the HF module's raw weights (``v_proj`` rows of key/value
  head ``h // G``, RMSNorm written out) and from HF's own eager attention probabilities;
- graph counts: metrics.md §3.3's closed form for SmolLM2-135M's shape (30 layers x 9 heads).
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# Heavy modules imported before pytester's in-process run snapshots sys.modules (as test_plugin.py does):
# re-importing them after the snapshot is restored would register pyarrow extension types twice.
import circuit_tests.cli  # noqa: F401
import circuit_tests.collect  # noqa: F401
import circuit_tests.sources  # noqa: F401
import circuit_tests.tasks  # noqa: F401
import transformer_lens.model_bridge  # noqa: F401
from circuit_tests import measures
from circuit_tests.engine import ABLATIONS, PatchingEngine
from circuit_tests.gqa import head_weights, kv_groups, ungrouped
from circuit_tests.graph import Circuit, Graph, empty_circuit, full_circuit, node_circuit
from circuit_tests.models import bridge_from_hf
from circuit_tests.path_patching import Receivers, path_patch, split_qkv_inputs
from circuit_tests.scores import (
    _plain_vocab,
    copy_suppression,
    name_mover,
    repeated_sequence_scores,
    s_inhibition,
    scores_table,
    successor,
)

from .reference import naive_circuit_logits, naive_path_patch, ungrouped_copy
from .test_path_patching import lowrank_calls, toy_ioi
from .test_scores import DAYS, NUM, literal_s2i, word_tokenizer

L, H, D, V = 3, 4, 32, 64
VARIANTS = {"gqa": (2, False), "gqa_bias": (2, True), "mha": (4, False), "mha_bias": (4, True)}
SMOLLM2 = {  # HuggingFaceTB/SmolLM2-135M config.json (reference/smollm2.md)
    "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "rope_theta": 100000,
    "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
}


def llama_hf(kv: int, bias: bool, *, dtype=torch.float32, vocab: int = V, seed: int = 0, layers: int = L):
    """A random LlamaForCausalLM with trained-looking parameters (RMSNorm gains and biases off their init)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=D, intermediate_size=2 * D, num_hidden_layers=layers, num_attention_heads=H,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=64, rope_theta=10000.0,
                      attention_bias=bias, mlp_bias=bias, tie_word_embeddings=True, initializer_range=0.2,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
    return hf.to(dtype).eval()


class Model:
    """One variant: the bridge under test, the reference bridge (its ungrouped copy) and pristine HF weights."""

    def __init__(self, kv: int, bias: bool, dtype=torch.float32, tokenizer=None, vocab: int = V):
        hf = llama_hf(kv, bias, dtype=dtype, vocab=vocab)
        self.raw = copy.deepcopy(hf)  # wrapping mutates the HF module: keep an untouched copy for naive maths
        self.raw.set_attn_implementation("eager")  # HF's own attention probabilities (output_attentions)
        self.ref = bridge_from_hf(ungrouped_copy(hf), tokenizer) if kv != H else None
        self.bridge = bridge_from_hf(hf, tokenizer)
        self.ref = self.ref or self.bridge
        self.G = H // kv


@pytest.fixture(scope="module")
def models():
    return {k: Model(*v) for k, v in VARIANTS.items()}


@pytest.fixture(scope="module")
def models64():
    return {k: Model(*v, dtype=torch.float64) for k, v in VARIANTS.items() if k in ("gqa", "gqa_bias")}


@pytest.fixture(scope="module")
def task():
    return toy_ioi(n=5, seed=3)


TOL = 2e-5


# ------------------------------------------------------------------------------------------------ graph


def test_smollm2_graph_counts_match_the_closed_form():
    g = Graph.from_hf_config(SMOLLM2)
    Lc, Hc = 30, 9
    assert (g.n_layers, g.n_heads, g.parallel) == (Lc, Hc, False)  # query heads, sequential blocks
    nodes = 2 + Lc * (Hc + 1)
    edges = sum(3 * Hc * (1 + l * (Hc + 1)) + (1 + l * (Hc + 1) + Hc) for l in range(Lc)) + (1 + Lc * (Hc + 1))
    assert len(g.nodes) == nodes == 302  # the figures the README states
    assert g.n_edges == edges == sum(1 for _ in g.edges()) == 123_211
    assert len(g.receivers) == Lc * (3 * Hc + 1) + 1  # q, k and v receivers for each of the 9 query heads
    assert {r for r in g.receivers if r.startswith("a0.")} == {f"a0.h{h}<{c}>" for h in range(9) for c in "qkv"}


def test_graph_of_a_gqa_bridge_counts_query_heads(models):
    b = models["gqa"].bridge
    g = Graph.from_bridge(b)
    assert g == Graph(L, H, False) == Graph.from_hf_config(models["gqa"].raw.config.to_dict())
    assert kv_groups(b) == 2 and kv_groups(models["mha"].bridge) == 1


# ------------------------------------------------------------------------------------------------ gqa


def test_ungrouped_is_the_same_function_with_per_query_head_kv_inputs(models):
    b = models["gqa"].bridge
    toks = torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = b(toks)
        with ungrouped(b):
            assert torch.allclose(b(toks), base, atol=1e-6, rtol=0)
            with split_qkv_inputs(b):
                _, c = b.run_with_cache(toks, names_filter=lambda n: n in ("blocks.1.hook_k_input",
                                                                            "blocks.1.attn.hook_pattern"))
                assert c["blocks.1.hook_k_input"].shape[2] == H

                def bump(x, hook):
                    x = x.clone()
                    x[:, :, 0] += 1.0
                    return x

                with b.hooks(fwd_hooks=[("blocks.1.hook_k_input", bump)]):
                    _, c2 = b.run_with_cache(toks, names_filter=lambda n: n == "blocks.1.attn.hook_pattern")
        d = (c2["blocks.1.attn.hook_pattern"] - c["blocks.1.attn.hook_pattern"]).abs().amax((0, 2, 3))
        assert d[0] > 1e-4 and (d[1:] == 0).all()  # head 1 shares key/value head 0 with head 0, yet is untouched
        # without ungrouping the same edit moves every query head of the group: why the engine ungroups
        with split_qkv_inputs(b):
            assert b.run_with_cache(toks, names_filter=lambda n: n == "blocks.1.hook_k_input")[1][
                "blocks.1.hook_k_input"].shape[2] == 2
            with b.hooks(fwd_hooks=[("blocks.1.hook_k_input", bump)]):
                _, c3 = b.run_with_cache(toks, names_filter=lambda n: n == "blocks.1.attn.hook_pattern")
        d3 = (c3["blocks.1.attn.hook_pattern"] - c["blocks.1.attn.hook_pattern"]).abs().amax((0, 2, 3))
        assert (d3[:2] > 1e-4).all() and (d3[2:] == 0).all()
        assert torch.equal(b(toks), base)
    assert tuple(b.W_K.shape) == (L, 2, D, D // H)


def test_ungrouped_restores_on_error(models):
    b = models["gqa"].bridge
    w = b.blocks[0].attn.k.original_component.weight
    with pytest.raises(RuntimeError, match="boom"):
        with ungrouped(b):
            with ungrouped(b):  # nested: a no-op
                assert b.blocks[0].attn.k.original_component.weight.shape[0] == D
            assert b.blocks[0].attn.k.original_component.weight.shape[0] == D
            raise RuntimeError("boom")
    assert b.blocks[0].attn.k.original_component.weight is w
    assert b.blocks[0].attn.original_component.num_key_value_groups == 2


def test_head_weights_repeat_kv_and_zero_missing_biases(models):
    for name, m in models.items():
        w = head_weights(m.bridge)
        raw = m.raw.model.layers
        e = D // H
        for l in range(L):
            for h in range(H):
                g = h // m.G
                assert torch.equal(w.W_K[l, h], raw[l].self_attn.k_proj.weight[g * e:(g + 1) * e].T)
                assert torch.equal(w.W_V[l, h], raw[l].self_attn.v_proj.weight[g * e:(g + 1) * e].T)
                bv = raw[l].self_attn.v_proj.bias
                assert torch.equal(w.b_V[l, h], bv[g * e:(g + 1) * e] if bv is not None else torch.zeros(e))
        assert w.has_bias["b_V"] == w.has_bias["b_O"] == name.endswith("bias")


# ------------------------------------------------------------------------------------------------ engine


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("ablation", ABLATIONS)
def test_engine_invariants(models, task, name, ablation):
    e = PatchingEngine(models[name].bridge)
    full = e.evaluate(task, full_circuit(e.graph), ablation)
    assert torch.allclose(full.circuit, full.clean, atol=TOL, rtol=0)
    rows = torch.arange(len(task))
    with torch.no_grad():
        assert torch.allclose(full.clean, e.bridge(task.clean)[rows, task.end], atol=TOL, rtol=0)
    empty = e.evaluate(task, empty_circuit(e.graph), ablation)
    assert torch.allclose(empty.circuit, empty.baseline, atol=TOL, rtol=0)
    if ablation == "corrupted":
        assert torch.allclose(empty.circuit, empty.corrupted, atol=TOL, rtol=0)
    else:
        assert (empty.circuit - empty.clean).abs().max() > 1e-3


def random_circuit(g: Graph, p: float, seed: int) -> Circuit:
    rng = random.Random(seed)
    return Circuit(g, frozenset(e for e in g.edges() if rng.random() < p))


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("ablation", ABLATIONS)
def test_engine_matches_naive_reference_on_the_ungrouped_model(models, task, name, ablation):
    m = models[name]
    e = PatchingEngine(m.bridge)
    for i, p in enumerate((0.05, 0.5, 0.95)):
        c = random_circuit(e.graph, p, seed=i)
        got = e.evaluate(task, c, ablation).circuit
        want = naive_circuit_logits(m.ref, task, c, ablation)
        assert torch.allclose(got, want, atol=TOL, rtol=0), (p, float((got - want).abs().max()))
    nodes = node_circuit(e.graph, ["a0.h1", "a1.h0", "a1.h3", "m1", "a2.h2"])
    got = e.evaluate(task, nodes, ablation).circuit
    assert torch.allclose(got, naive_circuit_logits(m.ref, task, nodes, ablation), atol=TOL, rtol=0)


def test_k_and_v_edges_reach_only_their_query_head(models, task):
    """Dropping every edge into a2.h0<k> (or <v>) differs from dropping those into a2.h1<k>, its kv-group mate."""
    m = models["gqa"]
    e = PatchingEngine(m.bridge)
    g = e.graph
    full = set(g.edges())
    for c in "kv":
        outs = []
        for h in (0, 1):
            circ = Circuit(g, frozenset(x for x in full if x[1] != f"a2.h{h}<{c}>"))
            got = e.evaluate(task, circ).circuit
            assert torch.allclose(got, naive_circuit_logits(m.ref, task, circ), atol=TOL, rtol=0)
            outs.append(got)
        clean = e.evaluate(task, full_circuit(g)).clean
        assert (outs[0] - clean).abs().max() > 1e-3 and (outs[1] - clean).abs().max() > 1e-3
        assert (outs[0] - outs[1]).abs().max() > 1e-3


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), name=st.sampled_from(["gqa", "gqa_bias"]), ablation=st.sampled_from(ABLATIONS))
def test_engine_matches_naive_on_generated_circuits(models64, task, data, name, ablation):
    # float64: a circuit that feeds the logits nothing under zero ablation of a bias-free model leaves an exactly
    # zero final residual in the engine but float round-off in the naive reference, and RMSNorm scales that
    # round-off by 1/sqrt(eps) (about 1e3); in float64 the round-off is far below the tolerance.
    m = models64[name]
    e = PatchingEngine(m.bridge)
    edges = sorted(e.graph.edges())
    keep = data.draw(st.sets(st.sampled_from(edges), max_size=60))
    c = Circuit(e.graph, frozenset(keep))
    got = e.evaluate(task, c, ablation).circuit
    assert torch.allclose(got, naive_circuit_logits(m.ref, task, c, ablation), atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------------------ role scores


def _rms(x: torch.Tensor, norm) -> torch.Tensor:
    return norm.weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def naive_ov_logits(raw, x: torch.Tensor, l: int, h: int, G: int, sign: float) -> torch.Tensor:
    """``sign * (rms1_l(x) Wv_{h//G} + bv) Wo_h`` through the final RMSNorm and the unembedding, from raw HF weights."""
    at = raw.model.layers[l].self_attn
    e = at.head_dim
    g = h // G
    v = _rms(x, raw.model.layers[l].input_layernorm) @ at.v_proj.weight[g * e:(g + 1) * e].T
    if at.v_proj.bias is not None:
        v = v + at.v_proj.bias[g * e:(g + 1) * e]
    o = sign * (v @ at.o_proj.weight[:, h * e:(h + 1) * e].T)
    return _rms(o, raw.model.norm) @ raw.lm_head.weight.T


@pytest.mark.parametrize("name", list(VARIANTS))
def test_copy_scores_equal_the_naive_computation(models, name):
    m = models[name]
    task = toy_ioi(n=6, seed=1)
    with torch.no_grad():
        hs = m.raw(task.clean, output_hidden_states=True).hidden_states[1]  # after block 0, before any norm
        attn = m.raw(task.clean, output_attentions=True).attentions
    rows = torch.arange(len(task))
    for sign, fn in ((1.0, name_mover), (-1.0, copy_suppression)):
        sc = fn(m.bridge, task)
        assert sc.not_evaluated is None
        want = torch.zeros(L, H, dtype=torch.float64)
        for l in range(L):
            for h in range(H):
                for p in ("IO", "S1", "S2"):
                    x = hs[rows, task.positions[p]]
                    with torch.no_grad():
                        top = naive_ov_logits(m.raw, x, l, h, m.G, sign).topk(5, -1).indices
                    want[l, h] += (top == task.clean[rows, task.positions[p]][:, None]).any(-1).sum()
        assert want.sum() > 0 and torch.equal(sc.values, 100.0 * want / (3 * len(task)))  # some hits: not vacuous
        io = torch.stack([a[rows, :, task.end, task.positions["IO"]].double().mean(0) for a in attn])
        assert torch.allclose(sc.details["attn_end_to_io"], io, atol=1e-6)


def test_repeated_sequence_scores_equal_hf_attention(models):
    m = models["gqa"]
    sc = repeated_sequence_scores(m.bridge, n_seq=3, seq_len=10, seed=5)
    vocab = _plain_vocab(m.bridge)
    g = torch.Generator().manual_seed(5)
    half = torch.stack([vocab[torch.randperm(len(vocab), generator=g)[:10]] for _ in range(3)])
    with torch.no_grad():
        att = m.raw(torch.cat([half, half], 1), output_attentions=True).attentions  # eager, per query head
    T = 10
    for l in range(L):
        a = att[l].double()
        prev = torch.stack([a[:, :, q, q - 1] for q in range(1, 2 * T)], -1).mean((0, 2))
        dup = torch.stack([a[:, :, q, q - T] for q in range(T, 2 * T)], -1).mean((0, 2))
        ind = torch.stack([a[:, :, q, q - T + 1] for q in range(T, 2 * T)], -1).mean((0, 2))
        for key, want in (("previous_token", prev), ("duplicate_token", dup), ("induction", ind)):
            assert torch.allclose(sc[key].values[l], want, atol=1e-6), key


@pytest.mark.parametrize("name", ["gqa", "gqa_bias"])
def test_successor_equals_the_naive_computation(tmp_path_factory, name):
    tok, vocab = word_tokenizer(tmp_path_factory.mktemp("wordtok"), NUM + DAYS + [f"w{i}" for i in range(20)])
    kv, bias = VARIANTS[name]
    m = Model(kv, bias, tokenizer=tok, vocab=len(vocab))
    sc = successor(m.bridge)
    assert sc.not_evaluated is None and sc.details["n_pairs"] == 16
    raw = m.raw
    tasks = [[(vocab[NUM[i]], vocab[NUM[i + 1]]) for i in range(len(NUM) - 1)],
             [(vocab[DAYS[i]], vocab[DAYS[(i + 1) % 7]]) for i in range(7)]]
    want = torch.zeros(L, H, dtype=torch.float64)
    with torch.no_grad():
        for pairs in tasks:
            src = torch.tensor([a for a, _ in pairs])
            targets = sorted({b for _, b in pairs})
            e = raw.model.embed_tokens.weight[src]
            e_mlp = raw.model.layers[0].mlp(_rms(e, raw.model.layers[0].post_attention_layernorm))
            for l in range(L):
                for h in range(H):
                    s = naive_ov_logits(raw, e_mlp, l, h, m.G, 1.0)[:, targets]
                    want[l, h] += (s.argmax(-1) == torch.tensor([targets.index(b) for _, b in pairs])).sum()
    assert want.sum() > 0 and torch.equal(sc.values, want / 16)


def test_s_inhibition_matches_the_literal_computation_on_gqa(models64):
    bridge = models64["gqa"].bridge
    task = toy_ioi(n=5, seed=2)
    nmh, cand = [(2, 1), (2, 2)], [(0, 3), (1, 0), (1, 1)]
    sc = s_inhibition(bridge, task, ["a2.h1", "a2.h2"], candidates=cand, batch_size=3)
    assert sc.not_evaluated is None
    for c in cand:
        d_ld, d_io, d_s1 = literal_s2i(bridge, task, c, nmh)
        assert float(sc.details["dLD"][c]) == pytest.approx(d_ld, rel=1e-8, abs=1e-12)
        assert float(sc.details["dIO"][c]) == pytest.approx(d_io, rel=1e-8, abs=1e-12)
        assert float(sc.details["dS1"][c]) == pytest.approx(d_s1, rel=1e-8, abs=1e-12)


def test_scores_table_runs_on_a_bias_free_gqa_model(models):
    text = scores_table(models["gqa"].bridge, toy_ioi(n=4), roles={"name_mover": ["a2.h1"]}, n_seq=2, seq_len=8)
    rows = [r for r in text.splitlines() if r.startswith("a") and ".h" in r.split()[0]]
    assert [r.split()[0] for r in rows] == [f"a{l}.h{h}" for l in range(L) for h in range(H)]


# ------------------------------------------------------------------------------------------------ path patching


# HF's LlamaRMSNorm computes in float32 even for a float64 model (``hidden_states.to(torch.float32)``), so the
# float64 models agree only to float32 rounding of each norm output (~1e-7 relative), not to 1e-9 as the
# GPT-2 / NeoX ones do: the fast engine sums the residual stream in another order than the bridge's forward.
PP_TOL = 2e-6
RECEIVERS = [["logits"], ["a2.h1<q>"], ["a2.h1<k>"], ["a2.h0<v>", "a1.h3<k>"], ["a2.h2<q>", "a2.h3<v>", "a1.h1<k>"]]


@pytest.mark.parametrize("name", ["gqa", "gqa_bias"])
@pytest.mark.parametrize("recv", RECEIVERS, ids=lambda r: "+".join(r))
def test_fast_path_patching_equals_the_definition(models64, name, recv):
    m = models64[name]
    task = toy_ioi(n=5, seed=4)
    R = Receivers.parse(recv)
    senders = [(l, h) for l in range(L) for h in range(H)]
    res = path_patch(m.bridge, task, R, batch_size=3)
    assert res.method == "fast" and res.fallback is None and not res.notes
    ref, m_clean, m_corr = naive_path_patch(m.ref, task, R, senders)
    scale = max(abs(m_clean - m_corr), 1e-3)
    assert res.ld_clean == pytest.approx(m_clean, abs=1e-12 * scale)
    for (l, h), v in ref.items():
        assert abs(float(res.raw[l, h]) - v) <= PP_TOL * scale, ((l, h), float(res.raw[l, h]), v)
    hooks = path_patch(m.bridge, task, R, senders=senders[:6], method="hooks")  # same forwards: exact
    for l, h in senders[:6]:
        assert abs(float(hooks.raw[l, h]) - ref[(l, h)]) <= 1e-12 * scale


@pytest.mark.parametrize("recv", [["logits"], ["a2.h1<q>"], ["a2.h1<k>", "a1.h3<v>"]], ids=lambda r: "+".join(r))
def test_worst_case_path_patching_with_low_rank_gated_mlps(models64, monkeypatch, recv):
    """Token 0 corrupted (every position differs): the gated MLPs behind RMSNorm take the low-rank route for
    each sender's first MLP and the first receiver layer's, and still equal the definition."""
    m = models64["gqa_bias"]
    task = toy_ioi(n=5, seed=4, corrupt="first")
    R = Receivers.parse(recv)
    senders = [(0, 1), (0, 2), (1, 3)]
    calls = lowrank_calls(monkeypatch)
    res = path_patch(m.bridge, task, R, senders=senders, method="fast", batch_size=3)
    assert res.method == "fast" and not res.notes and calls
    ref, m_clean, m_corr = naive_path_patch(m.ref, task, R, senders)
    scale = max(abs(m_clean - m_corr), 1e-3)
    for (l, h), v in ref.items():
        assert abs(float(res.raw[l, h]) - v) <= PP_TOL * scale, ((l, h), float(res.raw[l, h]), v)


def test_path_patching_on_mha_float32(models, task):
    for name in ("mha", "mha_bias"):
        R = Receivers.parse(["a2.h1<k>", "a2.h0<v>"])
        res = path_patch(models[name].bridge, task, R)
        ref, _, m_corr = naive_path_patch(models[name].ref, task, R, [(l, h) for l in range(L) for h in range(H)])
        scale = max(abs(res.ld_clean - m_corr), 1e-3)
        assert res.method == "fast"
        for (l, h), v in ref.items():
            assert abs(float(res.raw[l, h]) - v) <= 1e-4 * scale


def test_fallback_is_recorded_and_explained(models, task, monkeypatch):
    from circuit_tests import path_patching as pp
    from circuit_tests.spec import PathRatioClaim

    def fail(self):
        raise pp._SelfCheckFailed("layer 1: recomputed attention differs from hook_z by 1.00e+00")

    monkeypatch.setattr(pp._Attention, "self_check", fail)
    res = path_patch(models["gqa"].bridge, task, Receivers.parse(["a2.h1<k>"]), senders=[(0, 1), (1, 2)])
    assert res.method == "hooks" and res.fallback and "self-check failed" in res.fallback
    ref, _, _ = naive_path_patch(models["gqa"].ref, task, res.receivers, [(0, 1), (1, 2)])
    assert all(abs(float(res.raw[s]) - v) < 1e-4 for s, v in ref.items())
    claim = PathRatioClaim(type="path_ratio", senders=["sup"], receivers="nm", input="k", min=0.0, min_effect=1e-9)
    res.ld_clean, res.ld_corrupt = 1.0, 0.0  # a gap, so the ratio is measured
    m = measures.path_ratio(res, claim, {"sup": ["a0.h1"], "nm": ["a2.h1"]}, [], "logit_diff")
    assert m.numbers["path_patching_method"] == "hooks" and "self-check failed" in m.numbers["path_patching_fallback"]
    assert "path patching fell back to the hooks engine" in m.reason
    fast = path_patch(models["mha"].bridge, task, Receivers.logits(), senders=[(0, 1)], method="hooks")
    assert fast.fallback is None  # asked for hooks: not a fallback


# ------------------------------------------------------------------------------------------------ end to end


SPEC = """\
name: llama-all-claims
model:
  source: {src}
task:
  name: ioi
  size: 8
  seed: 0
circuit:
  roles:
    previous_token: [a0.h1]
    induction: [a1.h0]
    duplicate_token: [a0.h2]
    successor: [a0.h3]
    s_inhibition: [a1.h2]
    name_mover: [a2.h1, a2.h2]
    copy_suppression: [a2.h0]
claims:
  - {{type: faithfulness, normalization: normalized, min: 0.5, min_effect: 1.0e-9}}
  - {{type: faithfulness, id: ratio, normalization: ratio, min: 0.5}}
  - {{type: path_ratio, id: direct, senders: [name_mover, copy_suppression], receivers: logits, min: 0.1,
      min_effect: 1.0e-9}}
  - {{type: path_ratio, id: q, senders: [s_inhibition], receivers: name_mover, input: q, min: 0.1, min_effect: 1.0e-9}}
  - {{type: path_ratio, id: k, senders: [induction], receivers: name_mover, input: k, min: 0.1, min_effect: 1.0e-9}}
  - {{type: path_ratio, id: v, senders: [duplicate_token], receivers: s_inhibition, input: v, min: 0.1,
      min_effect: 1.0e-9}}
  - {{type: role_score, role: previous_token, min: 0.1}}
  - {{type: role_score, role: induction, min: 0.1}}
  - {{type: role_score, role: duplicate_token, min: 0.1}}
  - {{type: role_score, role: successor, min: 0.1}}
  - {{type: role_score, role: s_inhibition, min: 0.5}}
  - {{type: role_score, role: name_mover, min: 10}}
  - {{type: role_score, role: copy_suppression, min: 10}}
"""


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from circuit_tests.models import load_tokenizer
    from circuit_tests.zoo import checkpoint_dirs

    tok = load_tokenizer(checkpoint_dirs("ioi")[-1][1])
    hf = llama_hf(2, False, vocab=len(tok))
    d = tmp_path_factory.mktemp("llama") / "smol-shaped"
    hf.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_every_claim_type_runs_on_a_bias_free_gqa_model(pytester, llama_dir):
    pytester.makefile(".circuit.yaml", llama=SPEC.format(src=llama_dir))
    out = pytester.path / "results.json"
    r = pytester.runpytest_inprocess("-W", "ignore::pytest.PytestAssertRewriteWarning", f"--circuit-json={out}")
    text = r.stdout.str()
    assert "Traceback" not in text and "Error" not in text.replace("AssertionError", ""), text[-3000:]
    outcomes = r.parseoutcomes()
    # 13 declared claims + a role_check per role (7 roles, all with a criterion)
    assert outcomes.get("error", 0) == 0 and sum(outcomes.get(k, 0) for k in ("passed", "failed", "skipped")) == 20
    recs = json.loads(out.read_text())["records"]
    assert len(recs) == 20
    by = {rec["claim"]: rec for rec in recs}
    for cid in ("direct", "q", "k", "v"):
        assert by[cid]["extra"]["path_patching_method"] == "fast", by[cid]
    assert by["faithfulness"]["m_M"] is not None
    for rec in recs:  # every score computed on this model; the IOI word tokenizer has too few ordinal words
        if rec["claim_type"] == "role_score" and rec["extra"]["score"] != "successor":
            assert rec["measured"] in ("pass", "fail"), rec
    assert "ordinal pairs" in by["role_score4"]["reason"]
    checks = {rec["claim"]: rec for rec in recs if rec["claim_type"] == "role_check"}
    assert len(checks) == 7
    for cid, rec in checks.items():  # every criterion judged on GQA weights (successor: too few ordinal words)
        assert rec["measured"] in (("not_evaluated",) if cid == "role_check_successor" else ("pass", "fail")), rec


def test_cli_scores_runs_on_a_llama_model(llama_dir, tmp_path, capsys):
    from circuit_tests.cli import main

    spec = tmp_path / "llama.circuit.yaml"
    spec.write_text(SPEC.format(src=llama_dir))
    assert main(["scores", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "a2.h3" in out and "direct effect on logits" in out


def test_engine_folded_weights_follow_in_place_edits_under_gqa(task):
    """GQA: the engine's folded per-query-head k/v weights are rebuilt after an in-place edit of a k/v linear."""
    m = Model(2, True)
    engine = PatchingEngine(m.bridge)
    g = engine.graph
    circuit = random_circuit(g, 0.3, 0)
    before = engine.evaluate(task, circuit).circuit
    with torch.no_grad():
        m.bridge.blocks[1].attn.k.original_component.weight.add_(0.05)
        m.bridge.blocks[0].ln1.original_component.weight.mul_(1.3)
    after = engine.evaluate(task, circuit).circuit
    assert not torch.equal(before, after)
    assert torch.equal(after, PatchingEngine(m.bridge).evaluate(task, circuit).circuit)
