"""Task library: every task on a word-level and a byte-level BPE tokenizer, against independent truth.

Both tokenizers are built here (no downloads): the word-level one with the zoo's recipe (whitespace split,
punctuation split, digit runs in pairs; <pad>=0 <bos>=1 <eos>=2 <unk>=3) over the word lists, the BPE one
GPT-2 style (byte-level, words carry a leading space) trained on sentences generated from the word lists.
"""

from __future__ import annotations

import json
import random
import re
import string

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from circuit_tests.errors import TaskError
from circuit_tests.metrics import metric_values
from circuit_tests.tasks import (BuildContext, TaskData, build_task, clear_cache, task_names, tokenizer_fingerprint,
                                 validate_params)
from circuit_tests.tasks import wordlists as W

PH = re.compile(r"\[[A-Z0-9_]+\]")
GENERATED = ["ioi", "greater_than", "gendered_pronoun", "sva", "colored_objects", "induction"]


# --------------------------------------------------------------------------------------------- tokenizers
def _wordlist_texts() -> list[str]:
    texts: list[str] = []

    def walk(x):
        if isinstance(x, str):
            texts.append(PH.sub(" ", x))
        elif isinstance(x, (tuple, list)):
            for y in x:
                walk(y)

    for k in dir(W):
        if k.isupper():
            walk(getattr(W, k))
    texts += [f"{y:02d}" for y in range(100)]  # the years of the greater-than corpus
    return texts


def _word_pretok():
    # the zoo's recipe: \w+|[^\w\s]+ (whitespace + punctuation split), then digit runs cut in pairs
    return pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Split(Regex(r"\d\d"), behavior="isolated")])


def make_wordlevel(exclude: tuple[str, ...] = (), bos: bool = True) -> PreTrainedTokenizerFast:
    pt = _word_pretok()
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for t in _wordlist_texts():
        for w, _ in pt.pre_tokenize_str(t):
            if w not in exclude:
                vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pt
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    kw = {"bos_token": "<bos>"} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", **kw)


# words the BPE corpus never contains, so the trained BPE splits them into several tokens
BPE_UNSEEN = {"Rachel", "Helen", "Carol", "surgeon", "surgeons", "admires", "admire", "purple", "Purple", "necklace"}


def _bpe_corpus() -> list[str]:
    rng = random.Random(0)

    def seen(xs):
        return [x for x in xs if x not in BPE_UNSEEN and not (isinstance(x, tuple) and set(x) & BPE_UNSEEN)]

    def fill(t: str, pool) -> str:
        return PH.sub(lambda m: rng.choice(pool), t)

    lines = []
    names = seen(W.NAMES + W.GENDER_FEMALE_NAMES + W.GENDER_MALE_NAMES)
    nouns, objects, colors = seen(W.SVA_NOUNS), seen(W.COLORED_OBJECTS), seen(W.COLORS)
    for _ in range(1500):
        t = rng.choice(W.IOI_BABA_TEMPLATES + W.IOI_ABBA_TEMPLATES)
        lines.append(fill(t.replace("[PLACE]", rng.choice(W.PLACES)).replace("[OBJECT]", rng.choice(seen(W.OBJECTS))), names))
        lines.append(f"So {rng.choice(names)} is {rng.choice(W.GENDER_PREDICATES)}, isn't {rng.choice(['he', 'she'])}?")
        n, a = rng.choice(nouns), rng.choice(nouns)
        lines.append(f"The {rng.choice(n)} near the {rng.choice(a)} {rng.choice(rng.choice(W.SVA_VERBS))}.")
        lines.append(f"The {rng.choice(n)} that the {rng.choice(a)} {rng.choice(rng.choice(seen(W.SVA_REL_VERBS)))} "
                     f"{rng.choice(rng.choice(W.SVA_VERBS))} behind the {rng.choice(a)} next to the {rng.choice(a)} with me.")
        objs, cols = rng.sample(objects, 3), rng.sample(colors, 3)
        lines.append(f"Q: On the {rng.choice(W.COLORED_SURFACES)}, {rng.choice(W.COLORED_PRESENTERS)} a {cols[0]} {objs[0]}, "
                     f"an {cols[1]} {objs[1]}, and a {cols[2]} {objs[2]}. What color is the {objs[0]}?\nA: {cols[0].title()}")
    for _ in range(400):
        y = rng.randrange(1100, 1800)
        lines.append(f"The {rng.choice(W.GREATER_THAN_NOUNS)} lasted from the year {y} to the year {y // 100}")
    lines += [f"{y:02d}" for y in range(100) for _ in range(5)]
    return lines


