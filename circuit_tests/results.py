"""Result records: one per (spec, checkpoint, claim), JSON-able, the single source for reports.

Three words per record, so a reader never has to guess what "pass" meant:

- ``measured``: the claim against its threshold at this checkpoint, before any expectation: ``pass`` | ``fail`` |
  ``not_evaluated`` (no trustworthy number: the model cannot do the task, a duplicate checkpoint, weights not
  here) | ``uncertain`` (``gate: ci`` and the interval straddles the threshold) | ``error`` (the checkpoint or the
  claim could not be evaluated: unreadable or tampered weights, weights not covering the config, NaN/inf).
- ``expected``: ``present`` (the claim must hold) or ``absent`` (before the claim's ``holds_from`` step).
- ``verdict``: ``measured`` after the expectation: before ``holds_from`` a claim that does not hold is ``pass``
  (absent as declared) and one that holds is ``fail`` (appeared early).
- ``outcome``: what pytest reports for the item: ``passed`` | ``failed`` | ``xfailed`` (absent as declared) |
  ``skipped`` (not evaluated / uncertain, unless ``--circuit-not-evaluated=fail`` / ``--circuit-strict``).
  The terminal table counts these, so its counts equal pytest's.

Files (``write_json``) are validated when read (``read_json``, pydantic) and described by the shipped JSON Schema
``circuit_tests/results.schema.json`` (``results_json_schema()``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict

SCHEMA_VERSION = 2

Verdict = Literal["pass", "fail", "not_evaluated", "uncertain", "error"]
Outcome = Literal["passed", "failed", "xfailed", "skipped"]
OUTCOMES: tuple[str, ...] = ("passed", "failed", "xfailed", "skipped")


def _head_entry(v: Any) -> Any:
    """A ``per_head`` entry: a score (role_score), null (not finite) or an object (role_check: earned, why, ...)."""
    if v is None or isinstance(v, dict) or (isinstance(v, (int, float)) and not isinstance(v, bool)):
        return v
    raise PydanticCustomError("head_entry", "Input should be a number, null or an object")


class AblationResult(TypedDict, total=False):
    """``extra.ablations[NAME]``: the claim under another ablation (recorded, not gated)."""

    __pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[misc]
    value: float | None
    ci_low: float | None
    ci_high: float | None
    outcome: str
    reason: str


class BaselineResult(TypedDict, total=False):
    """``extra.baseline``: the random-circuit baseline the claim was compared with."""

    __pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[misc]
    kind: str
    k: int
    seed: int
    match: str | None
    values: list[float | None]
    p50: float | None
    p95: float | None
    require: str | None
    required_value: float | None
    quantile: float | None
    margin: float | None
    beats: str


class Extra(TypedDict, total=False):
    """``Record.extra``: claim-type specific numbers. The keys reports read are typed (so a wrong type is a located
    error when a file is read, not a crash while rendering); any other key is kept as it is."""

    __pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[misc]
    baseline: BaselineResult
    ablations: dict[str, AblationResult]
    per_head: dict[str, Annotated[Any, AfterValidator(_head_entry)]]
    effects: dict[str, float | None]
    warnings: list[str]
    cache: str
    gate: str
    ci_method: str
    ci_level: float | None
    ci_resamples: int
    ci_seed: int


@dataclass
class Record:
    """One (spec, checkpoint, claim) result. New fields need a default (older records still read)."""

    spec: str
    spec_file: str
    line: int
    model: str
    checkpoint: str
    step: int | None
    claim: str
    claim_type: str
    outcome: Outcome  # what pytest reports: passed | failed | xfailed | skipped
    measured: Verdict  # the claim against its threshold, before the expectation
    expected: Literal["present", "absent"] = "present"
    verdict: Verdict | Literal[""] = ""  # measured after the expectation ("" only in hand-built records)
    value: float | None = None
    threshold_min: float | None = None
    threshold_max: float | None = None
    metric: str | None = None
    normalization: str | None = None
    ablation: str | None = None
    m_M: float | None = None
    m_Mprime: float | None = None
    m_C: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    kl: float | None = None
    max_kl: float | None = None
    n_examples: int | None = None
    weights_sha256: str | None = None
    gguf_sha256: str | None = None  # GGUF sources: the file the weights were dequantized from
    quantization: str | None = None  # GGUF sources: its quantization type (e.g. Q4_1)
    duplicate_of: str | None = None
    reason: str = ""
    extra: Extra = field(default_factory=Extra)

    def to_json(self) -> str:
        return json.dumps(finite(asdict(self)), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Record":
        return cls(**json.loads(text))

    @property
    def cell(self) -> str:
        """Short table cell: verdict and value."""
        v = "" if self.value is None else f" {self.value:.3g}"
        verdict = self.verdict or self.measured
        if verdict == "error":
            return "ERROR"
        if verdict == "not_evaluated":
            return "n.e."
        if verdict == "uncertain":  # gate: ci and the interval straddles the threshold
            return "unc." + v
        if self.expected == "absent":
            return ("absent" + v) if verdict == "pass" else ("EARLY" + v)
        return ("pass" if verdict == "pass" else "FAIL") + v


def pytest_outcome(verdict: str, expected: str, *, not_evaluated: str = "skip", strict: bool = False) -> str:
    """The pytest outcome of a claim item with this verdict: ``passed`` | ``failed`` | ``xfailed`` | ``skipped``.

    ``not_evaluated``: ``skip`` (default) or ``fail`` (``--circuit-not-evaluated``); ``strict``: an ``uncertain``
    claim fails (``--circuit-strict``) instead of being skipped. Anything unknown fails: never a silent pass.
    """
    if verdict == "pass":
        return "xfailed" if expected == "absent" else "passed"
    if verdict == "not_evaluated":
        return "failed" if not_evaluated == "fail" else "skipped"
    if verdict == "uncertain":
        return "failed" if strict else "skipped"
    return "failed"


def finite(obj: Any) -> Any:
    """``obj`` with every NaN/±inf float replaced by None (JSON has no NaN; the reason text says what happened)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def counts(records: list[Record]) -> dict[str, int]:
    """How many records per pytest outcome (``passed``, ``failed``, ``xfailed``, ``skipped``), in that order: the
    JSON ``counts``, and through ``count_line`` the terminal table's, the HTML page's and the step summary's."""
    out = {k: 0 for k in OUTCOMES}
    for r in records:
        out[r.outcome] = out.get(r.outcome, 0) + 1
    return out


