"""The patching engine against invariants and against the naive edge-by-edge reference (tests/reference.py)."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuit_tests.engine import ABLATIONS, PatchingEngine
from circuit_tests.graph import Circuit, empty_circuit, full_circuit, node_circuit

from .helpers import random_task, tiny_bridge
from .reference import naive_circuit_logits

KINDS = ("gpt2", "neox")
TOL = 2e-5


@pytest.fixture(scope="module")
def engines():
    return {k: PatchingEngine(tiny_bridge(k, layers=3)) for k in KINDS}


@pytest.fixture(scope="module")
def task():
    return random_task(n=5, seq=7, ragged=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ablation", ABLATIONS)
def test_full_circuit_reproduces_clean_and_empty_the_baseline(engines, task, kind, ablation):
    e = engines[kind]
    full = e.evaluate(task, full_circuit(e.graph), ablation)
    assert torch.allclose(full.circuit, full.clean, atol=TOL, rtol=0)
    empty = e.evaluate(task, empty_circuit(e.graph), ablation)
    assert torch.allclose(empty.circuit, empty.baseline, atol=TOL, rtol=0)
    if ablation == "corrupted":  # interchange ablation: the empty circuit is the corrupted run
        assert torch.allclose(empty.circuit, empty.corrupted, atol=TOL, rtol=0)
    else:  # mean / zero: the empty circuit really differs from the clean run
        assert (empty.circuit - empty.clean).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_clean_and_corrupted_logits_are_plain_forwards(engines, task, kind):
    e = engines[kind]
    ev = e.evaluate(task, full_circuit(e.graph))
    rows = torch.arange(len(task))
    with torch.no_grad():
        assert torch.allclose(ev.clean, e.bridge(task.clean)[rows, task.end], atol=TOL)
        assert torch.allclose(ev.corrupted, e.bridge(task.corrupted)[rows, task.end], atol=TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_removing_one_edge_changes_exactly_that_input(engines, task, kind):
    """Full circuit minus a0.h1->logits == clean run with that head's output swapped at the logits only."""
    e = engines[kind]
    g = e.graph
    c = Circuit(g, frozenset(full_circuit(g).edges - {("a0.h1", "logits")}))
    got = e.evaluate(task, c).circuit
    b = e.bridge
    b.set_use_attn_result(True)
    try:
        with torch.no_grad():
            _, cc = b.run_with_cache(task.clean, names_filter=["blocks.0.attn.hook_result"])
            _, kc = b.run_with_cache(task.corrupted, names_filter=["blocks.0.attn.hook_result"])
        delta = kc["blocks.0.attn.hook_result"][:, :, 1] - cc["blocks.0.attn.hook_result"][:, :, 1]
        with torch.no_grad(), b.hooks(fwd_hooks=[(f"blocks.{g.n_layers - 1}.hook_resid_post", lambda x, hook: x + delta)]):
            want = b(task.clean)[torch.arange(len(task)), task.end]
    finally:
        b.set_use_attn_result(False)
    assert torch.allclose(got, want, atol=TOL)
    assert (got - e.evaluate(task, full_circuit(g)).clean).abs().max() > 1e-3  # the patch really changed something


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ablation", ["corrupted", "mean_per_position", "zero"])
def test_node_level_equals_edge_level_expansion(engines, task, kind, ablation):
    e = engines[kind]
    nc = node_circuit(e.graph, ["a0.h1", "a1.h2", "m0", "a2.h0"])
    as_edges = Circuit(e.graph, nc.edges, level="edge")
    a = e.evaluate(task, nc, ablation).circuit
    b = e.evaluate(task, as_edges, ablation).circuit
    assert torch.allclose(a, b, atol=TOL)


def test_deterministic_bit_for_bit(engines, task):
    e = engines["neox"]
    rng = random.Random(3)
    c = Circuit(e.graph, frozenset(x for x in e.graph.edges() if rng.random() < 0.1))
    a, b = e.evaluate(task, c).circuit, e.evaluate(task, c).circuit
    assert torch.equal(a, b)


def test_batching_does_not_change_results(engines, task):
    e = engines["gpt2"]
    rng = random.Random(4)
    c = Circuit(e.graph, frozenset(x for x in e.graph.edges() if rng.random() < 0.3))
    for abl in ("corrupted", "mean"):
        a, b = e.evaluate(task, c, abl, batch_size=2).circuit, e.evaluate(task, c, abl, batch_size=64).circuit
        assert torch.allclose(a, b, atol=TOL)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(KINDS), ablation=st.sampled_from(ABLATIONS), density=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16))
def test_engine_equals_naive_reference(engines, task, kind, ablation, density, seed):
    e = engines[kind]
    rng = random.Random(seed)
    c = Circuit(e.graph, frozenset(x for x in e.graph.edges() if rng.random() < density))
    fast = e.evaluate(task, c, ablation).circuit
    slow = naive_circuit_logits(e.bridge, task, c, ablation)
    assert torch.allclose(fast, slow, atol=TOL, rtol=0), (fast - slow).abs().max()


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), layers=st.integers(1, 3), heads=st.sampled_from([1, 2, 4]), kind=st.sampled_from(KINDS))
def test_engine_equals_naive_reference_on_generated_models(seed, layers, heads, kind):
    b = tiny_bridge(kind, layers=layers, heads=heads, d_model=16, seed=seed % 97)
    e = PatchingEngine(b)
    t = random_task(n=3, seq=5, seed=seed)
    rng = random.Random(seed)
    c = Circuit(e.graph, frozenset(x for x in e.graph.edges() if rng.random() < 0.2))
    assert torch.allclose(e.evaluate(t, c).circuit, naive_circuit_logits(b, t, c), atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_folded_weights_follow_in_place_weight_edits(kind, task):
    """The engine keeps its norm-folded q/k/v weights between evaluations; an in-place edit of ln1's or a q/k/v
    linear's weights (a user poking the model, a training loop) must be seen, bit for bit as a fresh engine."""
    bridge = tiny_bridge(kind, layers=3)
    engine = PatchingEngine(bridge)
    g = engine.graph
    circuit = Circuit(g, frozenset(e for i, e in enumerate(g.edges()) if i % 3 == 0))
    before = engine.evaluate(task, circuit).circuit
    mods = engine._qkv_modules()
    assert mods is not None, "these models have separate q/k/v linears: the folded path must be the one tested"
    with torch.no_grad():
        mods[1][0].weight.mul_(1.5)        # ln1 gain of layer 1
        mods[2][1][0].weight.add_(0.05)    # q weights of layer 2
    after = engine.evaluate(task, circuit).circuit
    fresh = PatchingEngine(bridge).evaluate(task, circuit).circuit
    assert not torch.equal(before, after)
    assert torch.equal(after, fresh)
