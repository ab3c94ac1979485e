"""Measurements of zoo checkpoints through TransformerBridge hooks: task metrics and per-head role scores.

Everything here reads a checkpoint *directory* through ``circuit_tests.models.load_bridge`` (the
route users take), with ``blocks.L.attn.hook_pattern`` ``[b, h, q, k]``, ``blocks.L.attn.hook_z``
``[b, p, h, d_head]`` and, for path patching, ``blocks.L.hook_q_input`` ``[b, p, h, d_model]``.
Head names follow the graph convention ``a{L}.h{H}``.

Shared primitives, so that the zoo's recorded numbers mean what the claims measure: attention-pattern scores
reduce through ``scores.mean_attention``, head weights come from ``gqa.head_weights`` (per query head, zero
biases where a model has none), head replacement and MLP replacement use the patching engine's hook functions
(``engine._replace_heads`` / ``engine._replace_all``), and path patching switches the split q/k/v inputs
through ``path_patching.split_qkv_inputs``.

Score definitions (all means over the held-out probe set):
- ``prev_token``: attention ``A[q, q-1]`` over all q >= 1 (BOS + r + r probe, or IOI prompts);
- ``induction``: on BOS + r + r (|r| = T), ``A[q, q-T+1]`` over q in the second copy, i.e. attention to
  the token after the previous occurrence (Olsson's prefix matching); on IOI prompts ``A[S2, S1+1]``;
- ``duplicate``: on BOS + r + r, ``A[q, q-T]``; on IOI prompts ``A[S2, S1]``;
- ``attn_io`` / ``attn_s1`` / ``attn_s2`` / ``attn_s2_prev``: IOI attention from END to IO / S1 / S2 /
  the token before S2 (the "." or "," where the model predicts the second-clause subject);
- ``dla``: direct logit attribution of the head's output at END to the task's logit difference
  (final LayerNorm scale frozen from the clean run), in logits; IOI also has ``dla_io`` / ``dla_s``:
  the head's direct effect on logit(IO) / logit(S) relative to the mean logit over all names;
- ``copy``: IOI OV copy score: the head's OV output for the (ln1-normed) residual at IO, through the
  final LN and unembedding, ranks IO first among all names (fraction of prompts);
- ``patch``: total effect of replacing the head's ``hook_z`` (all positions) with its value on the
  corrupted prompts, as (metric_patched - metric_clean) / |metric_clean - metric_corrupted| (so -1 means
  the head alone carries the whole clean-vs-corrupted difference, and negative = the head helps);
  None where the clean-vs-corrupted gap is below ``MIN_GAP`` (untrained checkpoints: noise);
- ``s_inhibition``: path patching of the head's output at END (from the corrupted run) into the
  query input of the name-mover heads only (direct edges to later-layer name movers), normalized as
  ``patch``;
- ``attn_yy``: greater-than attention from END to YY.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from ..engine import _replace_all, _replace_heads
from ..gqa import HeadWeights, head_weights
from ..path_patching import split_qkv_inputs
from ..scores import mean_attention

__all__ = ["head_name", "induction_step", "ioi_step", "greater_than_step"]


def head_name(layer: int, head: int) -> str:
    from ..names import head_name as canonical

    return canonical(layer, head)


def _load(step_dir: Path):
    from ..models import load_bridge

    return load_bridge(step_dir)


# Normalized scores (``patch``, ``s_inhibition``) divide by the clean-vs-corrupted gap of the task
# metric; below these gaps (untrained checkpoints) they are noise and are recorded as None.
MIN_GAP = {"logit_diff": 0.5, "prob_diff": 0.05}


def _grid(t: torch.Tensor | None, like: torch.Tensor | None = None) -> dict[str, float | None]:
    """[L, H] tensor -> {a{L}.h{H}: value} (rounded for the manifest); None -> all None (shape of ``like``)."""
    if t is None:
        return {head_name(l, h): None for l in range(like.shape[0]) for h in range(like.shape[1])}
    t = t.detach()
    return {head_name(l, h): round(float(t[l, h]), 4) for l in range(t.shape[0]) for h in range(t.shape[1])}


def _patterns(bridge, x: torch.Tensor) -> tuple[torch.Tensor, Any, list[torch.Tensor]]:
    logits, cache = bridge.run_with_cache(x, names_filter=lambda n: n.endswith("attn.hook_pattern") or n.endswith("attn.hook_z")
                                          or n == "ln_final.hook_scale")
    pats = [cache[f"blocks.{l}.attn.hook_pattern"] for l in range(bridge.cfg.n_layers)]
    return logits, cache, pats


def _lm_loss(bridge, x: torch.Tensor, pad_id: int = 0) -> float:
    with torch.no_grad():
        logits = bridge(x)
    lp = logits[:, :-1].log_softmax(-1)
    tgt = x[:, 1:]
    mask = tgt != pad_id
    return float(-(lp.gather(-1, tgt[..., None])[..., 0] * mask).sum() / mask.sum())


def _patch_heads(bridge, x: torch.Tensor, corr_cache, metric: Callable[[torch.Tensor], float]) -> torch.Tensor:
    """metric after replacing each head's z (all positions) with its corrupted value -> [L, H]."""
    L, H = bridge.cfg.n_layers, bridge.cfg.n_heads
    out = torch.zeros(L, H)
    for l in range(L):
        src = corr_cache[f"blocks.{l}.attn.hook_z"]
        for h in range(H):
            hook = partial(_replace_heads, heads=torch.tensor([h]), src=src)
            with torch.no_grad():
                logits = bridge.run_with_hooks(x, fwd_hooks=[(f"blocks.{l}.attn.hook_z", hook)])
            out[l, h] = metric(logits)
    return out