def count_line(records: list[Record]) -> str:
    """``47 passed, 65 xfailed[, 3 reused]``: every report summarises with pytest's words, so each adds up to
    pytest's own summary line (claim-level verdict words appear only in cells)."""
    from .cache import reused

    parts = [f"{n} {k}" for k, n in counts(records).items() if n]
    n_reused = sum(map(reused, records))
    return ", ".join(parts + ([f"{n_reused} reused"] if n_reused else []))


def short_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it (how reports name spec files)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return path


def run_environment(threads: int | None = None) -> dict[str, Any]:
    """What a run's results file and its HTML page record as provenance: versions, CPU kernels, the code hash
    (``cache.run_environment``) and ``threads``, the torch threads the specs were evaluated with when given.
    One function, so a page written by ``pytest --circuit-report`` has the rows ``circuit-tests report`` shows."""
    from .cache import run_environment as env

    out = env()
    if threads is not None:
        out["threads"] = threads
    return out


def by_spec(records: list[Record]) -> dict[tuple[str, str], list[Record]]:
    """Records grouped per spec, ``{(spec_file, spec): [...]}``, in file order (for reports and plots)."""
    out: dict[tuple[str, str], list[Record]] = {}
    for r in records:
        out.setdefault((r.spec_file, r.spec), []).append(r)
    return dict(sorted(out.items()))


def checkpoint_order(records: list[Record]) -> list[str]:
    """The distinct checkpoint labels of ``records`` in training order (steps first; labels without a step,
    such as hub revisions, sort by label)."""
    return [ck for _, ck in sorted({(r.step if r.step is not None else -1, r.checkpoint) for r in records})]


@dataclass
class ResultsFile:
    """The ``--circuit-json`` file. ``complete`` is false when the run stopped early (Ctrl-C, ``-x``/``--maxfail``,
    an internal error), with ``incomplete_reason``; such a file is written next to the requested path
    (``partial_path``) so a previous complete file is never replaced by a partial one."""

    schema_version: Literal[2]
    complete: bool
    incomplete_reason: str | None
    counts: dict[str, int]
    environment: dict[str, Any]
    records: list[Record]


def partial_path(path: str | Path) -> Path:
    """Where an incomplete run's results go: ``results.json`` -> ``results.partial.json``."""
    p = Path(path)
    return p.with_name(f"{p.stem}.partial{p.suffix or '.json'}")


def write_json(records: list[Record], path: str | Path, *, complete: bool = True,
               incomplete_reason: str | None = None, environment: dict[str, Any] | None = None) -> Path:
    """Write the records (sorted, for stable diffs) with the schema version, completeness, per-outcome counts and
    the environment (versions, CPU kernels, threads: what bit-for-bit agreement with another run depends on).

    Atomic: written to a temporary file in the same directory, then renamed over ``path``; an interrupted write
    leaves the previous file intact. A missing directory is created. Raises CircuitTestsError with the path and
    the reason when it cannot be written (read-only directory, a file where a directory should be)."""
    from .errors import CircuitTestsError
    from .runtime import environment as current_environment

    p = Path(path)
    recs = sorted(records, key=lambda r: (r.spec_file, r.step if r.step is not None else -1, r.checkpoint, r.claim))
    doc = {"schema_version": SCHEMA_VERSION, "complete": complete, "incomplete_reason": incomplete_reason,
           "counts": counts(recs), "environment": environment if environment is not None else current_environment(),
           "records": [finite(asdict(r)) for r in recs]}
    text = json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n"
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        if p.is_dir():
            raise IsADirectoryError(f"{p} is a directory")
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, p)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        why = e.strerror or str(e)
        raise CircuitTestsError(f"cannot write results file {p}: {why}") from None
    return p


