"""The computational graph of a model (EAP-IG / MIB convention) and circuits resolved against it.

Nodes: ``input`` (token embedding only), ``a{L}.h{H}``, ``m{L}``, ``logits``. Senders are written in forward
order; receivers are the q/k/v inputs of each head, each MLP input and the logits. A head in layer l reads
input, heads and MLPs of layers < l; ``m{l}`` also reads layer-l heads in sequential blocks (GPT-2) but not in
parallel blocks (GPT-NeoX/Pythia). Positional embeddings and attention output biases belong to no node.

Grouped-query attention (LLaMA family, e.g. SmolLM2: 9 query heads sharing 3 key/value heads): heads are the
*query* heads, and each has its own q, k and v receivers — ``a{L}.h{H}<k>`` is query head H's copy of the key
input, computed with the weights of key/value head ``H // (n_heads / n_kv_heads)``. This is how MIB evaluates
GQA models (TransformerLens ``ungroup_grouped_query_attention=True``; hannamw/MIB-circuit-track), so edge
counts and circuits match theirs: the graph depends on ``n_heads`` only (``gqa.py`` realises it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterable, Iterator, Mapping

from . import names
from .errors import GraphError


@dataclass(frozen=True)
class Graph:
    """Node and edge bookkeeping for one model shape (no weights needed)."""

    n_layers: int
    n_heads: int
    parallel: bool

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> "Graph":
        """Shape from a ``config.json`` dict (GPT-2, GPT-NeoX/Pythia, Llama-style)."""
        layers = cfg.get("n_layer", cfg.get("num_hidden_layers"))
        heads = cfg.get("n_head", cfg.get("num_attention_heads"))
        if layers is None or heads is None:
            raise GraphError("config.json has no layer/head counts (n_layer/num_hidden_layers, n_head/num_attention_heads)")
        parallel = bool(cfg.get("use_parallel_residual", False)) or bool(cfg.get("parallel_attn", False))
        return cls(int(layers), int(heads), parallel)

    @classmethod
    def from_bridge(cls, bridge: Any) -> "Graph":
        c = bridge.cfg
        return cls(int(c.n_layers), int(c.n_heads), bool(getattr(c, "parallel_attn_mlp", False)))

    # ------------------------------------------------------------------ nodes
    @cached_property
    def senders(self) -> tuple[str, ...]:
        out = ["input"]
        for layer in range(self.n_layers):
            out += [f"a{layer}.h{h}" for h in range(self.n_heads)]
            out.append(f"m{layer}")
        return tuple(out)

    @cached_property
    def sender_index(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.senders)}

    @cached_property
    def receivers(self) -> tuple[str, ...]:
        out = []
        for layer in range(self.n_layers):
            out += [f"a{layer}.h{h}<{c}>" for c in "qkv" for h in range(self.n_heads)]
            out.append(f"m{layer}")
        out.append("logits")
        return tuple(out)

    @cached_property
    def receiver_index(self) -> dict[str, int]:
        return {r: i for i, r in enumerate(self.receivers)}

    @property
    def nodes(self) -> tuple[str, ...]:
        return self.senders + ("logits",)

    def head_sender(self, layer: int, head: int) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_sender(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def n_upstream(self, receiver: str) -> int:
        """Number of senders (a prefix of ``senders``) that feed ``receiver``."""
        node, _ = names.parse_receiver(receiver)
        if node.kind == "logits":
            return len(self.senders)
        if node.kind == "head":
            return 1 + node.layer * (self.n_heads + 1)  # type: ignore[operator]
        return 1 + node.layer * (self.n_heads + 1) + (0 if self.parallel else self.n_heads)  # type: ignore[operator]

    # ------------------------------------------------------------------ validation
    def check_node(self, name: str) -> str:
        """Return ``name`` if it exists in this model, else raise GraphError naming the valid range."""
        rng = f"model has layers 0-{self.n_layers - 1}, heads 0-{self.n_heads - 1}"
        try:
            node = names.parse_node(name)
        except names.NameSyntaxError as e:
            raise names.NameSyntaxError(f"{e} ({rng})") from None
        if node.kind == "head":
            if node.layer >= self.n_layers:  # type: ignore[operator]
                raise GraphError(f"{name}: no layer {node.layer}; {rng}")
            if node.head >= self.n_heads:  # type: ignore[operator]
                raise GraphError(f"{name}: no head {node.head}; {rng}")
        elif node.kind == "mlp" and node.layer >= self.n_layers:  # type: ignore[operator]
            raise GraphError(f"{name}: no MLP in layer {node.layer}; model has layers 0-{self.n_layers - 1}")
        return name

    def edges(self) -> Iterator[tuple[str, str]]:
        """Every edge ``(sender, receiver)`` of the model."""
        for r in self.receivers:
            for s in self.senders[: self.n_upstream(r)]:
                yield s, r

    @cached_property
    def n_edges(self) -> int:
        return sum(self.n_upstream(r) for r in self.receivers)

    def receivers_of(self, node: str) -> tuple[str, ...]:
        """The receiver slots of a node: q/k/v for a head, itself for an MLP or logits, none for input."""
        if node == "input":
            return ()
        if names.parse_node(node).kind == "head":
            return tuple(names.receiver_name(node, c) for c in "qkv")
        return (node,)

    def parse_edge(self, text: str) -> list[tuple[str, str]]:
        """``'a0.h1->a3.h2<q>'`` → [(a0.h1, a3.h2<q>)]; a head receiver without <q|k|v> expands to all three."""
        sender, recv, qkv = names.parse_edge(text)
        s, node = str(sender), str(recv)
        self.check_node(s)
        self.check_node(node)
        slots = [names.receiver_name(node, qkv)] if qkv or recv.kind != "head" else list(self.receivers_of(node))
        out = []
        for slot in slots:
            if self.sender_index[s] >= self.n_upstream(slot):
                raise GraphError(f"{text}: {s} is not upstream of {slot} "
                                 f"({'parallel' if self.parallel else 'sequential'} blocks)")
            out.append((s, slot))
        return out


@dataclass(frozen=True)
class Circuit:
    """A set of edges of a graph, with the roles that named its nodes."""

    graph: Graph
    edges: frozenset[tuple[str, str]]
    roles: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    level: str = "edge"
    named_nodes: frozenset[str] = frozenset()

    @property
    def nodes(self) -> frozenset[str]:
        """Nodes touched by at least one edge, plus nodes named in the spec."""
        out = set(self.named_nodes)
        for s, r in self.edges:
            out.add(s)
            out.add(names.receiver_node(r))
        return frozenset(out)

    def in_graph(self) -> "Any":
        """Boolean tensor ``[n_senders, n_receivers]``: True where the edge is in the circuit."""
        import torch

        g = self.graph
        m = torch.zeros(len(g.senders), len(g.receivers), dtype=torch.bool)
        for s, r in self.edges:
            m[g.sender_index[s], g.receiver_index[r]] = True
        return m

    def dangling(self) -> list[str]:
        """Circuit nodes that cannot matter: no in-circuit input (heads/MLPs) or no in-circuit output."""
        has_in, has_out = set(), set()
        for s, r in self.edges:
            has_out.add(s)
            has_in.add(names.receiver_node(r))
        out = []
        for n in sorted(self.nodes - {"input", "logits"}):
            if n not in has_out:
                out.append(f"{n} (no outgoing edge)")
            elif n not in has_in:
                out.append(f"{n} (no incoming edge)")
        return out


def full_circuit(graph: Graph) -> Circuit:
    return Circuit(graph, frozenset(graph.edges()), level="edge")


def empty_circuit(graph: Graph) -> Circuit:
    return Circuit(graph, frozenset(), level="edge")


def node_circuit(graph: Graph, nodes: Iterable[str], roles: Mapping[str, Iterable[str]] | None = None) -> Circuit:
    """All edges among ``nodes`` plus ``input`` and ``logits`` (node-level circuit)."""
    keep = {graph.check_node(n) for n in nodes} | {"input", "logits"}
    edges = frozenset((s, r) for s, r in graph.edges() if s in keep and names.receiver_node(r) in keep)
    return Circuit(graph, edges, {k: tuple(v) for k, v in (roles or {}).items()}, "node", frozenset(keep))


def resolve_circuit(graph: Graph, roles: Mapping[str, Iterable[str]], nodes: Iterable[str], edges: Iterable[str],
                    level: str) -> Circuit:
    """Build the circuit a spec declares; raises GraphError (naming the node/edge) when it does not fit the model."""
    role_map = {k: tuple(graph.check_node(n) for n in v) for k, v in roles.items()}
    named = [n for v in role_map.values() for n in v] + [graph.check_node(n) for n in nodes]
    if level == "node":
        return node_circuit(graph, named, role_map)
    es: set[tuple[str, str]] = set()
    for e in edges:
        es.update(graph.parse_edge(e))
    return Circuit(graph, frozenset(es), role_map, "edge", frozenset(named))


# ------------------------------------------------------------------ MIB / EAP-IG graph JSON

def circuit_to_json(circuit: Circuit, *, d_model: int, scores: Mapping[tuple[str, str], float] | None = None) -> dict[str, Any]:
    """EAP-IG ``Graph.to_json`` dict: every node and edge with ``in_graph``, edge ``score`` (0 without scores).

    ``cfg`` holds what EAP-IG's ``Graph.from_json`` passes to ``Graph.from_model``: n_layers, n_heads,
    parallel_attn_mlp and d_model (it builds neuron-level tensors of width d_model, so a file without it fails
    to load there). Node ``score`` keys are omitted: EAP-IG then keeps ``nodes_scores`` None.
    """
    g = circuit.graph
    nodes = circuit.nodes | {"input", "logits"} if circuit.edges else circuit.nodes
    sc = scores or {}
    return {
        "cfg": {"n_layers": g.n_layers, "n_heads": g.n_heads, "parallel_attn_mlp": g.parallel, "d_model": int(d_model)},
        "nodes": {n: {"in_graph": n in nodes} for n in g.nodes},
        "edges": {f"{s}->{r}": {"score": float(sc.get((s, r), 0.0)), "in_graph": (s, r) in circuit.edges}
                  for s, r in g.edges()},
    }


def circuit_from_json(graph: Graph, data: Mapping[str, Any], where: str = "graph JSON") -> Circuit:
    """Read an EAP-IG / MIB graph JSON: the edges marked ``in_graph`` (validated against ``graph``).

    A ``cfg`` whose n_layers / n_heads / parallel_attn_mlp disagree with the model is an error naming both.
    """
    cfg = data.get("cfg")
    if isinstance(cfg, Mapping):
        want = {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "parallel_attn_mlp": graph.parallel}
        bad = [f"{k} {cfg[k]!r} (model: {v!r})" for k, v in want.items() if k in cfg and cfg[k] != v]
        if bad:
            raise GraphError(f"{where}: written for another model shape: cfg " + ", ".join(bad))
    edges_obj = data.get("edges")
    if not isinstance(edges_obj, Mapping):
        raise GraphError(f"{where}: no 'edges' mapping (expected EAP-IG's Graph.to_json format)")
    es: set[tuple[str, str]] = set()
    for name, attrs in edges_obj.items():
        if not isinstance(attrs, Mapping) or not isinstance(attrs.get("in_graph", False), bool):
            raise GraphError(f"{where}: edges[{name!r}] must be an object with a boolean 'in_graph'")
        if attrs.get("in_graph"):
            try:
                es.update(graph.parse_edge(name))
            except GraphError as e:
                raise GraphError(f"{where}: edges[{name!r}]: {e}") from None
    return Circuit(graph, frozenset(es), level="edge")
