"""Colored objects (Merullo et al. 2023, after Ippolito & Callison-Burch): one in-context example + a query.

"Q: On the table, I see an orange textbook, a red puzzle, and a purple cup. What color is the textbook?\\nA:
Orange\\nQ: On the desk, there is a blue pencil, a black necklace, and a yellow lighter. What color is the
pencil?\\nA:" -> " Blue". Corruption ("mindiff"): the query asks about another object of the same list, so
its answer is another listed color. Metric: logit(clean color) - logit(corrupted-prompt color).
"""

from __future__ import annotations

import random
import re

from . import wordlists as W
from ._common import Collector, Drop, Example, Tok, render
from .base import BuildContext, TaskData, TaskParams, register

# the answered in-context example's placeholders get an E prefix ([EC1], [EQ], [EANS], ...)
TEMPLATE = re.sub(r"\[([A-Z0-9]+)\]", r"[E\1]", W.COLORED_QUESTION) + " [EANS]\n" + W.COLORED_QUESTION


class ColoredObjectsParams(TaskParams):
    pass


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _fill(prefix: str, surf: str, pres: str, objs, colors, q: int) -> dict[str, str]:
    v = {f"{prefix}SURF": surf, f"{prefix}PRES": pres, f"{prefix}Q": objs[q]}
    for i in range(3):
        v[f"{prefix}A{i + 1}"] = _article(colors[i])
        v[f"{prefix}C{i + 1}"] = colors[i]
        v[f"{prefix}O{i + 1}"] = objs[i]
    return v


@register("colored_objects", ColoredObjectsParams, "logit_diff",
          positions=("QUERY", "ANS_OBJ", "ANS_COLOR", "WRONG_OBJ", "WRONG_COLOR", "END"))
def build(tokenizer, params: ColoredObjectsParams, ctx: BuildContext) -> TaskData:
    """Colored objects; targets [clean color, corrupted color]; positions QUERY, ANS_OBJ, ANS_COLOR, WRONG_OBJ, WRONG_COLOR, END."""
    tok = Tok(tokenizer, ctx, "colored_objects")
    col = Collector("colored_objects", params, tok)
    objs0, cols0 = W.COLORED_OBJECTS[:3], W.COLORS[:3]
    base = {**_fill("E", W.COLORED_SURFACES[0], W.COLORED_PRESENTERS[0], objs0, cols0, 0), "EANS": cols0[0].title(),
            **_fill("", W.COLORED_SURFACES[0], W.COLORED_PRESENTERS[0], objs0, cols0, 0)}
    probe = render(TEMPLATE, base)[0]

    def color_ok(c: str) -> None:
        tok.next_token(probe, " " + c.title())
        text, spans = render(TEMPLATE, {**base, "C1": c, "A1": _article(c)})
        tok.check_known(text)
        tok.locate(text, spans["C1"][0], "color", single=True)

    def object_ok(o: str) -> None:
        text, spans = render(TEMPLATE, {**base, "O1": o, "Q": o})
        tok.check_known(text)
        tok.locate(text, spans["O1"][0], "object", single=True)
        tok.locate(text, spans["Q"][0], "object", single=True)

    colors = col.pool("colors", W.COLORS, color_ok, need=3)
    objects = col.pool("objects", W.COLORED_OBJECTS, object_ok, need=3)
    surfaces = col.pool("surfaces", W.COLORED_SURFACES, lambda s: tok.check_known(render(TEMPLATE, {**base, "SURF": s})[0]))
    presenters = col.pool("presenters", W.COLORED_PRESENTERS,
                          lambda p: tok.check_known(render(TEMPLATE, {**base, "PRES": p})[0]))
    rng = random.Random(params.seed)

    def candidates():
        while True:
            e_objs, e_cols, e_q = rng.sample(objects, 3), rng.sample(colors, 3), rng.randrange(3)
            e_surf, e_pres = rng.choice(surfaces), rng.choice(presenters)
            objs, cols = rng.sample(objects, 3), rng.sample(colors, 3)
            qi, qj = rng.sample(range(3), 2)
            surf, pres = rng.choice(surfaces), rng.choice(presenters)
            vals = {**_fill("E", e_surf, e_pres, e_objs, e_cols, e_q), "EANS": e_cols[e_q].title(),
                    **_fill("", surf, pres, objs, cols, qi)}
            yield lambda vals=vals, objs=objs, cols=cols, qi=qi, qj=qj: make(vals, objs, cols, qi, qj)

    def make(vals, objs, cols, qi, qj) -> Example:
        clean, spans = render(TEMPLATE, vals)
        corrupted, cspans = render(TEMPLATE, {**vals, "Q": objs[qj]})
        ids = tok.check_known(clean)
        cids = tok.check_known(corrupted)
        q = tok.locate(clean, spans["Q"][0], "query object", single=True)[1]
        if tok.locate(corrupted, cspans["Q"][0], "query object", single=True)[1] != q:
            raise Drop("corrupted query object not at the clean one's position", corrupted)
        pos = {"QUERY": q}
        for name, k in (("ANS", qi), ("WRONG", qj)):
            pos[f"{name}_OBJ"] = tok.locate(clean, spans[f"O{k + 1}"][0], "object", single=True)[1]
            pos[f"{name}_COLOR"] = tok.locate(clean, spans[f"C{k + 1}"][0], "color", single=True)[1]
        right = tok.next_token(clean, " " + cols[qi].title())
        wrong = tok.next_token(clean, " " + cols[qj].title())
        key = tuple(sorted(vals.items())) + (qj,)
        return Example(ids, cids, [right, wrong], [1.0, -1.0], pos, clean, corrupted, key=key)

    col.run(candidates())
    return col.finish("logit_diff", {"n_colors": len(colors), "n_objects": len(objects)})
