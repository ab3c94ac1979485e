"""Role scores recover heads of models with a known behaviour.

- Attention scores: heads whose attention pattern is set by a hook on ``hook_pattern`` (the hook runs before
  ``pattern @ v``, so the model really computes with that pattern): a previous-token, a duplicate-token, an
  induction and a name-mover-like head; each score must single out exactly its head.
- Copy / negative copy: a GPT-2 whose names have orthogonal embeddings and one head with ``W_V W_O = +c I``
  (copier) and one with ``-c I`` (suppressor) on the names' subspace.
- Successor: a word-level tokenizer with number words and weekdays, and one head whose OV circuit through
  MLP0 is solved to map each word to the unembedding of its successor.
- S-inhibition: the numbers equal a literal two-pass computation (candidate's END output from the swapped
  prompt into the name movers' queries).
"""

from __future__ import annotations

import math

import pytest
import torch

from circuit_tests.errors import GraphError
from circuit_tests.metrics import metric_values
from circuit_tests.models import bridge_from_hf
from circuit_tests.path_patching import split_qkv_inputs
from circuit_tests.scores import (
    HeadScores,
    copy_suppression,
    duplicate_token,
    induction,
    name_mover,
    previous_token,
    repeated_sequence_scores,
    s_inhibition,
    scores_table,
    successor,
    swap_io_s1,
)
from circuit_tests.tasks.base import TaskData


def toy_ioi(n: int = 8, seed: int = 0, names: tuple[int, int] = (10, 30), V: int = 64) -> TaskData:
    """IOI-shaped random prompts: IO/S1 at positions 1/3 (order random), S2 three before END; S2 := IO corrupted."""
    g = torch.Generator().manual_seed(seed)
    T_max = 13
    clean = torch.full((n, T_max), 1, dtype=torch.long)
    corr = clean.clone()
    end, targets = torch.zeros(n, dtype=torch.long), torch.zeros(n, 2, dtype=torch.long)
    pos = {k: torch.zeros(n, dtype=torch.long) for k in ("IO", "S1", "S2", "END")}
    for i in range(n):
        T = int(torch.randint(9, T_max + 1, (1,), generator=g))
        toks = torch.randint(names[1], V, (T,), generator=g)
        a, b = (torch.randperm(names[1] - names[0], generator=g)[:2] + names[0]).tolist()
        io_p, s1_p = (1, 3) if torch.rand(1, generator=g) < 0.5 else (3, 1)
        toks[io_p], toks[s1_p], toks[T - 3] = a, b, b
        c2 = toks.clone()
        c2[T - 3] = a
        clean[i, :T], corr[i, :T] = toks, c2
        end[i], targets[i] = T - 1, torch.tensor([a, b])
        pos["IO"][i], pos["S1"][i], pos["S2"][i], pos["END"][i] = io_p, s1_p, T - 3, T - 1
    return TaskData(name="toy_ioi", clean=clean, corrupted=corr, end=end, targets=targets,
                    signs=torch.tensor([[1.0, -1.0]]).repeat(n, 1), default_metric="logit_diff", positions=pos)


def gpt2(L=3, H=4, d=32, V=64, std=0.2, dtype=torch.float32, tokenizer=None, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_layer=L, n_head=H, n_embd=d, vocab_size=V, n_positions=64,
                                   initializer_range=std, **kw)).to(dtype)
    return m, bridge_from_hf(m, tokenizer)


# ------------------------------------------------------------------------------- attention-pattern heads

PREV, DUP, IND, NMH = (1, 2), (0, 3), (2, 1), (2, 3)


