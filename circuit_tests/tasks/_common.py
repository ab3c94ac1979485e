"""Machinery shared by the task builders: a tokenizer view, span-aware encoding, example collection.

Why one place: every task must answer the same questions the same way on any tokenizer (word-level zoo
vocabularies, byte-level BPE with leading-space words): which token is the continuation of a prompt, where
a filled-in word sits in the token sequence, whether a word fell out of the vocabulary (<unk>), and how
many candidate examples survived and why the rest were dropped. Builders raise ``Drop`` for a candidate the
tokenizer cannot support; ``Collector`` counts the reasons and turns too few survivors into a TaskError.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence, TypeVar

import torch

from ..errors import TaskError
from .base import BuildContext, TaskData, TaskParams

T = TypeVar("T")

_PLACEHOLDER = re.compile(r"\[([A-Z][A-Z0-9_]*)\]")


class Drop(Exception):
    """A candidate (example or pool item) this tokenizer cannot support.

    ``reason`` is the aggregation key (short, no example-specific text); ``detail`` names the offender.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def render(template: str, values: dict[str, str]) -> tuple[str, dict[str, list[tuple[int, int]]]]:
    """Fill ``[KEY]`` placeholders; returns the text and each key's character spans, in order of occurrence."""
    out: list[str] = []
    spans: dict[str, list[tuple[int, int]]] = {}
    pos = 0
    n = 0
    for m in _PLACEHOLDER.finditer(template):
        key = m.group(1)
        if key not in values:
            raise KeyError(f"template {template!r} has no value for [{key}]")
        out.append(template[pos:m.start()])
        n += m.start() - pos
        v = values[key]
        spans.setdefault(key, []).append((n, n + len(v)))
        out.append(v)
        n += len(v)
        pos = m.end()
    out.append(template[pos:])
    return "".join(out), spans


def placeholders(template: str) -> list[str]:
    return [m.group(1) for m in _PLACEHOLDER.finditer(template)]


