"""Path patching: the batched engine equals the definition, run literally (two hooked forwards per sender).

The reference below is metrics.md §6 word for word: (1) cache clean and corrupted ``hook_z``; (2) run the
clean prompt with every head's ``hook_z`` frozen to clean except the sender's, taken from the corrupted run
at every position, and record the receivers' inputs; (3) run the clean prompt again with only the
receivers' inputs replaced by the recorded values. Models are tiny random GPT-2 (sequential blocks) and
GPT-NeoX (parallel blocks, rotary) built once per module, in float32 (tolerance 1e-4 relative) and
float64 (1e-9 relative, which only an exact computation meets).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from circuit_tests.errors import GraphError
from circuit_tests.metrics import metric_values
from circuit_tests.models import bridge_from_hf
from circuit_tests.path_patching import Receivers, path_patch, path_patch_ratio, split_qkv_inputs
from circuit_tests.tasks.base import TaskData

from .reference import naive_path_patch

L, H, V = 3, 4, 64


def toy_ioi(n: int = 6, seed: int = 0, corrupt: str = "s2", names: tuple[int, int] = (10, 30)) -> TaskData:
    """IOI-shaped random prompts of 9..13 tokens, right-padded: IO/S1 at 1/3, S2 three before END.

    corrupt: ``s2`` (S2 := IO, Tigges' ABB->ABA), ``first`` (also the first token changes: every position
    differs) or ``io`` (the IO token changes: differences start at position 1 or 3).
    """
    g = torch.Generator().manual_seed(seed)
    T_max = 13
    clean = torch.full((n, T_max), 1, dtype=torch.long)
    corr = clean.clone()
    end = torch.zeros(n, dtype=torch.long)
    targets = torch.zeros(n, 2, dtype=torch.long)
    pos = {k: torch.zeros(n, dtype=torch.long) for k in ("IO", "S1", "S2", "END")}
    for i in range(n):
        T = int(torch.randint(9, T_max + 1, (1,), generator=g))
        toks = torch.randint(names[1], V, (T,), generator=g)
        a, b = (torch.randperm(names[1] - names[0], generator=g)[:3] + names[0]).tolist()[:2]
        io_p, s1_p = (1, 3) if torch.rand(1, generator=g) < 0.5 else (3, 1)
        s2_p = T - 3
        toks[io_p], toks[s1_p], toks[s2_p] = a, b, b
        c2 = toks.clone()
        if corrupt == "io":
            c2[io_p] = names[0] + (a - names[0] + 1) % (names[1] - names[0])
        else:
            c2[s2_p] = a
        if corrupt == "first":
            c2[0] = names[1] + (toks[0] - names[1] + 1) % (V - names[1])
        clean[i, :T], corr[i, :T] = toks, c2
        end[i] = T - 1
        targets[i] = torch.tensor([a, b])
        pos["IO"][i], pos["S1"][i], pos["S2"][i], pos["END"][i] = io_p, s1_p, s2_p, T - 1
    return TaskData(name="toy_ioi", clean=clean, corrupted=corr, end=end, targets=targets,
                    signs=torch.tensor([[1.0, -1.0]]).repeat(n, 1), default_metric="logit_diff", positions=pos)


def build(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0, **extra):
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":
        m = GPT2LMHeadModel(GPT2Config(n_layer=L, n_head=H, n_embd=32, vocab_size=V, n_positions=64,
                                       initializer_range=0.2, **extra))
    else:
        m = GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=L, num_attention_heads=H, hidden_size=32,
                                             intermediate_size=128, vocab_size=V, max_position_embeddings=64,
                                             rotary_pct=0.5, initializer_range=0.2, **extra))
    return bridge_from_hf(m.to(dtype))


@pytest.fixture(scope="module")
def models():
    return {(k, d): build(k, getattr(torch, d)) for k in ("gpt2", "neox") for d in ("float32", "float64")}


@pytest.fixture(scope="module")
def tasks():
    return {c: toy_ioi(corrupt=c, seed=i) for i, c in enumerate(("s2", "first", "io"))}


TOL = {"float32": 1e-4, "float64": 1e-9}


def assert_matches(res, ref, m_clean, m_corr, dtype: str) -> None:
    scale = max(abs(m_clean - m_corr), max(abs(v) for v in ref.values()), 1e-3)
    assert res.ld_clean == pytest.approx(m_clean, abs=TOL[dtype] * scale)
    assert res.ld_corrupt == pytest.approx(m_corr, abs=TOL[dtype] * scale)
    for (l, h), v in ref.items():
        assert abs(float(res.raw[l, h]) - v) <= TOL[dtype] * scale, ((l, h), float(res.raw[l, h]), v)
    mask = torch.zeros(L, H, dtype=torch.bool)
    for l, h in ref:
        mask[l, h] = True
    assert torch.isnan(res.raw[~mask]).all() and not torch.isnan(res.raw[mask]).any()


head_receivers = st.lists(st.tuples(st.integers(0, L - 1), st.integers(0, H - 1), st.sampled_from("qkv")),
                          min_size=1, max_size=3, unique=True)
receiver_sets = st.one_of(st.just("logits"), head_receivers)
sender_sets = st.lists(st.tuples(st.integers(0, L - 1), st.integers(0, H - 1)), min_size=1, max_size=5, unique=True)


@settings(max_examples=24, deadline=None)
@given(kind=st.sampled_from(["gpt2", "neox"]), dtype=st.sampled_from(["float32", "float64"]),
       recv=receiver_sets, senders=sender_sets, corrupt=st.sampled_from(["s2", "first", "io"]),
       batch_size=st.sampled_from([2, 32]), max_rows=st.sampled_from([16, 4096]))
def test_fast_engine_equals_definition(models, tasks, kind, dtype, recv, senders, corrupt, batch_size, max_rows):
    bridge, task = models[(kind, dtype)], tasks[corrupt]
    R = Receivers.logits() if recv == "logits" else Receivers("heads", tuple(sorted(recv)))
    res = path_patch(bridge, task, R, senders=senders, method="fast", batch_size=batch_size, max_rows=max_rows)
    assert res.method == "fast" and not res.notes
    ref, m_clean, m_corr = naive_path_patch(bridge, task, R, senders)
    assert_matches(res, ref, m_clean, m_corr, dtype)


@pytest.mark.parametrize("kind", ["gpt2", "neox"])
@pytest.mark.parametrize("recv", [["logits"], ["a2.h1<q>", "a1.h3<v>"], ["a1.h0<k>"]])
def test_hooks_engine_equals_definition(models, tasks, kind, recv):
    bridge, task = models[(kind, "float32")], tasks["s2"]
    R = Receivers.parse(recv)
    senders = [(l, h) for l in range(L) for h in range(H)]
    res = path_patch(bridge, task, R, method="hooks", batch_size=4, max_rows=100)
    assert res.method == "hooks"
    ref, m_clean, m_corr = naive_path_patch(bridge, task, R, senders)
    assert_matches(res, ref, m_clean, m_corr, "float32")
    assert not bridge.cfg.use_split_qkv_input  # the flag was restored


def test_all_senders_both_block_types_and_prob_diff(models, tasks):
    for kind in ("gpt2", "neox"):
        bridge = models[(kind, "float64")]
        for recv in (Receivers.logits(), Receivers.of_heads([(1, 2), (2, 0)], "qv")):
            res = path_patch(bridge, tasks["s2"], recv, metric="prob_diff")
            ref, m_clean, m_corr = naive_path_patch(bridge, tasks["s2"], recv,
                                                    [(l, h) for l in range(L) for h in range(H)], "prob_diff")
            assert_matches(res, ref, m_clean, m_corr, "float64")


def test_normalisation_and_unreachable_senders(models, tasks):
    bridge, task = models[("gpt2", "float64")], tasks["s2"]
    res = path_patch(bridge, task, Receivers.parse(["a1.h0<q>"]))
    denom = res.ld_clean - res.ld_corrupt
    assert torch.allclose(res.effects, res.raw / denom, equal_nan=True)
    assert torch.equal(res.patched - res.ld_clean, res.raw)
    # a sender at or above the receiver's layer cannot reach it: exactly no effect
    assert (res.raw[1:] == 0).all() and (res.effects[1:] == 0).all()
    assert (res.raw[0] != 0).any()
    with torch.no_grad():
        lg = bridge(task.clean)
    ld = metric_values("logit_diff", lg[torch.arange(len(task)), task.end], task.targets, task.signs).mean()
    assert res.ld_clean == pytest.approx(float(ld), rel=1e-12)
    assert res.n_examples == len(task) and res.metric == "logit_diff"
    assert len(res.top(3)) == 3 and res.senders == [(l, h) for l in range(L) for h in range(H)]


def test_identical_prompts_give_no_effect_and_nan_effects(models, tasks):
    from dataclasses import replace

    task = replace(tasks["s2"], corrupted=tasks["s2"].clean.clone())
    res = path_patch(models[("neox", "float32")], task, Receivers.parse(["a2.h3<k>"]))
    assert (res.raw == 0).all()
    assert torch.isnan(res.effects).all() and any("undefined" in n for n in res.notes)


def test_unsupported_attention_falls_back_to_hooks(tasks):
    bridge = build("gpt2", torch.float32, scale_attn_by_inverse_layer_idx=True)
    recv = Receivers.parse(["a2.h1<q>"])
    with pytest.raises(RuntimeError, match="cannot reproduce"):
        path_patch(bridge, tasks["s2"], recv, method="fast")
    res = path_patch(bridge, tasks["s2"], recv)
    assert res.method == "hooks" and "self-check failed" in res.notes[0]
    ref, m_clean, m_corr = naive_path_patch(bridge, tasks["s2"], recv, [(l, h) for l in range(L) for h in range(H)])
    assert_matches(res, ref, m_clean, m_corr, "float32")


def test_receivers_and_validation(models, tasks):
    assert Receivers.parse("logits") == Receivers.logits()
    assert Receivers.parse(["a2.h1"]).heads == ((2, 1, "k"), (2, 1, "q"), (2, 1, "v"))
    assert Receivers.parse(["a9.h6<q>", "a9.h9<q>"]) == Receivers.of_heads([(9, 6), (9, 9)], "q")
    assert Receivers.parse(["a2.h1<q>"]).describe() == "a2.h1<q>"
    with pytest.raises(GraphError):
        Receivers.parse(["m3"])
    with pytest.raises(GraphError):
        Receivers.parse(["a1.h1<x>"])
    bridge = models[("gpt2", "float32")]
    with pytest.raises(GraphError, match="outside the model"):
        path_patch(bridge, tasks["s2"], Receivers.parse(["a7.h0<q>"]))
    with pytest.raises(GraphError, match="sender a0.h9"):
        path_patch(bridge, tasks["s2"], "logits", senders=[(0, 9)])


def test_split_qkv_flag_restored_on_error(models):
    bridge = models[("gpt2", "float32")]
    with pytest.raises(ZeroDivisionError):
        with split_qkv_inputs(bridge):
            assert bridge.cfg.use_split_qkv_input
            1 / 0
    assert not bridge.cfg.use_split_qkv_input


# ---------------------------------------------------------------------------- worst case: low-rank MLPs


def lowrank_calls(monkeypatch) -> list[int]:
    """Take the fast engine's low-rank MLP route wherever the layout allows (on these tiny shapes it would not
    pay everywhere) and count its evaluations, so a test knows that it ran (or did not)."""
    from circuit_tests import path_patching as pp

    calls: list[int] = []
    real = pp._lowrank_mlp
    monkeypatch.setattr(pp._LowRankClean, "pays", lambda self, senders, k: True)

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(pp, "_lowrank_mlp", counted)
    return calls


WORST_RECEIVERS = [["logits"], ["a2.h1<q>"], ["a1.h2<k>", "a2.h3<v>"], ["a1.h0<q>", "a1.h3<v>", "a2.h2<k>"]]
EARLY_SENDERS = [(0, 1), (0, 3), (1, 2)]


@pytest.mark.parametrize("kind", ["gpt2", "neox"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("recv", WORST_RECEIVERS, ids=lambda r: "+".join(r))
def test_worst_case_low_rank_mlps_equal_definition(models, tasks, monkeypatch, kind, dtype, recv):
    """Token 0 corrupted, so every position differs and nothing is skipped: the first MLP each sender
    reaches (and, sequential blocks, the first receiver layer's MLP) run on the low-rank route."""
    calls = lowrank_calls(monkeypatch)
    bridge, task, R = models[(kind, dtype)], tasks["first"], Receivers.parse(recv)
    res = path_patch(bridge, task, R, senders=EARLY_SENDERS, method="fast", batch_size=4)
    assert res.method == "fast" and not res.notes and calls
    ref, m_clean, m_corr = naive_path_patch(bridge, task, R, EARLY_SENDERS)
    assert_matches(res, ref, m_clean, m_corr, dtype)


def test_low_rank_route_only_where_it_pays():
    """GPT-2-small shapes (12 heads x 64 over d_model 768), 16 examples: 12 senders' first MLP pays at 32 positions
    (q receivers, every position differs), not at END only (logits: the writer matrices cost more)."""
    from types import SimpleNamespace

    from circuit_tests.path_patching import _LowRankClean

    W = SimpleNamespace(W_O=torch.zeros(12, 12, 64, 768))
    at = lambda rows: _LowRankClean(W, None, None, rows, {}, 0)
    assert at(16 * 32).pays(12, 64) and at(16 * 32).pays(108, 128)
    assert not at(16).pays(12, 64) and not at(16 * 32).pays(108, 768)


@pytest.mark.parametrize("kind", ["gpt2", "neox"])
def test_mlp_the_decomposition_does_not_reproduce_keeps_the_modules(models, tasks, monkeypatch, kind):
    """A layout read wrongly (here: another activation) fails the per-batch check against ``hook_mlp_out``
    and runs exactly as a layout that cannot be read at all: the bridge's modules, no low-rank route."""
    from circuit_tests import path_patching as pp

    bridge, task = models[(kind, "float64")], tasks["first"]
    R = Receivers.parse(["a2.h1<q>", "a1.h2<v>"])
    calls = lowrank_calls(monkeypatch)
    real_init = pp._MLPMats.__init__

    def wrong_activation(self, bridge, l):
        real_init(self, bridge, l)
        self.act = torch.relu

    def unreadable(self, bridge, l):
        raise AttributeError("no W_in")

    monkeypatch.setattr(pp._MLPMats, "__init__", wrong_activation)
    checked = path_patch(bridge, task, R, senders=EARLY_SENDERS, method="fast", batch_size=4)
    monkeypatch.setattr(pp._MLPMats, "__init__", unreadable)
    modules = path_patch(bridge, task, R, senders=EARLY_SENDERS, method="fast", batch_size=4)
    assert not calls and checked.method == modules.method == "fast"
    torch.testing.assert_close(checked.raw, modules.raw, rtol=0, atol=0, equal_nan=True)
    ref, m_clean, m_corr = naive_path_patch(bridge, task, R, EARLY_SENDERS)
    assert_matches(checked, ref, m_clean, m_corr, "float64")


# ------------------------------------------------------------------------------------------- ratios


def test_ratio_arithmetic():
    e = torch.tensor([[-0.5, 0.1], [-0.2, math.nan]], dtype=torch.float64)
    r = path_patch_ratio(e, [(0, 0)])
    assert r["numerator"] == pytest.approx(-0.5) and r["denominator"] == pytest.approx(-0.6)
    assert r["signed"] == pytest.approx(0.5 / 0.6)
    assert r["absolute"] == pytest.approx(0.5 / 0.8)
    r = path_patch_ratio(e, [(0, 0), (0, 1)], denominator_heads=[(0, 0), (0, 1)])
    assert r["signed"] == pytest.approx(1.0) and r["absolute"] == pytest.approx(1.0)
    zero = path_patch_ratio(torch.zeros(2, 2), [(0, 0)])
    assert zero["signed"] is None and zero["absolute"] is None


@settings(max_examples=50, deadline=None)
@given(vals=st.lists(st.floats(-2, 2, allow_nan=False), min_size=12, max_size=12),
       pick=st.lists(st.integers(0, 11), unique=True, max_size=12))
def test_absolute_ratio_is_bounded(vals, pick):
    e = torch.tensor(vals, dtype=torch.float64).reshape(L, H)
    r = path_patch_ratio(e, [(i // H, i % H) for i in pick])
    if r["absolute"] is None:
        assert float(e.abs().sum()) == 0
    else:
        assert -1e-12 <= r["absolute"] <= 1 + 1e-12


def test_ratio_stable_across_runs(models, tasks):
    bridge = models[("neox", "float32")]
    runs = [path_patch(bridge, tasks["s2"], Receivers.logits()) for _ in range(2)]
    assert torch.equal(runs[0].effects, runs[1].effects)
    cls = [(2, 0), (2, 3)]
    r0, r1 = (path_patch_ratio(r.effects, cls) for r in runs)
    assert r0 == r1
    assert 0 <= r0["absolute"] <= 1


def test_gpt2_gelu_runs_as_the_fused_op_while_patching_and_is_restored(models, tasks, monkeypatch):
    """GPT-2's NewGELUActivation (eight elementwise passes) runs as nn.GELU(approximate="tanh") inside the fast
    engine: not called once, the result still equals the definition, and the model gets its own modules back,
    also when the engine raises."""
    from circuit_tests import path_patching as pp

    bridge, task = models[("gpt2", "float64")], tasks["first"]
    acts = [blk.mlp.original_component.act for blk in bridge.blocks]
    assert {type(a).__name__ for a in acts} == {"NewGELUActivation"}
    calls: list[int] = []
    real_forward = type(acts[0]).forward
    monkeypatch.setattr(type(acts[0]), "forward", lambda self, x: calls.append(1) or real_forward(self, x))
    R = Receivers.parse(["a2.h1<q>"])
    res = path_patch(bridge, task, R, senders=EARLY_SENDERS, method="fast", batch_size=4)
    assert res.method == "fast" and calls == []
    assert all(blk.mlp.original_component.act is a for blk, a in zip(bridge.blocks, acts))
    ref, m_clean, m_corr = naive_path_patch(bridge, task, R, EARLY_SENDERS)
    assert calls  # the reference ran the model's own activation
    assert_matches(res, ref, m_clean, m_corr, "float64")

    def boom(*args, **kwargs):
        assert type(bridge.blocks[0].mlp.original_component.act) is torch.nn.GELU
        raise RuntimeError("engine failed")

    monkeypatch.setattr(pp, "_fast_batch", boom)
    with pytest.raises(RuntimeError, match="engine failed"):
        path_patch(bridge, task, R, senders=EARLY_SENDERS, method="fast", batch_size=4)
    assert all(blk.mlp.original_component.act is a for blk, a in zip(bridge.blocks, acts))
