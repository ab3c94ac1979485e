"""Role criteria: when a head has *earned* a role label, judged by that head's own measured scores.

Why: a spec that labels heads with roles their scores contradict, and still passes (``quantifier: any`` over a
role whose other members score 0), is the failure this product exists to prevent. So every role with a known
criterion is checked head by head (the implicit ``role_check`` claims), and ``circuit-tests roles`` labels a
circuit's heads from measurements instead of from a reader's impression.

The criteria are the papers' (reference/metrics.md §5); where a paper gives only a relative rule, an absolute
floor is added and named as ours. Scores come from ``scores.py``; docs/roles.md is the user-facing table.

====================  =========================================================================================
role                  a head earns it when (all conditions)
====================  =========================================================================================
previous_token        attention to the previous token on repeated random sequences > mean over all heads
duplicate_token       (Tigges et al.'s classifier) and >= 0.3 (our floor: the relative rule alone admits heads
induction             that put a tenth of their attention there); duplicate: earlier occurrence of the same
                      token; induction: the token after it (prefix matching, Olsson et al.)
name_mover            copy score > 10 % (Tigges' threshold; Wang et al.'s name movers copy at > 90 %) and
                      attention at END: attn(END→IO) > attn(END→S1) and > attn(END→S2) (Tigges'
                      ``filter_name_movers``)
negative_name_mover   negative copy score > 10 % and the same attention criterion (it attends IO and writes -IO)
copy_suppression      negative copy score > 10 % (proxy: CSPA needs open-domain text; see scores.copy_suppression)
s_inhibition          Tigges' three conditions, its output at END from IO/S1-swapped prompts path-patched into
                      the spec's name movers' queries: dLD < 0, dIO < 0, dS1 > 0
successor             succession score > 0.5 (our floor; Tigges plots the argmax head)
====================  =========================================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = ["Criterion", "ROLE_CRITERIA", "HeadVerdict", "RoleEvidence", "check_roles", "assign_roles",
           "ScoreTables", "ATTENTION_FLOOR", "COPY_THRESHOLD", "SUCCESSOR_FLOOR", "EFFECT_THRESHOLD"]

ATTENTION_FLOOR = 0.3     # previous/duplicate/induction: absolute floor on the attention fraction (ours)
COPY_THRESHOLD = 10.0     # % top-5: Tigges' name-mover / negative-name-mover copy-score threshold
SUCCESSOR_FLOOR = 0.5     # fraction of ordinal pairs (ours)
EFFECT_THRESHOLD = 0.05   # |direct effect| (noising-normalised) above which an unlabelled head is reported
S2I_CANDIDATE_EFFECT = -0.001  # Tigges: S-inhibition candidates' path-patching effect on the name movers' queries


@dataclass(frozen=True)
class Criterion:
    """A role's criterion in words (shown in failure reports and docs) and what it needs."""

    role: str
    rule: str
    source: str
    needs_ioi: bool = False            # IO/S1/S2 positions (an IOI-style task)
    needs_name_movers: bool = False    # s_inhibition: the spec's name_mover heads


ROLE_CRITERIA: dict[str, Criterion] = {c.role: c for c in (
    Criterion("previous_token", f"previous-token attention > mean over heads and >= {ATTENTION_FLOOR}",
              "Tigges et al. (relative rule); floor ours"),
    Criterion("duplicate_token", f"duplicate-token attention > mean over heads and >= {ATTENTION_FLOOR}",
              "Tigges et al. (relative rule); floor ours"),
    Criterion("induction", f"induction (prefix-matching) attention > mean over heads and >= {ATTENTION_FLOOR}",
              "Tigges et al. / Olsson et al. (relative rule); floor ours"),
    Criterion("name_mover", f"copy score > {COPY_THRESHOLD:g} % and attn(END->IO) > attn(END->S1), attn(END->S2)",
              "Wang et al.; Tigges et al. (copy > 10 %, filter_name_movers)", needs_ioi=True),
    Criterion("negative_name_mover", f"negative copy score > {COPY_THRESHOLD:g} % and attn(END->IO) > "
              "attn(END->S1), attn(END->S2)", "Wang et al.; Tigges et al. (neg. copy > 10 %)", needs_ioi=True),
    Criterion("copy_suppression", f"negative copy score > {COPY_THRESHOLD:g} %",
              "Tigges et al. (negative copy score; CSPA not computed)", needs_ioi=True),
    Criterion("s_inhibition", "three conditions with the name movers' queries patched from IO/S1-swapped "
              "prompts: dLD < 0, dIO < 0, dS1 > 0", "Tigges et al. (S2I test)", needs_ioi=True,
              needs_name_movers=True),
    Criterion("successor", f"succession score > {SUCCESSOR_FLOOR:g}", "Gould et al.; floor ours"),
)}