@pytest.fixture(scope="module")
def patterned():
    """A random GPT-2 plus hooks that give four heads a known attention pattern (built from the tokens)."""
    _, bridge = gpt2()
    state: dict = {}

    def grab_tokens(t, hook):
        state["toks"] = t

    def earlier_same(toks):  # [b, q, k]: k < q and tok[k] == tok[q]
        same = toks[:, :, None] == toks[:, None, :]
        return same & torch.ones(toks.shape[1], toks.shape[1], dtype=torch.bool).tril(-1)

    def rows_or_self(mask):
        mask = mask.float()
        none = mask.sum(-1, keepdim=True) == 0
        eye = torch.eye(mask.shape[-1]).expand_as(mask)
        mask = torch.where(none, eye, mask)
        return mask / mask.sum(-1, keepdim=True)

    def set_head(l, h, make):
        def hook(p, hook):
            p = p.clone()
            p[:, h] = make(state["toks"], p.shape[-1]).to(p.dtype)
            return p
        return (f"blocks.{l}.attn.hook_pattern", hook)

    def prev(toks, T):
        m = torch.zeros(toks.shape[0], T, T, dtype=torch.bool)
        m[:, torch.arange(1, T), torch.arange(T - 1)] = True
        return rows_or_self(m)

    def dup(toks, T):
        return rows_or_self(earlier_same(toks))

    def ind(toks, T):
        shifted = torch.zeros_like(earlier_same(toks))
        shifted[:, :, 1:] = earlier_same(toks)[:, :, :-1]
        shifted &= torch.ones(T, T, dtype=torch.bool).tril(-1)
        return rows_or_self(shifted)

    def to_io(toks, T):  # every query attends to the IO position (given by the test), else position 1
        io = state.get("task_io")
        if io is None or len(io) != toks.shape[0]:
            io = torch.ones(toks.shape[0], dtype=torch.long)
        m = torch.zeros(toks.shape[0], T, T, dtype=torch.bool)
        m[torch.arange(toks.shape[0]), :, io] = True
        m &= torch.ones(T, T, dtype=torch.bool).tril()
        return rows_or_self(m)

    hooks = [("embed.hook_in", grab_tokens), set_head(*PREV, prev), set_head(*DUP, dup), set_head(*IND, ind),
             set_head(*NMH, to_io)]
    return bridge, hooks, state


def only_top(scores: HeadScores, head, margin: float = 0.3):
    top = scores.top(2)
    assert top[0][0] == f"a{head[0]}.h{head[1]}", top
    assert top[0][1] - top[1][1] > margin, top


@pytest.mark.parametrize("bos", [False, True])
def test_attention_scores_find_the_patterned_heads(patterned, bos):
    bridge, hooks, _ = patterned
    with bridge.hooks(fwd_hooks=hooks):
        rep = repeated_sequence_scores(bridge, n_seq=4, seq_len=20, bos=bos, bos_id=0)
    for name, head in (("previous_token", PREV), ("duplicate_token", DUP), ("induction", IND)):
        sc = rep[name]
        assert sc.not_evaluated is None and sc.values.dtype == torch.float64 and sc.values.shape == (3, 4)
        only_top(sc, head)
        assert sc[head] == pytest.approx(1.0, abs=1e-6)
    # each head is high on its own diagonal only
    assert rep["previous_token"][IND] < 0.2 and rep["induction"][PREV] < 0.2 and rep["induction"][DUP] < 0.2
    assert rep["previous_token"].details["bos"] is bos and rep["previous_token"].details["seq_len"] == 20
    assert not rep["previous_token"].details["sampled_with_replacement"]


def test_single_score_functions_agree_with_the_shared_run(patterned):
    bridge, hooks, _ = patterned
    with bridge.hooks(fwd_hooks=hooks):
        rep = repeated_sequence_scores(bridge, n_seq=2, seq_len=10, seed=3)
        for fn, name in ((previous_token, "previous_token"), (duplicate_token, "duplicate_token"),
                         (induction, "induction")):
            assert torch.equal(fn(bridge, n_seq=2, seq_len=10, seed=3).values, rep[name].values)
    # seeded: same numbers again; another seed, other sequences
    assert torch.equal(repeated_sequence_scores(bridge, n_seq=2, seq_len=10, seed=3)["induction"].values,
                       repeated_sequence_scores(bridge, n_seq=2, seq_len=10, seed=3)["induction"].values)


def test_seq_len_is_fitted_to_the_context():
    _, bridge = gpt2(L=1, H=2, d=16)
    sc = previous_token(bridge, n_seq=2, seq_len=1000, bos=True, bos_id=0)
    assert sc.details["seq_len"] == (64 - 1) // 2 and sc.not_evaluated is None and sc.details["bos"]
    assert "note" in previous_token(bridge, n_seq=1, seq_len=4, bos=True).details  # no tokenizer: no BOS


def test_name_mover_attention_criterion(patterned):
    bridge, hooks, state = patterned
    task = toy_ioi()
    state["task_io"] = task.positions["IO"]
    try:
        with bridge.hooks(fwd_hooks=hooks):
            nm = name_mover(bridge, task, batch_size=len(task))
    finally:
        state["task_io"] = None
    crit = nm.details["attention_criterion"]
    assert bool(crit[NMH]) and nm.details["attn_end_to_io"][NMH] == pytest.approx(1.0)
    assert nm.details["attn_end_to_s1"][NMH] == 0 and nm.details["attn_end_to_s2"][NMH] == 0
    assert nm.unit == "% top-5" and ((nm.values >= 0) & (nm.values <= 100)).all()


