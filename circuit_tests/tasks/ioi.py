"""Indirect object identification (Wang et al. 2022): "... [B] gave a [OBJECT] to" -> [A].

Roles: IO = [A] (the answer), S = [B], S1/S2 its first/second occurrence. Corruptions (``corruption``):
``s2_io_flip`` S2 := IO (Tigges et al. / EAP-IG ``corrupted_hard``; flips the answer, LD(M') ~ -LD(M));
``s2_random`` S2 := a random third name (Hanna et al., "Have Faith"); ``abc`` IO, S1, S2 := three new,
distinct names (Wang's p_ABC). Metric: logit(IO) - logit(S) with the clean names.
"""

from __future__ import annotations

import random
from typing import Literal

from . import wordlists as W
from ._common import Collector, Drop, Example, Tok, render
from .base import BuildContext, TaskData, TaskParams, register


class IOIParams(TaskParams):
    templates: Literal["mixed", "BABA", "ABBA"] = "mixed"
    corruption: Literal["s2_io_flip", "s2_random", "abc"] = "s2_io_flip"


def _role_template(t: str) -> str:
    """Template prompt (text before the final [A]) with roles: first [A] -> [IO], [B]s -> [S1], [S2]."""
    if not t.endswith(" [A]"):
        raise ValueError(f"IOI template must end with ' [A]': {t!r}")
    p = t[: -len(" [A]")]
    if p.count("[A]") != 1 or p.count("[B]") != 2:
        raise ValueError(f"IOI template prompt needs one [A] and two [B]: {t!r}")
    return p.replace("[A]", "[IO]").replace("[B]", "[S1]", 1).replace("[B]", "[S2]", 1)


TEMPLATES = {
    "BABA": tuple(_role_template(t) for t in W.IOI_BABA_TEMPLATES),
    "ABBA": tuple(_role_template(t) for t in W.IOI_ABBA_TEMPLATES),
}


@register("ioi", IOIParams, "logit_diff", positions=("IO", "S1", "S2", "END"))
def build(tokenizer, params: IOIParams, ctx: BuildContext) -> TaskData:
    """IOI on BABA/ABBA templates; targets [IO, S], signs [+1, -1]; positions IO, S1, S2, END."""
    tok = Tok(tokenizer, ctx, "ioi")
    col = Collector("ioi", params, tok)
    kinds = ["BABA", "ABBA"] if params.templates == "mixed" else [params.templates]
    templates = [(k, i, t) for k in kinds for i, t in enumerate(TEMPLATES[k])]
    probe = {"IO": W.NAMES[0], "S1": W.NAMES[1], "S2": W.NAMES[1], "PLACE": W.PLACES[0], "OBJECT": W.OBJECTS[0]}
    probe_prompt = render(TEMPLATES["BABA"][0], probe)[0]

    names = col.pool("names", W.NAMES, lambda n: tok.next_token(probe_prompt, " " + n),
                     need=5 if params.corruption == "abc" else 3 if params.corruption == "s2_random" else 2)
    places = col.pool("places", W.PLACES, lambda p: tok.check_known(p))
    objects = col.pool("objects", W.OBJECTS, lambda o: tok.check_known(o))

    def template_ok(kt):
        k, i, t = kt
        tok.check_known(render(t, {**probe, "IO": names[0], "S1": names[1], "S2": names[1],
                                   "PLACE": places[0], "OBJECT": objects[0]})[0], "the template")

    templates = col.pool("templates", templates, template_ok, label=lambda kt: f"{kt[0]} {kt[1]}: {kt[2]!r}")
    rng = random.Random(params.seed)

    def candidates():
        while True:
            kind, ti, t = rng.choice(templates)
            a, b = rng.sample(names, 2)
            place, obj = rng.choice(places), rng.choice(objects)
            others = [n for n in names if n not in (a, b)]
            extra = rng.sample(others, 3) if params.corruption == "abc" else [rng.choice(others)] if params.corruption == "s2_random" else []
            yield lambda kind=kind, ti=ti, t=t, a=a, b=b, place=place, obj=obj, extra=extra: make(kind, ti, t, a, b, place, obj, extra)

    def make(kind, ti, t, a, b, place, obj, extra) -> Example:
        fill = {"PLACE": place, "OBJECT": obj}
        clean, spans = render(t, {**fill, "IO": a, "S1": b, "S2": b})
        if params.corruption == "s2_io_flip":
            cvals = {"IO": a, "S1": b, "S2": a}
        elif params.corruption == "s2_random":
            cvals = {"IO": a, "S1": b, "S2": extra[0]}
        else:
            cvals = dict(zip(("IO", "S1", "S2"), extra))
        corrupted, cspans = render(t, {**fill, **cvals})
        ids = tok.check_known(clean, "clean prompt")
        cids = tok.check_known(corrupted, "corrupted prompt")
        pos = {}
        for role in ("IO", "S1", "S2"):
            _, last = tok.locate(clean, spans[role][0], role, single=True)
            _, clast = tok.locate(corrupted, cspans[role][0], role, single=True)
            if clast != last:
                raise Drop("corrupted name not at the clean name's position", f"{role} in {corrupted!r}")
            pos[role] = last
        io_t = tok.next_token(clean, " " + a)
        s_t = tok.next_token(clean, " " + b)
        if io_t == s_t:
            raise Drop("IO and S map to the same token", f"{a!r} / {b!r}")
        return Example(ids, cids, [io_t, s_t], [1.0, -1.0], pos, clean, corrupted,
                       key=(kind, ti, a, b, place, obj, tuple(extra)))

    col.run(candidates())
    return col.finish("logit_diff", {"corruption": params.corruption, "templates": params.templates})
