"""Greater-than (Hanna et al. 2023): "The [NOUN] lasted from the year XXYY to the year XX" -> YY' > YY.

Corruption: YY -> "01" (Hanna). Metric: probability difference over the 100 two-digit tokens "00".."99",
+1 for y > YY and -1 for y <= YY. Years whose " XXYY" does not split into the two tokens [XX, YY] in this
tokenizer are skipped (Hanna's ``get_valid_years``), as are the first and last valid year of each century;
YY cycles over 02..98 so that every threshold is equally represented: each round visits every YY bucket
once, in a spread-out order (``_spread_order``), so any ``size`` >= the number of buckets holds every
bucket and a smaller ``size`` samples the whole 02..98 range evenly rather than its low end.
"""

from __future__ import annotations

import random

from pydantic import Field, model_validator

from ..errors import TaskError
from . import wordlists as W
from ._common import Collector, Drop, Example, Tok, render
from .base import BuildContext, TaskData, TaskParams, register


class GreaterThanParams(TaskParams):
    year_min: int = Field(1100, ge=1000, le=9999)
    year_max: int = Field(1799, ge=1000, le=9999)

    @model_validator(mode="after")
    def _range(self):
        if self.year_min > self.year_max:
            raise ValueError(f"year_min ({self.year_min}) must be <= year_max ({self.year_max})")
        return self


def _spread_order(n: int, offset: int) -> list[int]:
    """0..n-1 in bit-reversed (van der Corput) order, rotated by ``offset``: every prefix is spread over the
    whole range (n=97: 0, 64, 32, 96, 16, 80, ...), and the full list is a permutation."""
    bits = max(1, (n - 1).bit_length())
    order = [int(format(i, f"0{bits}b")[::-1], 2) for i in range(1 << bits)]
    return [(i + offset) % n for i in order if i < n]


def _split_year(tok: Tok, noun: str, xx: str, yy: str) -> tuple[str, list[int], dict[str, int]]:
    text, spans = render(W.GREATER_THAN_TEMPLATE, {"NOUN": noun, "XX": xx, "YY": yy})
    ids = tok.check_known(text)
    xx1, xx2 = spans["XX"]
    pos = {"XX1": tok.locate(text, xx1, "XX", single=True)[1],
           "YY": tok.locate(text, spans["YY"][0], "YY", single=True)[1],
           "XX2": tok.locate(text, xx2, "XX", single=True)[1]}
    if pos["YY"] != pos["XX1"] + 1 or pos["XX2"] != len(ids) - 1:
        raise Drop("year does not split into [XX, YY]", f"{xx}{yy} in {text!r}")
    return text, ids, pos


@register("greater_than", GreaterThanParams, "prob_diff", positions=("XX1", "YY", "XX2", "END"))
def build(tokenizer, params: GreaterThanParams, ctx: BuildContext) -> TaskData:
    """Greater-than; targets the 100 two-digit tokens with +1 (y > YY) / -1 (y <= YY); positions XX1, YY, XX2, END."""
    tok = Tok(tokenizer, ctx, "greater_than")
    col = Collector("greater_than", params, tok)
    digit_ids: list[int] = []
    missing: list[str] = []
    for y in range(100):
        try:
            digit_ids.append(tok.standalone_token(f"{y:02d}"))
        except Drop as d:
            missing.append(f"{y:02d} ({d.reason})")
    if missing:
        raise TaskError(f"greater_than: the 100 two-digit strings 00..99 must each be one token in this tokenizer; "
                        f"{len(missing)} are not: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    if len(set(digit_ids)) != 100:
        raise TaskError("greater_than: the two-digit strings 00..99 do not map to 100 distinct tokens")

    nouns = col.pool("nouns", W.GREATER_THAN_NOUNS, lambda n: tok.check_known(f"The {n} lasted"))

    def year_ok(year: int) -> None:
        s = f"{year:04d}"
        for yy in (s[2:], "01"):
            _, ids, pos = _split_year(tok, nouns[0], s[:2], yy)
            if ids[pos["YY"]] != digit_ids[int(yy)]:
                raise Drop("YY in context is not the standalone two-digit token", f"{s[:2]}{yy}")

    tok.prefetch(render(W.GREATER_THAN_TEMPLATE, {"NOUN": nouns[0], "XX": f"{y:04d}"[:2], "YY": yy})[0]
                 for y in range(params.year_min, params.year_max + 1) for yy in (f"{y:04d}"[2:], "01"))
    years = col.pool("years (tokenizable)", list(range(params.year_min, params.year_max + 1)), year_ok)
    by_century: dict[int, list[int]] = {}
    for y in years:
        by_century.setdefault(y // 100, []).append(y)
    valid = sorted(y for ys in by_century.values() for y in ys[1:-1])  # Hanna: drop first/last valid per century
    valid = [y for y in valid if 2 <= y % 100 <= 98]
    col.pools["years (tokenizable)"]["after_century_trim"] = len(valid)
    if not valid:
        raise TaskError(f"greater_than: no usable years in {params.year_min}..{params.year_max} on this tokenizer "
                        f"({len(years)} split into [XX, YY]; none left after dropping each century's first/last valid "
                        f"year and keeping YY in 02..98)")
    by_yy: dict[int, list[int]] = {}
    for y in valid:
        by_yy.setdefault(y % 100, []).append(y)
    cycle = sorted(by_yy)
    rng = random.Random(params.seed)

    def candidates():
        while True:  # one round = every YY bucket once, spread order, seeded rotation
            for i in _spread_order(len(cycle), rng.randrange(len(cycle))):
                yy = cycle[i]
                year = rng.choice(by_yy[yy])
                noun = rng.choice(nouns)
                yield lambda year=year, noun=noun: make(year, noun)

    def make(year: int, noun: str) -> Example:
        s = f"{year:04d}"
        xx, yy = s[:2], int(s[2:])
        clean, ids, pos = _split_year(tok, noun, xx, s[2:])
        corrupted, cids, cpos = _split_year(tok, noun, xx, "01")
        if cpos != pos:
            raise Drop("corrupted year splits differently", f"{xx}01")
        signs = [1.0 if y > yy else -1.0 for y in range(100)]
        return Example(ids, cids, list(digit_ids), signs, pos, clean, corrupted, key=(year, noun))

    col.run(candidates())
    return col.finish("prob_diff", {"valid_years": len(valid), "yy_values": len(cycle)})
