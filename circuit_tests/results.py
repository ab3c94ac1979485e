"""Result records: one per (spec, checkpoint, claim), JSON-able, the single source for reports.

Outcome is tri-state: ``pass``, ``fail``, ``not_evaluated`` — after the spec's expectation is applied
(``expected: absent`` before ``holds_from``: a claim that does not hold there is a pass, one that holds is
a failure "appeared early"). ``measured`` keeps the raw outcome against the threshold.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


@dataclass
class Record:
    spec: str
    spec_file: str
    line: int
    model: str
    checkpoint: str
    step: int | None
    claim: str
    claim_type: str
    outcome: str  # pass | fail | not_evaluated
    measured: str  # pass | fail | not_evaluated (before expectation)
    expected: str = "present"  # present | absent
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
    duplicate_of: str | None = None
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Record":
        return cls(**json.loads(text))

    @property
    def cell(self) -> str:
        """Short table cell: outcome and value."""
        v = "" if self.value is None else f" {self.value:.3g}"
        if self.outcome == "not_evaluated":
            return "n.e."
        if self.expected == "absent":
            return ("absent" + v) if self.outcome == "pass" else ("EARLY" + v)
        return ("pass" if self.outcome == "pass" else "FAIL") + v


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


def write_json(records: list[Record], path: str | Path) -> None:
    """Write every record with a schema version and the environment (versions, CPU kernels, threads: what
    bit-for-bit agreement with another run depends on), sorted for stable diffs."""
    from .runtime import environment

    recs = sorted(records, key=lambda r: (r.spec_file, r.step if r.step is not None else -1, r.checkpoint, r.claim))
    Path(path).write_text(json.dumps({"schema_version": SCHEMA_VERSION, "environment": environment(),
                                      "records": [asdict(r) for r in recs]}, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> list[Record]:
    """Records from a file written by ``write_json`` (``--circuit-json``); a clear error for anything else."""
    from .errors import CircuitTestsError

    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise CircuitTestsError(f"{p}: no such results file (write one with pytest --circuit-json {p})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CircuitTestsError(f"{p}: not a circuit_tests results file ({e})") from None
    if not isinstance(data, dict) or "records" not in data:
        raise CircuitTestsError(f"{p}: not a circuit_tests results file (no 'records'; write one with --circuit-json)")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise CircuitTestsError(f"{p}: results schema version {data.get('schema_version')!r}, this circuit_tests reads "
                                f"{SCHEMA_VERSION}")
    try:
        return [Record(**r) for r in data["records"]]
    except TypeError as e:
        raise CircuitTestsError(f"{p}: malformed record ({e})") from None