def _head_out(W: HeadWeights, cache, layer: int, head: int, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The head's write into the residual stream at (rows, pos): z @ W_O, [n, d_model] (b_O excluded)."""
    z = cache[f"blocks.{layer}.attn.hook_z"][rows, pos, head]
    return z @ W.W_O[layer, head]


def _dla(bridge, cache, rows, pos, direction: torch.Tensor, W: HeadWeights | None = None) -> torch.Tensor:
    """Per-head direct logit attribution along ``direction`` [n, d_model] (unembedding difference) -> [L, H]."""
    W = W if W is not None else head_weights(bridge)
    ln = bridge.ln_final._original_component if hasattr(bridge.ln_final, "_original_component") else bridge.ln_final
    scale = cache["ln_final.hook_scale"][rows, pos]  # [n, 1]
    L, H = bridge.cfg.n_layers, bridge.cfg.n_heads
    out = torch.zeros(L, H)
    for l in range(L):
        for h in range(H):
            r = _head_out(W, cache, l, h, rows, pos)
            r = (r - r.mean(-1, keepdim=True)) / scale * ln.weight
            out[l, h] = (r * direction).sum(-1).mean()
    return out


# --------------------------------------------------------------------------- induction
def induction_step(step_dir: Path, probe: torch.Tensor, half: int, heldout: torch.Tensor) -> dict[str, Any]:
    """Metrics of one induction checkpoint. ``probe`` = BOS + r + r ([n, 1 + 2*half]); ``heldout``: training-distribution rows."""
    b = _load(step_dir)
    T = half
    with torch.no_grad():
        logits, cache, pats = _patterns(b, probe)
    q_all = torch.arange(1, probe.shape[1])
    q2 = torch.arange(T + 1, 2 * T + 1)                      # second copy
    scores = {k: torch.zeros(b.cfg.n_layers, b.cfg.n_heads) for k in ("prev_token", "induction", "duplicate")}
    for l, A in enumerate(pats):
        scores["prev_token"][l] = mean_attention(A, q_all, q_all - 1)
        scores["induction"][l] = mean_attention(A, q2, q2 - T + 1)
        scores["duplicate"][l] = mean_attention(A, q2, q2 - T)
    lp = logits.log_softmax(-1)
    # in-context loss on the second copy (positions predicting r[1:] again)
    tgt = probe[:, T + 2:]
    rep_loss = float(-lp[:, T + 1:-1].gather(-1, tgt[..., None]).mean())
    first_loss = float(-lp[:, 1:T].gather(-1, probe[:, 2:T + 1, None]).mean())

    # head importance: mean-ablate each head's z (mean over batch and positions of the probe) -> rep-loss change
    L, H = b.cfg.n_layers, b.cfg.n_heads
    ablate = torch.zeros(L, H)

    for l in range(L):
        z = cache[f"blocks.{l}.attn.hook_z"]
        zmean = z.mean((0, 1)).expand_as(z)  # [b, p, h, d]: per-head mean over batch and positions
        for h in range(H):
            hook = partial(_replace_heads, heads=torch.tensor([h]), src=zmean)
            with torch.no_grad():
                lg = b.run_with_hooks(probe, fwd_hooks=[(f"blocks.{l}.attn.hook_z", hook)])
            ablate[l, h] = float(-lg[:, T + 1:-1].log_softmax(-1).gather(-1, tgt[..., None]).mean()) - rep_loss
    best_l1 = float(scores["induction"][-1].max()) if L > 1 else float(scores["induction"].max())
    return {
        "metrics": {"loss": round(_lm_loss(b, heldout), 4), "repeat_loss": round(rep_loss, 4),
                    "first_half_loss": round(first_loss, 4), "induction_score": round(best_l1, 4)},
        "heads": {k: _grid(v) for k, v in scores.items()} | {"ablation_repeat_loss_increase": _grid(ablate)},
    }


# --------------------------------------------------------------------------- IOI
def _ioi_ld(logits: torch.Tensor, ev: dict[str, torch.Tensor]) -> torch.Tensor:
    ar = torch.arange(len(ev["END"]))
    lg = logits[ar, ev["END"]]
    return lg[ar, ev["io"]] - lg[ar, ev["s"]]


def ioi_step(step_dir: Path, ev: dict[str, torch.Tensor], heldout: torch.Tensor,
             name_movers: list[tuple[int, int]] | None = None) -> dict[str, Any]:
    """Metrics of one IOI checkpoint on the held-out eval set ``ev`` (see ``data.IOIData.eval_set``).

    ``name_movers``: receivers for the S-inhibition path-patching score (default: heads with the 3
    largest positive DLA at this checkpoint)."""
    b = _load(step_dir)
    n = len(ev["END"])
    ar = torch.arange(n)
    with torch.no_grad():
        logits, cache, pats = _patterns(b, ev["clean"])
        logits_c, cache_c, _ = _patterns(b, ev["corrupted"])
    ld = _ioi_ld(logits, ev)
    ld_c = _ioi_ld(logits_c, ev)
    clean_m, corr_m = float(ld.mean()), float(ld_c.mean())
    denom = abs(clean_m - corr_m) or 1.0
    L, H = b.cfg.n_layers, b.cfg.n_heads
    s = {k: torch.zeros(L, H) for k in ("attn_io", "attn_s1", "attn_s2", "attn_s2_prev", "duplicate", "induction", "prev_token")}
    for l, A in enumerate(pats):
        s["attn_io"][l] = mean_attention(A, ev["END"], ev["IO"], rows=ar)
        s["attn_s1"][l] = mean_attention(A, ev["END"], ev["S1"], rows=ar)
        s["attn_s2"][l] = mean_attention(A, ev["END"], ev["S2"], rows=ar)
        s["attn_s2_prev"][l] = mean_attention(A, ev["END"], ev["S2"] - 1, rows=ar)
        s["duplicate"][l] = mean_attention(A, ev["S2"], ev["S1"], rows=ar)
        s["induction"][l] = mean_attention(A, ev["S2"], ev["S1"] + 1, rows=ar)
        # previous-token over real (non-pad) query positions q >= 1
        qs = torch.arange(1, A.shape[-1])
        real = (ev["clean"][:, 1:] != 0).float()                       # [n, T-1]
        s["prev_token"][l] = mean_attention(A, qs, qs - 1, weight=real)
    W = head_weights(b)
    W_U = b.W_U
    direction = (W_U[:, ev["io"]] - W_U[:, ev["s"]]).T                 # [n, d_model]
    s["dla"] = _dla(b, cache, ar, ev["END"], direction, W)
    names = torch.unique(torch.cat([ev["io"], ev["s"]]))
    mean_names = W_U[:, names].mean(-1)[None]                             # [1, d_model]
    s["dla_io"] = _dla(b, cache, ar, ev["END"], W_U[:, ev["io"]].T - mean_names, W)
    s["dla_s"] = _dla(b, cache, ar, ev["END"], W_U[:, ev["s"]].T - mean_names, W)
    gap_ok = abs(clean_m - corr_m) >= MIN_GAP["logit_diff"]
    s["patch"] = ((_patch_heads(b, ev["clean"], cache_c, lambda lg: float(_ioi_ld(lg, ev).mean())) - clean_m) / denom
                  if gap_ok else None)

    # copy score of each head: OV circuit applied to the (layer-normed) residual at IO, unembedded
    # through the final LN: fraction of prompts where IO is the top name among all names.
    ln = b.ln_final._original_component
    copy = torch.zeros(L, H)
    with torch.no_grad():
        _, c2 = b.run_with_cache(ev["clean"], names_filter=lambda nm: nm.endswith("ln1.hook_normalized"))
        for l in range(L):
            xn = c2[f"blocks.{l}.ln1.hook_normalized"][ar, ev["IO"]]      # [n, d]
            for h in range(H):
                o = (xn @ W.W_V[l, h] + W.b_V[l, h]) @ W.W_O[l, h]   # per query head (GQA), zero bias if none
                o = (o - o.mean(-1, keepdim=True)) / o.std(-1, keepdim=True, unbiased=False).clamp_min(1e-6) * ln.weight
                lg = o @ W_U[:, names]
                copy[l, h] = (names[lg.argmax(-1)] == ev["io"]).float().mean()
    s["copy"] = copy

    if name_movers is None:
        flat = s["dla"].flatten()
        name_movers = [(int(i) // H, int(i) % H) for i in flat.topk(min(3, flat.numel())).indices if flat[i] > 0]
    s["s_inhibition"] = _s_inhibition(b, W, ev, cache, cache_c, name_movers, clean_m, denom) if gap_ok else None
    return {
        "metrics": {"loss": round(_lm_loss(b, heldout), 4), "logit_diff": round(clean_m, 4),
                    "logit_diff_corrupted": round(corr_m, 4), "accuracy": round(float((ld > 0).float().mean()), 4),
                    "logit_diff_baba": round(float(ld[ev["baba"]].mean()), 4),
                    "logit_diff_abba": round(float(ld[~ev["baba"]].mean()), 4)},
        "heads": {k: _grid(v, s["dla"]) for k, v in s.items()},
        "name_mover_receivers": [head_name(l, h) for l, h in name_movers],
    }


def _s_inhibition(b, W: HeadWeights, ev, cache, cache_c, receivers, clean_m, denom) -> torch.Tensor:
    """Direct-edge path patching sender head (z at END from corrupted) -> receivers' query input at END."""
    L, H = b.cfg.n_layers, b.cfg.n_heads
    out = torch.zeros(L, H)
    ar = torch.arange(len(ev["END"]))
    end = ev["END"]
    with split_qkv_inputs(b):
        for l in range(L):
            for h in range(H):
                recv = [(rl, rh) for rl, rh in receivers if rl > l]
                if not recv:
                    continue
                delta = _head_out(W, cache_c, l, h, ar, end) - _head_out(W, cache, l, h, ar, end)  # [n, d]

                def hook(q_in, hook, heads):
                    for rh in heads:
                        q_in[ar, end, rh] += delta
                    return q_in

                by_layer: dict[int, list[int]] = {}
                for rl, rh in recv:
                    by_layer.setdefault(rl, []).append(rh)
                hooks = [(f"blocks.{rl}.hook_q_input", partial(hook, heads=hs)) for rl, hs in by_layer.items()]
                with torch.no_grad():
                    lg = b.run_with_hooks(ev["clean"], fwd_hooks=hooks)
                out[l, h] = (float(_ioi_ld(lg, ev).mean()) - clean_m) / denom
    return out


# --------------------------------------------------------------------------- greater-than
def _gt_pd(logits: torch.Tensor, ev: dict[str, torch.Tensor]) -> torch.Tensor:
    ar = torch.arange(len(ev["END"]))
    p = logits[ar, ev["END"]].double().softmax(-1)[:, ev["num_ids"]]
    gt = torch.arange(100)[None] > ev["yy"][:, None]
    return (p * gt).sum(1) - (p * ~gt).sum(1)


def greater_than_step(step_dir: Path, ev: dict[str, torch.Tensor], heldout: torch.Tensor) -> dict[str, Any]:
    b = _load(step_dir)
    n = len(ev["END"])
    ar = torch.arange(n)
    with torch.no_grad():
        logits, cache, pats = _patterns(b, ev["clean"])
        logits_c, cache_c, _ = _patterns(b, ev["corrupted"])
    pd, pd_c = _gt_pd(logits, ev), _gt_pd(logits_c, ev)
    clean_m, corr_m = float(pd.mean()), float(pd_c.mean())
    denom = abs(clean_m - corr_m) or 1.0
    L, H = b.cfg.n_layers, b.cfg.n_heads
    s = {k: torch.zeros(L, H) for k in ("attn_yy", "attn_xx", "prev_token")}
    pos_xx1 = ev["YY"] - 1
    for l, A in enumerate(pats):
        s["attn_yy"][l] = mean_attention(A, ev["END"], ev["YY"], rows=ar)
        s["attn_xx"][l] = mean_attention(A, ev["END"], pos_xx1, rows=ar)
        qs = torch.arange(1, A.shape[-1])
        s["prev_token"][l] = mean_attention(A, qs, qs - 1)
    gap_ok = abs(clean_m - corr_m) >= MIN_GAP["prob_diff"]
    s["patch"] = ((_patch_heads(b, ev["clean"], cache_c, lambda lg: float(_gt_pd(lg, ev).mean())) - clean_m) / denom
                  if gap_ok else None)
    # MLP total effects: replace hook_mlp_out (all positions) by its corrupted value
    mlp = {}
    with torch.no_grad():
        _, cm = b.run_with_cache(ev["corrupted"], names_filter=lambda nm: nm.endswith("hook_mlp_out"))
        for l in range(L):
            name = f"blocks.{l}.hook_mlp_out"
            lg = b.run_with_hooks(ev["clean"], fwd_hooks=[(name, partial(_replace_all, src=cm[name]))])
            mlp[f"m{l}"] = round((float(_gt_pd(lg, ev).mean()) - clean_m) / denom, 4) if gap_ok else None
            # zero-ablation of the MLP (how much of the task needs it at all)
            lg0 = b.run_with_hooks(ev["clean"], fwd_hooks=[(name, partial(_replace_all, src=torch.zeros(())))])
            mlp[f"m{l}_zero_ablation_pd"] = round(float(_gt_pd(lg0, ev).mean()), 4)
    return {
        "metrics": {"loss": round(_lm_loss(b, heldout), 4), "prob_diff": round(clean_m, 4),
                    "prob_diff_corrupted": round(corr_m, 4), "prob_diff_gap": round(clean_m - corr_m, 4),
                    "number_mass": round(float(logits[ar, ev["END"]].softmax(-1)[:, ev["num_ids"]].sum(1).mean()), 4)},
        "heads": {k: _grid(v, s["attn_yy"]) for k, v in s.items()},
        "mlps": mlp,
    }