@dataclass
class HeadVerdict:
    """Whether one head earned one role, with the numbers that decided it."""

    head: str
    role: str
    earned: bool | None            # None: could not be judged (``why`` says why)
    scores: dict[str, Any] = field(default_factory=dict)
    why: str = ""                  # the failed condition(s), or why it could not be judged

    def to_json(self) -> dict[str, Any]:
        return {"earned": self.earned, **{k: _num(v) for k, v in self.scores.items()}, **({"why": self.why} if self.why else {})}


@dataclass
class RoleEvidence:
    """Per-head verdicts for the roles asked about, and the raw score tables (for reports)."""

    verdicts: dict[tuple[str, str], HeadVerdict] = field(default_factory=dict)  # (role, head) -> verdict
    not_evaluated: dict[str, str] = field(default_factory=dict)                   # role -> why the role cannot be judged

    def of_role(self, role: str, heads: Sequence[str]) -> list[HeadVerdict]:
        return [self.verdicts[(role, h)] for h in heads]


def _num(v: Any) -> Any:
    if isinstance(v, float):
        return None if math.isnan(v) else round(v, 6)
    return v


def _is_head(n: str) -> bool:
    return n.startswith("a") and ".h" in n


# ------------------------------------------------------------------------------------------------ measurement

class ScoreTables:
    """Lazily computed score tables for one model + task, shared by every role check and role-score claim of a
    checkpoint (one forward on repeated sequences for all three attention scores, copy scores per head set)."""

    def __init__(self, bridge: Any, task: Any, *, bos: bool, n_seq: int, seq_len: int, seed: int) -> None:
        self.bridge, self.task, self.bos = bridge, task, bos
        self.n_seq, self.seq_len, self.seed = n_seq, seq_len, seed
        self._rep: dict[str, Any] | None = None
        self._copy: dict[tuple[Any, ...], Any] = {}  # copy scores and S-inhibition tests, by their inputs
        self._succ: Any = None

    def repeated(self) -> dict[str, Any]:
        if self._rep is None:
            from . import scores

            bos_id = getattr(getattr(self.bridge, "tokenizer", None), "bos_token_id", None)
            self._rep = scores.repeated_sequence_scores(self.bridge, n_seq=self.n_seq, seq_len=self.seq_len,
                                                        seed=self.seed, bos=self.bos and bos_id is not None,
                                                        bos_id=bos_id)
        return self._rep

    def copy(self, kind: str, heads: Sequence[str]) -> Any:
        from . import scores

        key = (kind, tuple(sorted(set(heads))))
        if key not in self._copy:
            fn = scores.name_mover if kind == "name_mover" else scores.copy_suppression
            self._copy[key] = fn(self.bridge, self.task, heads=list(key[1]))
        return self._copy[key]

    def s_inhibition(self, name_movers: Sequence[str], candidates: Sequence[str]) -> Any:
        """Tigges' three-condition test of ``candidates`` against ``name_movers`` (one hooked pass per candidate)."""
        from . import scores

        key = ("s_inhibition", tuple(name_movers), tuple(sorted(set(candidates))))
        if key not in self._copy:
            self._copy[key] = scores.s_inhibition(self.bridge, self.task, list(name_movers), candidates=list(key[2]))
        return self._copy[key]

    def successor(self) -> Any:
        if self._succ is None:
            from . import scores

            self._succ = scores.successor(self.bridge)
        return self._succ