# ------------------------------------------------------------------------------------- copy heads

COPY, SUPPRESS = (1, 2), (1, 0)


@pytest.fixture(scope="module")
def copier():
    """GPT-2 (tied embeddings): 12 names with orthogonal embeddings 5·e_i; a1.h2 copies them, a1.h0 negates."""
    hf, bridge = gpt2(L=2, H=4, d=64, V=64, std=0.02)
    d_head = 16
    with torch.no_grad():
        wte = hf.transformer.wte.weight
        for i in range(12):
            wte[10 + i] = 0
            wte[10 + i, i] = 5.0
        attn = hf.transformer.h[1].attn
        for (l, h), sign in ((COPY, 1.0), (SUPPRESS, -1.0)):
            cols = slice(128 + h * d_head, 128 + (h + 1) * d_head)
            attn.c_attn.weight[:, cols] = 0
            attn.c_attn.bias[cols] = 0
            attn.c_attn.weight[torch.arange(d_head), 128 + h * d_head + torch.arange(d_head)] = 1.0
            attn.c_proj.weight[h * d_head:(h + 1) * d_head] = 0
            attn.c_proj.weight[h * d_head + torch.arange(d_head), torch.arange(d_head)] = 3.0 * sign
    return bridge, toy_ioi(n=10, names=(10, 22))


def test_copy_score_finds_the_copier_and_the_suppressor(copier):
    bridge, task = copier
    nm, cs = name_mover(bridge, task, batch_size=4), copy_suppression(bridge, task)
    assert nm.not_evaluated is None and cs.not_evaluated is None
    assert nm[COPY] == 100.0 and cs[SUPPRESS] == 100.0
    assert nm[SUPPRESS] == 0.0 and cs[COPY] == 0.0
    only_top(nm, COPY, margin=20)
    only_top(cs, SUPPRESS, margin=20)
    assert nm.details["sign"] == 1.0 and cs.details["sign"] == -1.0
    # Tigges' un-normalised variant finds the same heads here
    assert name_mover(bridge, task, apply_ln=False).top(1)[0][0] == "a1.h2"


def test_copy_scores_of_chosen_heads_equal_the_all_head_scores(copier):
    """Scoring only a claim's heads (the real-model fast path) gives those heads' all-head values; the rest are NaN."""
    from circuit_tests.names import parse_head

    bridge, task = copier
    chosen = ["a1.h2", "a0.h3", "a1.h0"]
    for fn in (name_mover, copy_suppression):
        every, some = fn(bridge, task), fn(bridge, task, heads=chosen)
        picked = torch.zeros_like(every.values, dtype=torch.bool)
        for hd in chosen:
            picked[parse_head(hd)] = True
        assert torch.equal(some.values[picked], every.values[picked])
        assert torch.isnan(some.values[~picked]).all()
        for p in ("attn_end_to_io", "attn_end_to_s1", "attn_end_to_s2"):
            assert torch.equal(some.details[p], every.details[p])


def test_scores_need_ioi_positions(copier):
    bridge, task = copier
    from dataclasses import replace

    bare = replace(task, positions={})
    for fn in (name_mover, copy_suppression):
        sc = fn(bridge, bare)
        assert sc.not_evaluated and "IO" in sc.not_evaluated and torch.isnan(sc.values).all()
    sc = s_inhibition(bridge, bare, ["a1.h0"])
    assert sc.not_evaluated and torch.isnan(sc.values).all()


# ---------------------------------------------------------------------------------------- successor

NUM = "one two three four five six seven eight nine ten".split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
SUCC = (1, 3)