class Tok:
    """A task's view of a HF fast tokenizer: encoding without specials, BOS/pad policy, vocabulary checks."""

    def __init__(self, tokenizer: Any, ctx: BuildContext, task: str) -> None:
        if tokenizer is None or not callable(getattr(tokenizer, "__call__", None)):
            raise TaskError(f"{task}: needs a Hugging Face tokenizer, got {type(tokenizer).__name__}")
        if not getattr(tokenizer, "is_fast", False):
            raise TaskError(f"{task}: needs a fast tokenizer (PreTrainedTokenizerFast, with character offsets); "
                            f"got {type(tokenizer).__name__}")
        self.tk = tokenizer
        self.task = task
        self.prepend_bos = bool(ctx.prepend_bos)
        self.bos: int | None = None
        if self.prepend_bos:
            if tokenizer.bos_token_id is None:
                raise TaskError(f"{task}: the model prepends a BOS token (prepend_bos: true) but this tokenizer has "
                                "no bos_token; set prepend_bos: false or give the tokenizer a bos_token")
            self.bos = int(tokenizer.bos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_source = "pad"
        if pad is None:
            pad, self.pad_source = tokenizer.eos_token_id, "eos"
        if pad is None:
            pad, self.pad_source = 0, "id 0 (tokenizer has neither pad nor eos)"
        self.pad = int(pad)
        self.unk: int | None = tokenizer.unk_token_id
        self.special_ids: frozenset[int] = frozenset(int(i) for i in tokenizer.all_special_ids)
        # A byte-level BPE maps unk to a real special token (GPT-2: <|endoftext|>); only a model with an
        # unknown-token fallback (WordLevel, WordPiece, Unigram) can silently turn words into <unk>.
        self._cache: dict[str, tuple[list[int], list[tuple[int, int]]]] = {}

    # --- encoding -------------------------------------------------------------------------------
    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        hit = self._cache.get(text)
        if hit is None:
            enc = self.tk(text, add_special_tokens=False, return_offsets_mapping=True)
            hit = (list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]])
            if len(self._cache) < 200_000:
                self._cache[text] = hit
        return list(hit[0]), list(hit[1])

    def prefetch(self, texts: Iterable[str]) -> None:
        """Encode many texts in one batched call (the per-call overhead dominates short prompts)."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if todo:
            enc = self.tk(todo, add_special_tokens=False, return_offsets_mapping=True)
            for t, ids, offs in zip(todo, enc["input_ids"], enc["offset_mapping"]):
                self._cache[t] = (list(ids), [tuple(o) for o in offs])

    def encode(self, text: str) -> list[int]:
        return self.encode_offsets(text)[0]

    def show(self, ids: Iterable[int]) -> str:
        """Token strings for messages: ``['Ġto', 'ĠMa', 'ry']``."""
        return repr(self.tk.convert_ids_to_tokens([int(i) for i in ids]))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tk.decode([int(i) for i in ids])

    # --- checks ---------------------------------------------------------------------------------
    def unknown_words(self, text: str) -> list[str]:
        """Substrings of ``text`` that the tokenizer maps to its unknown token (empty if none)."""
        if self.unk is None:
            return []
        ids, offs = self.encode_offsets(text)
        words = [text[s:e] for i, (s, e) in zip(ids, offs) if i == self.unk and text[s:e] != self.tk.unk_token]
        return list(dict.fromkeys(words))

    def check_known(self, text: str, what: str = "") -> list[int]:
        """Encode ``text``; a word the vocabulary lacks (it would become <unk>) is a Drop naming it."""
        ids = self.encode(text)
        if self.unk is not None and self.unk in ids:
            words = self.unknown_words(text) or ["?"]
            raise Drop("word not in the tokenizer's vocabulary (would be <unk>)",
                       f"{', '.join(repr(w) for w in words)}{' in ' + what if what else ''}")
        return ids

    def next_token(self, prompt: str, continuation: str) -> int:
        """The single token that ``continuation`` adds after ``prompt``; a Drop if it is not exactly one token."""
        base = self.encode(prompt)
        full = self.encode(prompt + continuation)
        if full[: len(base)] != base:
            raise Drop("continuation changes the prompt's tokens",
                       f"{continuation!r} after {prompt[-30:]!r}: {self.show(base[-3:])} -> {self.show(full[len(base) - 3:])}")
        extra = full[len(base):]
        if len(extra) != 1:
            raise Drop("answer is not a single token", f"{continuation!r} -> {len(extra)} tokens {self.show(extra)}")
        tid = int(extra[0])
        if self.unk is not None and tid == self.unk:
            raise Drop("word not in the tokenizer's vocabulary (would be <unk>)", repr(continuation.strip() or continuation))
        return tid

    def standalone_token(self, text: str) -> int:
        """The one token ``text`` encodes to on its own; a Drop otherwise."""
        ids = self.encode(text)
        if len(ids) != 1:
            raise Drop("not a single token", f"{text!r} -> {len(ids)} tokens {self.show(ids)}")
        if self.unk is not None and ids[0] == self.unk:
            raise Drop("word not in the tokenizer's vocabulary (would be <unk>)", repr(text))
        return int(ids[0])

    def locate(self, text: str, span: tuple[int, int], what: str, single: bool = False) -> tuple[int, int]:
        """Token indices (first, last) covering the character span of a filled-in word.

        The word must own its tokens: the first may carry only leading whitespace before the span, the last
        must end exactly at the span end (so "Mary" merged with following text is a Drop).
        """
        ids, offs = self.encode_offsets(text)
        s, e = span
        first = last = None
        for j, (a, b) in enumerate(offs):
            if b <= a:
                continue
            if first is None and a <= s < b:
                first = j
            if a < e <= b:
                last = j
                break
        word = text[s:e]
        if first is None or last is None:
            raise Drop("word not aligned to token boundaries", f"{word!r} in {text!r}")
        a0 = offs[first][0]
        if a0 < s and not text[a0:s].isspace():
            raise Drop("word not aligned to token boundaries", f"{word!r} shares a token with the text before it")
        if offs[last][1] != e:
            raise Drop("word not aligned to token boundaries", f"{word!r} shares a token with the text after it")
        if single and first != last:
            raise Drop("word is not a single token in context", f"{word!r} -> {self.show(ids[first:last + 1])}")
        return first, last

    def fingerprint_info(self) -> dict[str, Any]:
        return {"prepend_bos": self.prepend_bos, "bos_id": self.bos, "pad_id": self.pad, "pad_from": self.pad_source}


@dataclass
class Example:
    """One built example, positions relative to the unprefixed token sequence (BOS is added at assembly)."""

    clean_ids: list[int]
    corrupted_ids: list[int]
    targets: list[int]
    signs: list[float]
    positions: dict[str, int]
    clean_text: str
    corrupted_text: str
    key: Any = None  # identity for de-duplication (None: never a duplicate)


@dataclass
class Collector:
    """Counts candidates, survivors and drop reasons; assembles TaskData or raises TaskError."""

    task: str
    params: TaskParams
    tok: Tok
    kept: list[Example] = field(default_factory=list)
    n_candidates: int = 0
    dropped: Counter = field(default_factory=Counter)
    details: dict[str, list[str]] = field(default_factory=dict)
    pools: dict[str, dict[str, Any]] = field(default_factory=dict)
    n_duplicates: int = 0
    exhausted: bool = False
    _seen: set = field(default_factory=set)

    @property
    def size(self) -> int:
        return int(self.params.size)

    @property
    def min_size(self) -> int:
        return int(self.params.min_size) if self.params.min_size is not None else self.size

    def full(self) -> bool:
        return len(self.kept) >= self.size

    def _note(self, d: Drop) -> None:
        self.dropped[d.reason] += 1
        lst = self.details.setdefault(d.reason, [])
        if d.detail and len(lst) < 3 and d.detail not in lst:
            lst.append(d.detail)

    def pool(self, name: str, items: Sequence[T], check: Callable[[T], Any], need: int = 1,
             label: Callable[[T], str] = str) -> list[T]:
        """Keep the items ``check`` accepts (it raises Drop otherwise); fewer than ``need`` is a TaskError.

        ``info["pools"][name]`` records ``total``, ``kept`` and ``dropped`` (``{label(item): reason}``).
        """
        kept: list[T] = []
        dropped: dict[str, str] = {}
        groups: dict[str, list[tuple[str, str]]] = {}
        for it in items:
            try:
                check(it)
            except Drop as d:
                dropped[label(it)] = d.reason + (f" ({d.detail})" if d.detail else "")
                groups.setdefault(d.reason, []).append((label(it), d.detail))
                continue
            kept.append(it)
        self.pools[name] = {"total": len(items), "kept": len(kept), "dropped": dropped}
        if len(kept) < need:
            parts = []
            for why, its in groups.items():
                details = {d for _, d in its}
                if len(details) == 1 and len(its) > 1 and "" not in details:  # one shared cause, e.g. a frame word
                    why, shown = f"{why} ({details.pop()})", [lab for lab, _ in its]
                else:
                    shown = [lab if d in ("", repr(lab)) else f"{lab} ({d})" for lab, d in its]
                parts.append(f"{why}: {', '.join(shown[:6])}{f' (+{len(shown) - 6} more)' if len(shown) > 6 else ''}")
            text = "; ".join(parts)
            raise TaskError(f"{self.task}: only {len(kept)} of {len(items)} {name} are usable with this tokenizer, "
                            f"need at least {need}. Dropped: {text}")
        return kept

    def offer(self, make: Callable[[], Example]) -> Example | None:
        """Build one candidate; a Drop is counted, a duplicate (same key as a kept one) is skipped silently."""
        self.n_candidates += 1
        try:
            ex = make()
        except Drop as d:
            self._note(d)
            return None
        if ex.key is not None:
            if ex.key in self._seen:
                self.n_candidates -= 1
                self.n_duplicates += 1
                return None
            self._seen.add(ex.key)
        if len(ex.clean_ids) != len(ex.corrupted_ids):
            self._note(Drop("clean and corrupted prompts have different token lengths",
                            f"{ex.clean_text!r} ({len(ex.clean_ids)}) vs {ex.corrupted_text!r} ({len(ex.corrupted_ids)})"))
            return None
        self.kept.append(ex)
        return ex

    def run(self, candidates: Iterable[Callable[[], Example]], max_attempts: int | None = None) -> None:
        """Offer candidates until ``size`` are kept, the candidates run out, or ``max_attempts`` tries (+ duplicates)."""
        limit = max_attempts if max_attempts is not None else 20 * self.size + 200
        tries = 0
        if self.full():
            return
        for make in candidates:
            tries += 1
            self.offer(make)
            if self.full() or tries >= limit:
                break
        else:
            self.exhausted = True

    def reasons_text(self) -> str:
        parts = []
        for reason, n in self.dropped.most_common():
            ex = self.details.get(reason) or []
            parts.append(f"{n} x {reason}" + (f" (e.g. {'; '.join(ex)})" if ex else ""))
        return "; ".join(parts) if parts else "none"

    def finish(self, default_metric: str, extra_info: dict[str, Any] | None = None) -> TaskData:
        n = len(self.kept)
        if n == 0 or n < self.min_size:
            pools = "; ".join(f"{k}: {v['kept']} of {v['total']} usable" for k, v in self.pools.items())
            why = []
            if self.exhausted:
                why.append(f"the task has only {self.n_candidates} distinct candidates with these pools")
            elif self.n_duplicates:
                why.append(f"{self.n_duplicates} duplicate candidates skipped: the pools allow few distinct examples")
            raise TaskError(
                f"{self.task}: only {n} of the {self.size} requested examples could be built on this tokenizer "
                f"(min_size {self.min_size}; {self.n_candidates} candidates tried). Dropped: {self.reasons_text()}."
                + (f" {'; '.join(why).capitalize()}." if why else "")
                + (f" Pools: {pools}." if pools else "")
            )
        info: dict[str, Any] = {
            "n_candidates": self.n_candidates,
            "n_kept": n,
            "n_duplicates": self.n_duplicates,
            "dropped": dict(self.dropped.most_common()),
            "dropped_examples": {k: list(v) for k, v in self.details.items()},
            "pools": self.pools,
            "params": self.params.model_dump(mode="json"),
            **self.tok.fingerprint_info(),
        }
        if extra_info:
            info.update(extra_info)
        return assemble(self.task, self.kept, self.tok, default_metric, info)


def assemble(name: str, examples: Sequence[Example], tok: Tok, default_metric: str, info: dict[str, Any]) -> TaskData:
    """Stack examples into right-padded tensors; prepend BOS and shift positions when the model wants it."""
    if not examples:
        raise TaskError(f"{name}: the dataset is empty")
    off = 1 if tok.bos is not None else 0
    pre = [tok.bos] if tok.bos is not None else []
    lens = [len(e.clean_ids) + off for e in examples]
    T_ = max(lens)
    K = max(len(e.targets) for e in examples)
    N = len(examples)
    clean = torch.full((N, T_), tok.pad, dtype=torch.long)
    corr = torch.full((N, T_), tok.pad, dtype=torch.long)
    targets = torch.zeros((N, K), dtype=torch.long)
    signs = torch.zeros((N, K), dtype=torch.float32)
    pos_names = sorted(set().union(*(e.positions.keys() for e in examples)))
    positions = {p: torch.zeros(N, dtype=torch.long) for p in pos_names}
    for i, e in enumerate(examples):
        if len(e.clean_ids) != len(e.corrupted_ids):
            raise TaskError(f"{name}: example {i}: clean and corrupted prompts have different token lengths "
                            f"({len(e.clean_ids)} vs {len(e.corrupted_ids)}): {e.clean_text!r} / {e.corrupted_text!r}")
        if not e.targets or len(e.targets) != len(e.signs):
            raise TaskError(f"{name}: example {i}: targets and signs must be non-empty and equally long")
        L = lens[i]
        clean[i, :L] = torch.tensor(pre + list(e.clean_ids), dtype=torch.long)
        corr[i, :L] = torch.tensor(pre + list(e.corrupted_ids), dtype=torch.long)
        k = len(e.targets)
        targets[i, :k] = torch.tensor(e.targets, dtype=torch.long)
        targets[i, k:] = e.targets[0]  # padding entries: a valid id with sign 0
        signs[i, :k] = torch.tensor(e.signs, dtype=torch.float32)
        for p in pos_names:
            if p not in e.positions:
                raise TaskError(f"{name}: example {i} lacks position {p!r}")
            positions[p][i] = e.positions[p] + off
    end = torch.tensor([L - 1 for L in lens], dtype=torch.long)
    positions["END"] = end.clone()
    return TaskData(
        name=name, clean=clean, corrupted=corr, end=end, targets=targets, signs=signs,
        default_metric=default_metric, positions=positions,
        clean_text=tuple(e.clean_text for e in examples), corrupted_text=tuple(e.corrupted_text for e in examples),
        info=info,
    )
