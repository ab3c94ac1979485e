"""Per-head component-function ("role") scores, as defined in the papers' code (reference/metrics.md §5).

Every function returns a ``HeadScores``: ``values [n_layers, n_heads]`` (float64), the score's name and
unit, ``not_evaluated`` (why the score cannot be computed on this model / tokenizer / task, else None) and
``details`` (the raw numbers behind the values).

- ``previous_token`` / ``duplicate_token`` / ``induction`` (Tigges et al.; Olsson et al.'s prefix matching):
  mean attention on one diagonal of the pattern of repeated random token sequences (§5.1).
- ``name_mover``: Wang et al.'s copy score (top-5 hit rate of the head's OV output for the name at the IO,
  S1 and S2 positions, in %), with Tigges' attention criterion attn(END→IO) > attn(END→S1), attn(END→S2)
  reported alongside (§5.4). ``copy_suppression``: the negative copy score (sign -1), not CSPA.
- ``successor``: Gould et al.'s succession score through MLP0 on ordinal sequences (§5.2).
- ``s_inhibition``: Tigges' three-condition test with IO/S1-swapped prompts (§5.5).
- ``scores_table``: all of the above plus the direct-effect path-patching matrix, as text.

LayerNorm: scores that read weights (copy, successor) apply the model's own LayerNorms, as Wang et al. do
(``ln1`` of the head's layer before ``W_V``, ``ln_final`` before the unembedding); ``apply_ln=False`` gives
Tigges' un-normalised variant (the bridge is not LN-folded, so without the LNs the residual stream's scale
and the LN weights would be ignored). The modules are the model's own, so RMSNorm models (LLaMA family) get
RMSNorm with its gain — nothing is folded or centred.

Model families: OV scores read per-query-head weights (``gqa.head_weights``): under grouped-query attention
head ``h`` uses key/value head ``h // (n_heads // n_kv_heads)``; missing biases are zeros. Attention-pattern
scores read ``hook_pattern``, which is per query head in every family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from .gqa import HeadWeights, head_weights
from .path_patching import Receivers, _Batch, _device, _head, _hooks_batch, path_patch

__all__ = [
    "HeadScores",
    "repeated_sequence_scores",
    "mean_attention",
    "previous_token",
    "duplicate_token",
    "induction",
    "name_mover",
    "copy_suppression",
    "successor",
    "s_inhibition",
    "swap_io_s1",
    "scores_table",
    "ORDINAL_SEQUENCES",
]

Head = tuple[int, int]


@dataclass
class HeadScores:
    """One role score for every head. ``values[l, h]`` is head ``a{l}.h{h}``; ``nan`` = not scored."""

    values: torch.Tensor
    name: str
    unit: str
    not_evaluated: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, head: str | Head) -> float:
        l, h = _parse_head(head) if isinstance(head, str) else head
        return float(self.values[l, h])

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` highest-scoring heads as ``("a{l}.h{h}", value)`` (nan last)."""
        flat = self.values.flatten().nan_to_num(nan=-math.inf)
        idx = flat.argsort(descending=True, stable=True)[:k]
        H = self.values.shape[1]
        return [(f"a{int(i) // H}.h{int(i) % H}", float(self.values.flatten()[i])) for i in idx]

    def heads_above(self, threshold: float) -> list[Head]:
        """Heads whose value is strictly above ``threshold``."""
        return [(int(l), int(h)) for l, h in (self.values > threshold).nonzero().tolist()]


def _parse_head(name: str) -> Head:
    return _head(name)


def _shape(bridge: Any) -> tuple[int, int]:
    return int(bridge.cfg.n_layers), int(bridge.cfg.n_heads)


def _nan_scores(bridge: Any, name: str, unit: str, reason: str, **details: Any) -> HeadScores:
    L, H = _shape(bridge)
    return HeadScores(torch.full((L, H), math.nan, dtype=torch.float64), name, unit, reason, dict(details))


# ------------------------------------------------------------------------------- repeated random tokens


def _plain_vocab(bridge: Any) -> torch.Tensor:
    """Token ids that are not special tokens (and exist in the tokenizer, when there is one)."""
    V = int(bridge.cfg.d_vocab)
    tok = getattr(bridge, "tokenizer", None)
    keep = torch.ones(V, dtype=torch.bool)
    if tok is not None:
        for i in getattr(tok, "all_special_ids", []) or []:
            if 0 <= int(i) < V:
                keep[int(i)] = False
        n = len(tok) if hasattr(tok, "__len__") else V
        keep[n:] = False
    return keep.nonzero()[:, 0]