def word_tokenizer(tmp_path, words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>"] + words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(str(tmp_path))
    return AutoTokenizer.from_pretrained(str(tmp_path)), vocab


@pytest.fixture(scope="module")
def succ_model(tmp_path_factory):
    tok, vocab = word_tokenizer(tmp_path_factory.mktemp("wordtok"), NUM + DAYS + [f"w{i}" for i in range(30)])
    hf, bridge = gpt2(L=2, H=4, d=64, V=len(vocab), std=0.1, tokenizer=tok, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, dtype=torch.float64)
    pairs = [(NUM[i], NUM[i + 1]) for i in range(len(NUM) - 1)] + [(DAYS[i], DAYS[(i + 1) % 7]) for i in range(7)]
    ordinal = NUM + DAYS
    with torch.no_grad():
        # unembedding rows of the ordinal words: orthonormal and zero-mean (so ln_final keeps them)
        g = torch.Generator().manual_seed(0)
        A = torch.randn(64, len(ordinal), generator=g, dtype=torch.float64)
        A -= A.mean(0, keepdim=True)
        U = torch.linalg.qr(A).Q  # [64, n] orthonormal columns, each zero-mean
        for j, w in enumerate(ordinal):
            hf.lm_head.weight[vocab[w]] = 8.0 * U[:, j]
        # solve the head's OV: ln1_1(MLP0(ln2_0(W_E[w_i]))) W_V W_O = unembedding row of w_{i+1}
        src = torch.tensor([vocab[a] for a, _ in pairs])
        blk0, blk1 = bridge.blocks[0], bridge.blocks[1]
        X = blk1.ln1(blk0.mlp(blk0.ln2(bridge.W_E[src][:, None])))[:, 0]
        Y = torch.stack([hf.lm_head.weight[vocab[b]] for _, b in pairs])
        M = torch.linalg.pinv(X) @ Y
        u, s, vt = torch.linalg.svd(M)
        d_head = 16
        h = SUCC[1]
        attn = hf.transformer.h[1].attn
        cols = slice(128 + h * d_head, 128 + (h + 1) * d_head)
        attn.c_attn.weight[:, cols] = u[:, :d_head] * s[:d_head]
        attn.c_attn.bias[cols] = 0
        attn.c_proj.weight[h * d_head:(h + 1) * d_head] = vt[:d_head]
    return bridge


def test_successor_finds_the_solved_head(succ_model):
    sc = successor(succ_model)
    assert sc.not_evaluated is None
    assert sc.details["n_pairs"] == 16 and sc.details["pairs_per_task"] == {"number_words": 9, "days": 7}
    assert sc[SUCC] == 1.0
    only_top(sc, SUCC, margin=0.4)
    assert ((sc.values >= 0) & (sc.values <= 1)).all()


def test_successor_not_evaluated_without_ordinal_tokens(tmp_path):
    tok, vocab = word_tokenizer(tmp_path, ["one", "two"] + [f"w{i}" for i in range(20)])
    _, bridge = gpt2(L=1, H=2, d=16, V=len(vocab), tokenizer=tok, bos_token_id=1, eos_token_id=2)
    sc = successor(bridge)
    assert sc.not_evaluated and "only 1 ordinal pairs" in sc.not_evaluated and torch.isnan(sc.values).all()
    _, bare = gpt2(L=1, H=2, d=16)
    assert "no tokenizer" in successor(bare).not_evaluated


# ------------------------------------------------------------------------------------- S-inhibition


def literal_s2i(bridge, task, cand, nmh):
    """Candidate's END output from the IO/S1-swapped prompt into the name movers' queries, two hooked passes."""
    sw = swap_io_s1(task)
    L = bridge.cfg.n_layers
    rows = torch.arange(len(task))
    with torch.no_grad():
        _, cc = bridge.run_with_cache(task.clean, names_filter=lambda n: n.endswith("attn.hook_z"))
        _, kc = bridge.run_with_cache(sw.corrupted, names_filter=lambda n: n.endswith("attn.hook_z"))

        def freeze(z, hook, l):
            z = cc[f"blocks.{l}.attn.hook_z"].clone()
            if l == cand[0]:
                z[rows, task.end, cand[1]] = kc[f"blocks.{l}.attn.hook_z"][rows, task.end, cand[1]]
            return z

        names = sorted({f"blocks.{l}.hook_q_input" for l, _ in nmh})
        rec, pats = {}, {}
        with split_qkv_inputs(bridge):
            fwd = [(f"blocks.{l}.attn.hook_z", lambda z, hook, l=l: freeze(z, hook, l)) for l in range(L)]
            fwd += [(n, lambda x, hook, n=n: rec.__setitem__(n, x.clone())) for n in names]
            bridge.run_with_hooks(task.clean, fwd_hooks=fwd)

            def patch(x, hook, n):
                x = x.clone()
                for l, h in nmh:
                    if n == f"blocks.{l}.hook_q_input":
                        x[:, :, h] = rec[n][:, :, h]
                return x

            fwd = [(n, lambda x, hook, n=n: patch(x, hook, n)) for n in names]
            fwd += [(f"blocks.{l}.attn.hook_pattern", lambda p, hook, l=l: pats.__setitem__(l, p.clone()))
                    for l, _ in nmh]
            lg = bridge.run_with_hooks(task.clean, fwd_hooks=fwd)
        lg0, c0 = bridge.run_with_cache(task.clean, names_filter=lambda n: n.endswith("hook_pattern"))
    ld = lambda g: float(metric_values("logit_diff", g[rows, task.end], task.targets, task.signs).mean())
    att = lambda p, l, h, k: float(p[rows, h, task.end, task.positions[k]].mean())
    io = sum(att(pats[l], l, h, "IO") for l, h in nmh) / len(nmh)
    s1 = sum(att(pats[l], l, h, "S1") for l, h in nmh) / len(nmh)
    io0 = sum(att(c0[f"blocks.{l}.attn.hook_pattern"], l, h, "IO") for l, h in nmh) / len(nmh)
    s10 = sum(att(c0[f"blocks.{l}.attn.hook_pattern"], l, h, "S1") for l, h in nmh) / len(nmh)
    return (ld(lg) - ld(lg0)) / ld(lg0), (io - io0) / io0, (s1 - s10) / s10


def test_s_inhibition_matches_the_literal_computation():
    _, bridge = gpt2(dtype=torch.float64)
    task = toy_ioi(n=6)
    nmh = [(2, 1), (2, 3)]
    cand = [(0, 3), (1, 0), (1, 2)]
    sc = s_inhibition(bridge, task, ["a2.h1", "a2.h3"], candidates=cand, batch_size=4)
    assert sc.not_evaluated is None
    for c in cand:
        d_ld, d_io, d_s1 = literal_s2i(bridge, task, c, nmh)
        assert float(sc.details["dLD"][c]) == pytest.approx(d_ld, rel=1e-8, abs=1e-12)
        assert float(sc.details["dIO"][c]) == pytest.approx(d_io, rel=1e-8, abs=1e-12)
        assert float(sc.details["dS1"][c]) == pytest.approx(d_s1, rel=1e-8, abs=1e-12)
        assert sc[c] == (1.0 if (d_ld < 0 and d_io < 0 and d_s1 > 0) else 0.0)
    off = torch.ones(3, 4, dtype=torch.bool)
    for c in cand:
        off[c] = False
    assert torch.isnan(sc.values[off]).all() and torch.isnan(sc.details["dLD"][off]).all()
    # default candidates: every head below the last name mover; none at or above it
    full = s_inhibition(bridge, task, nmh)
    assert torch.isnan(full.values[2]).all() and not torch.isnan(full.values[:2]).any()
    assert set(full.values[:2].unique().tolist()) <= {0.0, 1.0}
    # scoring only some candidates (what a role_score claim does) gives those heads the same values
    for c in cand:
        assert full.values[c] == sc.values[c]
        assert float(full.details["dLD"][c]) == pytest.approx(float(sc.details["dLD"][c]), rel=1e-9, abs=1e-12)


def test_swap_io_s1():
    task = toy_ioi(n=3)
    sw = swap_io_s1(task)
    r = torch.arange(3)
    io, s1 = task.positions["IO"], task.positions["S1"]
    assert torch.equal(sw.corrupted[r, io], task.clean[r, s1]) and torch.equal(sw.corrupted[r, s1], task.clean[r, io])
    assert torch.equal(sw.clean, task.clean) and (sw.corrupted != task.clean).sum() == 6


# -------------------------------------------------------------------------------------------- table


def test_scores_table_lists_every_head(copier):
    bridge, task = copier
    text = scores_table(bridge, task, roles={"name_mover": ["a1.h2"], "s_inhibition": ["a0.h1"]}, n_seq=2, seq_len=8)
    lines = text.splitlines()
    for l in range(2):
        for h in range(4):
            assert any(line.startswith(f"a{l}.h{h} ") for line in lines)
    assert "succ: not evaluated" in text and "direct effect on logits" in text
    assert any(line.startswith("a1.h2 ") and line.rstrip().endswith("name_mover") for line in lines)
    assert "PP->NMq" in text and "S2I" in text


def test_head_scores_helpers():
    v = torch.tensor([[0.1, 0.9], [math.nan, 0.5]], dtype=torch.float64)
    sc = HeadScores(v, "x", "u")
    assert sc.top(2) == [("a0.h1", 0.9), ("a1.h1", 0.5)]
    assert sc.heads_above(0.3) == [(0, 1), (1, 1)]
    assert sc["a1.h1"] == 0.5 and sc[(0, 0)] == 0.1
    with pytest.raises(GraphError):
        sc["m1"]
