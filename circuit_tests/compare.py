"""Regression diffing between two runs: which claims flipped verdict and which values moved.

Why: a red build should say at a glance what changed since the last green run (``--circuit-compare
OLD.json``): a claim that went pass → fail (or → uncertain / not_evaluated), and a value that moved by more
than a tolerance even though its verdict held. Items are matched by (spec, checkpoint, claim). A value that is
missing or not finite (None, NaN, inf) on one side only counts as moved: NaN compares false with everything, so
comparing it numerically would hide exactly the change that matters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .results import Record, checkpoint_order

DEFAULT_TOLERANCE = 0.02  # absolute change in a claim's value that counts as "moved"

Key = tuple[str, str, str]


def verdict(r: Record) -> str:
    """The claim's verdict (pass | fail | uncertain | not_evaluated | error): what a flip is measured on."""
    return r.verdict or r.measured


def item_key(r: Record) -> Key:
    return (r.spec, r.checkpoint, r.claim)


@dataclass(frozen=True)
class Change:
    old_verdict: str | None  # None: the item is new in this run
    new_verdict: str
    old_value: float | None
    new_value: float | None
    flipped: bool
    moved: bool

    @property
    def delta(self) -> float | None:
        """new - old, None unless both values are finite numbers."""
        if not (_finite(self.old_value) and _finite(self.new_value)):
            return None
        return self.new_value - self.old_value  # type: ignore[operator]

    def marker(self) -> str:
        """Table suffix: ``!`` flipped, ``~`` moved beyond the tolerance, ``+`` new item, else ''."""
        if self.old_verdict is None:
            return "+"
        return "!" if self.flipped else ("~" if self.moved else "")

    def describe(self) -> str:
        if self.old_verdict is None:
            return "new item"
        parts = []
        if self.flipped:
            parts.append(f"{self.old_verdict} -> {self.new_verdict}")
        if self.moved or self.flipped:
            d = self.delta
            if d is not None:
                parts.append(f"value {_fmt(self.old_value)} -> {_fmt(self.new_value)} ({d:+.3g})")
            elif self.old_value is not None or self.new_value is not None:
                parts.append(f"value {_fmt(self.old_value)} -> {_fmt(self.new_value)}")
        return "; ".join(parts)


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _fmt(v: float | None) -> str:
    return "none" if v is None else f"{v:.4g}"


def value_moved(old: float | None, new: float | None, tolerance: float) -> bool:
    """Both finite: |new - old| > tolerance. Otherwise moved unless both sides are equally without a number
    (missing or NaN on both, or the same infinity)."""
    if _finite(old) and _finite(new):
        return abs(new - old) > tolerance  # type: ignore[operator]
    if _finite(old) or _finite(new):
        return True
    same_missing = all(v is None or math.isnan(v) for v in (old, new))
    return not (same_missing or old == new)


def compare(old: list[Record], new: list[Record], tolerance: float = DEFAULT_TOLERANCE) -> dict[Key, Change]:
    """A Change for every item of ``new`` (``old`` items absent from ``new`` are ignored: a subset run), in
    report order: spec, checkpoints in training order (``results.checkpoint_order``: step250 before step1000),
    claim. ``tolerance``: a finite number >= 0 (ValueError otherwise: NaN would hide every move)."""
    if not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance {tolerance}: must be a finite number >= 0")
    before = {item_key(r): r for r in old}
    rank = {ck: i for i, ck in enumerate(checkpoint_order(new))}
    out: dict[Key, Change] = {}
    for r in sorted(new, key=lambda r: (r.spec, rank[r.checkpoint], r.claim)):
        o = before.get(item_key(r))
        if o is None:
            out[item_key(r)] = Change(None, verdict(r), None, r.value, False, False)
            continue
        out[item_key(r)] = Change(verdict(o), verdict(r), o.value, r.value, verdict(o) != verdict(r),
                                  value_moved(o.value, r.value, tolerance))
    return out


def summary(changes: dict[Key, Change]) -> list[str]:
    """One line per flipped or moved item, flips first, each group in the order of ``changes`` (``compare``'s:
    checkpoints in training order, not string order)."""
    rows = sorted((c for c in changes.items() if c[1].flipped or c[1].moved), key=lambda kc: not kc[1].flipped)
    return [f"{k[0]} @ {k[1]}: {k[2]}: {c.describe()}" for k, c in rows]
