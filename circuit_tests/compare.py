"""Regression diffing between two runs: which claims flipped verdict and which values moved.

Why: a red build should say at a glance what changed since the last green run (``--circuit-compare
OLD.json``): a claim that went pass → fail (or → uncertain / not_evaluated), and a value that moved by more
than a tolerance even though its verdict held. Items are matched by (spec, checkpoint, claim).
"""

from __future__ import annotations

from dataclasses import dataclass

from .results import Record

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
        if self.old_value is None or self.new_value is None:
            return None
        return self.new_value - self.old_value

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
        if self.delta is not None and (self.moved or self.flipped):
            parts.append(f"value {self.old_value:.4g} -> {self.new_value:.4g} ({self.delta:+.3g})")
        return "; ".join(parts)


def compare(old: list[Record], new: list[Record], tolerance: float = DEFAULT_TOLERANCE) -> dict[Key, Change]:
    """A Change for every item of ``new`` (``old`` items absent from ``new`` are ignored: a subset run)."""
    if tolerance < 0:
        raise ValueError(f"tolerance {tolerance}: must be >= 0")
    before = {item_key(r): r for r in old}
    out: dict[Key, Change] = {}
    for r in new:
        o = before.get(item_key(r))
        if o is None:
            out[item_key(r)] = Change(None, verdict(r), None, r.value, False, False)
            continue
        moved = (o.value is not None and r.value is not None and abs(r.value - o.value) > tolerance) or \
                ((o.value is None) != (r.value is None))
        out[item_key(r)] = Change(verdict(o), verdict(r), o.value, r.value, verdict(o) != verdict(r), moved)
    return out


def summary(changes: dict[Key, Change]) -> list[str]:
    """One line per flipped or moved item, flips first."""
    rows = sorted(((not c.flipped, k), c) for k, c in changes.items() if c.flipped or c.moved)
    return [f"{k[0]} @ {k[1]}: {k[2]}: {c.describe()}" for (_, k), c in rows]