def _attention_verdicts(role: str, table: Any, heads: Sequence[str]) -> list[HeadVerdict]:
    import torch

    vals = table.values
    mean = float(torch.nanmean(vals))
    out = []
    for h in heads:
        s = table[h]
        fails = []
        if not s > mean:
            fails.append(f"{s:.3g} <= mean over heads {mean:.3g}")
        if not s >= ATTENTION_FLOOR:
            fails.append(f"{s:.3g} < floor {ATTENTION_FLOOR:g}")
        out.append(HeadVerdict(h, role, not fails, {"score": s, "mean_over_heads": mean}, "; ".join(fails)))
    return out


def _copy_verdicts(role: str, table: Any, heads: Sequence[str], need_attention: bool) -> list[HeadVerdict]:
    from .names import parse_head

    d = table.details
    out = []
    for h in heads:
        l, i = parse_head(h)
        s = table[h]
        io, s1, s2 = (float(d[k][l, i]) for k in ("attn_end_to_io", "attn_end_to_s1", "attn_end_to_s2"))
        attends = io > s1 and io > s2
        fails = []
        label = "negative copy score" if table.name == "copy_suppression" else "copy score"
        if not s > COPY_THRESHOLD:
            fails.append(f"{label} {s:.3g} % <= {COPY_THRESHOLD:g} %")
        if need_attention and not attends:
            fails.append(f"attention at END: IO {io:.2f} vs S1 {s1:.2f}, S2 {s2:.2f} (IO is not the largest)")
        out.append(HeadVerdict(h, role, not fails, {"copy": s, "attn_io": io, "attn_s1": s1, "attn_s2": s2},
                               "; ".join(fails)))
    return out


def _s_inhibition_verdicts(sc: ScoreTables, heads: Sequence[str], name_movers: Sequence[str]) -> list[HeadVerdict]:
    from .names import parse_head

    table = sc.s_inhibition(name_movers, heads)
    d = table.details
    top = max(parse_head(n)[0] for n in name_movers)
    out = []
    for h in heads:
        l, i = parse_head(h)
        if l >= top:
            out.append(HeadVerdict(h, "s_inhibition", False, {}, f"layer {l} is not below the last name mover "
                                   f"(layer {top}): it cannot reach the name movers' queries"))
            continue
        if table.not_evaluated:
            out.append(HeadVerdict(h, "s_inhibition", None, {}, table.not_evaluated))
            continue
        dld, dio, ds1 = (float(d[k][l, i]) for k in ("dLD", "dIO", "dS1"))
        fails = [txt for ok, txt in ((dld < 0, f"dLD {dld:+.3g} not < 0"), (dio < 0, f"dIO {dio:+.3g} not < 0"),
                                     (ds1 > 0, f"dS1 {ds1:+.3g} not > 0")) if not ok]
        out.append(HeadVerdict(h, "s_inhibition", not fails, {"dLD": dld, "dIO": dio, "dS1": ds1}, "; ".join(fails)))
    return out


