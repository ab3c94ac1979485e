"""Subject-verb agreement (Marvin & Linzen 2018 style, as in Tigges et al. / Have-Faith).

Prompts end just before the main verb: "The author near the guards" -> is/laughs/... Clean and corrupted
are a singular/plural minimal pair differing only in the subject noun, in both directions (even examples
have a singular clean subject, odd ones a plural one). Metric: probability difference summed over verb
groups, +1 for every verb form of the clean subject's number, -1 for every form of the other number
(Tigges' ``group_sum``). Verb pairs are kept only if both forms are single tokens (Have-Faith ``strict``).
"""

from __future__ import annotations

import random

from . import wordlists as W
from ._common import Collector, Drop, Example, Tok, placeholders, render
from .base import BuildContext, TaskData, TaskParams, register


class SVAParams(TaskParams):
    pass


@register("sva", SVAParams, "prob_diff", positions=("SUBJ", "END"))
def build(tokenizer, params: SVAParams, ctx: BuildContext) -> TaskData:
    """SVA; targets all kept verb forms (+1 agreeing with the clean subject, -1 not); positions SUBJ, END."""
    tok = Tok(tokenizer, ctx, "sva")
    col = Collector("sva", params, tok)
    probe = "The " + W.SVA_NOUNS[0][0]

    def pair_ok(pair: tuple[str, str]) -> None:
        ids = [tok.next_token(probe, " " + w) for w in pair]
        if ids[0] == ids[1]:
            raise Drop("both forms map to the same token", repr(pair))

    verbs = col.pool("verbs", W.SVA_VERBS, pair_ok)
    nouns = col.pool("nouns", W.SVA_NOUNS, lambda pr: [tok.check_known(f"The {w}") for w in pr], need=2)
    relv = col.pool("relative-clause verbs", W.SVA_REL_VERBS, lambda pr: [tok.check_known(f"the {w}") for w in pr])
    templates = col.pool("templates", W.SVA_TEMPLATES, lambda t: tok.check_known(
        render(t, {"SUBJ": nouns[0][0], "ATTR": nouns[1][1], "RELV": relv[0][1]})[0]))
    rng = random.Random(params.seed)

    def candidates():
        while True:
            t = rng.choice(templates)
            subj, attr = rng.sample(nouns, 2)
            an, rv = rng.randrange(2), rng.choice(relv)
            yield lambda t=t, subj=subj, attr=attr, an=an, rv=rv: make(t, subj, attr, an, rv)

    def make(t, subj, attr, an, rv) -> Example:
        cn = len(col.kept) % 2  # alternate the clean subject's number over *kept* examples: balanced directions
        fill = {"ATTR": attr[an], "RELV": rv[an]}
        clean, spans = render(t, {**fill, "SUBJ": subj[cn]})
        corrupted, cspans = render(t, {**fill, "SUBJ": subj[1 - cn]})
        ids = tok.check_known(clean)
        cids = tok.check_known(corrupted)
        first, last = tok.locate(clean, spans["SUBJ"][0], "SUBJ")
        if tok.locate(corrupted, cspans["SUBJ"][0], "SUBJ") != (first, last) or len(ids) != len(cids):
            raise Drop("singular and plural subject have different token lengths", f"{subj[0]!r} / {subj[1]!r}")
        if ids[:first] != cids[:first] or ids[last + 1:] != cids[last + 1:]:
            raise Drop("minimal pair differs outside the subject", f"{clean!r} / {corrupted!r}")
        good = [tok.next_token(clean, " " + v[cn]) for v in verbs]
        bad = [tok.next_token(clean, " " + v[1 - cn]) for v in verbs]
        key = (t, subj, attr[an] if "ATTR" in placeholders(t) else None, rv[an] if "RELV" in placeholders(t) else None, cn)
        return Example(ids, cids, good + bad, [1.0] * len(good) + [-1.0] * len(bad), {"SUBJ": last},
                       clean, corrupted, key=key)

    col.run(candidates())
    return col.finish("prob_diff", {"n_verb_pairs": len(verbs)})
