"""The one grammar of graph names: nodes, receivers and edges (EAP-IG / MIB convention).

    node      input | logits | a{L}.h{H} (attention head) | m{L} (MLP)
    receiver  a{L}.h{H}<q|k|v> | a{L}.h{H} (all of q, k, v, where allowed) | m{L} | logits
    edge      SENDER->RECEIVER   (spaces around ``->`` are allowed; the sender is never ``logits``)

``L`` and ``H`` are ASCII decimals without leading zeros (``0``, ``7``, ``12``). Why so strict: the graph keys
its nodes by their exact text, so ``a00.h03`` or ``a１.h2`` (full-width digit) would parse as numbers yet
match no node and silently vanish from a circuit. Anything else is rejected with a ``NameSyntaxError`` whose
message carries the canonical form when one can be guessed (``did you mean 'a0.h3'?``).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

from .errors import GraphError

__all__ = ["Node", "NameSyntaxError", "parse_node", "parse_head", "parse_receiver", "parse_edge", "head_name",
           "mlp_name", "receiver_name", "edge_name", "receiver_node", "suggest_node", "NODE_GRAMMAR", "RECEIVER_GRAMMAR",
           "EDGE_GRAMMAR"]

NODE_GRAMMAR = "a{L}.h{H} (attention head), m{L} (MLP), input or logits"
RECEIVER_GRAMMAR = "a{L}.h{H}<q|k|v>, a{L}.h{H} (all of q, k, v), m{L} or logits"
EDGE_GRAMMAR = "SENDER->RECEIVER such as a0.h1->a3.h2<q>, m2->a5.h0<v>, input->m0, a11.h10->logits"

_NUM = r"(0|[1-9][0-9]*)"
_NODE = re.compile(rf"input|logits|a{_NUM}\.h{_NUM}|m{_NUM}", re.ASCII)
_RECV = re.compile(rf"(?P<node>a{_NUM}\.h{_NUM}|m{_NUM}|logits)(?:<(?P<qkv>[qkv])>)?", re.ASCII)
_ARROW = re.compile(r" *-> *")
Kind = Literal["input", "head", "mlp", "logits"]


class NameSyntaxError(GraphError, ValueError):
    """A node/receiver/edge name does not follow the grammar (a ValueError too, so pydantic reports it)."""


@dataclass(frozen=True)
class Node:
    """A parsed node: ``kind`` plus ``layer`` (heads, MLPs) and ``head`` (heads)."""

    kind: Kind
    layer: int | None = None
    head: int | None = None

    def __str__(self) -> str:
        if self.kind == "head":
            return head_name(self.layer, self.head)  # type: ignore[arg-type]
        if self.kind == "mlp":
            return mlp_name(self.layer)  # type: ignore[arg-type]
        return self.kind


def head_name(layer: int, head: int) -> str:
    return f"a{int(layer)}.h{int(head)}"


def mlp_name(layer: int) -> str:
    return f"m{int(layer)}"


def receiver_name(node: str, qkv: str | None = None) -> str:
    return f"{node}<{qkv}>" if qkv else node


def edge_name(sender: str, receiver: str) -> str:
    return f"{sender}->{receiver}"


def receiver_node(receiver: str) -> str:
    """The node of a canonical receiver name (``'a3.h2<q>'`` → ``'a3.h2'``); cheap, for names the graph made."""
    return receiver.partition("<")[0]


# ------------------------------------------------------------------------------------------ suggestions

_LOOSE = [
    (re.compile(r"a(\d+)\.?h(\d+)", re.ASCII), lambda m: head_name(int(m[1]), int(m[2]))),
    (re.compile(r"l(\d+)\.?h(\d+)", re.ASCII), lambda m: head_name(int(m[1]), int(m[2]))),
    (re.compile(r"a(\d+)\.(\d+)", re.ASCII), lambda m: head_name(int(m[1]), int(m[2]))),
    (re.compile(r"(?:m|mlp)\.?(\d+)", re.ASCII), lambda m: mlp_name(int(m[1]))),
    (re.compile(r"(input|logits)"), lambda m: m[1]),
]


def _loosen(text: str) -> str:
    """Compatibility-normalise, map any Unicode decimal digit to ASCII, drop whitespace, lower-case."""
    t = unicodedata.normalize("NFKC", text)
    t = "".join(str(unicodedata.decimal(c)) if unicodedata.decimal(c, None) is not None else c for c in t)
    return "".join(t.split()).lower()


def suggest_node(text: str) -> str | None:
    """The canonical node a near-miss most likely means (``a00.h03`` → ``a0.h3``), or None."""
    if not isinstance(text, str):
        return None
    t = _loosen(text)
    for rx, fmt in _LOOSE:
        m = rx.fullmatch(t)
        if m:
            out = fmt(m)
            return out if out != text else None
    return None


def _bad(text: object, what: str, grammar: str, guess: str | None) -> NameSyntaxError:
    hint = f"; did you mean {guess!r}?" if guess else ""
    return NameSyntaxError(f"{text!r} is not {what}: expected {grammar}{hint}")


# ------------------------------------------------------------------------------------------ parsers

def parse_node(text: str) -> Node:
    """``'a9.h6'`` → Node('head', 9, 6); raises NameSyntaxError for anything not canonical."""
    if not isinstance(text, str):
        raise NameSyntaxError(f"{text!r} is not a node name (expected a string: {NODE_GRAMMAR})")
    m = _NODE.fullmatch(text)
    if m is None:
        raise _bad(text, "a node name", NODE_GRAMMAR, suggest_node(text))
    if text in ("input", "logits"):
        return Node(text)  # type: ignore[arg-type]
    if m[1] is not None:
        return Node("head", int(m[1]), int(m[2]))
    return Node("mlp", int(m[3]))


def parse_head(text: str) -> tuple[int, int]:
    """``'a9.h6'`` → (9, 6); any other node or malformed name is a NameSyntaxError."""
    n = parse_node(text)
    if n.kind != "head":
        raise NameSyntaxError(f"{text!r} is not an attention head: expected a{{L}}.h{{H}}")
    return n.layer, n.head  # type: ignore[return-value]


def parse_receiver(text: str) -> tuple[Node, str | None]:
    """``'a3.h2<q>'`` → (Node('head', 3, 2), 'q'); ``'m2'`` → (Node('mlp', 2), None). One component per name:
    ``<qk>`` is rejected (write two receivers)."""
    if not isinstance(text, str):
        raise NameSyntaxError(f"{text!r} is not a receiver (expected a string: {RECEIVER_GRAMMAR})")
    m = _RECV.fullmatch(text)
    if m is None and text == "input":
        raise NameSyntaxError("'input' is not a receiver: the input node (token embedding) receives nothing")
    if m is None:
        base, _, rest = text.partition("<")
        guess = suggest_node(base) if rest in ("", "q>", "k>", "v>") else None
        if rest and len(rest) > 2 and rest.endswith(">") and set(rest[:-1]) <= set("qkv"):
            node = guess or base
            guess = " and ".join(f"{node}<{c}>" for c in rest[:-1])
        elif guess and rest:
            guess = f"{guess}<{rest}"
        raise _bad(text, "a receiver", RECEIVER_GRAMMAR, guess)
    node = parse_node(m["node"])
    if m["qkv"] and node.kind != "head":
        raise NameSyntaxError(f"{text!r}: only attention heads have <q|k|v> inputs")
    return node, m["qkv"]


def parse_edge(text: str) -> tuple[Node, Node, str | None]:
    """``'a0.h1->a3.h2<q>'`` → (sender, receiver node, 'q'|'k'|'v'|None)."""
    if not isinstance(text, str):
        raise NameSyntaxError(f"{text!r} is not an edge (expected a string: {EDGE_GRAMMAR})")
    parts = _ARROW.split(text)
    if len(parts) != 2:
        raise NameSyntaxError(f"{text!r} is not an edge: expected {EDGE_GRAMMAR}")
    s_text, r_text = parts
    try:
        sender = parse_node(s_text)
    except NameSyntaxError as e:
        raise NameSyntaxError(f"{text!r}: sender {e}") from None
    if sender.kind == "logits":
        raise NameSyntaxError(f"{text!r}: logits sends to nothing (it is only a receiver)")
    try:
        receiver, qkv = parse_receiver(r_text)
    except NameSyntaxError as e:
        raise NameSyntaxError(f"{text!r}: receiver {e}") from None
    return sender, receiver, qkv
