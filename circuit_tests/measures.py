"""Claim measurements: turn engine outputs into a value, an outcome and the numbers behind it.

Faithfulness (reference/metrics.md §2): ``ratio = m(C)/m(M)`` (Tigges et al.) or
``normalized = (m(C) - m(M'))/(m(M) - m(M'))`` (Hanna et al. / MIB), ratios of dataset means. Never implicit.
When the denominator is below a floor the full model cannot do the task at this checkpoint and the claim is
``not_evaluated`` (never passed). A paired bootstrap interval over examples (seeded; stats.py) is reported; the gate
uses the point estimate, or the whole interval with ``gate: ci``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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


def faithfulness(evaluation: Any, task: Any, claim: Any, boot: Any = None, gate_mode: str = "point") -> Measurement:
    """Evaluate a FaithfulnessClaim on an engine ``Evaluation`` of the spec's circuit.

    ``boot`` (stats.BootstrapSettings) sets the paired bootstrap interval; ``gate_mode`` ``ci`` gates on the whole
    interval (outcome ``uncertain`` when it straddles a bound), ``point`` on the value (stats.gate)."""
    from . import stats
    metric = claim.metric or task.default_metric
    if metric not in DEFAULT_MIN_EFFECT:  # e.g. a custom task whose default metric is kl
        return Measurement("not_evaluated", None, f"metric {metric!r} cannot be normalized as faithfulness; "
                           f"set the claim's metric to one of {', '.join(DEFAULT_MIN_EFFECT)}")
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
        iv = stats.paired_bootstrap(stats.ratio_of_means, (circ, full), boot or stats.BootstrapSettings())
    else:
        den = m_M - m_B
        if den < floor:
            return Measurement("not_evaluated", None, f"full model cannot do the task: m(M) - m(M') = {den:.4g} < floor "
                               f"{floor:g} ({metric})", CANNOT_DO_TASK, numbers)
        value = (m_C - m_B) / den
        iv = stats.paired_bootstrap(stats.normalized, (circ, full, base), boot or stats.BootstrapSettings())
    numbers.update(ci_low=iv.low, ci_high=iv.high, gate=gate_mode, **iv.record())
    outcome = stats.gate(value, iv.low, iv.high, claim.min, claim.max, gate_mode)
    why = []
    if outcome == stats.UNCERTAIN:
        why.append(f"{claim.normalization} faithfulness {value:.4g}: its {iv.level:.0%} interval [{iv.low:.4g}, "
                   f"{iv.high:.4g}] ({iv.method}) straddles the threshold")
    elif outcome == "fail":
        shown = f"{value:.4g}" + (f" (interval [{iv.low:.4g}, {iv.high:.4g}])" if gate_mode == "ci" else "")
        if value < claim.min or (gate_mode == "ci" and iv.high < claim.min):
            why.append(f"{claim.normalization} faithfulness {shown} < min {claim.min:g}")
        else:
            why.append(f"{claim.normalization} faithfulness {shown} > max {claim.max:g}")
    if claim.max_kl is not None and numbers["kl"] > claim.max_kl:
        outcome = "fail"
        why.append(f"KL(full || circuit) {numbers['kl']:.4g} > max_kl {claim.max_kl:g}")
    return Measurement(outcome, value, "; ".join(why), "", numbers)


# ---------------------------------------------------------------- role scores

def _head(name: str) -> tuple[int, int]:
    from .names import parse_head

    return parse_head(name)


def role_scores_key(claim: Any, roles: dict[str, list[str]]) -> tuple:
    """Cache key of ``compute_role_scores``: claims that would compute the same ``HeadScores`` share it
    (s_inhibition and the copy scores are computed for the claimed heads only; the attention scores cover every
    head, as one pass gives them all)."""
    per_head = ("s_inhibition", "name_mover", "copy_suppression")
    heads = tuple(claimed_heads(claim, roles)) if claim.score_name in per_head else None
    return ("role", claim.score_name, claim.n_seq, claim.seq_len, claim.seed, heads)


def compute_role_scores(bridge: Any, task: Any, claim: Any, roles: dict[str, list[str]], bos: bool,
                        tables: Any = None) -> Any:
    """The per-head ``HeadScores`` a role-score claim needs (scores.py holds the definitions). ``tables``
    (roles.ScoreTables for the claim's repeated-sequence settings) shares the computation with the role checks."""
    from .roles import ScoreTables

    name = claim.score_name
    if tables is None:
        tables = ScoreTables(bridge, task, bos=bos, n_seq=claim.n_seq, seq_len=claim.seq_len, seed=claim.seed)
    if name in ("previous_token", "induction", "duplicate_token"):
        return tables.repeated()[name]
    if name in ("name_mover", "copy_suppression"):
        return tables.copy(name, claimed_heads(claim, roles))
    if name == "successor":
        return tables.successor()
    if name == "s_inhibition":
        # only the claimed heads are candidates: each candidate costs one path-patching sender
        return tables.s_inhibition(roles["name_mover"], claimed_heads(claim, roles))
    raise ValueError(f"unknown role score {name!r}")  # the spec schema admits only known scores


def claimed_heads(claim: Any, roles: dict[str, list[str]]) -> list[str]:
    """The heads a role-score claim scores: its ``heads`` or else every head of its role."""
    return list(claim.heads if claim.heads is not None else roles[claim.role])


def role_score(head_scores: Any, claim: Any, roles: dict[str, list[str]]) -> Measurement:
    """all / any / at least k of the role's heads reach ``min``; value = min / max / k-th largest score."""
    heads = claimed_heads(claim, roles)
    numbers: dict[str, Any] = {"score": claim.score_name, "unit": head_scores.unit, "quantifier": claim.quantifier,
                               "details": {k: v for k, v in head_scores.details.items() if isinstance(v, (int, float, str, bool))}}
    if head_scores.not_evaluated:
        return Measurement("not_evaluated", None, f"{claim.score_name} score: {head_scores.not_evaluated}", "", numbers)
    per_head = {h: float(head_scores.values[_head(h)]) for h in heads}
    numbers["per_head"] = per_head
    missing = [h for h, v in per_head.items() if v != v]  # nan
    if missing:
        return Measurement("not_evaluated", None, f"{claim.score_name} score not computed for {', '.join(missing)}", "", numbers)
    vals = sorted(per_head.values(), reverse=True)
    k = {"all": len(vals), "any": 1, "at_least": claim.k}[claim.quantifier]
    value = vals[k - 1]
    ok = value >= claim.min
    # how many claimed heads reach min, whatever the quantifier: `any` must not hide the members that do not
    numbers["earned"] = f"{sum(v >= claim.min for v in vals)} of {len(vals)}"
    shown = ", ".join(f"{h} {v:.3g}" for h, v in per_head.items())
    need = {"all": "every head", "any": "some head", "at_least": f"at least {k} heads"}[claim.quantifier]
    reason = "" if ok else f"{claim.score_name} score: {need} must reach {claim.min:g} ({head_scores.unit}); got {shown}"
    return Measurement("pass" if ok else "fail", value, reason, "", numbers)


# ---------------------------------------------------------------- path-patching ratios

def path_ratio(result: Any, claim: Any, roles: dict[str, list[str]], circuit_heads: list[str], metric: str) -> Measurement:
    """Share of the path-patching effect on the receivers carried by the sender roles (reference/metrics.md §6)."""
    from .path_patching import path_patch_ratio

    gap = float(result.ld_clean - result.ld_corrupt)
    floor = claim.min_effect if claim.min_effect is not None else DEFAULT_MIN_EFFECT.get(metric, 0.05)
    numbers: dict[str, Any] = {"metric": metric, "m_clean": float(result.ld_clean), "m_corrupted": float(result.ld_corrupt),
                               "receivers": result.receivers.describe() if hasattr(result.receivers, "describe") else str(result.receivers),
                               "measure": claim.measure, "denominator_set": claim.denominator,
                               "path_patching_method": getattr(result, "method", None)}
    fallback = getattr(result, "fallback", None)
    note = ""
    if fallback:  # the numbers are exact either way, but say which engine made them and why
        numbers["path_patching_fallback"] = fallback
        note = f"path patching fell back to the hooks engine: {fallback}"
    if gap < floor:
        return Measurement("not_evaluated", None, f"full model cannot do the task: m(clean) - m(corrupted) = {gap:.4g} < "
                           f"floor {floor:g} ({metric})" + (f"; {note}" if note else ""), CANNOT_DO_TASK, numbers)
    senders = sorted({_head(h) for r in claim.senders for h in roles[r] if h.startswith("a")})
    den = None if claim.denominator == "all" else sorted({_head(h) for h in circuit_heads})
    ratio = path_patch_ratio(result.effects, senders, den)
    numbers.update({k: ratio[k] for k in ("signed", "absolute", "numerator", "denominator", "numerator_abs", "denominator_abs")})
    numbers["effects"] = {f"a{l}.h{h}": float(result.effects[l, h]) for l, h in senders}
    value = ratio[claim.measure]
    if value is None:
        return Measurement("not_evaluated", None, "; ".join(x for x in ("zero denominator: no sender has an effect on "
                                                                        "these receivers", note) if x), "", numbers)
    ok = value >= claim.min and (claim.max is None or value <= claim.max)
    why = "" if ok else (f"{claim.measure} path ratio {value:.4g} (from {', '.join(claim.senders)} to {claim.receivers}) "
                         f"outside [{claim.min:g}, {claim.max if claim.max is not None else 'inf'}]")
    return Measurement("pass" if ok else "fail", value, "; ".join(x for x in (why, note) if x), "", numbers)