def mean_attention(pattern: torch.Tensor, q: torch.Tensor, k: torch.Tensor, *, rows: torch.Tensor | None = None,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """Every head's mean attention from query positions ``q`` to key positions ``k`` -> ``[n_heads]`` (float64).

    The one reduction behind all attention-pattern role scores (here and in the zoo analysis).
    ``pattern``: ``hook_pattern`` ``[batch, head, query, key]``. Without ``rows``, ``(q, k)`` are position
    pairs shared by every row (a diagonal such as ``k = q - 1``): mean over rows and pairs, or the
    ``weight [batch, pairs]``-weighted mean (e.g. 0 at padding). With ``rows``, one pair per row
    (``q[i], k[i]`` of row ``rows[i]``, e.g. END -> IO): mean over rows.
    """
    if rows is not None:
        return pattern[rows, :, q, k].double().mean(0)
    a = pattern[:, :, q, k].double()  # [batch, head, pairs]
    if weight is None:
        return a.mean((0, 2))
    w = weight.to(a.device).double()[:, None]
    return (a * w).sum((0, 2)) / w.sum()


def repeated_sequence_scores(bridge: Any, *, n_seq: int = 8, seq_len: int = 50, seed: int = 0,
                             bos: bool = False, bos_id: int | None = None) -> dict[str, HeadScores]:
    """Previous-token, duplicate-token and induction scores from one run on repeated random sequences.

    Each sequence is ``T = seq_len`` token ids drawn (seeded ``torch.Generator``) from the non-special
    vocabulary — without replacement when the vocabulary allows, so that every token of a half occurs
    once — repeated once (``[BOS] t t``). With ``A`` a head's pattern ``[query, key]`` and ``o`` the offset
    of the first token (1 with BOS), the scores are means over sequences and over the diagonal:

    - previous token: ``A[q, q-1]`` for every query ``q`` in ``o+1 .. o+2T-1``;
    - duplicate token: ``A[q, q-T]`` for ``q`` in the second half;
    - induction: ``A[q, q-T+1]`` for ``q`` in the second half (the token after the earlier occurrence).
      Tigges' code also counts one element outside the second half (``q = T-1 -> k = 0``); we do not.

    ``seq_len`` is reduced to fit the model's context (``details["seq_len"]`` says what was used).
    ``bos_id`` (default: the tokenizer's BOS, else EOS) is the token prepended when ``bos``.
    """
    L, H = _shape(bridge)
    o = 1 if bos else 0
    n_ctx = int(getattr(bridge.cfg, "n_ctx", 2 * seq_len + o) or (2 * seq_len + o))
    T = min(seq_len, (n_ctx - o) // 2)
    vocab = _plain_vocab(bridge)
    if bos and bos_id is not None:
        vocab = vocab[vocab != int(bos_id)]
    names = ("previous_token", "duplicate_token", "induction")
    if T < 2 or len(vocab) < 2:
        reason = f"cannot build repeated sequences (seq_len {T}, {len(vocab)} plain tokens)"
        return {n: _nan_scores(bridge, n, "attention fraction", reason) for n in names}
    g = torch.Generator().manual_seed(seed)
    if len(vocab) >= T:
        rows = [vocab[torch.randperm(len(vocab), generator=g)[:T]] for _ in range(n_seq)]
        replacement = False
    else:
        rows = [vocab[torch.randint(0, len(vocab), (T,), generator=g)] for _ in range(n_seq)]
        replacement = True
    half = torch.stack(rows)
    toks = torch.cat([half, half], 1)
    bos_note = None
    if bos:
        tok = getattr(bridge, "tokenizer", None)
        if bos_id is None and tok is not None:
            bos_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if bos_id is None:
            bos_note = "no BOS/EOS token in the tokenizer: ran without BOS"
            o = 0
        else:
            toks = torch.cat([torch.full((n_seq, 1), int(bos_id)), toks], 1)
    toks = toks.to(_device(bridge))
    q_all = torch.arange(o + 1, o + 2 * T)
    q_second = torch.arange(o + T, o + 2 * T)
    diag = {"previous_token": (q_all, q_all - 1), "duplicate_token": (q_second, q_second - T),
            "induction": (q_second, q_second - T + 1)}
    vals = {n: torch.zeros(L, H, dtype=torch.float64) for n in names}
    with torch.no_grad():
        _, cache = bridge.run_with_cache(toks, names_filter=lambda n: n.endswith("attn.hook_pattern"))
        for l in range(L):
            pat = cache[f"blocks.{l}.attn.hook_pattern"]  # [b, h, q, k]
            for n, (q, k) in diag.items():
                vals[n][l] = mean_attention(pat, q, k).cpu()
    details = {"n_seq": n_seq, "seq_len": T, "seed": seed, "bos": bool(o), "sampled_with_replacement": replacement,
               "vocab_size_sampled": int(len(vocab))}
    if bos_note:
        details["note"] = bos_note
    return {n: HeadScores(vals[n], n, "attention fraction", None, dict(details)) for n in names}


def previous_token(bridge: Any, *, n_seq: int = 8, seq_len: int = 50, seed: int = 0, bos: bool = False,
                   bos_id: int | None = None) -> HeadScores:
    """Mean attention to the previous token on repeated random sequences (see ``repeated_sequence_scores``)."""
    rep = repeated_sequence_scores(bridge, n_seq=n_seq, seq_len=seq_len, seed=seed, bos=bos, bos_id=bos_id)
    return rep["previous_token"]


def duplicate_token(bridge: Any, *, n_seq: int = 8, seq_len: int = 50, seed: int = 0, bos: bool = False,
                    bos_id: int | None = None) -> HeadScores:
    """Mean attention from a repeated token to its earlier occurrence (see ``repeated_sequence_scores``)."""
    rep = repeated_sequence_scores(bridge, n_seq=n_seq, seq_len=seq_len, seed=seed, bos=bos, bos_id=bos_id)
    return rep["duplicate_token"]


def induction(bridge: Any, *, n_seq: int = 8, seq_len: int = 50, seed: int = 0, bos: bool = False,
              bos_id: int | None = None) -> HeadScores:
    """Mean attention to the token after the earlier occurrence (prefix matching; ``repeated_sequence_scores``)."""
    rep = repeated_sequence_scores(bridge, n_seq=n_seq, seq_len=seq_len, seed=seed, bos=bos, bos_id=bos_id)
    return rep["induction"]


# ---------------------------------------------------------------------------------------- copy scores


def _head_ov_logits(bridge: Any, x: torch.Tensor, l: int, sign: float, apply_ln: bool,
                    cols: torch.Tensor | None = None, W: HeadWeights | None = None,
                    heads: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of each layer-``l`` head's OV output for residual vectors ``x [R, d]`` -> ``[R, H, V or |cols|]``.

    ``o = sign * (ln1_l(x) W_V + b_V) W_O`` (no ``b_O``: it belongs to no head), then ``ln_final`` and the
    unembedding (restricted to ``cols`` when given). ``W`` (``gqa.head_weights``, read once by the caller):
    per query head, so a GQA head ``h`` uses key/value head ``h // G`` and a bias-free model ``b_V = 0``.
    ``ln1`` / ``ln_final`` are the model's own modules (LayerNorm or RMSNorm, with their gains).
    """
    W = W if W is not None else head_weights(bridge)
    blk = bridge.blocks[l]
    xin = blk.ln1(x[:, None])[:, 0] if apply_ln else x
    W_V, b_V, W_O = W.W_V[l], W.b_V[l], W.W_O[l]
    if heads is not None:  # only these heads of layer l (index tensor), in that order
        W_V, b_V, W_O = W_V[heads], b_V[heads], W_O[heads]
    v = torch.einsum("rd,hde->rhe", xin, W_V) + b_V
    o = sign * torch.einsum("rhe,hed->rhd", v, W_O)
    if apply_ln:
        o = bridge.ln_final(o)
    if cols is None:
        return bridge.unembed(o)
    return torch.einsum("rhd,dv->rhv", o, bridge.W_U[:, cols]) + bridge.b_U[cols]


def _ioi_positions(task: Any) -> str | None:
    missing = [k for k in ("IO", "S1", "S2") if k not in getattr(task, "positions", {})]
    if missing:
        return f"task {getattr(task, 'name', '?')!r} has no {'/'.join(missing)} positions (an IOI-style task is needed)"
    return None


def _copy_score(bridge: Any, task: Any, sign: float, *, k: int, apply_ln: bool, batch_size: int,
                name: str, heads: Sequence[Head | str] | None = None) -> HeadScores:
    reason = _ioi_positions(task)
    if reason:
        return _nan_scores(bridge, name, "% top-5", reason)
    L, H = _shape(bridge)
    dev = _device(bridge)
    # ``heads``: score only these (the others stay NaN). The full-vocabulary unembedding of every head's OV
    # output dominates the cost on a real model (270 heads x 49k tokens for SmolLM2), and a claim needs only its own.
    wanted = torch.ones(L, H, dtype=torch.bool)
    if heads is not None:
        wanted[:] = False
        for hd in heads:
            l, h = _parse_head(hd) if isinstance(hd, str) else hd
            wanted[l, h] = True
    hits = torch.zeros(L, H, dtype=torch.float64)
    attn = {p: torch.zeros(L, H, dtype=torch.float64) for p in ("IO", "S1", "S2")}
    N = len(task)
    W = head_weights(bridge)
    with torch.no_grad():
        for start in range(0, N, batch_size):
            idx = torch.arange(start, min(N, start + batch_size))
            toks = task.clean[idx].to(dev)
            rows = torch.arange(len(idx), device=dev)
            end = task.end[idx].to(dev)
            pos = {p: task.positions[p][idx].to(dev) for p in ("IO", "S1", "S2")}
            _, cache = bridge.run_with_cache(toks, names_filter=lambda n: n == "blocks.0.hook_resid_post"
                                             or n.endswith("attn.hook_pattern"))
            r0 = cache["blocks.0.hook_resid_post"]
            x = torch.cat([r0[rows, pos[p]] for p in ("IO", "S1", "S2")])  # [3b, d]
            want = torch.cat([toks[rows, pos[p]] for p in ("IO", "S1", "S2")])  # the name at that position
            for l in range(L):
                hs = wanted[l].nonzero().flatten()
                for sl in (range(0, x.shape[0], 16) if len(hs) else ()):
                    lg = _head_ov_logits(bridge, x[sl:sl + 16], l, sign, apply_ln, W=W, heads=hs)  # [r, |hs|, V]
                    top = lg.topk(k, dim=-1).indices
                    hits[l, hs] += (top == want[sl:sl + 16, None, None]).any(-1).double().sum(0).cpu()
                pat = cache[f"blocks.{l}.attn.hook_pattern"]  # [b, h, q, k]
                for p in ("IO", "S1", "S2"):
                    attn[p][l] += pat[rows, :, end, pos[p]].double().sum(0).cpu()
    values = 100.0 * hits / (3 * N)
    values[~wanted] = float("nan")
    means = {p: v / N for p, v in attn.items()}
    crit = (means["IO"] > means["S1"]) & (means["IO"] > means["S2"])
    return HeadScores(values, name, f"% top-{k}", None, {
        "sign": sign, "k": k, "apply_ln": apply_ln, "n_examples": N,
        "attn_end_to_io": means["IO"], "attn_end_to_s1": means["S1"], "attn_end_to_s2": means["S2"],
        "attention_criterion": crit,
    })


def name_mover(bridge: Any, task: Any, *, k: int = 5, apply_ln: bool = True, batch_size: int = 32,
              heads: Sequence[Head | str] | None = None) -> HeadScores:
    """Copy score (Wang et al.; Tigges ``compute_copy_score``) and the name-mover attention criterion.

    For every clean prompt and every name position p in {IO, S1, S2}: ``r`` = residual stream after
    block 0 at p, ``o = (ln1(r) W_V + b_V) W_O`` for each head, logits = unembed(ln_final(o)); a hit when
    the name at p is in the top ``k``. ``values`` = hit rate in %. ``details``: mean attention at END to
    the IO / S1 / S2 positions (``attn_end_to_io`` ...) and ``attention_criterion`` (bool ``[L, H]``:
    attn(END→IO) > attn(END→S1) and > attn(END→S2), Tigges' ``filter_name_movers``). Tigges' name movers
    have copy score > 10 %, the criterion, and a negative direct effect (``path_patch(..., "logits")``).
    """
    return _copy_score(bridge, task, 1.0, k=k, apply_ln=apply_ln, batch_size=batch_size, name="name_mover",
                       heads=heads)


def copy_suppression(bridge: Any, task: Any, *, k: int = 5, apply_ln: bool = True, batch_size: int = 32,
              heads: Sequence[Head | str] | None = None) -> HeadScores:
    """Negative copy score: the copy score with the head's output negated (sign -1), in %.

    This is the negative-copy-score variant (Wang et al.'s negative name movers), **not** McDougall et
    al.'s CSPA (copy-suppression-preserving ablation on OpenWebText), which needs a semantic-similarity
    table and open-domain text. A head that writes the *opposite* of the attended name scores high.
    ``details`` carries the same attention means as ``name_mover``.
    """
    return _copy_score(bridge, task, -1.0, k=k, apply_ln=apply_ln, batch_size=batch_size, name="copy_suppression",
                       heads=heads)


# ------------------------------------------------------------------------------------------ successor

_NUM_WORDS = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
              "sixteen seventeen eighteen nineteen twenty").split()
_ORDINALS = "first second third fourth fifth sixth seventh eighth ninth tenth".split()
_DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_MONTHS = "January February March April May June July August September October November December".split()
_ROMAN = "I II III IV V VI VII VIII IX X XI XII XIII XIV XV XVI XVII XVIII XIX XX".split()

#: Gould et al.'s ordinal tasks as in Tigges' script: (name, items, cyclic, case variants allowed).
ORDINAL_SEQUENCES: tuple[tuple[str, tuple[str, ...], bool, bool], ...] = (
    ("numbers", tuple(str(i) for i in range(1, 201)), False, False),
    ("number_words", tuple(_NUM_WORDS), False, True),
    ("ordinals", tuple(_ORDINALS), False, True),
    ("days", tuple(_DAYS), True, True),
    ("days_short", tuple(d[:3] for d in _DAYS), True, True),
    ("months", tuple(_MONTHS), True, True),
    ("months_short", tuple(m[:3] for m in _MONTHS), True, True),
    ("letters", tuple(chr(c) for c in range(ord("A"), ord("Z") + 1)), False, False),
    ("roman", tuple(_ROMAN), False, False),
)


def _invert_case(w: str) -> str:
    return w[0].lower() + w[1:] if w[0].isupper() else w[0].upper() + w[1:]


def _single_token(tok: Any, word: str) -> int | None:
    """The id of ``word`` if it is exactly one real (non-unknown) token that decodes back to it."""
    try:
        ids = tok.encode(word, add_special_tokens=False)
    except Exception:
        return None
    if len(ids) != 1:
        return None
    i = int(ids[0])
    if tok.unk_token_id is not None and i == tok.unk_token_id:
        return None
    if tok.decode([i]).strip() != word.strip():
        return None
    return i


def _ordinal_tasks(tok: Any, V: int) -> list[tuple[str, list[tuple[int, int]]]]:
    """Per task variant: the valid (w_i, w_{i+1}) token pairs; identical variants are merged."""
    tasks: list[tuple[str, list[tuple[int, int]]]] = []
    seen: set[tuple[tuple[int, int], ...]] = set()
    for name, items, cyclic, casing in ORDINAL_SEQUENCES:
        seqs = [("", items)]
        if casing:
            seqs.append(("inv", tuple(_invert_case(w) for w in items)))
        for tag, seq in seqs:
            for space in ("", " "):
                words = list(seq) + ([seq[0]] if cyclic else [])
                ids = [_single_token(tok, space + w) for w in words]
                pairs = [(a, b) for a, b in zip(ids, ids[1:]) if a is not None and b is not None and a < V and b < V]
                key = tuple(pairs)
                if pairs and key not in seen:
                    seen.add(key)
                    tasks.append((f"{name}{'_' + tag if tag else ''}{'_space' if space else ''}", pairs))
    return tasks


def successor(bridge: Any, *, min_pairs: int = 5, apply_ln: bool = True) -> HeadScores:
    """Succession score (Gould et al. 2023, as in Tigges' script): OV circuit through MLP0 on ordinal sequences.

    For each ordinal task (numbers 1–200, number words, ordinals, weekdays, months and their abbreviations
    (cyclic), letters, Roman numerals; each with and without a leading space, and with inverted
    capitalisation for words) the pairs ``(w_i, w_{i+1})`` whose two words are single tokens are kept.
    Effective embedding ``E' = MLP0(ln2_0(W_E[w]))``; a head's scores ``S = unembed(ln_final(ln1(E') W_V W_O))``
    over the task's targets; a pair succeeds when ``w_{i+1}`` has the highest score among the task's
    targets. ``values`` = fraction of successful pairs over all tasks (Tigges plots the argmax head).
    ``not_evaluated`` when there is no tokenizer or fewer than ``min_pairs`` valid pairs.
    """
    tok = getattr(bridge, "tokenizer", None)
    name, unit = "successor", "fraction of pairs"
    if tok is None:
        return _nan_scores(bridge, name, unit, "the model has no tokenizer: ordinal words cannot be looked up")
    V = int(bridge.cfg.d_vocab)
    tasks = _ordinal_tasks(tok, V)
    n_pairs = sum(len(p) for _, p in tasks)
    if n_pairs < min_pairs:
        return _nan_scores(bridge, name, unit,
                           f"only {n_pairs} ordinal pairs (number, weekday, month, letter...) are single tokens "
                           f"in this tokenizer; at least {min_pairs} are needed", n_pairs=n_pairs)
    L, H = _shape(bridge)
    success = torch.zeros(L, H, dtype=torch.float64)
    per_task: dict[str, int] = {}
    W = head_weights(bridge)
    with torch.no_grad():
        blk0 = bridge.blocks[0]
        for tname, pairs in tasks:
            src = torch.tensor([a for a, _ in pairs], device=_device(bridge))
            dst = [b for _, b in pairs]
            targets = sorted(set(dst))
            cols = torch.tensor(targets, device=src.device)
            want = torch.tensor([targets.index(b) for b in dst], device=src.device)
            e = bridge.W_E[src][:, None]  # [n, 1, d]
            e_mlp = blk0.mlp(blk0.ln2(e) if apply_ln else e)[:, 0]
            for l in range(L):
                s = _head_ov_logits(bridge, e_mlp, l, 1.0, apply_ln, cols, W)  # [n, H, |targets|]
                success[l] += (s.argmax(-1) == want[:, None]).double().sum(0).cpu()
            per_task[tname] = len(pairs)
    return HeadScores(success / n_pairs, name, unit, None,
                      {"n_pairs": n_pairs, "pairs_per_task": per_task, "apply_ln": apply_ln})


# ------------------------------------------------------------------------------------- S-inhibition


def swap_io_s1(task: Any) -> Any:
    """The task with clean prompts in which the IO and S1 tokens trade places (``ABB->BAB, BAB->ABB``).

    Returned as a ``TaskData`` whose ``corrupted`` is the swapped prompt (clean and labels unchanged):
    Tigges' ``token_same_pos_oppo`` dataset for the S-inhibition test.
    """
    from dataclasses import replace

    io, s1 = task.positions["IO"], task.positions["S1"]
    rows = torch.arange(len(task))
    sw = task.clean.clone()
    sw[rows, io] = task.clean[rows, s1]
    sw[rows, s1] = task.clean[rows, io]
    return replace(task, corrupted=sw, corrupted_text=())


class _NMHAttention:
    """Step-3 readout for ``s_inhibition``: name movers' attention from END to IO and S1, per candidate."""

    def __init__(self, nmh: list[Head], b: _Batch, n_cand: int) -> None:
        self.nmh, self.b = nmh, b
        self.names = sorted({f"blocks.{l}.attn.hook_pattern" for l, _ in nmh})
        self.io = torch.zeros(n_cand, dtype=torch.float64)
        self.s1 = torch.zeros(n_cand, dtype=torch.float64)
        self.pos_io = self.pos_s1 = None

    def __call__(self, cap: dict[str, torch.Tensor], s: int, sl: slice) -> None:
        b = self.b
        for l, h in self.nmh:
            pat = cap[f"blocks.{l}.attn.hook_pattern"]
            pat = pat.reshape(s, b.B, *pat.shape[1:])[:, :, h]  # [s, B, q, k]
            at_end = pat[:, b.rows, b.end]  # [s, B, k]
            self.io[sl] += at_end[:, b.rows, self.pos_io].double().mean(1).cpu() / len(self.nmh)
            self.s1[sl] += at_end[:, b.rows, self.pos_s1].double().mean(1).cpu() / len(self.nmh)


def s_inhibition(bridge: Any, task: Any, name_movers: Sequence[Head | str], *,
                 candidates: Iterable[Head | str] | None = None, batch_size: int = 32,
                 metric: str | None = None) -> HeadScores:
    """Tigges' S-inhibition test (metrics.md §5.5) for candidate heads, given the name-mover heads.

    For each candidate, its output (``hook_z``) at END is taken from the IO/S1-swapped prompt
    (``swap_io_s1``) and path-patched into the name movers' query inputs (all other heads frozen, MLPs
    recomputed, as in ``path_patch``). Relative changes against the unpatched clean run:
    ``dLD = (LD_patched - LD)/LD``, ``dIO`` / ``dS1`` = relative change of the name movers' mean attention
    from END to the IO / S1 position. ``values`` = 1.0 where ``dLD < 0``, ``dIO < 0`` and ``dS1 > 0``,
    0.0 for other candidates, ``nan`` for heads that were not candidates. ``details`` has ``dLD``, ``dIO``,
    ``dS1`` (``[L, H]``, nan off-candidate) and the unpatched baselines. Candidates default to every head
    in a layer below the last name mover (Tigges takes heads whose path-patching effect on the name
    movers' queries is < -0.001).
    """
    name, unit = "s_inhibition", "1 = meets all three conditions"
    reason = _ioi_positions(task)
    if reason:
        return _nan_scores(bridge, name, unit, reason)
    L, H = _shape(bridge)
    nmh = [(_parse_head(x) if isinstance(x, str) else (int(x[0]), int(x[1]))) for x in name_movers]
    if not nmh:
        return _nan_scores(bridge, name, unit, "no name-mover heads given")
    top = max(l for l, _ in nmh)
    if candidates is None:
        cand = [(l, h) for l in range(top) for h in range(H) if (l, h) not in nmh]
    else:
        cand = sorted({(_parse_head(x) if isinstance(x, str) else (int(x[0]), int(x[1]))) for x in candidates})
    cand = [c for c in cand if c[0] < top]  # a head at or above the last name mover cannot reach its query
    if not cand:
        return _nan_scores(bridge, name, unit, "no candidate head below the name movers")
    metric = metric or getattr(task, "default_metric", None) or "logit_diff"
    swapped = swap_io_s1(task)
    recv = Receivers.of_heads(nmh, "q")
    N = len(task)
    dev = _device(bridge)
    ld_sum = torch.zeros(len(cand), dtype=torch.float64)
    io_sum = torch.zeros(len(cand), dtype=torch.float64)
    s1_sum = torch.zeros(len(cand), dtype=torch.float64)
    ld0 = io0 = s10 = 0.0
    with torch.no_grad():
        for start in range(0, N, batch_size):
            idx = torch.arange(start, min(N, start + batch_size))
            b = _Batch(swapped, idx, dev)
            capture = _NMHAttention(nmh, b, len(cand))
            capture.pos_io = swapped.positions["IO"][idx].to(dev)
            capture.pos_s1 = swapped.positions["S1"][idx].to(dev)
            vals, m_clean, _ = _hooks_batch(bridge, b, cand, recv, metric, max_rows=8192,
                                            sender_pos="end", capture=capture)
            ld_sum += vals.sum(1).cpu()
            io_sum += capture.io * len(idx)
            s1_sum += capture.s1 * len(idx)
            ld0 += float(m_clean.sum())
            _, cache = bridge.run_with_cache(b.clean, names_filter=lambda n: n in capture.names)
            for l, h in nmh:
                at_end = cache[f"blocks.{l}.attn.hook_pattern"][b.rows, h, b.end]  # [B, k]
                io0 += float(at_end[b.rows, capture.pos_io].double().sum()) / len(nmh)
                s10 += float(at_end[b.rows, capture.pos_s1].double().sum()) / len(nmh)
    ld0, io0, s10 = ld0 / N, io0 / N, s10 / N
    rel = lambda new, old: (new - old) / old if old != 0 else math.nan
    grids = {k: torch.full((L, H), math.nan, dtype=torch.float64) for k in ("dLD", "dIO", "dS1")}
    values = torch.full((L, H), math.nan, dtype=torch.float64)
    for i, (l, h) in enumerate(cand):
        d_ld = rel(float(ld_sum[i]) / N, ld0)
        d_io = rel(float(io_sum[i]) / N, io0)
        d_s1 = rel(float(s1_sum[i]) / N, s10)
        grids["dLD"][l, h], grids["dIO"][l, h], grids["dS1"][l, h] = d_ld, d_io, d_s1
        values[l, h] = 1.0 if (d_ld < 0 and d_io < 0 and d_s1 > 0) else 0.0
    details: dict[str, Any] = {**grids, "ld_clean": ld0, "attn_io_clean": io0, "attn_s1_clean": s10,
                               "name_movers": [f"a{l}.h{h}" for l, h in nmh],
                               "candidates": [f"a{l}.h{h}" for l, h in cand], "metric": metric}
    if ld0 == 0 or io0 == 0 or s10 == 0:
        details["note"] = "a zero baseline makes some relative changes undefined (nan -> condition not met)"
    return HeadScores(values, name, unit, None, details)


# -------------------------------------------------------------------------------------------- table


def _fmt(v: float, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def scores_table(bridge: Any, task: Any, *, roles: dict[str, list[str]] | None = None,
                 n_seq: int = 8, seq_len: int = 50) -> str:
    """Every head's role scores (rows ``a{L}.h{H}``) and the direct-effect path-patching matrix, as text.

    Columns: previous-token / duplicate-token / induction attention, successor fraction, copy and
    negative-copy score (% top-5) with the name-mover attention criterion (``*``), the direct effect
    (path patching into ``logits``, noising-normalised: negative = the head helps), and the claimed roles
    from ``roles`` (``{role: ["a9.h6", ...]}``). When ``roles`` names name movers (key ``name_mover`` or
    ``name_movers``), the effect of each head on their queries and the S-inhibition test are added for
    heads with effect < -0.001 or claimed as ``s_inhibition``.
    """
    roles = roles or {}
    L, H = _shape(bridge)
    rep = repeated_sequence_scores(bridge, n_seq=n_seq, seq_len=seq_len)
    cols: list[tuple[str, HeadScores, str]] = [
        ("prev", rep["previous_token"], ".2f"), ("dup", rep["duplicate_token"], ".2f"),
        ("ind", rep["induction"], ".2f"), ("succ", successor(bridge), ".2f"),
    ]
    nm = name_mover(bridge, task)
    cols += [("copy%", nm, ".0f"), ("-copy%", copy_suppression(bridge, task), ".0f")]
    de = path_patch(bridge, task, Receivers.logits())
    claimed: dict[Head, list[str]] = {}
    for role, heads in roles.items():
        for x in heads:
            claimed.setdefault(_parse_head(x), []).append(role)
    nmh_names = roles.get("name_mover") or roles.get("name_movers") or []
    pq = s2i = None
    if nmh_names and _ioi_positions(task) is None:
        nmh = [_parse_head(x) for x in nmh_names]
        pq = path_patch(bridge, task, Receivers.of_heads(nmh, "q"))
        cand = {(l, h) for l, h in (pq.effects < -0.001).nonzero().tolist()}
        cand |= {_parse_head(x) for x in roles.get("s_inhibition", [])}
        if cand:
            s2i = s_inhibition(bridge, task, nmh, candidates=sorted(cand))

    head_w = max(6, len(f"a{L - 1}.h{H - 1}"))
    header = [f"{'head':<{head_w}}"] + [f"{c:>7}" for c, _, _ in cols] + [f"{'attn':>5}", f"{'DE':>8}"]
    if pq is not None:
        header += [f"{'PP->NMq':>8}", f"{'S2I':>4}"]
    header += ["  role"]
    lines = [
        f"role scores: {getattr(task, 'name', 'task')} ({len(task)} prompts), metric {de.metric}: "
        f"clean {de.ld_clean:.3f}, corrupted {de.ld_corrupt:.3f}",
    ]
    for c, sc, _ in cols:
        if sc.not_evaluated:
            lines.append(f"  {c}: not evaluated: {sc.not_evaluated}")
    lines.append("".join(header[:1]) + " " + " ".join(header[1:]))
    crit = nm.details.get("attention_criterion")
    for l in range(L):
        for h in range(H):
            row = [f"{f'a{l}.h{h}':<{head_w}}"]
            row += [f"{_fmt(float(sc.values[l, h]), spec):>7}" for _, sc, spec in cols]
            row.append(f"{('*' if crit is not None and bool(crit[l, h]) else ''):>5}")
            row.append(f"{_fmt(float(de.effects[l, h]), '+.3f'):>8}")
            if pq is not None:
                row.append(f"{_fmt(float(pq.effects[l, h]), '+.3f'):>8}")
                v = float(s2i.values[l, h]) if s2i is not None else math.nan
                row.append(f"{('-' if math.isnan(v) else ('yes' if v == 1.0 else 'no')):>4}")
            row.append("  " + ",".join(claimed.get((l, h), [])))
            lines.append(row[0] + " " + " ".join(row[1:]).rstrip())
    lines.append("")
    lines.append("direct effect on logits (path patching, (m_patched - m_clean)/(m_clean - m_corrupt); "
                 "negative = helps the task)")
    lines.append("      " + " ".join(f"{f'h{h}':>7}" for h in range(H)))
    for l in range(L):
        lines.append(f"{f'L{l}':<6}" + " ".join(f"{_fmt(float(de.effects[l, h]), '+.3f'):>7}" for h in range(H)))
    lines.append("attn: * = attn(END->IO) > attn(END->S1) and > attn(END->S2) (name-mover criterion)")
    return "\n".join(lines)
