"""Claim types as a registry: for each type, how it is measured at a checkpoint (and which thresholds its record
carries) and how its failure report reads.

Why a registry: the runner and the failure report used to repeat the same if-chain over claim types; a new claim
type was three edits in two modules that could disagree. Now it is one ``register`` call here, and an unknown type
is a clear error instead of falling into the last branch.

``measure(run, res, claim, rec)`` gets the spec run, the checkpoint's evaluated state (``runner.CheckpointResult``:
bridge, task, circuit, engine evaluation, a per-checkpoint cache for expensive intermediate results) and the record
to fill with thresholds; it returns a ``measures.Measurement``. ``details(rec, bounds)`` returns the failure-report
lines that follow ``reason:`` (``bounds`` is the threshold text, e.g. ``>= 0.8 and <= 1.2``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .errors import CircuitTestsError
from .results import Record

__all__ = ["ClaimType", "CLAIM_TYPES", "register", "claim_type", "fmt"]


@dataclass(frozen=True)
class ClaimType:
    name: str
    measure: Callable[[Any, Any, Any, Record], Any]
    details: Callable[[Record, str], list[str]]


CLAIM_TYPES: dict[str, ClaimType] = {}


def register(name: str, measure: Callable[[Any, Any, Any, Record], Any],
             details: Callable[[Record, str], list[str]]) -> ClaimType:
    """Add (or replace) a claim type; returns its entry."""
    CLAIM_TYPES[name] = ClaimType(name, measure, details)
    return CLAIM_TYPES[name]


def claim_type(name: str) -> ClaimType:
    try:
        return CLAIM_TYPES[name]
    except KeyError:
        raise CircuitTestsError(f"unknown claim type {name!r}; known: {', '.join(sorted(CLAIM_TYPES))}") from None


def fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.4g}"


# ---------------------------------------------------------------------------------------------------------------
# faithfulness: the circuit reproduces the model's task behaviour (engine evaluation of the whole circuit)
# ---------------------------------------------------------------------------------------------------------------

def _faithfulness(run: Any, res: Any, claim: Any, rec: Record) -> Any:
    from .baseline import measure_faithfulness
    from .stats import settings_from

    spec = run.loaded.spec
    rec.threshold_min, rec.threshold_max, rec.max_kl = claim.min, claim.max, claim.max_kl
    rec.ablation = (claim.ablations or [spec.ablation])[0]
    return measure_faithfulness(res, claim, spec, run.gate_of(claim), settings_from(claim.bootstrap or spec.bootstrap))


def _faithfulness_details(r: Record, bounds: str) -> list[str]:
    if r.value is None and r.m_M is None:
        return []
    x = r.extra
    lines = [f"  measured:      {fmt(r.value)} ({r.normalization}, {r.metric})   threshold: {bounds}",
             f"  {x.get('ci_level', 0.95):.0%} CI:        [{fmt(r.ci_low)}, {fmt(r.ci_high)}] over {r.n_examples} examples "
             f"(paired bootstrap, {x.get('ci_method', 'percentile')}, {x.get('ci_resamples', '?')} resamples, seed "
             f"{x.get('ci_seed', 0)}; gate: {x.get('gate', 'point')})",
             f"  m(M) = {fmt(r.m_M)}   m(M') = {fmt(r.m_Mprime)}   m(C) = {fmt(r.m_C)}   ablation: {r.ablation}"]
    if r.kl is not None:
        lines.append(f"  KL(full || circuit) = {fmt(r.kl)}   max_kl: {fmt(r.max_kl)}")
    if "baseline" in x:
        b = x["baseline"]
        lines.append(f"  random baseline ({b.get('k')} {b.get('match')}-matched circuits, seed {b.get('seed')}): p50 {fmt(b.get('p50'))}, "
                     f"p95 {fmt(b.get('p95'))}; claim at quantile {fmt(b.get('quantile'))}, margin over {b.get('require')} {fmt(b.get('margin'))}")
    for ab, o in x.get("ablations", {}).items():
        lines.append(f"  under {ab} ablation: {fmt(o.get('value'))} [{fmt(o.get('ci_low'))}, {fmt(o.get('ci_high'))}] ({o.get('outcome')}; recorded, not gated)")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# role_score: the heads of a role still do what the role says (component-function scores, cached per checkpoint)
# ---------------------------------------------------------------------------------------------------------------

def score_tables(res: Any, n_seq: int, seq_len: int, seed: int) -> Any:
    """The checkpoint's shared role-score tables for these repeated-sequence settings (roles.ScoreTables): role checks
    and role-score claims read the same forward on repeated sequences and the same copy scores."""
    from .roles import ScoreTables

    key = ("score_tables", n_seq, seq_len, seed)
    if key not in res.cache:
        res.cache[key] = ScoreTables(res.bridge, res.task, bos=res.prepend_bos, n_seq=n_seq, seq_len=seq_len,
                                     seed=seed)
    return res.cache[key]


def _role_score(run: Any, res: Any, claim: Any, rec: Record) -> Any:
    from . import measures

    roles = run.loaded.spec.circuit.roles
    rec.threshold_min = claim.min
    key = measures.role_scores_key(claim, roles)
    if key not in res.cache:
        res.cache[key] = measures.compute_role_scores(res.bridge, res.task, claim, roles, res.prepend_bos,
                                                      score_tables(res, claim.n_seq, claim.seq_len, claim.seed))
    return measures.role_score(res.cache[key], claim, roles)


def _role_score_details(r: Record, bounds: str) -> list[str]:
    x = r.extra
    if "per_head" not in x:
        return []
    return [f"  measured:      {fmt(r.value)} ({x.get('score')} score, {x.get('quantifier')}; {x.get('unit')})   threshold: {bounds}",
            f"  reached min:   {x.get('earned', '?')} claimed heads",
            "  per head:      " + ", ".join(f"{h} {fmt(v)}" for h, v in x["per_head"].items())]


# ---------------------------------------------------------------------------------------------------------------
# path_ratio: share of the path-patching effect on a receiver set carried by sender roles
# ---------------------------------------------------------------------------------------------------------------

def _path_ratio(run: Any, res: Any, claim: Any, rec: Record) -> Any:
    from . import measures
    from .path_patching import Receivers, path_patch

    spec = run.loaded.spec
    roles = spec.circuit.roles
    rec.threshold_min, rec.threshold_max = claim.min, claim.max
    receivers = (Receivers.logits() if claim.receivers == "logits"
                 else Receivers.parse([f"{h}<{claim.input}>" for h in roles[claim.receivers] if h.startswith("a")]))
    heads = sorted(n for n in res.circuit.nodes if n.startswith("a")) if res.circuit else []
    # Each sender costs a patched pass: with `denominator: circuit` only the circuit's heads and the claim's
    # sender roles enter the ratio, so only they are patched (270 -> 63 senders on SmolLM2's IOI circuit).
    senders = None
    if claim.denominator != "all":
        senders = tuple(sorted(set(heads) | {h for r in claim.senders for h in roles[r] if h.startswith("a")}))
    key = ("path", receivers.describe(), senders)
    if key not in res.cache:
        res.cache[key] = path_patch(res.bridge, res.task, receivers, senders=senders, batch_size=spec.task.batch_size)
    return measures.path_ratio(res.cache[key], claim, roles, heads, res.task.default_metric)


def _path_ratio_details(r: Record, bounds: str) -> list[str]:
    x = r.extra
    if "signed" not in x:
        return []
    return [f"  measured:      {fmt(r.value)} ({x.get('measure')} path ratio into {x.get('receivers')})   threshold: {bounds}",
            f"  signed {fmt(x.get('signed'))}, absolute {fmt(x.get('absolute'))}; numerator {fmt(x.get('numerator'))}, "
            f"denominator {fmt(x.get('denominator'))} ({x.get('denominator_set')} senders)",
            f"  m(clean) = {fmt(x.get('m_clean'))}   m(corrupted) = {fmt(x.get('m_corrupted'))}   ({x.get('metric')})",
            "  sender effects: " + ", ".join(f"{h} {fmt(v)}" for h, v in x.get("effects", {}).items())]


# ---------------------------------------------------------------------------------------------------------------
# role_check: every head labelled with a role earns it by its own scores (roles.ROLE_CRITERIA)
# ---------------------------------------------------------------------------------------------------------------

def _role_check(run: Any, res: Any, claim: Any, rec: Record) -> Any:
    from .measures import Measurement
    from .roles import ROLE_CRITERIA, check_roles

    roles = run.loaded.spec.circuit.roles
    members = roles[claim.role]
    rec.threshold_min = 1.0
    ev = check_roles(res.bridge, res.task, {claim.role: members}, name_movers=roles.get("name_mover", []),
                     tables=score_tables(res, claim.n_seq, claim.seq_len, claim.seed))
    verdicts = ev.of_role(claim.role, members)
    crit = ROLE_CRITERIA[claim.role]
    numbers: dict[str, Any] = {"role": claim.role, "criterion": crit.rule, "criterion_source": crit.source,
                               "unit": "fraction of labelled heads that earned the role",
                               "per_head": {v.head: v.to_json() for v in verdicts}}
    unjudged = [v for v in verdicts if v.earned is None]
    if unjudged:
        return Measurement("not_evaluated", None, f"{claim.role}: " + "; ".join(sorted({v.why for v in unjudged})),
                           "", numbers)
    earned = [v.head for v in verdicts if v.earned]
    numbers["earned"] = f"{len(earned)} of {len(verdicts)}"
    value = len(earned) / len(verdicts)
    if value == 1.0:
        return Measurement("pass", value, "", "", numbers)
    why = "; ".join(f"{v.head}: {v.why}" for v in verdicts if not v.earned)
    return Measurement("fail", value, f"{claim.role}: {len(earned)} of {len(verdicts)} labelled heads earned the "
                       f"role ({crit.rule}); {why}", "", numbers)


def _role_check_details(r: Record, bounds: str) -> list[str]:
    x = r.extra
    if "per_head" not in x:
        return []
    return [f"  measured:      {x.get('earned', fmt(r.value))} labelled heads earned {x.get('role')!r}   (criterion: "
            f"{x.get('criterion')}; {x.get('criterion_source')})",
            "  per head:      " + "; ".join(f"{h} {'earned' if v.get('earned') else 'NOT earned'}"
                                          + "".join(f", {k} {fmt(n)}" for k, n in v.items()
                                                    if isinstance(n, (int, float)) and not isinstance(n, bool))
                                          for h, v in x["per_head"].items())]


register("faithfulness", _faithfulness, _faithfulness_details)
register("role_score", _role_score, _role_score_details)
register("path_ratio", _path_ratio, _path_ratio_details)
register("role_check", _role_check, _role_check_details)