def check_roles(bridge: Any, task: Any, roles: dict[str, list[str]], *, bos: bool = False, n_seq: int = 16,
                seq_len: int = 30, seed: int = 0, only: Sequence[str] | None = None,
                name_movers: Sequence[str] | None = None, tables: ScoreTables | None = None) -> RoleEvidence:
    """Judge every head of every role (or of the roles in ``only``) against its role's criterion.

    Roles without a criterion are skipped; MLPs listed under a role with a criterion fail it (a role criterion
    scores attention heads). ``name_movers``: the heads the S-inhibition test patches into (default: the role
    ``name_mover``). The repeated-sequence defaults are the role-score claims' (16 x 2 x 30 tokens, seed 0).
    ``tables``: score tables to share with other checks of the same model, task and settings."""
    sc = tables or ScoreTables(bridge, task, bos=bos, n_seq=n_seq, seq_len=seq_len, seed=seed)
    ev = RoleEvidence()
    ioi_missing = [p for p in ("IO", "S1", "S2") if p not in getattr(task, "positions", {})]
    for role, members in roles.items():
        if role not in ROLE_CRITERIA or (only is not None and role not in only):
            continue
        crit = ROLE_CRITERIA[role]
        heads = [n for n in members if _is_head(n)]
        for n in members:
            if not _is_head(n):
                ev.verdicts[(role, n)] = HeadVerdict(n, role, False, {}, f"{n} is not an attention head: the "
                                                     f"{role} criterion scores heads")
        if not heads:
            continue
        why = None
        if crit.needs_ioi and ioi_missing:
            why = (f"task {getattr(task, 'name', '?')!r} has no {'/'.join(ioi_missing)} positions: the {role} "
                   "criterion needs an IOI-style task")
        nm = list(name_movers if name_movers is not None else roles.get("name_mover", []))
        if why is None and crit.needs_name_movers and not nm:
            why = "the S-inhibition test needs the circuit's name_mover heads (none declared)"
        if why:
            ev.not_evaluated[role] = why
            for h in heads:
                ev.verdicts[(role, h)] = HeadVerdict(h, role, None, {}, why)
            continue
        if role in ("previous_token", "duplicate_token", "induction"):
            table = sc.repeated()[role]
            vs = ([HeadVerdict(h, role, None, {}, table.not_evaluated) for h in heads] if table.not_evaluated
                  else _attention_verdicts(role, table, heads))
        elif role in ("name_mover", "negative_name_mover", "copy_suppression"):
            table = sc.copy("name_mover" if role == "name_mover" else "copy_suppression", heads)
            vs = ([HeadVerdict(h, role, None, {}, table.not_evaluated) for h in heads] if table.not_evaluated
                  else _copy_verdicts(role, table, heads, need_attention=role != "copy_suppression"))
        elif role == "s_inhibition":
            vs = _s_inhibition_verdicts(sc, heads, nm)
        else:  # successor
            table = sc.successor()
            vs = ([HeadVerdict(h, role, None, {}, table.not_evaluated) for h in heads] if table.not_evaluated else
                  [HeadVerdict(h, role, table[h] > SUCCESSOR_FLOOR, {"score": table[h]},
                               "" if table[h] > SUCCESSOR_FLOOR else f"{table[h]:.3g} <= {SUCCESSOR_FLOOR:g}")
                   for h in heads])
        for v in vs:
            ev.verdicts[(role, v.head)] = v
    return ev


# ------------------------------------------------------------------------------------------------ assignment

@dataclass
class Assignment:
    """Roles labelled from measurements over a set of heads, and the strong heads left without a role."""

    roles: dict[str, list[str]]
    evidence: RoleEvidence
    direct_effect: dict[str, float]
    unlabelled_strong: list[str]
    previous: dict[str, list[str]] = field(default_factory=dict)


