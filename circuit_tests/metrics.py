"""Task metrics at the END position, per example. One place, one formula each.

All functions take logits at END ``[N, V]`` and the task's ``targets [N, K]`` / ``signs [N, K]``
(+1 correct, -1 incorrect, 0 padding) and return per-example values ``[N]`` (float64 for stable means).

- ``logit_diff``:  mean logit over +1 targets minus mean logit over -1 targets
  (for one answer and one wrong token this is ``logit[answer] - logit[wrong]``).
- ``prob_diff``:   sum of softmax probability (full vocabulary) over +1 targets minus over -1 targets
  (Hanna et al.'s greater-than group sum; Tigges' ``compute_probability_diff(mode="group_sum")``).
- ``accuracy``:    1 if the best +1 target's logit beats the best -1 target's logit, else 0.
- ``kl``:          KL(P_reference || P) over the full vocabulary (reference = full model on clean input);
  Edge-Pruning's faithfulness loss. Lower is better; needs ``reference``.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["METRICS", "metric_values", "logit_diff", "prob_diff", "accuracy", "kl"]


def _group_means(values: torch.Tensor, signs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pos, neg = (signs > 0).to(values.dtype), (signs < 0).to(values.dtype)
    return (values * pos).sum(-1) / pos.sum(-1).clamp_min(1), (values * neg).sum(-1) / neg.sum(-1).clamp_min(1)


def logit_diff(logits: torch.Tensor, targets: torch.Tensor, signs: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    vals = logits.double().gather(-1, targets)
    good, bad = _group_means(vals, signs)
    return good - bad


def prob_diff(logits: torch.Tensor, targets: torch.Tensor, signs: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    probs = logits.double().softmax(-1).gather(-1, targets)
    return (probs * signs.double()).sum(-1)


def accuracy(logits: torch.Tensor, targets: torch.Tensor, signs: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    vals = logits.double().gather(-1, targets)
    neg_inf = torch.finfo(vals.dtype).min
    best_good = vals.masked_fill(signs <= 0, neg_inf).amax(-1)
    best_bad = vals.masked_fill(signs >= 0, neg_inf).amax(-1)
    return (best_good > best_bad).double()


def kl(logits: torch.Tensor, targets: torch.Tensor, signs: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    if reference is None:
        raise ValueError("the kl metric needs the full model's clean logits as reference")
    logp_ref = reference.double().log_softmax(-1)
    logp = logits.double().log_softmax(-1)
    return (logp_ref.exp() * (logp_ref - logp)).sum(-1)


METRICS: dict[str, Callable[..., torch.Tensor]] = {
    "logit_diff": logit_diff,
    "prob_diff": prob_diff,
    "accuracy": accuracy,
    "kl": kl,
}


def metric_values(name: str, logits: torch.Tensor, targets: torch.Tensor, signs: torch.Tensor,
                  reference: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example values of metric ``name`` (one of ``METRICS``)."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    return METRICS[name](logits, targets, signs, reference)
