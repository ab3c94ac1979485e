"""Training and held-out data of the zoo models: vocabularies and seeded batch generators.

Every generator draws only from the ``torch.Generator`` it is given, so data is a pure function of
the seed. Rows are ``BOS + tokens``; ``labels`` equal the inputs with padding set to -100 (the HF
causal-LM loss shifts them). Held-out sets use seeds disjoint from the training seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tasks import wordlists as W
from .tokenizer import BOS_ID, PAD_ID, SPECIALS, pre_tokenize

__all__ = [
    "induction_vocab", "ioi_vocab", "greater_than_vocab", "InductionData", "IOIData", "GreaterThanData",
    "IOIExample", "GTExample",
]


# --------------------------------------------------------------------------- vocabularies
def _syllable_words(n: int) -> list[str]:
    """``n`` distinct letter-only pseudo-words ("ba", "be", ..., "baka", ...), deterministic order."""
    cons, vows = "bdfgklmnprstvz", "aeiou"
    syl = [c + v for c in cons for v in vows]  # 70
    words = list(syl)
    for a in syl:
        for b in syl:
            if len(words) >= n:
                return words[:n]
            words.append(a + b)
    return words[:n]


def induction_vocab(n_words: int) -> list[str]:
    return _syllable_words(n_words)


def _template_words(templates: tuple[str, ...], placeholders: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for t in templates:
        for ph in placeholders:
            t = t.replace(ph, " ")
        for w in pre_tokenize(t):
            if w not in out:
                out.append(w)
    return out


def ioi_vocab() -> list[str]:
    templates = W.IOI_BABA_TEMPLATES + W.IOI_ABBA_TEMPLATES
    words = _template_words(templates, ("[A]", "[B]", "[PLACE]", "[OBJECT]"))
    return words + [w for w in (*W.NAMES, *W.PLACES, *W.OBJECTS) if w not in words]


def greater_than_vocab() -> list[str]:
    words = _template_words((W.GREATER_THAN_TEMPLATE,), ("[NOUN]", "[XX]", "[YY]"))
    return words + list(W.GREATER_THAN_NOUNS) + [f"{i:02d}" for i in range(100)]


def _pad_rows(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    x = torch.full((len(rows), T), PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    labels = x.clone()
    labels[x == PAD_ID] = -100
    return x, labels


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi)."""
    return int(torch.randint(lo, hi, (1,), generator=g))