def assign_roles(bridge: Any, task: Any, heads: Sequence[str], *, bos: bool = False,
                 roles: Sequence[str] | None = None, previous: dict[str, list[str]] | None = None,
                 n_seq: int = 16, seq_len: int = 30, seed: int = 0, batch_size: int = 32) -> Assignment:
    """Label ``heads`` with every role (of ``roles``, default all with a criterion) whose criterion they meet.

    Name movers are found first; the S-inhibition test then runs, as in Tigges et al., on the heads below the last
    of them whose path-patching effect on the name movers' queries is < -0.001.
    ``direct_effect``: each head's path-patching effect on the logits (noising-normalised; negative helps),
    from which heads with ``|effect| >= EFFECT_THRESHOLD`` and no role are reported."""
    from .path_patching import Receivers, path_patch

    wanted = [r for r in ROLE_CRITERIA if roles is None or r in roles]
    ioi = all(p in getattr(task, "positions", {}) for p in ("IO", "S1", "S2"))
    first = {r: list(heads) for r in wanted if r != "s_inhibition" and (ioi or not ROLE_CRITERIA[r].needs_ioi)}
    ev = check_roles(bridge, task, first, bos=bos, n_seq=n_seq, seq_len=seq_len, seed=seed)
    labelled = {r: [v.head for v in ev.of_role(r, hs) if v.earned] for r, hs in first.items()}
    nm = labelled.get("name_mover", [])
    if "s_inhibition" in wanted and ioi and nm:
        from .names import parse_head

        top = max(parse_head(n)[0] for n in nm)
        below = [h for h in heads if parse_head(h)[0] < top and h not in nm]
        for h in heads:
            if h not in below:
                ev.verdicts[("s_inhibition", h)] = HeadVerdict(h, "s_inhibition", False, {}, "not an S-inhibition "
                                                                f"candidate: not below the last name mover (layer {top})")
        cand = below
        if cand:  # Tigges' step 1: candidates lower the name movers' queries' effect (path patching < -0.001)
            pq = path_patch(bridge, task, Receivers.of_heads([parse_head(n) for n in nm], "q"),
                            senders=tuple(sorted(cand, key=parse_head)), batch_size=batch_size)
            effect_q = {h: float(pq.effects[parse_head(h)]) for h in cand}
            cand = [h for h in cand if effect_q[h] < S2I_CANDIDATE_EFFECT]
            for h in below:
                if h not in cand:
                    ev.verdicts[("s_inhibition", h)] = HeadVerdict(
                        h, "s_inhibition", False, {"effect_on_nm_queries": effect_q[h]}, "not an S-inhibition "
                        f"candidate: path-patching effect on the name movers' queries {effect_q[h]:+.3g} is not < "
                        f"{S2I_CANDIDATE_EFFECT:g} (Tigges' filter)")
        if cand:
            ev2 = check_roles(bridge, task, {"s_inhibition": cand}, name_movers=nm)
            ev.verdicts.update(ev2.verdicts)
            labelled["s_inhibition"] = [v.head for v in ev2.of_role("s_inhibition", cand) if v.earned]
    effect: dict[str, float] = {}
    if ioi or getattr(task, "default_metric", None):
        from .names import parse_head

        res = path_patch(bridge, task, Receivers.logits(), senders=tuple(sorted(heads, key=parse_head)),
                         batch_size=batch_size)
        for h in heads:
            l, i = parse_head(h)
            effect[h] = float(res.effects[l, i])
    has_role = {h for hs in labelled.values() for h in hs}
    strong = sorted((h for h in heads if h not in has_role and abs(effect.get(h, 0.0)) >= EFFECT_THRESHOLD),
                    key=lambda h: -abs(effect[h]))
    return Assignment({r: hs for r, hs in labelled.items() if hs}, ev, effect, strong, dict(previous or {}))


def format_assignment(a: Assignment) -> str:
    """The assignment as text: each role with its heads and their deciding numbers, then the disagreements with
    the spec's labels and the strong heads without a role."""
    lines = ["roles earned (criteria: docs/roles.md)"]
    for role, crit in ROLE_CRITERIA.items():
        hs = a.roles.get(role, [])
        lines.append(f"  {role:<20} {', '.join(_show(a.evidence.verdicts[(role, h)]) for h in hs) or '-'}")
        if role in a.evidence.not_evaluated:
            lines.append(f"  {'':<20} not evaluated: {a.evidence.not_evaluated[role]}")
    if a.previous:
        lines.append("spec labels vs measurements")
        for role, hs in a.previous.items():
            for h in hs:
                v = a.evidence.verdicts.get((role, h))
                if role not in ROLE_CRITERIA:
                    lines.append(f"  {h:<8} {role}: no criterion for this role (not checked)")
                elif v is None:
                    lines.append(f"  {h:<8} {role}: not measured (outside the heads assigned)")
                else:
                    state = {True: "earned", False: "NOT earned", None: "not evaluated"}[v.earned]
                    lines.append(f"  {h:<8} {role}: {state}" + (f" ({v.why})" if v.why else f" ({_show(v)})"))
    if a.unlabelled_strong:
        lines.append(f"heads with |direct effect| >= {EFFECT_THRESHOLD:g} and no role: "
                     + ", ".join(f"{h} {a.direct_effect[h]:+.3f}" for h in a.unlabelled_strong))
    return "\n".join(lines)


def _show(v: HeadVerdict) -> str:
    nums = ", ".join(f"{k} {x:.3g}" for k, x in v.scores.items() if isinstance(x, float) and k != "mean_over_heads")
    return f"{v.head} ({nums})" if nums else v.head
