"""A user-supplied dataset: a JSONL or CSV file of clean/corrupted prompts with answer and wrong tokens.

Columns: ``clean``, ``corrupted`` (prompt texts), and either ``answer``/``wrong`` (one continuation each) or
``answers``/``wrongs`` (groups: a JSON list, or one string with ``|`` between the items). Each answer is the
text ``join + answer`` appended to the clean prompt (``join`` defaults to one space, so write ``Mary``, not
`` Mary``; use ``join: ""`` for continuations such as digits) and must be exactly one token after it. The
metric uses the clean labels on both prompts. Unknown columns are ignored. Every row must be valid: a bad
row is a TaskError naming the file and line, never a silently smaller test.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from ..errors import TaskError
from ..metrics import METRICS
from ._common import Drop, Example, Tok, assemble
from .base import MAX_SIZE, BuildContext, TaskData, TaskParams, register

class CustomParams(TaskParams):
    path: str = Field(min_length=1)
    metric: str = "logit_diff"  # one of metrics.METRICS
    join: str = " "
    size: int | None = Field(None, ge=1, le=MAX_SIZE)  # use the first `size` rows (default: all)

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        if v not in METRICS:
            raise ValueError(f"unknown metric {v!r}; known: {', '.join(METRICS)}")
        return v


_MAX_SHOWN = 8


def _read_rows(path: Path) -> list[tuple[int, Any]]:
    """(line number, raw row) pairs; a file that cannot be parsed is a TaskError naming the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskError(f"custom: dataset file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise TaskError(f"custom: {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise TaskError(f"custom: {path}: cannot read: {e}") from None
    suffix = path.suffix.lower()
    rows: list[tuple[int, Any]] = []
    if suffix in (".jsonl", ".ndjson", ".json"):
        if suffix == ".json" and text.lstrip().startswith("["):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise TaskError(f"custom: {path}:{e.lineno}: invalid JSON: {e.msg}") from None
            return [(i + 1, r) for i, r in enumerate(data)]  # "line" = item number in the array
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise TaskError(f"custom: {path}:{n}: invalid JSON: {e.msg} (column {e.colno})") from None
        return rows
    if suffix in (".csv", ".tsv"):
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        try:
            header = next(reader, None)
            if header is None:
                return []
            header = [h.strip() for h in header]
            dup = sorted({h for h in header if header.count(h) > 1})
            if dup:
                raise TaskError(f"custom: {path}:1: duplicate column(s) {dup}")
            for rec in reader:
                if not any(c.strip() for c in rec):
                    continue
                n = reader.line_num
                if len(rec) > len(header):
                    raise TaskError(f"custom: {path}:{n}: {len(rec)} fields but the header has {len(header)}")
                rows.append((n, {h: v for h, v in zip(header, rec)}))
        except csv.Error as e:
            raise TaskError(f"custom: {path}:{reader.line_num}: malformed CSV: {e}") from None
        return rows
    raise TaskError(f"custom: {path}: unknown file type {path.suffix!r}; use .jsonl, .json, .csv or .tsv")


def _group(row: dict, one: str, many: str) -> list[str]:
    """The answer (or wrong) group of a row, from ``one`` (a string) or ``many`` (list or '|'-separated string)."""
    a, b = row.get(one), row.get(many)
    a = None if a is None or (isinstance(a, str) and a == "") else a
    b = None if b is None or (isinstance(b, str) and b == "") or b == [] else b
    if a is not None and b is not None:
        raise Drop(f"both {one!r} and {many!r} given")
    if a is None and b is None:
        raise Drop(f"missing {one!r} (or {many!r})")
    if a is not None:
        if not isinstance(a, str):
            raise Drop(f"{one!r} must be a string", f"got {type(a).__name__}")
        return [a]
    items = b.split("|") if isinstance(b, str) else b
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise Drop(f"{many!r} must be a list of strings or a '|'-separated string", f"got {b!r}")
    if any(x == "" for x in items):
        raise Drop(f"{many!r} has an empty item", repr(b))
    return list(items)


@register("custom", CustomParams, "logit_diff", positions=("END",))
def build(tokenizer, params: CustomParams, ctx: BuildContext) -> TaskData:
    """A dataset from a JSONL/CSV file; targets answers (+1) and wrongs (-1); positions END."""
    tok = Tok(tokenizer, ctx, "custom")
    path = Path(params.path)
    if not path.is_absolute():
        path = Path(ctx.spec_dir) / path
    raw = _read_rows(path)
    if not raw:
        raise TaskError(f"custom: {path}: no rows (the dataset is empty)")
    if params.size is not None:
        raw = raw[: params.size]
    errors: list[str] = []
    examples: list[Example] = []
    for n, row in raw:
        where = f"{path.name}:{n}"
        try:
            if not isinstance(row, dict):
                raise Drop("row is not an object with named columns", f"got {type(row).__name__}")
            prompts = []
            for col in ("clean", "corrupted"):
                v = row.get(col)
                if not isinstance(v, str) or not v.strip():
                    raise Drop(f"missing or empty {col!r}", f"got {v!r}")
                prompts.append(v)
            clean, corrupted = prompts
            ids = tok.check_known(clean, "clean")
            cids = tok.check_known(corrupted, "corrupted")
            if len(ids) != len(cids):
                raise Drop("clean and corrupted prompts have different token lengths",
                           f"{len(ids)} vs {len(cids)}: {tok.show(ids)} / {tok.show(cids)}")
            answers, wrongs = _group(row, "answer", "answers"), _group(row, "wrong", "wrongs")
            a_ids = [tok.next_token(clean, params.join + a) for a in answers]
            w_ids = [tok.next_token(clean, params.join + w) for w in wrongs]
            both = sorted(set(a_ids) & set(w_ids))
            if both:
                raise Drop("a token is both an answer and a wrong", tok.show(both))
            examples.append(Example(ids, cids, a_ids + w_ids, [1.0] * len(a_ids) + [-1.0] * len(w_ids), {},
                                    clean, corrupted))
        except Drop as d:
            errors.append(f"{where}: {d.reason}" + (f" ({d.detail})" if d.detail else ""))
    if errors:
        shown = "\n  ".join(errors[:_MAX_SHOWN])
        more = f"\n  ... and {len(errors) - _MAX_SHOWN} more" if len(errors) > _MAX_SHOWN else ""
        raise TaskError(f"custom: {path}: {len(errors)} of {len(raw)} rows are invalid for this tokenizer:\n  {shown}{more}")
    min_size = params.min_size if params.min_size is not None else (params.size or 1)
    if len(examples) < min_size:
        raise TaskError(f"custom: {path}: {len(examples)} rows, fewer than min_size {min_size}")
    info = {"n_candidates": len(raw), "n_kept": len(examples), "n_duplicates": 0, "dropped": {}, "pools": {},
            "path": str(path),
            "params": params.model_dump(mode="json"), **tok.fingerprint_info()}
    return assemble("custom", examples, tok, params.metric, info)
