"""Exact path patching (Wang et al. 2022 / Goldowsky-Dill et al. 2023 semantics, reference/metrics.md §6).

Effect of sender head ``s`` on a receiver set ``R``:

1. cache the clean run ``x`` and the corrupted run ``x'``;
2. run ``x`` with ``s``'s output (``hook_z``) taken from ``x'`` at every position, the output of every
   other head frozen to its clean value, MLPs recomputed; record the inputs of the receivers;
3. run ``x`` again, patching only the receivers' inputs with the recorded values;

``effect = (m_patched - m_clean) / (m_clean - m_corrupt)`` (noising-normalised: 0 = no effect, -1 = the
receivers see everything the corruption does), with ``m`` the task metric averaged over the dataset
(clean labels throughout). Receivers are ``logits`` (the residual stream before ``ln_final``: the direct
effect, MLP paths included as in McDougall's ``direct_includes_mlps=True``) or the q / k / v inputs of
given heads (``blocks.{l}.hook_{q,k,v}_input``).

How it is fast (``method="fast"``) and still exact. In step 2 every head is frozen, so nothing mixes
positions: the residual stream is ``clean + (o_s(x') - o_s(x)) + (MLP deltas)``, and only the MLPs need
recomputing, per position, layer by layer, batched over all senders. In step 3 nothing before the first
receiver layer changes, so the forward starts there; it recomputes only the receiver heads in that layer
and only query positions from the first position where the clean and corrupted prompts differ (earlier
positions are identical in every run; their keys/values come from the clean run). For the ``logits``
receiver, step 2 runs at the END positions only and step 3 is ``ln_final`` + the unembedding columns of the
scored tokens. LayerNorms, MLPs, ``ln_final`` and the unembedding are the bridge's own modules; attention is
recomputed from ``W_Q/W_K/W_V/W_O`` (and the model's own rotary cos/sin) and checked against the cached
``hook_z`` of the clean run before use: a model whose attention this code does not reproduce falls back to
``method="hooks"`` (batched hooked forwards, same definition, slower) with a note in the result.
Two MLPs see their clean input plus a low-rank term: the first one a sender reaches (``dz @ W_O[l, h]``,
rank ``d_head``) and, in sequential blocks, the first receiver layer's in step 3 (rank ``d_head`` per
receiver head there). With ``ln2(y) = gamma * center(y) / s(y) + beta`` the input projection is
``(center(x) @ A + dz @ (center(W_O) @ A)) / s(y) + c``, ``A = diag(gamma) W_in``: the clean product is shared
by all senders and each row costs ``d_head`` instead of ``d_model`` columns (``s(y)`` from the explicit
input). These plain matrices (``_MLPMats``) are checked against ``hook_mlp_out`` on every batch; a layer
they do not reproduce keeps the modules. In parallel blocks the first receiver layer's MLP reads the clean
``resid_pre``: its cached output is used. GPT-2's ``NewGELUActivation`` runs as the fused op of the same
formula while the engine computes (``_fused_activations``).
Cost: per sender, the MLPs from its layer up to the receiver layer plus the layers from the first receiver
layer on, at the computed positions; beyond those clean products nothing is shared between senders (each
sender's residual stream differs wherever the corruption reaches). Keys/values are computed once per
key/value head, and position-wise modules run on chunks of ``_ROWS`` rows (cache-sized).
Equality with the two-passes-per-sender definition is tested in ``tests/test_path_patching.py``.

Model families: receivers are per *query* head. Under grouped-query attention (LLaMA family) a k/v
receiver ``a{l}.h{h}<k>`` is query head ``h``'s own copy of the key input (the MIB convention): the fast
engine repeats key/value weights per query head, the hooks engine runs the ungrouped equivalent model
(``gqa.ungrouped``). Missing biases (bias-free projections) are zeros. When ``method="auto"`` falls back to
the hooks engine, ``result.fallback`` says why (and the claim's record carries it).

Conventions: the attention output bias ``b_O`` and positional embeddings stay clean (they belong to no
head); the ``logits`` receiver of a parallel-block model (Pythia) gets no contribution from a last-layer
sender through the same layer's MLP (that MLP does not read it).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal, Sequence, cast

import torch

from . import names
from .errors import GraphError
from .gqa import head_weights, ungrouped
from .metrics import metric_values

__all__ = [
    "Receivers",
    "PathPatchResult",
    "path_patch",
    "path_patch_ratio",
    "split_qkv_inputs",
]

Head = tuple[int, int]
Component = Literal["q", "k", "v"]


# ---------------------------------------------------------------------------------------------- API types


@dataclass(frozen=True)
class Receivers:
    """A receiver set: ``logits`` (final residual stream), or q/k/v inputs of heads.

    Build with ``Receivers.logits()``, ``Receivers.of_heads([(9, 6), (9, 9)], "q")`` or
    ``Receivers.parse(["a9.h6<q>", "a9.h9<q>"])`` (EAP-IG / MIB edge-endpoint names; ``"logits"`` alone too).
    """

    kind: Literal["logits", "heads"]
    heads: tuple[tuple[int, int, str], ...] = ()

    def __post_init__(self) -> None:
        if self.kind == "logits" and self.heads:
            raise ValueError("a logits receiver set has no heads")
        if self.kind == "heads":
            if not self.heads:
                raise ValueError("a head receiver set needs at least one (layer, head, component)")
            for l, h, c in self.heads:
                if c not in ("q", "k", "v"):
                    raise ValueError(f"receiver component must be q, k or v, got {c!r}")

    @classmethod
    def logits(cls) -> "Receivers":
        return cls("logits")

    @classmethod
    def of_heads(cls, heads: Iterable[Head], components: str = "q") -> "Receivers":
        """The ``components`` (any of ``"qkv"``) inputs of each head in ``heads``."""
        hs = tuple(sorted({(int(l), int(h), c) for l, h in heads for c in components}))
        return cls("heads", hs)

    @classmethod
    def parse(cls, spec: str | Sequence[str]) -> "Receivers":
        """``"logits"`` or names like ``"a9.h6<q>"`` (a bare ``"a9.h6"`` means all of q, k, v)."""
        items = [spec] if isinstance(spec, str) else list(spec)
        if items == ["logits"]:
            return cls.logits()
        out: set[tuple[int, int, str]] = set()
        for s in items:
            node, qkv = names.parse_receiver(s)
            if node.kind != "head":
                raise GraphError(f"receiver {s!r}: expected 'logits' alone or head inputs 'a{{L}}.h{{H}}<q|k|v>'")
            for c in qkv or "qkv":
                out.add((node.layer, node.head, c))  # type: ignore[arg-type]
        return cls("heads", tuple(sorted(out)))

    @property
    def layers(self) -> list[int]:
        return sorted({l for l, _, _ in self.heads})

    def describe(self) -> str:
        if self.kind == "logits":
            return "logits"
        return ", ".join(f"a{l}.h{h}<{c}>" for l, h, c in self.heads)


@dataclass
class PathPatchResult:
    """Per-sender path-patching effects on one receiver set.

    effects: ``[L, H]`` float64, noising-normalised ``(m_patched - m_clean) / (m_clean - m_corrupt)``;
        ``nan`` for heads that were not senders (and everywhere when ``m_clean == m_corrupt``).
    raw: ``[L, H]`` ``m_patched - m_clean`` (metric units); patched: ``[L, H]`` ``m_patched``.
    method: the engine that produced the numbers (``fast`` or ``hooks``); fallback: when ``method="auto"``
        fell back to ``hooks``, the reason (also in ``notes``), else None.
    ld_clean / ld_corrupt: the metric (logit difference by default) of the full model on clean / corrupted
        prompts, clean labels, averaged over the dataset.
    """

    effects: torch.Tensor
    raw: torch.Tensor
    patched: torch.Tensor
    ld_clean: float
    ld_corrupt: float
    receivers: Receivers
    metric: str
    n_examples: int
    method: str
    notes: list[str] = field(default_factory=list)
    fallback: str | None = None  # why the fast engine was not used although asked for ("auto"), else None

    @property
    def senders(self) -> list[Head]:
        return [tuple(x) for x in (~torch.isnan(self.raw)).nonzero().tolist()]  # type: ignore[misc]

    def top(self, k: int = 10, *, by: str = "abs") -> list[tuple[str, float]]:
        """The ``k`` senders with the largest ``|effect|`` (``by="abs"``) or most negative effect (``"neg"``)."""
        e = self.effects if not torch.isnan(self.effects).all() else self.raw
        flat = e.flatten().clone()
        key = flat.abs() if by == "abs" else -flat
        key[torch.isnan(key)] = -math.inf
        idx = key.argsort(descending=True)[:k]
        H = e.shape[1]
        return [(f"a{int(i) // H}.h{int(i) % H}", float(flat[i])) for i in idx if not math.isinf(float(key[i]))]


def path_patch_ratio(effects: torch.Tensor, numerator_heads: Iterable[Head],
                     denominator_heads: Iterable[Head] | None = None) -> dict[str, float | None]:
    """Share of the path-patching effect on one receiver set carried by a class of heads (metrics.md §6).

    ``signed = Σ_class e / Σ_D e`` and ``absolute = Σ_class |e| / Σ_D |e|`` (fractions, not %), where ``D``
    is ``denominator_heads`` (default: every sender with a finite effect). Class heads outside ``D`` are
    still counted in the numerator (so a ratio can exceed 1; the caller decides whether that is an error).
    A zero denominator gives ``None``. Also returns the two sums (``numerator``, ``denominator``, signed)
    and their absolute counterparts.
    """
    e = torch.as_tensor(effects, dtype=torch.float64)
    num = sorted({(int(l), int(h)) for l, h in numerator_heads})
    if denominator_heads is None:
        den = [tuple(x) for x in (~torch.isnan(e)).nonzero().tolist()]
    else:
        den = sorted({(int(l), int(h)) for l, h in denominator_heads})

    def total(heads: Sequence[Sequence[int]], f: Any) -> float:
        vals = [float(e[l, h]) for l, h in heads]
        vals = [v for v in vals if not math.isnan(v)]
        return float(sum(f(v) for v in vals))

    n_s, d_s = total(num, lambda v: v), total(den, lambda v: v)
    n_a, d_a = total(num, abs), total(den, abs)
    return {
        "signed": (n_s / d_s) if d_s != 0 else None,
        "absolute": (n_a / d_a) if d_a != 0 else None,
        "numerator": n_s,
        "denominator": d_s,
        "numerator_abs": n_a,
        "denominator_abs": d_a,
    }


@contextlib.contextmanager
def split_qkv_inputs(bridge: Any, on: bool = True) -> Iterator[None]:
    """Temporarily set ``use_split_qkv_input`` (turning ``use_attn_in`` off, they are exclusive); restores both."""
    cfg = bridge.cfg
    prev_split = bool(getattr(cfg, "use_split_qkv_input", False))
    prev_in = bool(getattr(cfg, "use_attn_in", False))
    try:
        if on and prev_in:
            bridge.set_use_attn_in(False)
        if prev_split != on:
            bridge.set_use_split_qkv_input(on)
        yield
    finally:
        if bool(getattr(cfg, "use_split_qkv_input", False)) != prev_split:
            bridge.set_use_split_qkv_input(prev_split)
        if prev_in and not bool(getattr(cfg, "use_attn_in", False)):
            bridge.set_use_attn_in(True)


# ---------------------------------------------------------------------------------------------- main entry


def path_patch(bridge: Any, task: Any, receivers: Receivers | str | Sequence[str], *,
               senders: Iterable[Head | str] | None = None, metric: str | None = None,
               batch_size: int = 32, method: Literal["auto", "fast", "hooks"] = "auto",
               max_rows: int = 4096) -> PathPatchResult:
    """Path-patching effect of every sender head on ``receivers`` (see the module docstring).

    task: a ``TaskData`` (clean/corrupted ``[N, T]``, ``end``, ``targets``, ``signs``).
    receivers: a ``Receivers``, ``"logits"`` or names like ``["a9.h6<q>", "a9.h9<q>"]``.
    senders: ``(layer, head)`` pairs or ``"a{L}.h{H}"`` names (default: every head).
    metric: a name in ``metrics.METRICS`` (default: the task's), always with the clean labels.
    batch_size: examples per chunk. max_rows: rows (sender x example x position) per batched tensor;
        bounds memory (about ``max_rows * d_mlp * 4`` bytes per intermediate) and keeps it cache-friendly.
    method: ``fast`` (batched, exact), ``hooks`` (batched hooked forwards), ``auto`` = fast unless its
        self-check fails on this model (then hooks, with a note in ``result.notes``).
    """
    recv = receivers if isinstance(receivers, Receivers) else Receivers.parse(receivers)
    L, H = int(bridge.cfg.n_layers), int(bridge.cfg.n_heads)
    _check_heads([(l, h) for l, h, _ in recv.heads], L, H, "receiver")
    snd = sorted({_head(x) for x in (senders if senders is not None else
                                     [(l, h) for l in range(L) for h in range(H)])})
    _check_heads(snd, L, H, "sender")
    metric = metric or getattr(task, "default_metric", None) or "logit_diff"
    if tuple(task.clean.shape) != tuple(task.corrupted.shape):
        raise ValueError(f"clean {tuple(task.clean.shape)} and corrupted {tuple(task.corrupted.shape)} "
                         "prompts must have the same shape for path patching")
    if method not in ("auto", "fast", "hooks"):
        raise ValueError(f"method must be auto, fast or hooks, got {method!r}")
    if getattr(bridge, "training", False):
        raise ValueError("path patching needs the model in eval mode (call bridge.eval())")

    N = len(task)
    if N == 0:
        raise ValueError("path patching needs at least one example")
    notes: list[str] = []
    sums = torch.zeros(len(snd), dtype=torch.float64)
    clean_sum = corrupt_sum = 0.0
    used = method if method != "auto" else "fast"
    fallback: str | None = None
    dev = _device(bridge)
    state: dict[str, Any] = {}
    with torch.no_grad():
        W = None
        if used == "fast":
            try:
                W = _Weights(bridge)
            except (AttributeError, ValueError, RuntimeError) as e:  # an attention layout this code cannot read
                if method == "fast":
                    raise RuntimeError(f"fast path patching cannot read this model's attention weights: {e}") from e
                fallback = f"fast engine cannot read this model's attention weights ({type(e).__name__}: {e})"
                notes.append(fallback + "; used batched hooked forwards")
                used = "hooks"
        for start in range(0, N, batch_size):
            idx = torch.arange(start, min(N, start + batch_size))
            b = _Batch(task, idx, dev)
            if used == "fast":
                try:
                    with _fused_activations(bridge):
                        vals, m_clean, m_corr = _fast_batch(bridge, W, b, snd, recv, metric, max_rows, state, N)
                except _SelfCheckFailed as e:
                    if method == "fast":
                        raise RuntimeError(f"fast path patching cannot reproduce this model exactly: {e}") from e
                    fallback = f"fast engine self-check failed ({e})"
                    notes.append(fallback + "; used batched hooked forwards")
                    used = "hooks"
            if used == "hooks":
                vals, m_clean, m_corr = _hooks_batch(bridge, b, snd, recv, metric, max_rows)
            sums += vals.sum(-1).cpu()
            clean_sum += float(m_clean.sum())
            corrupt_sum += float(m_corr.sum())

    m_clean, m_corr = clean_sum / N, corrupt_sum / N
    patched = torch.full((L, H), math.nan, dtype=torch.float64)
    for i, (l, h) in enumerate(snd):
        patched[l, h] = sums[i] / N
    raw = patched - m_clean
    denom = m_clean - m_corr
    if denom == 0 or not math.isfinite(denom):
        effects = torch.full_like(raw, math.nan)
        notes.append("clean and corrupted metric are equal: normalised effects are undefined (nan)")
    else:
        effects = raw / denom
    return PathPatchResult(effects=effects, raw=raw, patched=patched, ld_clean=m_clean, ld_corrupt=m_corr,
                           receivers=recv, metric=metric, n_examples=N, method=used, notes=notes, fallback=fallback)


# ---------------------------------------------------------------------------------------------- internals


class _SelfCheckFailed(Exception):
    pass


# Activation modules that spell a fused torch op as several elementwise passes -> the fused op (same formula).
_FUSED_ACTIVATIONS: dict[str, Any] = {"NewGELUActivation": lambda: torch.nn.GELU(approximate="tanh")}


@contextlib.contextmanager
def _fused_activations(bridge: Any) -> Iterator[None]:
    """Run the MLPs' activation as one fused op while the fast engine computes; restored after, also on error.

    GPT-2's ``NewGELUActivation`` writes the tanh GELU out in eight elementwise passes: 15 ms vs 2.6 ms for
    ``nn.GELU(approximate="tanh")`` on 512 x 3072 rows, about a fifth of an MLP, and MLPs are most of path
    patching's cost. Same formula, so the numbers agree to float rounding (the self-checks compare with it).
    """
    swapped: list[tuple[torch.nn.Module, str, Any]] = []
    try:
        for blk in getattr(bridge, "blocks", []):
            hf = getattr(getattr(blk, "mlp", None), "original_component", None)
            for name in ("act", "act_fn"):
                act = getattr(hf, name, None) if isinstance(hf, torch.nn.Module) else None
                make = _FUSED_ACTIVATIONS.get(type(act).__name__)
                if make is not None:
                    setattr(hf, name, make())
                    swapped.append((hf, name, act))
        yield
    finally:
        for hf, name, act in reversed(swapped):
            setattr(hf, name, act)


def _head(x: Head | str) -> Head:
    """``(layer, head)`` from a pair or an ``"a{L}.h{H}"`` name."""
    if isinstance(x, str):
        return names.parse_head(x)
    return int(x[0]), int(x[1])


def _check_heads(heads: Iterable[Head], L: int, H: int, what: str) -> None:
    for l, h in heads:
        if not (0 <= l < L and 0 <= h < H):
            raise GraphError(f"{what} a{l}.h{h} is outside the model (layers 0..{L - 1}, heads 0..{H - 1})")


def _device(bridge: Any) -> torch.device:
    try:
        return next(bridge.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


class _Batch:
    """One chunk of examples on the model's device."""

    def __init__(self, task: Any, idx: torch.Tensor, dev: torch.device) -> None:
        self.clean = task.clean[idx].to(dev)
        self.corrupted = task.corrupted[idx].to(dev)
        self.end = task.end[idx].to(dev).long()
        self.targets = task.targets[idx].to(dev).long()
        self.signs = task.signs[idx].to(dev)
        self.B, self.T = self.clean.shape
        self.rows = torch.arange(self.B, device=dev)


_LayerMats = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class _Weights:
    """The bridge's per-head weights, read once (the properties stack tensors on every access).

    Per query head (``gqa.head_weights``): under grouped-query attention key/value weights are repeated to
    the query heads that share them; missing biases are zeros.
    """

    def __init__(self, bridge: Any) -> None:
        hw = head_weights(bridge)
        self.W_Q, self.W_K, self.W_V, self.W_O = hw.W_Q, hw.W_K, hw.W_V, hw.W_O
        self.b_Q, self.b_K, self.b_V, self.b_O = hw.b_Q, hw.b_K, hw.b_V, hw.b_O
        self.W_U, self.b_U = bridge.W_U.detach(), bridge.b_U.detach()
        self.parallel = bool(getattr(bridge.cfg, "parallel_attn_mlp", False))
        self.d_head = int(bridge.cfg.d_head)
        scale = getattr(bridge.cfg, "attn_scale", -1.0)
        use_scale = getattr(bridge.cfg, "use_attn_scale", True)
        self.attn_scale = (float(scale) if scale and scale > 0 else math.sqrt(self.d_head)) if use_scale else 1.0
        self.groups = int(hw.groups)
        self._mats: dict[int, _LayerMats] = {}
        self._bridge = bridge
        self._mlps: dict[int, _MLPMats | None] = {}
        self._writers: dict[tuple[int, int], torch.Tensor] = {}

    def mlp(self, l: int) -> "_MLPMats | None":
        """Layer ``l``'s MLP as plain matrices (read once), or None when this code cannot read its layout."""
        if l not in self._mlps:
            try:
                self._mlps[l] = _MLPMats(self._bridge, l)
            except (AttributeError, ValueError, RuntimeError, TypeError):
                self._mlps[l] = None
        return self._mlps[l]

    def writer(self, l_src: int, l: int, mm: "_MLPMats") -> torch.Tensor:
        """``center(W_O[l_src, h]) @ A_l`` for every head ``h``: ``[H, e, c]`` (built once)."""
        if (l_src, l) not in self._writers:
            self._writers[(l_src, l)] = (mm.center(self.W_O[l_src]) @ mm.A).contiguous()
        return self._writers[(l_src, l)]

    def mats(self, l: int) -> "_LayerMats":
        """Layer ``l``'s attention as plain matrices (built once): ``(W_q [d, H*e], b_q [H*e], W_kv [d, 2*kv*e],
        b_kv [2*kv*e], W_o [H*e, d])``, keys/values per *key/value* head (computing them once per group, not
        once per query head, is what grouped-query attention saves) and keys before values.
        """
        if l not in self._mats:
            G = self.groups
            H, d, e = self.W_Q.shape[1:]
            kv = H // G
            wk, wv = self.W_K[l, ::G], self.W_V[l, ::G]  # one query head per group: the shared key/value head
            w_kv = torch.cat([wk, wv], 0).permute(1, 0, 2).reshape(d, 2 * kv * e).contiguous()
            b_kv = torch.cat([self.b_K[l, ::G], self.b_V[l, ::G]], 0).reshape(2 * kv * e).contiguous()
            w_q = self.W_Q[l].permute(1, 0, 2).reshape(d, H * e).contiguous()
            self._mats[l] = (w_q, self.b_Q[l].reshape(H * e).contiguous(), w_kv, b_kv,
                             self.W_O[l].reshape(H * e, -1).contiguous())
        return self._mats[l]


def _metric_at_end(bridge: Any, W: _Weights | None, x_end: torch.Tensor, targets: torch.Tensor,
                   signs: torch.Tensor, metric: str, reference: torch.Tensor | None) -> torch.Tensor:
    """Metric per row from final residual vectors ``x_end [..., B, d]`` (before ln_final) -> ``[..., B]``."""
    lead = x_end.shape[:-2]
    B, d = x_end.shape[-2:]
    x = bridge.ln_final(x_end.reshape(-1, 1, d))[:, 0]  # [R, d]
    tg = targets.expand(*lead, *targets.shape).reshape(-1, targets.shape[-1])
    sg = signs.expand(*lead, *signs.shape).reshape(-1, signs.shape[-1])
    if metric in ("logit_diff", "accuracy") and W is not None:
        cols = W.W_U[:, tg]  # [d, R, K]
        logits = torch.einsum("rd,drk->rk", x, cols) + W.b_U[tg]
        tg_local = torch.arange(tg.shape[-1], device=tg.device).expand_as(tg)
        vals = metric_values(metric, logits, tg_local, sg)
    else:
        logits = bridge.unembed(x[:, None])[:, 0]
        ref = None
        if reference is not None:
            ref = reference.expand(*lead, *reference.shape).reshape(-1, reference.shape[-1])
        vals = metric_values(metric, logits, tg, sg, ref)
    return vals.reshape(*lead, B)


def _first_diff(b: _Batch) -> torch.Tensor:
    """Per example, the first position where clean and corrupted tokens differ (T when identical)."""
    diff = b.clean != b.corrupted
    pos = torch.where(diff.any(1), diff.float().argmax(1), torch.full_like(b.end, b.T))
    return pos


def _chunks(n: int, size: int) -> Iterator[slice]:
    size = max(1, size)
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


# ------------------------------------------------------------------------------------------- fast engine


def _rotary(x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
    """NeoX-style (rotate-half) rotary on the first ``cos.shape[-1]`` dims; ``cos`` broadcastable to ``x``."""
    if cos is None:
        return x
    r = cos.shape[-1]
    xr, xp = x[..., :r], x[..., r:]
    half = r // 2
    rot = torch.cat([-xr[..., half:], xr[..., :half]], -1)
    return torch.cat([xr * cos + rot * sin, xp], -1)


def _fast_batch(bridge: Any, W: _Weights, b: _Batch, snd: list[Head], recv: Receivers, metric: str,
                max_rows: int, state: dict[str, Any], n_examples: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk of examples (of ``n_examples`` in all): per-sender per-example metric ``[S, B]``, and the clean /
    corrupted metric ``[B]``."""
    L = int(bridge.cfg.n_layers)
    par = W.parallel
    last = L - 1
    names = set()
    for l in range(L):
        names |= {f"blocks.{l}.attn.hook_z", f"blocks.{l}.hook_resid_pre", f"blocks.{l}.hook_mlp_out",
                  f"blocks.{l}.hook_attn_out", f"blocks.{l}.attn.hook_cos", f"blocks.{l}.attn.hook_sin"}
        if not par:
            names.add(f"blocks.{l}.hook_resid_mid")
        names.add(f"blocks.{l}.hook_resid_post")
    clean_logits, cc = bridge.run_with_cache(b.clean, names_filter=lambda n: n in names)
    if not state.get("structure_checked"):
        _check_structure(bridge, cc, par)
        state["structure_checked"] = True
    corr_logits, kc = bridge.run_with_cache(b.corrupted, names_filter=lambda n: n.endswith("attn.hook_z"))
    ends = (b.rows, b.end)
    ref = clean_logits[ends] if metric == "kl" else None
    m_clean = metric_values(metric, clean_logits[ends], b.targets, b.signs, ref)
    m_corr = metric_values(metric, corr_logits[ends], b.targets, b.signs, ref)
    del clean_logits, corr_logits

    S = len(snd)
    out = torch.empty(S, b.B, dtype=torch.float64, device=m_clean.device)
    # Senders that cannot reach the receivers leave them untouched: exactly the clean metric.
    if recv.kind == "logits":
        reach = [i for i, (l, _) in enumerate(snd)]
        stop = L
    else:
        top = max(recv.layers)
        reach = [i for i, (l, _) in enumerate(snd) if l < top]
        stop = top
    reach_set = set(reach)
    unreached = [i for i in range(S) if i not in reach_set]
    if unreached:
        out[unreached] = m_clean
    if not reach:
        return out, m_clean, m_corr

    # Positions computed: END only (logits) or [p_first, p_end) (head receivers).
    first = _first_diff(b)
    if bool((first > b.end).all()):  # clean == corrupted up to END everywhere: nothing can change
        out[reach] = m_clean
        return out, m_clean, m_corr
    if recv.kind == "logits":
        pos = b.end[:, None]  # [B, 1]
    else:
        p_first = int(torch.minimum(first, b.end).min())
        p_end = int(b.end.max()) + 1
        pos = torch.arange(p_first, p_end, device=b.end.device).expand(b.B, -1)
    Q = pos.shape[1]
    gather = lambda t: t[b.rows[:, None], pos]  # [B, T, ...] -> [B, Q, ...]
    reach_snd = [snd[i] for i in reach]
    firsts: dict[int, int] = {}  # senders per layer of their first MLP
    for l, _ in reach_snd:
        firsts[l + int(par)] = firsts.get(l + int(par), 0) + 1
    low = _LowRankClean(W, cc, gather, n_examples * Q, firsts, len(reach_snd))

    # The same pipeline with no patch: subtracting it cancels the (float-level) differences between this
    # recomputation and the bridge's own forward, so "no change" gives exactly the clean metric.
    if recv.kind == "heads":
        attn = _Attention(bridge, W, cc, b, p_first, p_end, recv, low)
        attn.self_check()
        zero = cc[f"blocks.{attn.l0}.hook_resid_pre"][None, :, p_first:p_end] * 0
        x_base = attn.forward({l: zero for l in recv.layers}, 1)
    else:
        x_base = cc[f"blocks.{last}.hook_resid_post"][ends][None]
    base = _metric_at_end(bridge, W, x_base, b.targets, b.signs, metric, ref)[0]

    per_sender_rows = b.B * Q
    chunk = max(1, max_rows // max(1, per_sender_rows))
    for sl in _chunks(len(reach_snd), chunk):
        group = reach_snd[sl]
        low.drop_below(group[0][0], attn.l0 if recv.kind == "heads" else -1)
        rec = _step2(bridge, W, cc, kc, group, gather, stop, recv, par, low)
        if recv.kind == "logits":
            x_end = cc[f"blocks.{last}.hook_resid_post"][ends][None] + rec[L][:, :, 0]  # [s, B, d]
            vals = _metric_at_end(bridge, W, x_end, b.targets, b.signs, metric, ref)
        else:
            x_end = attn.forward(rec, len(group))  # [s, B, d]
            vals = _metric_at_end(bridge, W, x_end, b.targets, b.signs, metric, ref)
        out[[reach[i] for i in range(sl.start, sl.stop)]] = vals - base + m_clean
    return out, m_clean, m_corr


def _check_structure(bridge: Any, cc: Any, par: bool) -> None:
    """The residual stream is the sum the fast engine assumes, and ln2 + mlp reproduce ``hook_mlp_out``."""
    L = int(bridge.cfg.n_layers)

    def close(a: torch.Tensor, ref: torch.Tensor, what: str) -> None:
        err = float((a - ref).abs().max())
        if not err <= 1e-4 * max(1.0, float(ref.abs().max())):
            raise _SelfCheckFailed(f"{what} differs by {err:.2e}")

    for l in range(L):
        pre, post = cc[f"blocks.{l}.hook_resid_pre"], cc[f"blocks.{l}.hook_resid_post"]
        attn, mlp = cc[f"blocks.{l}.hook_attn_out"], cc[f"blocks.{l}.hook_mlp_out"]
        blk = bridge.blocks[l]
        if par:
            close(pre + attn + mlp, post, f"layer {l}: resid_pre + attn_out + mlp_out vs resid_post")
            close(blk.mlp(blk.ln2(pre)), mlp, f"layer {l}: mlp(ln2(resid_pre)) vs hook_mlp_out")
        else:
            mid = cc[f"blocks.{l}.hook_resid_mid"]
            close(pre + attn, mid, f"layer {l}: resid_pre + attn_out vs resid_mid")
            close(mid + mlp, post, f"layer {l}: resid_mid + mlp_out vs resid_post")
            close(blk.mlp(blk.ln2(mid)), mlp, f"layer {l}: mlp(ln2(resid_mid)) vs hook_mlp_out")
        if l + 1 < L:
            close(post, cc[f"blocks.{l + 1}.hook_resid_pre"], f"layer {l}: resid_post vs next resid_pre")


_Fresh = tuple[int, int, int, torch.Tensor, torch.Tensor]  # (layer l, i0, i1, dz, heads): D[i0:i1] = dz @ W_O[l]


def _step2(bridge: Any, W: _Weights, cc: Any, kc: Any, group: list[Head], gather: Any, stop: int,
           recv: Receivers, par: bool, low: "_LowRankClean") -> dict[int, torch.Tensor]:
    """Residual-stream deltas of step 2 for senders ``group`` (sorted by layer) at the gathered positions.

    Returns ``{layer: D}`` with ``D [s, B, Q, d]`` the delta of ``resid_pre`` of each receiver layer
    (layer ``L`` = the final residual stream, before ``ln_final``). The first MLP a sender reaches (its own
    layer's, or the next layer's in a parallel block) sees a delta of rank ``d_head``: ``_mlp_update``.
    """
    L = int(bridge.cfg.n_layers)
    want = {L} if recv.kind == "logits" else set(recv.layers)
    s = len(group)
    layers = torch.tensor([l for l, _ in group])
    base0 = gather(cc["blocks.0.hook_resid_pre"])
    D = torch.zeros(s, *base0.shape, dtype=base0.dtype, device=base0.device)
    rec: dict[int, torch.Tensor] = {}
    fresh: _Fresh | None = None
    for l in range(stop + 1):
        if l in want:
            rec[l] = D if l == stop else D.clone()
        if l == stop:
            break
        if par:  # the MLP reads resid_pre: senders of earlier layers only
            n_act = int((layers < l).sum())
            if n_act:
                _mlp_update(bridge, W, cc, D, n_act, l, gather, f"blocks.{l}.hook_resid_pre", fresh, low)
        in_layer = [i for i, (ls, _) in enumerate(group) if ls == l]
        fresh = None
        if in_layer:
            dz = gather(kc[f"blocks.{l}.attn.hook_z"] - cc[f"blocks.{l}.attn.hook_z"])  # [B, Q, H, e]
            heads = torch.tensor([group[i][1] for i in in_layer], device=dz.device)
            D[in_layer[0]:in_layer[-1] + 1] += torch.einsum("bqhe,hed->hbqd", dz[:, :, heads], W.W_O[l][heads])
            fresh = (l, in_layer[0], in_layer[-1] + 1, dz, heads)
        if not par:  # the MLP reads resid_mid: senders up to this layer
            n_act = int((layers <= l).sum())
            if n_act:
                _mlp_update(bridge, W, cc, D, n_act, l, gather, f"blocks.{l}.hook_resid_mid", fresh, low)
    return rec


_ROWS = 512  # rows per position-wise module call: the MLP's hidden activations stay in cache (about 2x less
# time in the elementwise activation than at 4096 rows; the matrix products run as fast)


def _rowwise(fn: Any, x: torch.Tensor) -> torch.Tensor:
    """A position-wise module chain ``fn`` (LayerNorm, MLP; ``[1, n, d] -> [1, n, d]``) on ``x [..., d]``, in
    chunks of ``_ROWS`` rows."""
    d = x.shape[-1]
    flat = x.reshape(1, -1, d)
    n = flat.shape[1]
    if n <= _ROWS:
        return fn(flat).reshape(x.shape)
    out = torch.empty_like(flat)
    for i in range(0, n, _ROWS):
        out[:, i:i + _ROWS] = fn(flat[:, i:i + _ROWS])
    return out.reshape(x.shape)


def _mlp_update(bridge: Any, W: _Weights, cc: Any, D: torch.Tensor, n_act: int, l: int, gather: Any,
                base_name: str, fresh: _Fresh | None, low: "_LowRankClean") -> None:
    """``D[:n_act] += MLP_l(ln2(base + D)) - MLP_l(clean)`` at the gathered positions (in place).

    Rows ``fresh`` (senders whose delta is still ``dz @ W_O``) take the low-rank route when layer ``l``'s MLP
    is reproduced by ``_MLPMats`` on this batch; the others (and all of them otherwise) the bridge's modules.
    """
    blk = bridge.blocks[l]
    base = gather(cc[base_name])  # [B, Q, d]
    n_mod = n_act
    if fresh is not None and (clean := low.get(l, base_name, low.firsts.get(l, 0), fresh[3].shape[-1])) is not None:
        l_src, i0, i1, dz, heads = fresh
        mm, P, out0 = clean
        k, (B, Q) = i1 - i0, base.shape[:2]
        scale = mm.scale(base[None] + D[i0:i1])  # [k, B, Q, 1]
        z = dz[:, :, heads].permute(2, 0, 1, 3).reshape(k, B * Q, -1)
        M = W.writer(l_src, l, mm)[heads]  # [k, e, c]
        y = _lowrank_mlp(mm, P.reshape(B * Q, -1), scale.reshape(k, B * Q, 1), z, M)
        D[i0:i1] += y.reshape(D[i0:i1].shape).sub_(out0)
        n_mod = i0
    if n_mod:
        clean_out = gather(cc[f"blocks.{l}.hook_mlp_out"])
        y = _rowwise(lambda t: blk.mlp(blk.ln2(t)), base[None] + D[:n_mod])
        D[:n_mod] += y.sub_(clean_out[None])


class _MLPMats:
    """Layer ``l``'s ``mlp(ln2(y))`` as plain matrices, for inputs ``y = x + z @ W`` with ``z`` of few columns.

    With the norm written ``ln2(y) = gamma * center(y) / s(y) + beta`` (RMSNorm: no centering, no beta), the
    input projection(s) are ``pre = center(y) @ A / s(y) + c``, ``A = diag(gamma) @ [W_gate | W_in]``,
    ``c = beta @ [W_gate | W_in] + [b_gate | b_in]``; and ``center(y) @ A = center(x) @ A + z @ (center(W) @ A)``:
    the clean part is shared by all senders, the rest costs ``z``'s columns instead of ``d`` per row.
    Read as the bridge's forward computes (``NormalizationBridge``'s eps choice, the HF module's activation);
    ``_LowRankClean`` checks it against ``hook_mlp_out`` on every batch.
    """

    def __init__(self, bridge: Any, l: int) -> None:
        blk = bridge.blocks[l]
        ln, mlp = blk.ln2, blk.mlp
        hf = mlp.original_component
        act = getattr(hf, "act", None) or getattr(hf, "act_fn", None)
        if not callable(act):
            raise ValueError(f"no activation module on {type(hf).__name__}")
        self.act = act
        self.rms = bool(ln.uses_rms_norm)
        eps = None
        if ln.use_native_layernorm_autograd or getattr(ln.config, "layer_norm_folding", False):  # the HF module's
            eps = getattr(ln.original_component, "eps", getattr(ln.original_component, "variance_epsilon", None))
        self.eps = float(getattr(ln.config, "eps", 1e-05) if eps is None else eps)
        gamma = ln.weight.detach()
        gamma = 1.0 + gamma if ln.uses_weight_offset else gamma
        beta = None if self.rms else getattr(ln.original_component, "bias", None)
        w_gate = mlp.W_gate
        self.gated = w_gate is not None
        ws = ([w_gate.detach()] if w_gate is not None else []) + [mlp.W_in.detach()]
        bs = ([getattr(mlp, "b_gate", None)] if w_gate is not None else []) + [mlp.b_in]
        w = torch.cat(ws, 1)  # [d, c]
        b = torch.cat([torch.zeros(x.shape[1], dtype=w.dtype, device=w.device) if y is None else y.detach()
                       for x, y in zip(ws, bs)])
        self.A = (gamma[:, None] * w).contiguous()
        self.c = b if beta is None else b + beta.detach() @ w
        self.W_out = mlp.W_out.detach().contiguous()
        b_out = mlp.b_out
        zero = torch.zeros(self.W_out.shape[1], dtype=w.dtype, device=w.device)
        self.b_out = zero if b_out is None else b_out.detach()

    def center(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.rms else y - y.mean(-1, keepdim=True)

    def scale(self, y: torch.Tensor) -> torch.Tensor:
        """``s(y)`` ``[..., 1]``, as the bridge's norm computes it."""
        return (self.center(y).pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def out(self, pre: torch.Tensor) -> torch.Tensor:
        """Activation and output projection of input projections ``pre [..., c]`` -> ``[..., d]``."""
        if self.gated:
            g, u = pre.chunk(2, -1)
            h = self.act(g) * u
        else:
            h = self.act(pre)
        return torch.addmm(self.b_out, h.reshape(-1, h.shape[-1]), self.W_out).reshape(*h.shape[:-1], -1)


def _lowrank_mlp(mm: _MLPMats, P: torch.Tensor, scale: torch.Tensor, z: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``mm.out((P + z @ M) / scale + c)`` for ``P [n, c]`` (clean, shared), ``z [g, n, k]``, ``M [g or 1, k, c]``,
    ``scale [g, n, 1]`` -> ``[g, n, d]``, in blocks of about ``_ROWS`` rows (the hidden activations stay in cache)."""
    g, n = z.shape[:2]
    out = torch.empty(g, n, mm.W_out.shape[1], dtype=z.dtype, device=z.device)
    per = max(1, _ROWS // n)
    for i in range(0, g, per):
        j = min(g, i + per)
        Mi = M[i:j] if M.shape[0] > 1 else M.expand(j - i, -1, -1)
        for r in range(0, n, _ROWS):
            rs = slice(r, r + _ROWS)
            pre = torch.baddbmm(P[rs], z[i:j, rs], Mi)
            out[i:j, rs] = mm.out(torch.addcdiv(mm.c, pre, scale[i:j, rs]))
    return out


class _LowRankClean:
    """Per batch: the clean rows' ``center(x) @ A`` and MLP output for each layer that takes the low-rank
    route, computed once and checked against the bridge's ``hook_mlp_out`` (else that layer keeps the
    modules: an MLP or norm that ``_MLPMats`` does not reproduce is never used).

    rows: rows per sender over the whole dataset (examples x computed positions); firsts: per layer, the
    senders whose first MLP it is; n_reach: senders that reach the receivers.
    """

    def __init__(self, W: _Weights, cc: Any, gather: Any, rows: int, firsts: dict[int, int], n_reach: int) -> None:
        self.W, self.cc, self.gather = W, cc, gather
        self.rows, self.firsts, self.n_reach = rows, firsts, n_reach
        self._done: dict[int, tuple[_MLPMats, torch.Tensor, torch.Tensor] | None] = {}

    def pays(self, senders: int, k: int) -> bool:
        """The route saves ``senders * rows`` rows of ``d - k`` input columns and costs the writer matrices
        (``H * e`` rows of ``d``, once per call) and the clean product (``rows`` of ``d``): with few rows (the
        ``logits`` receiver reads END only) it does not pay."""
        _, H, e, d = self.W.W_O.shape
        return senders * self.rows * (d - k) > (H * e + self.rows) * d

    def get(self, l: int, base_name: str, senders: int, k: int) -> tuple[_MLPMats, torch.Tensor, torch.Tensor] | None:
        """``(mats, P [B, Q, c], clean output [B, Q, d])`` for layer ``l`` (MLP input ``base_name``) when the
        route pays for ``senders`` inputs of rank ``k`` there, else None."""
        if not self.pays(senders, k):
            return None
        if l not in self._done:
            mm = self.W.mlp(l)
            res = None
            if mm is not None:
                x = self.gather(self.cc[base_name])
                P = mm.center(x) @ mm.A
                out0 = mm.out(torch.addcdiv(mm.c, P, mm.scale(x)))
                ref = self.gather(self.cc[f"blocks.{l}.hook_mlp_out"])
                err = float((out0 - ref).abs().max())
                if err <= 1e-4 * max(1.0, float(ref.abs().max())):
                    res = (mm, P, out0)
            self._done[l] = res
        return self._done[l]

    def drop_below(self, l: int, keep: int) -> None:
        """Forget layers below ``l`` except ``keep`` (senders come in layer order)."""
        for k in [k for k in self._done if k < l and k != keep]:
            del self._done[k]


class _Attention:
    """Step 3 for head receivers: the forward from the first receiver layer on, batched over senders.

    Query positions ``[p_first, p_end)`` only (keys/values at earlier positions are the clean run's), and
    in the last layer only the END positions (the metric reads nothing else). Keys and values are computed
    per key/value head (grouped-query attention shares them; ``_Weights.mats``) and repeated per query head
    only in a layer where a k/v receiver gives one query head its own copy.
    """

    def __init__(self, bridge: Any, W: _Weights, cc: Any, b: _Batch, p_first: int, p_end: int,
                 recv: Receivers, low: _LowRankClean) -> None:
        self.bridge, self.W, self.cc, self.b, self.low = bridge, W, cc, b, low
        self.p0, self.p1 = p_first, p_end
        self.L = int(bridge.cfg.n_layers)
        self.l0 = min(recv.layers)
        self.recv: dict[int, dict[int, set[str]]] = {}
        for l, h, c in recv.heads:
            self.recv.setdefault(l, {}).setdefault(h, set()).add(c)
        self.cos: dict[int, torch.Tensor | None] = {}
        self.sin: dict[int, torch.Tensor | None] = {}
        for l in range(self.l0, self.L):
            c = cc.cache_dict.get(f"blocks.{l}.attn.hook_cos")
            s = cc.cache_dict.get(f"blocks.{l}.attn.hook_sin")
            if (c is None) != (s is None):
                raise _SelfCheckFailed("rotary cos/sin hooks incomplete")
            if c is not None and s is not None:
                c, s = c.reshape(-1, c.shape[-2], c.shape[-1])[0], s.reshape(-1, s.shape[-2], s.shape[-1])[0]
                if c.shape[-1] > W.d_head or c.shape[-1] % 2:
                    raise _SelfCheckFailed(f"unsupported rotary shape {tuple(c.shape)}")
            self.cos[l], self.sin[l] = c, s
        self.ln1_clean: dict[int, torch.Tensor] = {}
        self.k_pre: dict[int, torch.Tensor] = {}  # clean keys/values before p_first, per key/value head
        self.v_pre: dict[int, torch.Tensor] = {}

    def _rope(self, l: int, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Rotary on x ``[..., P, h, e]`` at absolute positions ``pos`` (``[P]`` or ``[B, P]``)."""
        c, s = self.cos[l], self.sin[l]
        if c is None or s is None:
            return x
        return _rotary(x, c[pos].unsqueeze(-2), s[pos].unsqueeze(-2))

    def _proj(self, x: torch.Tensor, l: int, which: str, heads: Any = slice(None)) -> torch.Tensor:
        """``x [..., p, d]`` projected by query heads ``heads`` (k/v: each query head's copy) -> ``[..., p, h, e]``."""
        Wm = getattr(self.W, f"W_{which}")[l][heads]
        bm = getattr(self.W, f"b_{which}")[l][heads]
        return torch.einsum("...pd,hde->...phe", x, Wm) + bm

    def _q(self, x: torch.Tensor, l: int) -> torch.Tensor:
        """Queries of every head: ``x [..., p, d]`` -> ``[..., p, H, e]`` (one matrix product)."""
        w_q, b_q = self.W.mats(l)[:2]
        y = torch.addmm(b_q, x.reshape(-1, x.shape[-1]), w_q)
        return y.reshape(*x.shape[:-1], -1, self.W.d_head)

    def _kv(self, x: torch.Tensor, l: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values per key/value head: ``x [..., p, d]`` -> two ``[..., p, kv, e]`` (one matrix product)."""
        w_kv, b_kv = self.W.mats(l)[2:4]
        y = torch.addmm(b_kv, x.reshape(-1, x.shape[-1]), w_kv)
        y = y.reshape(*x.shape[:-1], 2, -1, self.W.d_head)
        return y[..., 0, :, :], y[..., 1, :, :]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
        """q ``[s, B, Qn, H, e]`` at absolute positions ``qpos [B, Qn]``; k/v ``[s, B, Kn, Hk, e]`` from
        position 0, with ``Hk`` = H (one per query head) or the key/value heads (query head h reads h // G)."""
        s, B, Qn, H, e = q.shape
        Hk = k.shape[-2]
        qg = q.reshape(s, B, Qn, Hk, H // Hk, e)
        scores = torch.einsum("sbqkge,sbnke->sbkgqn", qg, k) / self.W.attn_scale
        kpos = torch.arange(k.shape[-3], device=q.device)
        masked = kpos[None, None, :] > qpos[:, :, None]  # [B, Qn, Kn]
        scores = scores.masked_fill(masked[None, :, None, None], float("-inf"))
        return torch.einsum("sbkgqn,sbnke->sbqkge", scores.softmax(-1), v).reshape(s, B, Qn, H, e)

    def _per_query_head(self, t: torch.Tensor) -> torch.Tensor:
        """``[..., kv, e]`` -> ``[..., H, e]`` (each query head's copy of its group's key or value)."""
        G = self.W.groups
        return t if G == 1 else t.repeat_interleave(G, dim=-2)

    def self_check(self) -> None:
        """Recompute the clean run's hook_z from resid_pre for layers >= l0; store clean prefix keys/values."""
        cc, bridge = self.cc, self.bridge
        for l in range(self.l0, self.L):
            ln = bridge.blocks[l].ln1(cc[f"blocks.{l}.hook_resid_pre"])  # [B, T, d]
            B, T = ln.shape[:2]
            ar = torch.arange(T, device=ln.device)
            k, v = self._kv(ln, l)
            q, k = self._rope(l, self._q(ln, l), ar), self._rope(l, k, ar)
            z = self._attend(q[None], k[None], v[None], ar[None].expand(B, -1))[0]
            ref = cc[f"blocks.{l}.attn.hook_z"]
            err = float((z - ref).abs().max())
            tol = 1e-4 * max(1.0, float(ref.abs().max()))
            if not err <= tol:
                raise _SelfCheckFailed(f"layer {l}: recomputed attention differs from hook_z by {err:.2e}")
            self.ln1_clean[l] = ln
            self.k_pre[l], self.v_pre[l] = k[:, : self.p0], v[:, : self.p0]

    def _receiver_mlp(self, l: int, mid: torch.Tensor, dz: torch.Tensor, sel: Any, heads: list[int]) -> torch.Tensor:
        """MLP output at the first receiver layer (sequential block): ``mid`` = clean ``resid_mid`` + ``dz @ W_O``
        over the receiver heads, a delta of rank ``len(heads) * d_head``: low-rank when that pays and
        ``_LowRankClean`` reproduces the layer, else the modules (the same for every sender group and the base)."""
        s, B, Qn, d = mid.shape
        k = dz.shape[-2] * dz.shape[-1]
        clean = self.low.get(l, f"blocks.{l}.hook_resid_mid", self.low.n_reach, k)
        if clean is None:
            blk = self.bridge.blocks[l]
            return _rowwise(lambda t: blk.mlp(blk.ln2(t)), mid)
        mm, P, _ = clean
        M = self.W.writer(l, l, mm)[heads].reshape(1, k, -1)
        P = sel(P[None])[0].reshape(B * Qn, -1)
        y = _lowrank_mlp(mm, P, mm.scale(mid).reshape(s, B * Qn, 1), dz.reshape(s, B * Qn, k), M)
        return y.reshape(mid.shape)

    def forward(self, rec: dict[int, torch.Tensor], s: int) -> torch.Tensor:
        """Layers l0..L-1 with receiver inputs patched to ``clean + rec[l]``; final resid at END ``[s, B, d]``."""
        cc, bridge, W, b = self.cc, self.bridge, self.W, self.b
        p0, p1 = self.p0, self.p1
        B = b.B
        dev = b.end.device
        G = W.groups
        flat = lambda t: t.reshape(-1, t.shape[-2], t.shape[-1])
        R = cc[f"blocks.{self.l0}.hook_resid_pre"][:, p0:p1][None].expand(s, -1, -1, -1)  # [s, B, Q, d]
        all_pos = torch.arange(p0, p1, device=dev)
        dzs: list[torch.Tensor] = []  # at l0: the receiver heads' z - z_clean
        for l in range(self.l0, self.L):
            blk = bridge.blocks[l]
            last = l == self.L - 1
            if last:  # only the END rows are read after this layer
                qpos = b.end[:, None]
                sel = lambda t: t[:, b.rows, b.end - p0][:, :, None]
            else:
                qpos = all_pos[None].expand(B, -1)
                sel = lambda t: t
            rh = self.recv.get(l, {})
            ln_patched: torch.Tensor | None = None  # the receivers' patched inputs, after ln1
            if rh:
                x = cc[f"blocks.{l}.hook_resid_pre"][:, p0:p1][None] + rec[l]
                ln_patched = blk.ln1(flat(x)).reshape(x.shape)
            if l == self.l0:
                # Only receiver heads change here: everything else in this layer is clean.
                ln_cur = self.ln1_clean[l][:, p0:p1][None].expand(s, -1, -1, -1)
                attn_out = sel(cc[f"blocks.{l}.hook_attn_out"][:, p0:p1][None]).expand(s, -1, -1, -1).clone()
                z_clean = sel(cc[f"blocks.{l}.attn.hook_z"][:, p0:p1][None])
                for h, comps in sorted(rh.items()):
                    xs = {c: cast(torch.Tensor, ln_patched if c in comps else ln_cur) for c in "qkv"}
                    q = self._rope(l, self._proj(sel(xs["q"]), l, "Q", [h]), qpos)
                    k = self._rope(l, self._proj(xs["k"], l, "K", [h]), all_pos)
                    v = self._proj(xs["v"], l, "V", [h])
                    g = [h // G]
                    k = torch.cat([self.k_pre[l][None, :, :, g].expand(s, -1, -1, -1, -1), k], -3)
                    v = torch.cat([self.v_pre[l][None, :, :, g].expand(s, -1, -1, -1, -1), v], -3)
                    dzs.append(self._attend(q, k, v, qpos) - z_clean[:, :, :, [h]])
                    attn_out += torch.einsum("sbqhe,hed->sbqd", dzs[-1], W.W_O[l][[h]])
            else:
                ln_cur = blk.ln1(flat(R)).reshape(R.shape)
                q = self._q(sel(ln_cur), l)
                k, v = self._kv(ln_cur, l)
                k_pre, v_pre = self.k_pre[l], self.v_pre[l]
                if any(c in comps for comps in rh.values() for c in "kv"):  # one query head gets its own copy
                    k, v = self._per_query_head(k), self._per_query_head(v)
                    k_pre, v_pre = self._per_query_head(k_pre), self._per_query_head(v_pre)
                for h, comps in sorted(rh.items()):
                    lp = cast(torch.Tensor, ln_patched)
                    if "q" in comps:
                        q[:, :, :, h] = self._proj(sel(lp), l, "Q", [h])[:, :, :, 0]
                    if "k" in comps:
                        k[:, :, :, h] = self._proj(lp, l, "K", [h])[:, :, :, 0]
                    if "v" in comps:
                        v[:, :, :, h] = self._proj(lp, l, "V", [h])[:, :, :, 0]
                q, k = self._rope(l, q, qpos), self._rope(l, k, all_pos)
                k = torch.cat([k_pre[None].expand(s, -1, -1, -1, -1), k], -3)
                v = torch.cat([v_pre[None].expand(s, -1, -1, -1, -1), v], -3)
                z = self._attend(q, k, v, qpos)
                w_o = W.mats(l)[4]
                attn_out = torch.addmm(W.b_O[l], z.reshape(-1, w_o.shape[0]), w_o).reshape(*z.shape[:-2], -1)
            R = sel(R)
            mlp = lambda t: blk.mlp(blk.ln2(t))
            if W.parallel and l == self.l0:  # the MLP reads the clean resid_pre
                R = R + attn_out + sel(cc[f"blocks.{l}.hook_mlp_out"][:, p0:p1][None])
            elif W.parallel:
                R = R + attn_out + _rowwise(mlp, R)
            else:
                mid = R + attn_out
                if l == self.l0:
                    R = mid + self._receiver_mlp(l, mid, torch.cat(dzs, -2), sel, sorted(rh))
                else:
                    R = mid + _rowwise(mlp, mid)
        return R[:, :, 0]  # the last layer selected the END rows: [s, B, d]


# ------------------------------------------------------------------------------------------ hooks engine


def _hooks_batch(bridge: Any, b: _Batch, snd: list[Head], recv: Receivers, metric: str, max_rows: int,
                 *, sender_pos: Literal["all", "end"] = "all", capture: Any = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same definition as the fast engine, with hooked forwards of ``[senders × examples]`` batches.

    ``sender_pos="end"`` patches the senders at END only; ``capture(cache_like, n_senders)`` is called with
    the step-3 activations named by ``capture.names`` (for S-inhibition's attention readout).
    """
    L = int(bridge.cfg.n_layers)
    last = L - 1
    clean_logits, cc = bridge.run_with_cache(b.clean, names_filter=lambda n: n.endswith("attn.hook_z"))
    corr_logits, kc = bridge.run_with_cache(b.corrupted, names_filter=lambda n: n.endswith("attn.hook_z"))
    ends = (b.rows, b.end)
    ref = clean_logits[ends] if metric == "kl" else None
    m_clean = metric_values(metric, clean_logits[ends], b.targets, b.signs, ref)
    m_corr = metric_values(metric, corr_logits[ends], b.targets, b.signs, ref)
    S, B, T = len(snd), b.B, b.T
    out = torch.empty(S, B, dtype=torch.float64, device=m_clean.device)
    chunk = max(1, max_rows // (B * T))
    pos_mask = torch.zeros(B, T, dtype=torch.bool, device=b.end.device)
    if sender_pos == "end":
        pos_mask[b.rows, b.end] = True
    else:
        pos_mask[:] = True
    for sl in _chunks(S, chunk):
        group = snd[sl]
        s = len(group)
        toks = b.clean.repeat(s, 1)
        recorded: dict[str, torch.Tensor] = {}

        def freeze(z: torch.Tensor, hook: Any, l: int) -> torch.Tensor:
            new = cc[f"blocks.{l}.attn.hook_z"].repeat(s, 1, 1, 1)
            corr = kc[f"blocks.{l}.attn.hook_z"]
            for i, (ls, h) in enumerate(group):
                if ls == l:
                    blk = new[i * B:(i + 1) * B, :, h]
                    blk[pos_mask] = corr[:, :, h][pos_mask]
            return new

        def record(x: torch.Tensor, hook: Any, name: str) -> None:
            recorded[name] = x.clone()

        if recv.kind == "logits":
            rec_names = [f"blocks.{last}.hook_resid_post"]
        else:
            rec_names = sorted({f"blocks.{l}.hook_{c}_input" for l, _, c in recv.heads})
        fwd = [(f"blocks.{l}.attn.hook_z", (lambda z, hook, l=l: freeze(z, hook, l))) for l in range(L)]
        kv_recv = any(c in ("k", "v") for _, _, c in recv.heads)
        with split_qkv_inputs(bridge, recv.kind == "heads"), (ungrouped(bridge) if kv_recv else contextlib.nullcontext()):
            bridge.run_with_hooks(toks, fwd_hooks=fwd + [(n, (lambda x, hook, n=n: record(x, hook, n)))
                                                         for n in rec_names])

            def patch(x: torch.Tensor, hook: Any, name: str) -> torch.Tensor:
                if recv.kind == "logits":
                    return recorded[name]
                l, c = _layer_comp(name)
                x = x.clone()
                for (lr, h, cr) in recv.heads:
                    if lr == l and cr == c:
                        x[:, :, h] = recorded[name][:, :, h]
                return x

            hooks = [(n, (lambda x, hook, n=n: patch(x, hook, n))) for n in rec_names]
            if capture is not None:
                cap: dict[str, torch.Tensor] = {}
                hooks += [(n, (lambda x, hook, n=n: cap.__setitem__(n, x.detach()))) for n in capture.names]
            logits = bridge.run_with_hooks(toks, fwd_hooks=hooks)
            if capture is not None:
                capture(cap, s, sl)
        end_logits = logits.reshape(s, B, T, -1)[:, b.rows, b.end]  # [s, B, V]
        out[sl] = metric_values(metric, end_logits.reshape(s * B, -1), b.targets.repeat(s, 1),
                                b.signs.repeat(s, 1), None if ref is None else ref.repeat(s, 1)).reshape(s, B)
    return out, m_clean, m_corr


def _layer_comp(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return int(parts[1]), parts[-1][len("hook_")]