# --------------------------------------------------------------------------- induction
@dataclass(frozen=True)
class InductionData:
    """BOS + ``seq_len`` random words; each later chunk is, with probability ``p_copy``, a copy of an
    earlier span of the sequence (so copying from context pays off only via induction)."""

    vocab_size: int          # tokenizer size (specials included)
    seq_len: int = 64
    chunk: int = 16
    p_copy: float = 0.5

    @property
    def first_word(self) -> int:
        return len(SPECIALS)

    def batch(self, g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        L, C = self.seq_len, self.chunk
        x = torch.randint(self.first_word, self.vocab_size, (n, L), generator=g)
        copy = torch.rand(n, L // C, generator=g) < self.p_copy
        for i in range(n):
            for c in range(1, L // C):
                if copy[i, c]:
                    start = c * C
                    src = _randint(g, 0, start - C + 1)
                    x[i, start: start + C] = x[i, src: src + C].clone()
        x = torch.cat([torch.full((n, 1), BOS_ID, dtype=torch.long), x], 1)
        return x, x.clone()

    def repeated(self, g: torch.Generator, n: int, half: int) -> torch.Tensor:
        """Held-out probe: BOS + r + r with ``r`` = ``half`` random words, [n, 1 + 2*half]."""
        r = torch.randint(self.first_word, self.vocab_size, (n, half), generator=g)
        return torch.cat([torch.full((n, 1), BOS_ID, dtype=torch.long), r, r], 1)


# --------------------------------------------------------------------------- IOI
@dataclass(frozen=True)
class IOIExample:
    ids: list[int]           # BOS + full sentence (prompt + final IO name)
    template: int            # index into BABA + ABBA templates
    order: str               # "BABA", "ABBA" or "SSIO" (``unique_last``)
    io: int                  # token ids
    s: int
    pos_io: int              # positions (in ids) of IO, S1, S2 and END (last prompt token)
    pos_s1: int
    pos_s2: int
    pos_end: int
    place: int
    obj: int


class IOIData:
    """Sentences from ``IOI_BABA_TEMPLATES + IOI_ABBA_TEMPLATES`` with two distinct random names.

    ``p_distractor``: fraction of *training* sentences where the second subject gets a companion
    ("[B] and [C] gave a ring to [A]", C a third name). Without them the subject S is always the
    most recent name before END, and the model solves the task with one head that attends to the
    last name and suppresses it (no duplicate-token heads, no name movers). With them, the answer is
    "the first-clause name that is not repeated". ``p_distractor_first``: fraction of those where the
    distractor comes first ("[C] and [B] gave ..."), so S2 is not at a fixed place in its clause either
    and only duplicate detection identifies S. Held-out prompts never contain the distractor.
    ``p_unique_last``: fraction of training sentences whose three subject slots read S, S, IO (the
    answer is then the most recent name), so neither "suppress the most recent name" nor "suppress the
    second clause" solves the task. ``p_induction``: fraction of training rows that are induction
    sequences over the whole vocabulary (``InductionData``), so induction heads have a reason to form.
    ``p_multi``: fraction of training rows with K = 3..``multi_max`` first-clause names whose second
    clause repeats all but IO (``multi_example``; ``p_multi_new`` adds an unrepeated name there).
    ``p_crowd``: fraction of training rows with a second sentence of other names (``crowd_row``).
    All default to 0 (no random draws, so the shipped ioi recipe is unchanged); what forms with them
    is recorded in docs/zoo.md.
    """

    def __init__(self, tokenizer, p_distractor: float = 0.0, p_distractor_first: float = 0.0,
                 p_unique_last: float = 0.0, p_induction: float = 0.0, induction_len: int = 32,
                 induction_chunk: int = 8, p_multi: float = 0.0, multi_max: int = 4, p_multi_new: float = 0.0,
                 p_crowd: float = 0.0, crowd_max: int = 3, p_crowd_late: float = 0.5, crowd_pair: bool = False) -> None:
        self.tok = tokenizer
        self.p_crowd, self.crowd_max, self.p_crowd_late = p_crowd, crowd_max, p_crowd_late
        self._crowd_tail = [tokenizer.convert_tokens_to_ids(w) for w in ("were", "at", "the")]
        self.crowd_pair = crowd_pair
        self._pair_head = [tokenizer.convert_tokens_to_ids(w) for w in ("Then", ",")]
        self._pair_tail = [tokenizer.convert_tokens_to_ids(w) for w in ("went", "to", "the")]
        self.period_id = tokenizer.convert_tokens_to_ids(".")
        self.p_multi, self.multi_max, self.p_multi_new = p_multi, multi_max, p_multi_new
        self.comma_id = tokenizer.convert_tokens_to_ids(",")
        self.p_unique_last = p_unique_last
        self.p_induction = p_induction
        self.induction = InductionData(vocab_size=len(tokenizer), seq_len=induction_len, chunk=induction_chunk)
        self.p_distractor = p_distractor
        self.p_distractor_first = p_distractor_first
        self.and_id = tokenizer.convert_tokens_to_ids("and")
        self.templates = W.IOI_BABA_TEMPLATES + W.IOI_ABBA_TEMPLATES
        self.n_baba = len(W.IOI_BABA_TEMPLATES)
        self.name_ids = [tokenizer.convert_tokens_to_ids(n) for n in W.NAMES]
        self.place_ids = [tokenizer.convert_tokens_to_ids(n) for n in W.PLACES]
        self.object_ids = [tokenizer.convert_tokens_to_ids(n) for n in W.OBJECTS]
        # templates as token lists with placeholder markers
        self._tpl: list[list[str | int]] = []
        for t in self.templates:
            for ph in ("[A]", "[B]", "[PLACE]", "[OBJECT]"):
                t = t.replace(ph, f" {ph[1:-1]}PH ")
            toks: list[str | int] = []
            for w in pre_tokenize(t):
                toks.append(w if w.endswith("PH") else tokenizer.convert_tokens_to_ids(w))
            self._tpl.append(toks)

    def example(self, g: torch.Generator, template: int | None = None, names: tuple[int, int] | None = None,
                s2: int | None = None, place: int | None = None, obj: int | None = None,
                distractor: int | None = None, distractor_first: bool = False, unique_last: bool = False) -> IOIExample:
        """One sentence; template, ``names = (A, B)`` (IO, S token ids), place and object are drawn
        unless given; ``s2`` overrides the second subject occurrence (corruptions); ``distractor``: a
        name inserted as "[S2] and [C]" (or "[C] and [S2]" with ``distractor_first``); ``unique_last``:
        the three subject slots read S, S, IO instead of the template's order (the answer stays IO)."""
        ti = _randint(g, 0, len(self.templates)) if template is None else template
        if names is None:
            ia = _randint(g, 0, len(self.name_ids))
            ib = _randint(g, 0, len(self.name_ids) - 1)
            ib += ib >= ia
            a, b = self.name_ids[ia], self.name_ids[ib]
        else:
            a, b = names
        place = self.place_ids[_randint(g, 0, len(self.place_ids))] if place is None else place
        obj = self.object_ids[_randint(g, 0, len(self.object_ids))] if obj is None else obj
        ids, seen_b, pos = [BOS_ID], 0, {}
        slot = 0
        for t in self._tpl[ti]:
            if unique_last and t in ("APH", "BPH"):
                slot += 1
                if slot <= 3:
                    key = "A" if slot == 3 else "B"
                    pos.setdefault(key, []).append(len(ids)); ids.append(a if slot == 3 else b)
                else:
                    ids.append(a)
                continue
            if t == "APH":
                pos.setdefault("A", []).append(len(ids)); ids.append(a)
            elif t == "BPH":
                if seen_b == 1 and distractor is not None and distractor_first:
                    ids += [distractor, self.and_id]
                pos.setdefault("B", []).append(len(ids))
                ids.append(b if (seen_b == 0 or s2 is None) else s2)
                if seen_b == 1 and distractor is not None and not distractor_first:
                    ids += [self.and_id, distractor]
                seen_b += 1
            elif t == "PLACEPH":
                ids.append(place)
            elif t == "OBJECTPH":
                ids.append(obj)
            else:
                ids.append(int(t))
        return IOIExample(ids=ids, template=ti, order="SSIO" if unique_last else "BABA" if ti < self.n_baba else "ABBA", io=a, s=b,
                          pos_io=pos["A"][0], pos_s1=pos["B"][0], pos_s2=pos["B"][1], pos_end=len(ids) - 2, place=place, obj=obj)

    def _name_list(self, names: list[int]) -> list[int]:
        """"n1 , n2 and n3" as token ids."""
        out: list[int] = []
        for i, n in enumerate(names):
            if i:
                out.append(self.and_id if i == len(names) - 1 else self.comma_id)
            out.append(n)
        return out

    def multi_example(self, g: torch.Generator) -> list[int]:
        """A template sentence with K = 3..``multi_max`` first-clause names (IO and K-1 subjects, random
        order); the second clause names the K-1 subjects again (random order, with probability
        ``p_multi_new`` plus one name not seen before); the answer is IO, the only first-clause name
        not repeated."""
        k = _randint(g, 3, self.multi_max + 1)
        perm = torch.randperm(len(self.name_ids), generator=g).tolist()
        chosen = [self.name_ids[i] for i in perm[: k + 1]]
        io, subjects, new = chosen[0], chosen[1:k], chosen[k]
        first = [chosen[i] for i in torch.randperm(k, generator=g).tolist()]
        second = [subjects[i] for i in torch.randperm(k - 1, generator=g).tolist()]
        if self.p_multi_new and float(torch.rand(1, generator=g)) < self.p_multi_new:
            second.insert(_randint(g, 0, len(second) + 1), new)
        ti = _randint(g, 0, len(self.templates))
        place = self.place_ids[_randint(g, 0, len(self.place_ids))]
        obj = self.object_ids[_randint(g, 0, len(self.object_ids))]
        ids, slot, skip_and = [BOS_ID], 0, False
        for t in self._tpl[ti]:
            if t in ("APH", "BPH"):
                slot += 1
                if slot == 1:
                    ids += self._name_list(first); skip_and = True
                elif slot == 3:
                    ids += self._name_list(second)
                elif slot == 4:
                    ids.append(io)
                continue
            if skip_and:            # the "and" between the template's two first-clause names
                skip_and = False
                continue
            ids.append(place if t == "PLACEPH" else obj if t == "OBJECTPH" else int(t))
        return ids

    def crowd_row(self, g: torch.Generator) -> list[int]:
        """A plain IOI sentence plus a crowd sentence "X , Y and Z were at the PLACE ." of 2..``crowd_max``
        other names, at the start or (with probability ``p_crowd_late``) just before S2. Copying every name
        in context and suppressing S then leaves the crowd tied with IO: only a name mover that picks the
        name paired with S in the first clause solves it."""
        ex = self.example(g)
        k = 2 if self.crowd_pair else _randint(g, 2, self.crowd_max + 1)
        others = [t for t in self.name_ids if t not in (ex.io, ex.s)]
        crowd = [others[i] for i in torch.randperm(len(others), generator=g)[:k].tolist()]
        place = self.place_ids[_randint(g, 0, len(self.place_ids))]
        if self.crowd_pair:
            sent = self._pair_head + self._name_list(crowd) + self._pair_tail + [place, self.period_id]
        else:
            sent = self._name_list(crowd) + self._crowd_tail + [place, self.period_id]
        at = ex.pos_s2 if float(torch.rand(1, generator=g)) < self.p_crowd_late else 1
        return ex.ids[:at] + sent + ex.ids[at:]

    def training_example(self, g: torch.Generator) -> IOIExample:
        if self.p_unique_last and float(torch.rand(1, generator=g)) < self.p_unique_last:
            ex = self.example(g)
            return self.example(g, template=ex.template, names=(ex.io, ex.s), place=ex.place, obj=ex.obj, unique_last=True)
        if self.p_distractor and float(torch.rand(1, generator=g)) < self.p_distractor:
            ex = self.example(g)
            others = [t for t in self.name_ids if t not in (ex.io, ex.s)]
            c = others[_randint(g, 0, len(others))]
            first = bool(self.p_distractor_first) and float(torch.rand(1, generator=g)) < self.p_distractor_first
            return self.example(g, template=ex.template, names=(ex.io, ex.s), place=ex.place, obj=ex.obj, distractor=c,
                                distractor_first=first)
        return self.example(g)

    def training_row(self, g: torch.Generator) -> list[int]:
        if self.p_induction and float(torch.rand(1, generator=g)) < self.p_induction:
            return self.induction.batch(g, 1)[0][0].tolist()
        if self.p_multi and float(torch.rand(1, generator=g)) < self.p_multi:
            return self.multi_example(g)
        if self.p_crowd and float(torch.rand(1, generator=g)) < self.p_crowd:
            return self.crowd_row(g)
        return self.training_example(g).ids

    def batch(self, g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _pad_rows([self.training_row(g) for _ in range(n)])

    def eval_set(self, g: torch.Generator, n: int) -> dict[str, torch.Tensor]:
        """Held-out prompts (without the final IO), plus an ABC corruption of each (three other names,
        same template/place/object draw order), right-padded; positions per row."""
        clean, corr, rows = [], [], []
        for _ in range(n):
            ex = self.example(g)
            # ABC (Wang et al.'s p_ABC): IO, S1 and S2 replaced by three other distinct names
            others = [t for t in self.name_ids if t not in (ex.io, ex.s)]
            x, y, z = (others[i] for i in torch.randperm(len(others), generator=g)[:3].tolist())
            ex_c = self.example(g, template=ex.template, names=(x, y), s2=z, place=ex.place, obj=ex.obj)
            clean.append(ex.ids[:-1]); corr.append(ex_c.ids[:-1]); rows.append(ex)
        xc, _ = _pad_rows(clean)
        xk, _ = _pad_rows(corr)
        P = lambda f: torch.tensor([getattr(r, f) for r in rows], dtype=torch.long)  # noqa: E731
        return {"clean": xc, "corrupted": xk, "io": P("io"), "s": P("s"), "IO": P("pos_io"), "S1": P("pos_s1"),
                "S2": P("pos_s2"), "END": P("pos_end"), "baba": torch.tensor([r.order == "BABA" for r in rows])}


# --------------------------------------------------------------------------- greater-than
@dataclass(frozen=True)
class GTExample:
    ids: list[int]
    yy: int
    pos_yy: int
    pos_end: int


class GreaterThanData:
    """"The {noun} lasted from the year {XX}{YY} to the year {XX}{ZZ}", ZZ uniform in (YY, 99]."""

    def __init__(self, tokenizer, centuries: tuple[int, int] = (11, 17), yy_range: tuple[int, int] = (2, 98)) -> None:
        self.tok = tokenizer
        self.num_ids = [tokenizer.convert_tokens_to_ids(f"{i:02d}") for i in range(100)]
        self.noun_ids = [tokenizer.convert_tokens_to_ids(n) for n in W.GREATER_THAN_NOUNS]
        self.centuries, self.yy_range = centuries, yy_range
        head, tail = W.GREATER_THAN_TEMPLATE.split("[NOUN]")
        mid, _ = tail.split("[XX][YY]")
        self.head = [tokenizer.convert_tokens_to_ids(w) for w in pre_tokenize(head)]
        self.mid = [tokenizer.convert_tokens_to_ids(w) for w in pre_tokenize(mid)]
        rest = tail.split("[XX][YY]")[1].replace("[XX]", "")
        self.tail = [tokenizer.convert_tokens_to_ids(w) for w in pre_tokenize(rest)]

    def example(self, g: torch.Generator, yy: int | None = None, zz: bool = True) -> GTExample:
        noun = self.noun_ids[_randint(g, 0, len(self.noun_ids))]
        xx = _randint(g, self.centuries[0], self.centuries[1] + 1)
        yy = _randint(g, self.yy_range[0], self.yy_range[1] + 1) if yy is None else yy
        ids = [BOS_ID, *self.head, noun, *self.mid, self.num_ids[xx], self.num_ids[yy], *self.tail, self.num_ids[xx]]
        pos_yy, pos_end = len(self.head) + len(self.mid) + 3, len(ids) - 1
        if zz:
            ids.append(self.num_ids[_randint(g, yy + 1, 100)])
        return GTExample(ids=ids, yy=yy, pos_yy=pos_yy, pos_end=pos_end)

    def batch(self, g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _pad_rows([self.example(g).ids for _ in range(n)])

    def eval_set(self, g: torch.Generator, n: int) -> dict[str, torch.Tensor]:
        """Held-out prompts ending at the second XX, YY cycling over the range; corrupted: YY := 01."""
        lo, hi = self.yy_range
        rows = [self.example(g, yy=lo + i % (hi - lo + 1), zz=False) for i in range(n)]
        clean = torch.tensor([r.ids for r in rows], dtype=torch.long)
        corr = clean.clone()
        corr[:, rows[0].pos_yy] = self.num_ids[1]
        return {"clean": clean, "corrupted": corr, "yy": torch.tensor([r.yy for r in rows]),
                "YY": torch.tensor([r.pos_yy for r in rows]), "END": torch.tensor([r.pos_end for r in rows]),
                "num_ids": torch.tensor(self.num_ids)}
