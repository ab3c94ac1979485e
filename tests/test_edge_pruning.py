"""Edge Pruning on a LLaMA-family model with grouped-query attention (4 query heads over 2 k/v heads, RMSNorm):
it trains, is deterministic for a seed, and the KL it reports for its final circuit is the KL the patching engine
(an independent implementation of edge patching) gives for that circuit."""

from __future__ import annotations

import pytest
import torch

from circuit_tests.discovery import mask_to_circuit
from circuit_tests.edge_pruning import prune_edges
from circuit_tests.engine import PatchingEngine
from circuit_tests.models import bridge_from_hf

from .helpers import random_task
from .test_llama import llama_hf


@pytest.fixture(scope="module")
def gqa_run():
    bridge = bridge_from_hf(llama_hf(2, True))
    task = random_task(vocab=64, n=6, seq=6, ragged=True)
    kw = dict(target_sparsity=0.6, steps=8, lr=0.5, reg_lr=0.5, batch_size=4)
    return bridge, task, prune_edges(bridge, task, seed=0, **kw), prune_edges(bridge, task, seed=0, **kw)


def test_edge_pruning_on_gqa_is_deterministic_and_prunes(gqa_run):
    bridge, task, a, b = gqa_run
    assert torch.equal(a.log_alpha, b.log_alpha) and torch.equal(a.mask, b.mask) and a.kl == b.kl
    assert (a.log_alpha[torch.isfinite(a.log_alpha)] != 3.0).all()  # every real edge's logit was trained
    assert 0 < int(a.mask.sum()) < int(torch.isfinite(a.log_alpha).sum())  # some edges out, some in
    assert all(p.requires_grad for p in bridge.parameters())  # parameters unfrozen afterwards
    assert [blk.attn.original_component.num_key_value_groups for blk in bridge.blocks] == [2] * len(bridge.blocks)


def test_edge_pruning_kl_is_the_engines_kl_of_the_learned_circuit(gqa_run):
    bridge, task, r, _ = gqa_run
    eng = PatchingEngine(bridge)
    ev = eng.evaluate(task, mask_to_circuit(eng.graph, r.mask), "corrupted")
    p_full = ev.clean.log_softmax(-1)
    kl = float((p_full.exp() * (p_full - ev.circuit.log_softmax(-1))).sum(-1).mean())
    assert kl > 1e-3  # the pruned circuit differs from the full model
    assert r.kl == pytest.approx(kl, rel=1e-4, abs=1e-6)