def make_bpe() -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tr = trainers.BpeTrainer(vocab_size=1200, min_frequency=3, special_tokens=["<|endoftext|>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_bpe_corpus(), tr)
    eot = "<|endoftext|>"  # GPT-2's convention: bos = eos = unk, no pad
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=eot, eos_token=eot, unk_token=eot)


@pytest.fixture(scope="module")
def word_tok():
    return make_wordlevel()


@pytest.fixture(scope="module")
def bpe_tok():
    return make_bpe()


@pytest.fixture(params=["word", "bpe"])
def tok(request, word_tok, bpe_tok):
    return word_tok if request.param == "word" else bpe_tok


def is_word(tk) -> bool:
    return tk.unk_token == "<unk>"


def squash(s: str) -> str:
    return "".join(s.split())


def dec(tk, ids) -> str:
    return tk.decode([int(i) for i in ids])


def word_at(tk, data: TaskData, i: int, pos: str, which: str = "clean") -> str:
    return dec(tk, [getattr(data, which)[i, data.positions[pos][i]]]).strip()


def gt_yy(text: str) -> int:
    return int(re.search(r"year \d\d(\d\d) to", text).group(1))


def diff_positions(data: TaskData, i: int) -> list[int]:
    L = int(data.end[i]) + 1
    return torch.nonzero(data.clean[i, :L] != data.corrupted[i, :L]).flatten().tolist()


# ------------------------------------------------------------------------------------- shared invariants
def check_invariants(tk, data: TaskData, prepend_bos: bool = True) -> None:
    N, T = data.clean.shape
    assert N == len(data) == data.info["n_kept"] > 0
    assert data.corrupted.shape == (N, T) and data.end.shape == (N,)
    assert data.targets.shape == data.signs.shape and data.targets.shape[0] == N
    assert data.clean.dtype == data.corrupted.dtype == data.targets.dtype == torch.long
    pad = tk.pad_token_id if tk.pad_token_id is not None else tk.eos_token_id
    off = 1 if prepend_bos else 0
    for i in range(N):
        e = int(data.end[i])
        assert 0 < e < T
        assert (data.clean[i, e + 1:] == pad).all() and (data.corrupted[i, e + 1:] == pad).all()
        if prepend_bos:
            assert data.clean[i, 0] == data.corrupted[i, 0] == tk.bos_token_id
        real = data.clean[i, off:e + 1].tolist()
        creal = data.corrupted[i, off:e + 1].tolist()
        assert real[-1] not in set(tk.all_special_ids)  # END is a real token, not padding
        if data.name != "induction":
            # decoding the real tokens reproduces the prompt text (word-level decoding re-spaces words)
            if is_word(tk):
                assert squash(dec(tk, real)) == squash(data.clean_text[i])
                assert squash(dec(tk, creal)) == squash(data.corrupted_text[i])
                assert tk.unk_token_id not in real + creal
            else:
                assert dec(tk, real) == data.clean_text[i]
                assert dec(tk, creal) == data.corrupted_text[i]
        nz = data.signs[i] != 0
        assert (data.signs[i][nz].abs() == 1).all() and (data.signs[i] > 0).any() and (data.signs[i] < 0).any()
        good = set(data.targets[i][data.signs[i] > 0].tolist())
        bad = set(data.targets[i][data.signs[i] < 0].tolist())
        assert not good & bad
        assert not (good | bad) & set(tk.all_special_ids)
        for p, v in data.positions.items():
            assert off <= int(v[i]) <= e, (p, i)
    assert (data.positions["END"] == data.end).all()
    assert len(data.clean_text) == len(data.corrupted_text) == N


# ------------------------------------------------------------------------------------------- every task
def test_registry():
    assert task_names() == sorted(GENERATED + ["custom"])


@pytest.mark.parametrize("name", GENERATED)
def test_builds_on_both_tokenizers(name, tok):
    clear_cache()
    data = build_task(name, tok, {"size": 24})
    assert len(data) == 24 and data.info["n_candidates"] >= 24
    check_invariants(tok, data)


def test_bpe_drops_words_that_are_not_single_tokens(bpe_tok):
    pools = {n: build_task(n, bpe_tok, {"size": 16}).info["pools"] for n in ("ioi", "gendered_pronoun", "sva", "colored_objects")}
    assert set(pools["ioi"]["names"]["dropped"]) == {"Rachel", "Helen"}
    assert "single token" in pools["ioi"]["names"]["dropped"]["Rachel"]
    assert set(pools["gendered_pronoun"]["female names"]["dropped"]) == {"Carol"}
    assert list(pools["sva"]["relative-clause verbs"]["dropped"]) == []  # not an answer: any token count is fine
    assert set(pools["colored_objects"]["colors"]["dropped"]) == {"purple"}
    assert set(pools["colored_objects"]["objects"]["dropped"]) == {"necklace"}
    assert pools["ioi"]["objects"]["dropped"] == {}  # fillers need no single token


def test_bpe_multi_token_subject_keeps_aligned_pairs(bpe_tok):
    from circuit_tests.tasks._common import Tok
    assert len(bpe_tok.tokenize(" surgeon")) > 1
    data = build_task("sva", bpe_tok, {"size": 200, "min_size": 1})
    t = Tok(bpe_tok, BuildContext(), "sva")
    same_len = len(t.encode(" surgeon")) == len(t.encode(" surgeons"))
    rows = [i for i, txt in enumerate(data.clean_text) if txt.split()[1] in ("surgeon", "surgeons")]
    assert bool(rows) == same_len
    if not same_len:
        assert "singular and plural subject have different token lengths" in data.info["dropped"]
    for i in rows:
        d = diff_positions(data, i)
        assert d and max(d) <= int(data.positions["SUBJ"][i])


@pytest.mark.parametrize("name", GENERATED)
def test_full_size_on_wordlevel_vocab_of_the_word_lists(name, word_tok):
    """A word-level tokenizer that knows the word lists supports every generator at its default size, dropping nothing."""
    data = build_task(name, word_tok, {})
    assert len(data) == 64 and data.info["dropped"] == {}
    assert all(p["kept"] == p["total"] for p in data.info["pools"].values())


@pytest.mark.parametrize("name", GENERATED)
def test_deterministic_and_seeded(name, tok):
    clear_cache()
    a = build_task(name, tok, {"size": 16, "seed": 3})
    clear_cache()
    b = build_task(name, tok, {"size": 16, "seed": 3})
    c = build_task(name, tok, {"size": 16, "seed": 4})
    assert a is not b and torch.equal(a.clean, b.clean) and torch.equal(a.corrupted, b.corrupted)
    assert torch.equal(a.targets, b.targets) and a.clean_text == b.clean_text
    assert not torch.equal(a.clean, c.clean) or not torch.equal(a.targets, c.targets)


@pytest.mark.parametrize("name", GENERATED)
def test_without_bos(name, tok):
    with_bos = build_task(name, tok, {"size": 8})
    data = build_task(name, tok, {"size": 8}, BuildContext(prepend_bos=False))
    check_invariants(tok, data, prepend_bos=False)
    assert (data.end == with_bos.end - 1).all()
    assert torch.equal(data.clean[:, : data.clean.shape[1]], with_bos.clean[:, 1:])
    for p in data.positions:
        assert (data.positions[p] == with_bos.positions[p] - 1).all()


def test_bos_required_but_missing():
    tk = make_wordlevel(bos=False)
    with pytest.raises(TaskError, match="no bos_token"):
        build_task("ioi", tk, {"size": 4})
    assert len(build_task("ioi", tk, {"size": 4}, BuildContext(prepend_bos=False))) == 4


def test_not_a_fast_tokenizer():
    with pytest.raises(TaskError, match="fast tokenizer|Hugging Face tokenizer"):
        build_task("ioi", object(), {"size": 4})


# ------------------------------------------------------------------------------------------------- IOI
@pytest.mark.parametrize("corruption", ["s2_io_flip", "s2_random", "abc"])
def test_ioi_roles_and_corruptions(tok, corruption):
    data = build_task("ioi", tok, {"size": 32, "corruption": corruption})
    check_invariants(tok, data)
    names = set(W.NAMES)
    for i in range(len(data)):
        io, s1, s2 = (word_at(tok, data, i, r) for r in ("IO", "S1", "S2"))
        assert io in names and s1 == s2 != io
        assert [dec(tok, [t]).strip() for t in data.targets[i]] == [io, s1]
        assert data.signs[i].tolist() == [1.0, -1.0]
        assert data.clean_text[i].endswith(" to") and f" {io} " in data.clean_text[i] + " "
        pos = {r: int(data.positions[r][i]) for r in ("IO", "S1", "S2")}
        assert pos["S2"] > max(pos["IO"], pos["S1"])
        d = diff_positions(data, i)
        c = {r: word_at(tok, data, i, r, "corrupted") for r in ("IO", "S1", "S2")}
        if corruption == "s2_io_flip":
            assert d == [pos["S2"]] and c["S2"] == io
        elif corruption == "s2_random":
            assert d == [pos["S2"]] and c["S2"] in names - {io, s1}
        else:
            assert d == sorted(pos.values())
            assert len(set(c.values())) == 3 and not set(c.values()) & {io, s1}


@pytest.mark.parametrize("kind", ["BABA", "ABBA"])
def test_ioi_template_orders(word_tok, kind):
    data = build_task("ioi", word_tok, {"size": 32, "templates": kind})
    io_first = (data.positions["IO"] < data.positions["S1"])
    assert io_first.all() if kind == "ABBA" else (~io_first).all()
    assert data.info["pools"]["templates"]["total"] == len(W.IOI_BABA_TEMPLATES)


def test_ioi_drops_names_missing_from_the_vocabulary():
    tk = make_wordlevel(exclude=("Mary", "John"))
    data = build_task("ioi", tk, {"size": 32})
    dropped = data.info["pools"]["names"]["dropped"]
    assert set(dropped) == {"Mary", "John"} and "vocabulary" in dropped["Mary"]
    assert not any(" Mary " in t or " John " in t for t in data.clean_text)


def test_ioi_template_with_unknown_word_is_dropped():
    tk = make_wordlevel(exclude=("commuting",))
    data = build_task("ioi", tk, {"size": 16})
    dropped = data.info["pools"]["templates"]["dropped"]
    assert len(dropped) == 2 and all("'commuting'" in v for v in dropped.values())  # its BABA and ABBA forms


def test_too_few_names_is_a_task_error_with_reasons():
    tk = make_wordlevel(exclude=tuple(W.NAMES[2:]))
    with pytest.raises(TaskError, match=r"only 2 of 40 names.*need at least 5.*vocabulary.*: Alice, Bob"):
        build_task("ioi", tk, {"size": 8, "corruption": "abc"})


def test_bpe_multi_token_name_is_dropped(bpe_tok):
    # the BPE corpus never saw this name, so it cannot be a single token
    from circuit_tests.tasks import ioi as ioi_mod
    from circuit_tests.tasks._common import Drop, Tok
    t = Tok(bpe_tok, BuildContext(), "ioi")
    with pytest.raises(Drop, match="single token"):
        t.next_token("Then, Mary gave a ring to", " Bartholomew")
    assert ioi_mod.TEMPLATES["ABBA"][0].startswith("Then, [IO] and [S1]")


# ---------------------------------------------------------------------------------------- greater-than
def hanna_valid_years(tk, lo=1100, hi=1799) -> list[int]:
    """Independent re-implementation of Hanna's get_valid_years (plus the 01-corruption and YY range)."""
    out = {}
    for y in range(lo, hi + 1):
        ok = True
        for yy in (f"{y % 100:02d}", "01"):
            toks = tk.tokenize(f" {y // 100}{yy}")
            ok &= len(toks) == 2 and tk.convert_tokens_to_string([toks[1]]) == yy
        if ok:
            out.setdefault(y // 100, []).append(y)
    return sorted(y for ys in out.values() for y in ys[1:-1] if 2 <= y % 100 <= 98)


def test_greater_than_structure(tok):
    data = build_task("greater_than", tok, {"size": 48})
    check_invariants(tok, data)
    valid = set(hanna_valid_years(tok))
    assert data.info["valid_years"] == len(valid)
    twodigit = [dec(tok, [t]) for t in data.targets[0]]
    assert twodigit == [f"{y:02d}" for y in range(100)]
    for i in range(len(data)):
        m = re.fullmatch(r"The (\w+) lasted from the year (\d\d)(\d\d) to the year (\d\d)", data.clean_text[i])
        assert m and m.group(2) == m.group(4) and int(m.group(2) + m.group(3)) in valid
        yy = int(m.group(3))
        assert data.signs[i].tolist() == [1.0 if y > yy else -1.0 for y in range(100)]
        assert data.corrupted_text[i] == data.clean_text[i].replace(f"{m.group(2)}{m.group(3)} to", f"{m.group(2)}01 to")
        assert diff_positions(data, i) == [int(data.positions["YY"][i])]
        assert word_at(tok, data, i, "YY") == m.group(3) and word_at(tok, data, i, "YY", "corrupted") == "01"
        assert data.clean[i, data.positions["XX1"][i]] == data.clean[i, data.positions["XX2"][i]]
        assert data.positions["XX2"][i] == data.end[i] and data.positions["YY"][i] == data.positions["XX1"][i] + 1
    # the YY thresholds are spread evenly (Hanna's balanced cycling)
    yys = {gt_yy(t) for t in data.clean_text}
    assert len(yys) == min(48, len({y % 100 for y in valid}))


def test_greater_than_every_yy_bucket_at_any_size_from_its_count(word_tok):
    """Issue 14: the YY thresholds used to be walked in sorted order (size 64 only saw 02..65). Every bucket
    (an independent recomputation from Hanna's valid years) appears once size reaches the bucket count, and a
    smaller size samples the whole 02..98 range, not its low end."""
    buckets = {y % 100 for y in hanna_valid_years(word_tok)}
    n = len(buckets)
    for size in (n, n + 7, 2 * n + 3):
        data = build_task("greater_than", word_tok, {"size": size, "seed": size})
        assert {gt_yy(t) for t in data.clean_text} == buckets, size
    for size in (16, 64):
        yys = sorted(gt_yy(t) for t in build_task("greater_than", word_tok, {"size": size}).clean_text)
        assert len(set(yys)) == size
        lo, hi = min(buckets), max(buckets)
        quarter = (hi - lo) / 4
        assert yys[0] < lo + quarter and yys[-1] > hi - quarter, (size, yys)  # both ends of the range
        for q in range(4):  # and every quarter of it
            assert any(lo + q * quarter <= y <= lo + (q + 1) * quarter for y in yys), (size, q, yys)


def test_greater_than_bucket_order_is_seeded(word_tok):
    a = build_task("greater_than", word_tok, {"size": 16, "seed": 1}).clean_text
    assert build_task("greater_than", word_tok, {"size": 16, "seed": 1}).clean_text == a
    assert build_task("greater_than", word_tok, {"size": 16, "seed": 2}).clean_text != a


def test_greater_than_skips_years_that_merge(bpe_tok):
    all_years = set(range(1100, 1800))
    valid = set(hanna_valid_years(bpe_tok))
    merged = [y for y in all_years if len(bpe_tok.tokenize(f" {y}")) != 2]
    assert merged, "the test BPE should merge some frequent years into one token"
    assert not valid & set(merged)
    data = build_task("greater_than", bpe_tok, {"size": 16})
    assert data.info["pools"]["years (tokenizable)"]["kept"] < 700


def test_greater_than_needs_all_two_digit_tokens():
    tk = make_wordlevel(exclude=("05", "77"))
    with pytest.raises(TaskError, match=r"00\.\.99.*2 are not: 05.*77"):
        build_task("greater_than", tk, {"size": 8})


def test_greater_than_year_range_params(word_tok):
    data = build_task("greater_than", word_tok, {"size": 8, "year_min": 1500, "year_max": 1599})
    assert all(" 15" in t for t in data.clean_text)
    with pytest.raises(TaskError, match="year_min"):
        validate_params("greater_than", {"year_min": 1800, "year_max": 1700})


# ------------------------------------------------------------------------------------ gendered pronoun
def test_gendered_pronoun(tok):
    data = build_task("gendered_pronoun", tok, {"size": 40})
    check_invariants(tok, data)
    fem, male = set(W.GENDER_FEMALE_NAMES), set(W.GENDER_MALE_NAMES)
    for i in range(len(data)):
        name, other = word_at(tok, data, i, "NAME"), word_at(tok, data, i, "NAME", "corrupted")
        assert (name in fem and other in male) or (name in male and other in fem)
        assert data.clean_text[i] == f"So {name} is {data.clean_text[i].split(' is ', 1)[1]}"
        assert data.clean_text[i].endswith(", isn't")
        want = ["she", "he"] if name in fem else ["he", "she"]
        assert [dec(tok, [t]).strip() for t in data.targets[i]] == want
        assert diff_positions(data, i) == [int(data.positions["NAME"][i])]
    assert len(set(data.clean_text)) >= 20


def test_gendered_pronoun_space_is_finite(word_tok):
    n = 2 * 10 * 5 * 10
    with pytest.raises(TaskError, match=rf"only {n} of the 5000"):
        build_task("gendered_pronoun", word_tok, {"size": 5000})
    data = build_task("gendered_pronoun", word_tok, {"size": 5000, "min_size": 100})
    assert len(data) == n and len(set(zip(data.clean_text, data.corrupted_text))) == n


# ---------------------------------------------------------------------------------------------------- SVA
def test_sva(tok):
    data = build_task("sva", tok, {"size": 40})
    check_invariants(tok, data)
    sing = {s: p for s, p in W.SVA_NOUNS}
    plur = {p: s for s, p in W.SVA_NOUNS}
    vs, vp = {s for s, _ in W.SVA_VERBS}, {p for _, p in W.SVA_VERBS}
    n_plural = 0
    for i in range(len(data)):
        words, cwords = data.clean_text[i].split(), data.corrupted_text[i].split()
        assert words[0] == "The" and len(words) == len(cwords)
        subj, csubj = words[1], cwords[1]
        assert [j for j in range(len(words)) if words[j] != cwords[j]] == [1]
        is_plural = subj in plur
        n_plural += is_plural
        assert (plur.get(subj) == csubj) if is_plural else (sing[subj] == csubj)
        good = {dec(tok, [t]).strip() for t in data.targets[i][data.signs[i] > 0]}
        bad = {dec(tok, [t]).strip() for t in data.targets[i][data.signs[i] < 0]}
        assert (good, bad) == ((vp, vs) if is_plural else (vs, vp))
        assert word_at(tok, data, i, "SUBJ") == subj or subj.endswith(word_at(tok, data, i, "SUBJ"))
        d = diff_positions(data, i)
        assert d and max(d) == int(data.positions["SUBJ"][i])
        if "that the" in data.clean_text[i]:  # the relative-clause verb agrees with the attractor
            attr, relv = words[-2], words[-1]
            assert (relv in {p for _, p in W.SVA_REL_VERBS}) == (attr in plur)
    assert n_plural == len(data) // 2  # both directions, balanced


def test_sva_drops_verbs_missing_from_vocab():
    tk = make_wordlevel(exclude=("swims",))
    data = build_task("sva", tk, {"size": 8})
    assert list(data.info["pools"]["verbs"]["dropped"]) == ["('swims', 'swim')"]
    assert data.targets.shape[1] == 2 * (len(W.SVA_VERBS) - 1)


# ----------------------------------------------------------------------------------------- colored objects
def test_colored_objects(tok):
    data = build_task("colored_objects", tok, {"size": 32})
    check_invariants(tok, data)
    pat = re.compile(r"Q: On the (\w+), (there is|you see|I see) an? (\w+) (\w+), an? (\w+) (\w+), and an? (\w+) (\w+)\. "
                     r"What color is the (\w+)\?\nA:")
    for i in range(len(data)):
        text = data.clean_text[i]
        q1, a1, rest = text.partition("\nA: ")[0], *text.partition("\nA: ")[2].split("\n", 1)
        m1 = pat.fullmatch(q1 + "\nA:")
        assert m1 and a1 == dict(zip(m1.group(4, 6, 8), m1.group(3, 5, 7)))[m1.group(9)].title()
        m = pat.fullmatch(rest)
        assert m, rest
        colors = dict(zip(m.group(4, 6, 8), m.group(3, 5, 7)))
        q = m.group(9)
        cq = pat.fullmatch(data.corrupted_text[i].split("\n", 2)[2]).group(9)
        assert cq != q and cq in colors and q in colors
        assert [dec(tok, [t]).strip() for t in data.targets[i]] == [colors[q].title(), colors[cq].title()]
        assert diff_positions(data, i) == [int(data.positions["QUERY"][i])]
        assert word_at(tok, data, i, "QUERY") == q and word_at(tok, data, i, "QUERY", "corrupted") == cq
        assert word_at(tok, data, i, "ANS_OBJ") == q and word_at(tok, data, i, "ANS_COLOR") == colors[q]
        assert word_at(tok, data, i, "WRONG_OBJ") == cq and word_at(tok, data, i, "WRONG_COLOR") == colors[cq]
        assert len(set(colors.values())) == 3 and len(colors) == 3


def test_colored_objects_title_case_answer_required():
    tk = make_wordlevel(exclude=("Blue",))
    data = build_task("colored_objects", tk, {"size": 8})
    assert list(data.info["pools"]["colors"]["dropped"]) == ["blue"]
    assert "Blue" not in " ".join(data.clean_text)


# ------------------------------------------------------------------------------------------------ induction
@pytest.mark.parametrize("corruption", ["resample", "swap_answer"])
def test_induction(tok, corruption):
    T = 12
    data = build_task("induction", tok, {"size": 16, "seq_len": T, "corruption": corruption})
    check_invariants(tok, data)
    special = set(tok.all_special_ids)
    for i in range(len(data)):
        row, crow = data.clean[i, 1:].tolist(), data.corrupted[i, 1:].tolist()
        x = row[:T]
        assert len(row) == 2 * T - 1 and row[T:] == x[:-1] and len(set(x)) == T and not set(x) & special
        ans, wrong = data.targets[i].tolist()
        assert ans == x[-1] and wrong not in row and wrong not in special
        assert data.end[i] == 2 * T - 1  # BOS + 2T-1 tokens
        assert data.clean[i, data.positions["CUR1"][i]] == data.clean[i, data.end[i]]
        assert data.clean[i, data.positions["NEXT1"][i]] == ans
        assert crow[T:] == row[T:]
        if corruption == "resample":
            assert not set(crow[:T]) & set(x) and len(set(crow[:T])) == T and ans not in crow and wrong not in crow
        else:
            assert diff_positions(data, i) == [int(data.positions["NEXT1"][i])] and crow[T - 1] == wrong


def test_induction_token_range_and_small_vocab(word_tok):
    data = build_task("induction", word_tok, {"size": 8, "token_range": [100, 200]})
    assert ((data.clean[:, 1:] >= 100) & (data.clean[:, 1:] < 200)).all()
    with pytest.raises(TaskError, match="needs at least 41 distinct"):
        build_task("induction", word_tok, {"size": 8, "token_range": [100, 130]})


# ------------------------------------------------------------------------------------------------- custom
def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


IOI_ROWS = [
    {"clean": "Then, Mary and John went to the store. John gave a ring to",
     "corrupted": "Then, Mary and John went to the store. Mary gave a ring to", "answer": "Mary", "wrong": "John"},
    {"clean": "Then, Alice and Bob went to the school. Bob gave a drink to",
     "corrupted": "Then, Alice and Bob went to the school. Alice gave a drink to", "answers": ["Alice"], "wrongs": "Bob"},
]


def test_custom_jsonl_and_csv_agree(tok, tmp_path):
    write_jsonl(tmp_path / "d.jsonl", IOI_ROWS)
    with open(tmp_path / "d.csv", "w", newline="") as f:
        f.write("clean,corrupted,answer,wrong,answers,wrongs,note\n")
        for r in IOI_ROWS:
            a, w = r.get("answer", ""), r.get("wrong", "")
            aa = "|".join(r["answers"]) if "answers" in r else ""
            ww = r.get("wrongs", "")
            f.write(f'"{r["clean"]}","{r["corrupted"]}",{a},{w},{aa},{ww},ignored\n')
    ctx = BuildContext(spec_dir=str(tmp_path))
    a = build_task("custom", tok, {"path": "d.jsonl"}, ctx)
    b = build_task("custom", tok, {"path": "d.csv"}, ctx)
    check_invariants(tok, a)
    assert torch.equal(a.clean, b.clean) and torch.equal(a.targets, b.targets) and a.default_metric == "logit_diff"
    assert [dec(tok, [t]).strip() for t in a.targets[0]] == ["Mary", "John"]
    (j,) = diff_positions(a, 0)
    assert dec(tok, [a.clean[0, j]]).strip() == "John" and dec(tok, [a.corrupted[0, j]]).strip() == "Mary"


def test_custom_groups_metric_and_size(word_tok, tmp_path):
    rows = [{"clean": "The author near the guards", "corrupted": "The authors near the guards",
             "answers": "is|laughs|smiles", "wrongs": ["are", "laugh"]}] * 5
    write_jsonl(tmp_path / "s.jsonl", rows)
    data = build_task("custom", word_tok, {"path": str(tmp_path / "s.jsonl"), "metric": "prob_diff", "size": 3})
    assert len(data) == 3 and data.default_metric == "prob_diff"
    assert data.signs[0].tolist() == [1, 1, 1, -1, -1]
    with pytest.raises(TaskError, match="fewer than min_size 10"):
        build_task("custom", word_tok, {"path": str(tmp_path / "s.jsonl"), "size": 10})


def test_custom_join_for_digit_continuations(word_tok, bpe_tok, tmp_path):
    write_jsonl(tmp_path / "g.jsonl", [{"clean": "The war lasted from the year 1750 to the year 17",
                                        "corrupted": "The war lasted from the year 1701 to the year 17",
                                        "answers": ["51", "99"], "wrongs": ["49", "10"]}])
    for tk in (word_tok, bpe_tok):
        d = build_task("custom", tk, {"path": str(tmp_path / "g.jsonl"), "join": ""})
        assert [dec(tk, [t]) for t in d.targets[0]] == ["51", "99", "49", "10"]


BAD_ROWS = {
    "missing 'wrong'": {"clean": "Then, Mary went to", "corrupted": "Then, John went to", "answer": "Mary"},
    "both 'answer' and 'answers'": {**IOI_ROWS[0], "answers": ["Mary"]},
    "different token lengths": {**IOI_ROWS[0], "corrupted": "Then, Mary and John went to the store. John gave to"},
    "not a single token": {**IOI_ROWS[0], "answer": "Mary Mary"},
    "vocabulary": {**IOI_ROWS[0], "clean": "Then, Mary and Zorblax went to the store. John gave a ring to"},
    "both an answer and a wrong": {**IOI_ROWS[0], "wrong": "Mary"},
    "missing or empty 'clean'": {**IOI_ROWS[0], "clean": ""},
    "not an object": ["a", "b"],
    "list of strings": {**IOI_ROWS[0], "answer": None, "answers": [1, 2]},
}


@pytest.mark.parametrize("what", list(BAD_ROWS))
def test_custom_bad_row_names_file_and_line(word_tok, tmp_path, what):
    write_jsonl(tmp_path / "bad.jsonl", [IOI_ROWS[1], IOI_ROWS[0], BAD_ROWS[what]])
    with pytest.raises(TaskError, match=rf"(?s)1 of 3 rows.*bad\.jsonl:3: .*{re.escape(what)}"):
        build_task("custom", word_tok, {"path": str(tmp_path / "bad.jsonl")})


def test_custom_file_errors(word_tok, tmp_path):
    ctx = BuildContext(spec_dir=str(tmp_path))
    with pytest.raises(TaskError, match="not found"):
        build_task("custom", word_tok, {"path": "nope.jsonl"}, ctx)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(TaskError, match="empty"):
        build_task("custom", word_tok, {"path": "empty.jsonl"}, ctx)
    (tmp_path / "broken.jsonl").write_text(json.dumps(IOI_ROWS[0]) + "\n{not json\n")
    with pytest.raises(TaskError, match=r"broken\.jsonl:2: invalid JSON"):
        build_task("custom", word_tok, {"path": "broken.jsonl"}, ctx)
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(TaskError, match="unknown file type"):
        build_task("custom", word_tok, {"path": "d.txt"}, ctx)
    (tmp_path / "bin.csv").write_bytes(b"clean,corrupted\n\xff\xfe\n")
    with pytest.raises(TaskError, match="UTF-8"):
        build_task("custom", word_tok, {"path": "bin.csv"}, ctx)
    (tmp_path / "wide.csv").write_text("clean,corrupted,answer,wrong\na,b,c,d,e\n")
    with pytest.raises(TaskError, match=r"wide\.csv:2: 5 fields"):
        build_task("custom", word_tok, {"path": "wide.csv"}, ctx)
    (tmp_path / "arr.json").write_text(json.dumps(IOI_ROWS))
    assert len(build_task("custom", word_tok, {"path": "arr.json"}, ctx)) == 2
    with pytest.raises(TaskError, match="metric"):
        validate_params("custom", {"path": "arr.json", "metric": "bogus"})
    with pytest.raises(TaskError, match="path"):
        validate_params("custom", {})


def test_custom_rebuilds_when_the_file_changes(word_tok, tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", IOI_ROWS[:1])
    assert len(build_task("custom", word_tok, {"path": str(p)})) == 1
    write_jsonl(p, IOI_ROWS + IOI_ROWS)
    assert len(build_task("custom", word_tok, {"path": str(p)})) == 4


_text = st.text(alphabet=string.ascii_letters + " ,.|'\"\n\t{}[]:0123456789é", max_size=30)
_value = st.one_of(st.none(), st.integers(), _text, st.lists(_text, max_size=3), st.booleans())
_row = st.one_of(
    st.dictionaries(st.sampled_from(["clean", "corrupted", "answer", "wrong", "answers", "wrongs", "x"]), _value),
    _value,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(_row, max_size=5), fmt=st.sampled_from(["jsonl", "csv", "raw"]), raw=st.binary(max_size=60))
def test_custom_fuzz_never_crashes(word_tok, bpe_tok, tmp_path_factory, rows, fmt, raw):
    d = tmp_path_factory.mktemp("fz")
    if fmt == "jsonl":
        p = write_jsonl(d / "f.jsonl", rows) if rows else (d / "f.jsonl")
        if not rows:
            p.write_text("")
    elif fmt == "csv":
        p = d / "f.csv"
        cols = ["clean", "corrupted", "answer", "wrong"]
        lines = [",".join(cols)] + [",".join(json.dumps(r.get(c) if isinstance(r, dict) else r) for c in cols) for r in rows]
        p.write_text("\n".join(lines))
    else:
        p = d / "f.jsonl"
        p.write_bytes(raw)
    for tk in (word_tok, bpe_tok):
        try:
            data = build_task("custom", tk, {"path": str(p)})
        except TaskError:
            continue
        check_invariants(tk, data)


# ----------------------------------------------------------------------------------------- params & cache
def test_validate_params_errors_keep_pydantic_loc():
    with pytest.raises(TaskError, match="unknown task 'nope'.*ioi") as ei:
        validate_params("nope", {})
    with pytest.raises(TaskError, match=r"corruption") as ei:
        validate_params("ioi", {"corruption": "xyz", "sizee": 3})
    cause = ei.value.__cause__
    assert isinstance(cause, ValidationError)
    assert {e["loc"] for e in cause.errors()} == {("corruption",), ("sizee",)}
    with pytest.raises(TaskError, match="seq_len"):
        validate_params("induction", {"seq_len": 1})
    with pytest.raises(TaskError, match="mapping"):
        validate_params("ioi", [1])
    with pytest.raises(TaskError, match="size: Input should be greater than or equal to 1"):
        validate_params("sva", {"size": 0})
    with pytest.raises(TaskError, match=r"min_size \(9\) cannot exceed size \(8\)"):
        validate_params("sva", {"size": 8, "min_size": 9})
    assert validate_params("custom", {"path": "x.csv", "min_size": 9}).size is None
    p = validate_params("ioi", None)
    assert p.size == 64 and p.corruption == "s2_io_flip" and validate_params("ioi", p) is p


def test_build_cache(word_tok):
    clear_cache()
    a = build_task("ioi", word_tok, {"size": 8})
    assert build_task("ioi", word_tok, {"size": 8, "seed": 0}) is a  # same validated params
    assert build_task("ioi", make_wordlevel(), {"size": 8}) is a  # an equal tokenizer, another object
    assert build_task("ioi", word_tok, {"size": 8}, BuildContext(prepend_bos=False)) is not a
    assert build_task("ioi", make_wordlevel(exclude=("Mary",)), {"size": 8}) is not a
    assert tokenizer_fingerprint(word_tok) != tokenizer_fingerprint(make_wordlevel(exclude=("Mary",)))


def test_min_size_smaller_than_size_returns_what_survived():
    tk = make_wordlevel(exclude=tuple(W.GENDER_MALE_NAMES[1:]))  # one male name left: 10*5*1*2 = 100 triples
    with pytest.raises(TaskError, match=r"only 100 of the 150 requested.*min_size 150"):
        build_task("gendered_pronoun", tk, {"size": 150})
    data = build_task("gendered_pronoun", tk, {"size": 150, "min_size": 90})
    assert len(data) == data.info["n_kept"] == 100 and data.info["pools"]["male names"]["kept"] == 1


# ---------------------------------------------------------------------------------------- metrics on tasks
def test_metrics_on_hand_made_logits(word_tok):
    V = len(word_tok)
    ioi = build_task("ioi", word_tok, {"size": 8})
    logits = torch.zeros(len(ioi), V)
    logits.scatter_(1, ioi.targets[:, :1], 3.0)  # IO gets +3
    logits.scatter_(1, ioi.targets[:, 1:2], 1.0)  # S gets +1
    assert torch.allclose(metric_values("logit_diff", logits, ioi.targets, ioi.signs), torch.full((8,), 2.0, dtype=torch.float64))
    assert (metric_values("accuracy", logits, ioi.targets, ioi.signs) == 1).all()

    gt = build_task("greater_than", word_tok, {"size": 8})
    uniform = torch.zeros(len(gt), V)
    yy = torch.tensor([gt_yy(t) for t in gt.clean_text])
    want = ((99 - yy) - (yy + 1)).double() / V  # #(y > YY) - #(y <= YY), each with prob 1/V
    assert torch.allclose(metric_values("prob_diff", uniform, gt.targets, gt.signs), want)
    peaked = torch.full((len(gt), V), -1e9)
    peaked.scatter_(1, gt.targets[:, 99:100], 0.0)  # all mass on "99" > YY
    assert torch.allclose(metric_values("prob_diff", peaked, gt.targets, gt.signs), torch.ones(len(gt), dtype=torch.float64))

    sva = build_task("sva", word_tok, {"size": 4})
    k = sva.targets.shape[1] // 2
    logits = torch.full((4, V), -1e9)
    logits.scatter_(1, sva.targets[:, :k], 0.0)  # uniform over the agreeing forms
    assert torch.allclose(metric_values("prob_diff", logits, sva.targets, sva.signs), torch.ones(4, dtype=torch.float64))


# ------------------------------------------------------------------------ fuzz: vocabularies with holes
_ALL_WORDS = sorted({w for t in _wordlist_texts() for w, _ in _word_pretok().pre_tokenize_str(t)})


@settings(max_examples=25, deadline=None)
@given(holes=st.lists(st.sampled_from(_ALL_WORDS), max_size=40, unique=True), seed=st.integers(0, 2**31),
       name=st.sampled_from(GENERATED), bos=st.booleans())
def test_fuzz_vocabulary_holes_give_valid_data_or_task_error(holes, seed, name, bos):
    """Whatever words the vocabulary lacks, a generator returns valid data without <unk>, or a TaskError."""
    tk = make_wordlevel(exclude=tuple(holes))
    try:
        data = build_task(name, tk, {"size": 8, "seed": seed, "min_size": 4}, BuildContext(prepend_bos=bos))
    except TaskError as e:
        assert str(e).startswith(name)
        return
    check_invariants(tk, data, prepend_bos=bos)
    assert 4 <= len(data) <= 8


# --------------------------------------------------------------------------- the zoo's own tokenizers
@pytest.mark.parametrize("task, vocab", [("ioi", "ioi_vocab"), ("greater_than", "greater_than_vocab"),
                                         ("induction", "induction_vocab")])
def test_zoo_word_tokenizers_support_their_task(task, vocab):
    """Each zoo model's tokenizer (its own small vocabulary) supports its task at full size, dropping nothing."""
    zoo_tok = pytest.importorskip("circuit_tests.zoo.tokenizer")
    zoo_data = pytest.importorskip("circuit_tests.zoo.data")
    words = getattr(zoo_data, vocab)(200) if vocab == "induction_vocab" else getattr(zoo_data, vocab)()
    tk = zoo_tok.build_word_tokenizer(words)
    data = build_task(task, tk, {})
    check_invariants(tk, data)
    assert len(data) == 64 and data.info["dropped"] == {}
    assert all(p["kept"] == p["total"] for p in data.info["pools"].values())
