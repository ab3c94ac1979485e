"""Word-level tokenizer for zoo models, shaped so task code written for BPE works unchanged.

Pre-tokenization = whitespace split + punctuation split (``tokenizers.pre_tokenizers.Whitespace``:
``\\w+|[^\\w\\s]+``) + digit runs cut into pairs ("1732" -> "17", "32"; "173" -> "17", "3"). So a year
splits like GPT-2/NeoX BPE (" 1732" -> " 17", "32"), names and punctuation are single tokens, and
``decode`` joins tokens with single spaces (``encode(decode(ids)) == ids`` for in-vocabulary text).
Special ids are fixed: ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3; the tokenizer never adds
BOS itself (callers prepend it, exactly like Pythia's tokenizer).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIALS", "PAD_ID", "BOS_ID", "EOS_ID", "UNK_ID", "build_word_tokenizer", "pre_tokenize"]

SPECIALS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

_WORD_RE = re.compile(r"\w+|[^\w\s]+")
_DIGITS_RE = re.compile(r"\d\d")


def pre_tokenize(text: str) -> list[str]:
    """The same split as the tokenizer's pre-tokenizer, in pure Python (used to build vocabularies)."""
    out: list[str] = []
    for piece in _WORD_RE.findall(text):
        pos = 0
        for m in _DIGITS_RE.finditer(piece):
            if m.start() > pos:
                out.append(piece[pos:m.start()])
            out.append(m.group())
            pos = m.end()
        if pos < len(piece):
            out.append(piece[pos:])
    return out


def build_word_tokenizer(words: Iterable[str]) -> "PreTrainedTokenizerFast":
    """A ``PreTrainedTokenizerFast`` over the specials followed by ``words`` (deduplicated, order kept).

    Every word must survive pre-tokenization as exactly one piece (e.g. "17", "Mary", ","), otherwise
    it could never be produced and a ``ValueError`` names it.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {s: i for i, s in enumerate(SPECIALS)}
    bad = []
    for w in words:
        if w in vocab:
            continue
        if pre_tokenize(w) != [w]:
            bad.append(w)
            continue
        vocab[w] = len(vocab)
    if bad:
        raise ValueError(f"words that do not pre-tokenize to themselves (split by whitespace/punctuation/digit pairs): {bad[:10]}")
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Whitespace(),
        pre_tokenizers.Split(Regex(r"\d\d"), behavior="isolated"),
    ])
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        add_bos_token=False, model_max_length=1024, clean_up_tokenization_spaces=False,
    )