def read_json(path: str | Path) -> list[Record]:
    """Records from a file written by ``write_json`` (``--circuit-json``), validated; a one-line error otherwise."""
    return read_results(path).records


def read_results(path: str | Path) -> ResultsFile:
    """The whole results file, validated against the types above (pydantic); CircuitTestsError naming the file and
    the first problem (truncated JSON, another schema version, a record with a wrong field) otherwise."""
    from pydantic import TypeAdapter, ValidationError

    from .errors import CircuitTestsError

    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise CircuitTestsError(f"{p}: no such results file (write one with pytest --circuit-json {p})") from None
    except IsADirectoryError:
        raise CircuitTestsError(f"{p}: is a directory, not a results file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CircuitTestsError(f"{p}: not a circuit_tests results file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or "records" not in data:
        raise CircuitTestsError(f"{p}: not a circuit_tests results file (no 'records'; write one with --circuit-json)")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise CircuitTestsError(f"{p}: results schema version {data.get('schema_version')!r}, this circuit_tests reads "
                                f"{SCHEMA_VERSION} (re-run pytest --circuit-json to write a current file)")
    try:
        return TypeAdapter(ResultsFile).validate_python(data)
    except ValidationError as e:
        raise CircuitTestsError(f"{p}: malformed results file: {_located(e.errors()[0], data)}"
                                + (f" (and {e.error_count() - 1} more problem(s))" if e.error_count() > 1 else "")) from None


def _located(err: Any, data: dict[str, Any]) -> str:
    """One pydantic error as ``record 3 (spec, claim @ checkpoint): field extra.baseline.p50: expected a valid
    number, got str '<x>'``: where in the file, which field, what was expected, what was there."""
    loc = list(err["loc"])
    where = ""
    if len(loc) >= 2 and loc[0] == "records" and isinstance(loc[1], int):
        i = loc[1]
        rec = data["records"][i] if isinstance(data.get("records"), list) and i < len(data["records"]) else None
        what = ""
        if isinstance(rec, dict):
            what = " (" + ", ".join(str(rec.get(k))[:60] for k in ("spec", "claim") if k in rec)
            what += f" @ {str(rec.get('checkpoint'))[:60]})" if "checkpoint" in rec else ")"
        where, loc = f"record {i}{what if what != ' ()' else ''}: ", loc[2:]
    field = ".".join(str(x) for x in loc) or "(the record itself)"
    if err["type"] == "missing":
        return f"{where}field {field}: missing (required)"
    msg = "Input should be an object (a result record)" if err["type"] == "dataclass_type" else str(err["msg"])
    expected = msg[len("Input should be "):] if msg.startswith("Input should be ") else msg
    got = err.get("input")
    shown = repr(got)
    return f"{where}field {field}: expected {expected}, got {type(got).__name__} {shown[:60]}{'...' if len(shown) > 60 else ''}"


FIELD_DOCS = {
    "outcome": "what pytest reported for the item: passed | failed | xfailed (absent before holds_from, as "
               "declared) | skipped (not evaluated or uncertain, with the reason)",
    "measured": "the claim against its threshold at this checkpoint, before the expectation: pass | fail | "
                "not_evaluated (no trustworthy number) | uncertain (gate: ci, interval straddles the threshold) | "
                "error (the checkpoint or claim could not be evaluated; see reason)",
    "expected": "present (the claim must hold here) | absent (checkpoint before the claim's holds_from step)",
    "verdict": "measured after the expectation: before holds_from a claim that does not hold is pass and one "
               "that holds is fail (appeared early)",
    "value": "the measured number (faithfulness, role score, path ratio); null when not measured or not finite",
    "reason": "why the claim failed / was not evaluated / errored (file and cause for checkpoint errors)",
    "weights_sha256": "sha256 over the checkpoint's tensors (names, dtypes, shapes, bytes)",
    "duplicate_of": "the earlier checkpoint with identical weights (the claim is then not evaluated)",
}


def results_json_schema() -> dict[str, Any]:
    """The JSON Schema of results files (shipped as ``circuit_tests/results.schema.json``, checked by a test)."""
    from pydantic import TypeAdapter

    schema = TypeAdapter(ResultsFile).json_schema()
    for name, doc in FIELD_DOCS.items():
        schema["$defs"]["Record"]["properties"][name]["description"] = doc
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "circuit_tests results file (pytest --circuit-json)"
    return schema
