"""Induction on repeated random tokens: ``[BOS] x_0 .. x_{T-1} x_0 .. x_{T-2}`` -> ``x_{T-1}``.

x is T *distinct* tokens drawn uniformly from the tokenizer's non-special vocabulary, so END (the second
x_{T-2}) occurs exactly once before, and the answer x_{T-1} is inferable only by induction (attend to the
token after the earlier occurrence of the current token, copy it). The wrong token z is a random token that
occurs in neither prompt. Corruptions (``corruption``):

- ``resample`` (default): the first half is replaced by T fresh distinct tokens disjoint from x and z, so the
  repeat carries no information; neither x_{T-1} nor z occurs in the corrupted prompt, LD(M') ~ 0.
- ``swap_answer``: only x_{T-1} in the first half is replaced by z, so induction on the corrupted prompt
  predicts z: LD(M') ~ -LD(M), like IOI's ``s2_io_flip``.

Metric: logit(x_{T-1}) - logit(z). Prompts are built from token ids (not text); ``clean_text`` is their decoding.
"""

from __future__ import annotations

import random
from typing import Literal

from pydantic import StrictInt, Field, model_validator

from ..errors import TaskError
from ._common import Collector, Example, Tok
from .base import BuildContext, TaskData, TaskParams, register


class InductionParams(TaskParams):
    seq_len: int = Field(20, ge=2, le=4096)
    corruption: Literal["resample", "swap_answer"] = "resample"
    # [lo, hi) of candidate ids (Tigges: [100, 20000)); default: all. A YAML list: lax only for list -> tuple
    token_range: tuple[StrictInt, StrictInt] | None = Field(None, strict=False)

    @model_validator(mode="after")
    def _range(self):
        if self.token_range is not None and not (0 <= self.token_range[0] < self.token_range[1]):
            raise ValueError(f"token_range must be [lo, hi) with 0 <= lo < hi, got {list(self.token_range)}")
        return self


@register("induction", InductionParams, "logit_diff", positions=("CUR1", "NEXT1", "END"))
def build(tokenizer, params: InductionParams, ctx: BuildContext) -> TaskData:
    """Induction; targets [x_{T-1}, z], signs [+1, -1]; positions CUR1 (first x_{T-2}), NEXT1 (first x_{T-1}), END."""
    tok = Tok(tokenizer, ctx, "induction")
    col = Collector("induction", params, tok)
    vocab_ids = sorted(set(int(i) for i in tokenizer.get_vocab().values()) - set(tok.special_ids))
    if params.token_range is not None:
        lo, hi = params.token_range
        vocab_ids = [i for i in vocab_ids if lo <= i < hi]
    T = params.seq_len
    need = 2 * T + 1 if params.corruption == "resample" else T + 1
    col.pools["tokens"] = {"total": len(vocab_ids), "kept": len(vocab_ids), "dropped": {}}
    if len(vocab_ids) < need:
        raise TaskError(f"induction: needs at least {need} distinct non-special tokens for seq_len {T} with "
                        f"corruption {params.corruption!r}; the tokenizer has {len(vocab_ids)}"
                        + (f" in token_range {list(params.token_range)}" if params.token_range else ""))
    rng = random.Random(params.seed)

    def make() -> Example:
        drawn = rng.sample(vocab_ids, need)
        x, z = drawn[:T], drawn[T]
        clean = x + x[:-1]
        if params.corruption == "resample":
            corrupted = drawn[T + 1:] + x[:-1]
        else:
            corrupted = x[:-1] + [z] + x[:-1]
        pos = {"CUR1": T - 2, "NEXT1": T - 1}
        return Example(clean, corrupted, [x[-1], z], [1.0, -1.0], pos, tok.decode(clean), tok.decode(corrupted),
                       key=tuple(drawn))

    col.run(make for _ in range(params.size * 20 + 200))
    return col.finish("logit_diff", {"seq_len": T, "corruption": params.corruption, "vocab_candidates": len(vocab_ids)})
