"""Gendered pronoun (Mathwin et al. 2023, as used by Tigges et al.): "So [NAME] is [PREDICATE], isn't" -> he/she.

Corruption: the same sentence with a name of the opposite gender. Metric: logit(clean pronoun) -
logit(other pronoun). Examples enumerate (name, predicate, opposite name) triples in a seeded order.
"""

from __future__ import annotations

import random

from . import wordlists as W
from ._common import Collector, Example, Tok, render
from .base import BuildContext, TaskData, TaskParams, register


class GenderedPronounParams(TaskParams):
    pass


@register("gendered_pronoun", GenderedPronounParams, "logit_diff", positions=("NAME", "END"))
def build(tokenizer, params: GenderedPronounParams, ctx: BuildContext) -> TaskData:
    """Gendered pronoun; targets [clean pronoun, other pronoun], signs [+1, -1]; positions NAME, END."""
    tok = Tok(tokenizer, ctx, "gendered_pronoun")
    col = Collector("gendered_pronoun", params, tok)
    probe = render(W.GENDER_TEMPLATE, {"NAME": W.GENDER_MALE_NAMES[0], "PREDICATE": W.GENDER_PREDICATES[0]})[0]
    col.pool("pronouns", W.GENDER_PRONOUNS, lambda p: tok.next_token(probe, " " + p), need=2)
    she, he = (tok.next_token(probe, " " + p) for p in W.GENDER_PRONOUNS)

    def name_ok(n: str) -> None:
        text, spans = render(W.GENDER_TEMPLATE, {"NAME": n, "PREDICATE": W.GENDER_PREDICATES[0]})
        tok.check_known(text)
        tok.locate(text, spans["NAME"][0], "NAME", single=True)

    female = col.pool("female names", W.GENDER_FEMALE_NAMES, name_ok)
    male = col.pool("male names", W.GENDER_MALE_NAMES, name_ok)
    preds = col.pool("predicates", W.GENDER_PREDICATES,
                     lambda p: tok.check_known(render(W.GENDER_TEMPLATE, {"NAME": female[0], "PREDICATE": p})[0]))

    triples = [(n, p, o, g) for g, (own, other) in enumerate(((female, male), (male, female)))
               for n in own for p in preds for o in other]
    rng = random.Random(params.seed)
    rng.shuffle(triples)

    def make(name: str, pred: str, other: str, g: int) -> Example:
        clean, spans = render(W.GENDER_TEMPLATE, {"NAME": name, "PREDICATE": pred})
        corrupted, cspans = render(W.GENDER_TEMPLATE, {"NAME": other, "PREDICATE": pred})
        ids = tok.check_known(clean)
        cids = tok.check_known(corrupted)
        pos = tok.locate(clean, spans["NAME"][0], "NAME", single=True)[1]
        tok.locate(corrupted, cspans["NAME"][0], "NAME", single=True)
        right = tok.next_token(clean, " " + W.GENDER_PRONOUNS[g])
        wrong = tok.next_token(clean, " " + W.GENDER_PRONOUNS[1 - g])
        return Example(ids, cids, [right, wrong], [1.0, -1.0], {"NAME": pos}, clean, corrupted,
                       key=(name, pred, other))

    col.run(((lambda t=t: make(*t)) for t in triples), max_attempts=len(triples) + 1)
    return col.finish("logit_diff", {"n_female": len(female), "n_male": len(male), "pronoun_ids": [she, he]})

