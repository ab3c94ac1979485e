"""Graph bookkeeping against the EAP-IG counts and real model configs (random init, no weights)."""

from __future__ import annotations

import pytest

from circuit_tests.errors import GraphError
from circuit_tests.graph import Graph, circuit_from_json, circuit_to_json, node_circuit, resolve_circuit


def _formula(L: int, H: int, parallel: bool) -> int:
    """reference/metrics.md §3.3, written independently of Graph.edges()."""
    per_layer = sum(3 * H * (1 + l * (H + 1)) + (1 + l * (H + 1) + (0 if parallel else H)) for l in range(L))
    return per_layer + (1 + L * (H + 1))


@pytest.mark.parametrize("L,H,parallel,nodes,edges", [
    (12, 12, False, 158, 32491),   # GPT-2 small
    (12, 12, True, 158, 32347),    # Pythia-160m
    (6, 8, True, 56, 3580),        # Pythia-70m
    (24, 16, True, 410, 231493),   # Pythia-410m
])
def test_counts_match_eap_ig(L, H, parallel, nodes, edges):
    g = Graph(L, H, parallel)
    assert len(g.nodes) == nodes
    assert g.n_edges == edges == sum(1 for _ in g.edges()) == _formula(L, H, parallel)


def test_real_configs_give_real_counts(real_config_bridges):
    """Random-init GPT-2 small and Pythia-160m built from their real configs, read through the bridge."""
    gpt2, pythia = real_config_bridges
    g1, g2 = Graph.from_bridge(gpt2), Graph.from_bridge(pythia)
    assert (g1.n_layers, g1.n_heads, g1.parallel, len(g1.nodes), g1.n_edges) == (12, 12, False, 158, 32491)
    assert (g2.n_layers, g2.n_heads, g2.parallel, len(g2.nodes), g2.n_edges) == (12, 12, True, 158, 32347)


def test_from_hf_config_dicts():
    assert Graph.from_hf_config({"n_layer": 12, "n_head": 12}) == Graph(12, 12, False)
    assert Graph.from_hf_config({"num_hidden_layers": 6, "num_attention_heads": 8, "use_parallel_residual": True}) == Graph(6, 8, True)
    with pytest.raises(GraphError):
        Graph.from_hf_config({"hidden_size": 3})


def test_upstream_rules_sequential_vs_parallel():
    seq, par = Graph(3, 2, False), Graph(3, 2, True)
    # heads read input + everything in earlier layers; sequential MLPs also read same-layer heads
    assert ("a1.h0", "m1") in set(seq.edges()) and ("a1.h0", "m1") not in set(par.edges())
    assert ("m0", "a1.h1<k>") in set(seq.edges()) and ("m0", "a1.h1<k>") in set(par.edges())
    assert ("a1.h0", "a1.h1<q>") not in set(seq.edges())
    assert ("m2", "logits") in set(par.edges()) and ("input", "m0") in set(par.edges())


@pytest.mark.parametrize("name,msg", [
    ("a12.h0", "a12.h0: no layer 12; model has layers 0-11"),
    ("a3.h12", "no head 12; model has layers 0-11, heads 0-11"),
    ("m12", "model has layers 0-11"),
    ("b1", "is not a node"),
])
def test_unknown_nodes_name_the_valid_range(name, msg):
    with pytest.raises(GraphError, match=msg.replace(".", r"\.").replace("(", r"\(")):
        Graph(12, 12, False).check_node(name)


def test_parse_edge_forms_and_errors():
    g = Graph(4, 2, True)
    assert g.parse_edge("a0.h1->a3.h0<q>") == [("a0.h1", "a3.h0<q>")]
    assert [r for _, r in g.parse_edge("a0.h1 -> a3.h0")] == ["a3.h0<q>", "a3.h0<k>", "a3.h0<v>"]
    assert g.parse_edge("input->logits") == [("input", "logits")]
    for bad, msg in [("a3.h0->a1.h0<q>", "not upstream"), ("a1.h0->m1", "not upstream"), ("logits->m1", "sends to nothing"),
                     ("a0.h0->a9.h0<q>", "no layer 9"), ("a0.h0", "not an edge"), ("a0.h0->a1.h0<x>", "not a receiver")]:
        with pytest.raises(GraphError, match=msg):
            g.parse_edge(bad)


def test_node_circuit_is_all_edges_among_nodes():
    g = Graph(3, 2, False)
    c = node_circuit(g, ["a0.h1", "m1"])
    keep = {"input", "logits", "a0.h1", "m1"}
    expected = {(s, r) for s, r in g.edges() if s in keep and r.split("<")[0] in keep}
    assert c.edges == expected
    assert ("a0.h1", "m1") in c.edges and ("input", "a0.h1<v>") in c.edges


def test_dangling_nodes_are_linted():
    g = Graph(3, 2, False)
    c = resolve_circuit(g, {"mover": ["a2.h0"]}, [], ["a0.h0->a1.h1<q>", "a1.h1->logits"], "edge")
    assert c.dangling() == ["a0.h0 (no incoming edge)", "a2.h0 (no outgoing edge)"]


def test_mib_json_round_trip():
    g = Graph(3, 2, True)
    c = resolve_circuit(g, {}, [], ["input->a0.h1<v>", "a0.h1->a2.h0<k>", "a2.h0->logits"], "edge")
    data = circuit_to_json(c, d_model=32)
    assert len(data["edges"]) == g.n_edges and data["edges"]["a0.h1->a2.h0<k>"]["in_graph"] is True
    assert data["nodes"]["a0.h1"]["in_graph"] and not data["nodes"]["a1.h0"]["in_graph"]
    assert circuit_from_json(g, data).edges == c.edges
