"""Per-query-head attention weights for every model family: grouped-query attention and bias-free projections.

Why one place: the graph has q, k and v receivers for every *query* head (the EAP-IG / MIB convention; MIB
evaluates GQA models through TransformerLens with ``ungroup_grouped_query_attention=True``). A LLaMA-family
model with ``n_kv`` key/value heads shares each key/value head among ``G = n_heads // n_kv`` query heads:
query head ``h`` reads key/value head ``h // G`` (``repeat_kv`` order). Everything that reads attention
weights or patches k/v inputs goes through this module, so that GPT-2 / GPT-NeoX (``G = 1``, biases present)
take exactly the code path they took before.

- ``kv_groups``: ``G`` (1 without GQA).
- ``head_weights``: ``W_Q/W_K/W_V [L, H, d_model, d_head]``, ``W_O [L, H, d_head, d_model]``, biases
  ``b_Q/b_K/b_V [L, H, d_head]``, ``b_O [L, d_model]`` — key/value weights repeated to query heads, missing
  biases (TransformerBridge raises AttributeError for bias-free projections) as zeros.
- ``ungrouped``: a context in which the bridge computes attention as its ungrouped equivalent (key/value
  projections repeated per query head, ``num_key_value_groups = 1``), so that ``hook_k_input`` /
  ``hook_v_input`` have one slot per query head. The forward is the same function; the weights are restored
  on exit, also on error.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch

__all__ = ["kv_groups", "n_kv_heads", "head_weights", "HeadWeights", "ungrouped", "bias_or_zeros"]


def n_kv_heads(bridge: Any) -> int:
    """Number of key/value heads (``n_heads`` for multi-head attention)."""
    H = int(bridge.cfg.n_heads)
    return int(getattr(bridge.cfg, "n_key_value_heads", None) or H)


def kv_groups(bridge: Any) -> int:
    """Query heads per key/value head; raises ValueError for a head count that does not divide."""
    H, kv = int(bridge.cfg.n_heads), n_kv_heads(bridge)
    if kv <= 0 or H % kv:
        raise ValueError(f"{H} query heads cannot be grouped over {kv} key/value heads")
    return H // kv


def _repeat(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Key/value-head axis (dim 1 of a stacked ``[L, n_kv, ...]`` tensor) repeated to query heads."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def bias_or_zeros(bridge: Any, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """``bridge.<name>`` (e.g. ``b_V``), or zeros of ``shape`` when the model has no such bias."""
    try:
        t = getattr(bridge, name)
    except AttributeError:
        t = None
    if t is None:
        ref = bridge.W_O
        return torch.zeros(shape, dtype=ref.dtype, device=ref.device)
    return t.detach()


@dataclass
class HeadWeights:
    """Stacked attention weights, one entry per query head (see the module docstring)."""

    W_Q: torch.Tensor
    W_K: torch.Tensor
    W_V: torch.Tensor
    W_O: torch.Tensor
    b_Q: torch.Tensor
    b_K: torch.Tensor
    b_V: torch.Tensor
    b_O: torch.Tensor
    groups: int
    has_bias: dict[str, bool]


def head_weights(bridge: Any) -> HeadWeights:
    """Read the bridge's stacked attention weights once (each property access stacks tensors anew)."""
    G = kv_groups(bridge)
    L, H = int(bridge.cfg.n_layers), int(bridge.cfg.n_heads)
    W_O = bridge.W_O.detach()
    e, d = int(W_O.shape[-2]), int(W_O.shape[-1])
    kv = H // G
    has: dict[str, bool] = {}
    biases = {}
    for name, heads in (("b_Q", H), ("b_K", kv), ("b_V", kv)):
        b = bias_or_zeros(bridge, name, (L, heads, e))
        has[name] = _has_attr(bridge, name)
        biases[name] = b
    b_O = bias_or_zeros(bridge, "b_O", (L, d))
    has["b_O"] = _has_attr(bridge, "b_O")
    return HeadWeights(W_Q=bridge.W_Q.detach(), W_K=_repeat(bridge.W_K.detach(), G), W_V=_repeat(bridge.W_V.detach(), G),
                       W_O=W_O, b_Q=biases["b_Q"], b_K=_repeat(biases["b_K"], G), b_V=_repeat(biases["b_V"], G),
                       b_O=b_O, groups=G, has_bias=has)


def _has_attr(bridge: Any, name: str) -> bool:
    try:
        return getattr(bridge, name) is not None
    except AttributeError:
        return False


@contextlib.contextmanager
def ungrouped(bridge: Any) -> Iterator[None]:
    """Run the bridge as its ungrouped equivalent: one key/value projection per query head (a no-op for MHA).

    The key/value ``nn.Linear`` weights (and biases) of every attention layer are temporarily replaced by
    copies repeated per query head, the HF module's ``num_key_value_groups`` set to 1 and the attention
    config's ``n_key_value_heads`` to ``n_heads``. Logits are unchanged (same products, no sharing); what
    changes is that ``hook_k/v_input`` give each query head its own copy of the residual stream.
    """
    G = kv_groups(bridge)
    if G == 1 or getattr(bridge, "_circuit_tests_ungrouped", False):  # MHA, or already inside this context
        yield
        return
    H = int(bridge.cfg.n_heads)
    restore: list[tuple[Any, str, Any]] = []
    try:
        for blk in bridge.blocks:
            attn = blk.attn
            hf_attn = attn.original_component
            if not all(isinstance(getattr(attn, n, None), torch.nn.Module) for n in ("k", "v")):
                raise ValueError(f"{type(attn).__name__}: no separate key/value projections; grouped-query "
                                 "attention with a fused qkv projection cannot be ungrouped (per-query-head k/v "
                                 "receivers are unsupported for this architecture)")
            if getattr(hf_attn, "num_key_value_groups", None) != G:
                raise ValueError(f"{type(hf_attn).__name__}: expected num_key_value_groups == {G}, got "
                                 f"{getattr(hf_attn, 'num_key_value_groups', None)!r}; cannot ungroup this attention")
            for lin in (attn.k, attn.v):
                mod = lin.original_component
                for pname in ("weight", "bias"):
                    p = getattr(mod, pname, None)
                    if p is None:
                        continue
                    rows = p.detach().reshape(H // G, -1, *p.shape[1:])  # [n_kv, d_head, (d_model)]
                    rep = rows.repeat_interleave(G, dim=0).reshape(-1, *p.shape[1:])
                    restore.append((mod, pname, p))
                    setattr(mod, pname, torch.nn.Parameter(rep, requires_grad=False))
                if hasattr(mod, "out_features"):
                    restore.append((mod, "out_features", mod.out_features))
                    mod.out_features = mod.out_features * G
            restore.append((hf_attn, "num_key_value_groups", G))
            hf_attn.num_key_value_groups = 1
            cfg = attn.config
            if getattr(cfg, "n_key_value_heads", None) != H:
                restore.append((cfg, "n_key_value_heads", cfg.n_key_value_heads))
                cfg.n_key_value_heads = H
        restore.append((bridge, "_circuit_tests_ungrouped", False))
        bridge._circuit_tests_ungrouped = True
        yield
    finally:
        for obj, name, value in reversed(restore):
            setattr(obj, name, value)
