"""Claim measurements: turn engine outputs into a value, an outcome and the numbers behind it.

Faithfulness (reference/metrics.md §2): ``ratio = m(C)/m(M)`` (Tigges et al.) or
``normalized = (m(C) - m(M'))/(m(M) - m(M'))`` (Hanna et al. / MIB), ratios of dataset means. Never implicit.
When the denominator is below a floor the full model cannot do the task at this checkpoint and the claim is
``not_evaluated`` (never passed). A 95% bootstrap CI over examples (seeded) is reported; the gate uses the
point estimate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .metrics import metric_values

# Denominator floors per metric: below these the model "cannot do the task" (documented in the README).
DEFAULT_MIN_EFFECT = {"logit_diff": 0.5, "prob_diff": 0.05, "accuracy": 0.05}
CANNOT_DO_TASK = "cannot_do_task"


@dataclass
class Measurement:
    outcome: str  # pass | fail | not_evaluated
    value: float | None
    reason: str = ""
    reason_kind: str = ""  # CANNOT_DO_TASK or "" (used by the expectation logic)
    numbers: dict[str, Any] = field(default_factory=dict)


def _bootstrap(num: np.ndarray, den_parts: tuple[np.ndarray, ...], fn, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(n, len(num)))
    with np.errstate(divide="ignore", invalid="ignore"):  # resamples with a zero denominator are dropped below
        vals = fn(num[idx].mean(1), *(p[idx].mean(1) for p in den_parts))
    vals = vals[np.isfinite(vals)]
    if len(vals) == 0:
        return float("nan"), float("nan")
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def faithfulness(evaluation: Any, task: Any, claim: Any) -> Measurement:
    """Evaluate a FaithfulnessClaim on an engine ``Evaluation`` of the spec's circuit."""
    metric = claim.metric or task.default_metric
    if metric not in DEFAULT_MIN_EFFECT:
        return Measurement("not_evaluated", None, f"metric {metric!r} cannot be normalized as faithfulness")
    t, s = task.targets, task.signs
    full = metric_values(metric, evaluation.clean, t, s).numpy()
    base = metric_values(metric, evaluation.baseline, t, s).numpy()
    circ = metric_values(metric, evaluation.circuit, t, s).numpy()
    m_M, m_B, m_C = float(full.mean()), float(base.mean()), float(circ.mean())
    floor = claim.min_effect if claim.min_effect is not None else DEFAULT_MIN_EFFECT[metric]
    numbers: dict[str, Any] = {"metric": metric, "normalization": claim.normalization, "m_M": m_M, "m_Mprime": m_B,
                               "m_C": m_C, "min_effect": floor, "n_examples": len(full)}
    if claim.max_kl is not None:
        from .metrics import kl

        numbers["kl"] = float(kl(evaluation.circuit, t, s, reference=evaluation.clean).mean())
    if claim.normalization == "ratio":
        den = m_M
        if den < floor:
            return Measurement("not_evaluated", None, f"full model cannot do the task: m(M) = {m_M:.4g} < floor {floor:g} "
                               f"({metric})", CANNOT_DO_TASK, numbers)
        value = m_C / den
        lo, hi = _bootstrap(circ, (full,), lambda c, f: c / f)
    else:
        den = m_M - m_B
        if den < floor:
            return Measurement("not_evaluated", None, f"full model cannot do the task: m(M) - m(M') = {den:.4g} < floor "
                               f"{floor:g} ({metric})", CANNOT_DO_TASK, numbers)
        value = (m_C - m_B) / den
        lo, hi = _bootstrap(circ, (full, base), lambda c, f, b: (c - b) / (f - b))
    numbers.update(ci_low=lo, ci_high=hi)
    ok = value >= claim.min and (claim.max is None or value <= claim.max)
    why = []
    if value < claim.min:
        why.append(f"{claim.normalization} faithfulness {value:.4g} < min {claim.min:g}")
    if claim.max is not None and value > claim.max:
        why.append(f"{claim.normalization} faithfulness {value:.4g} > max {claim.max:g}")
    if claim.max_kl is not None and numbers["kl"] > claim.max_kl:
        ok = False
        why.append(f"KL(full || circuit) {numbers['kl']:.4g} > max_kl {claim.max_kl:g}")
    return Measurement("pass" if ok else "fail", value, "; ".join(why), "", numbers)
