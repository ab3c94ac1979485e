"""Merge the results files of shards (CI matrix jobs, separate machines) into one.

Why strict: a merged report is only meaningful when every shard ran the same code on distinct items. So the
merge refuses shards whose ``code_sha256`` (or package version) differ, a file without one, and any item
(spec file, spec, checkpoint, claim) present in two shards — naming the item and both files. Environments
that differ otherwise (another CPU on another runner) are kept, per key, as the list of distinct values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .errors import CircuitTestsError
from .results import Record, read_results, write_json

CODE_KEYS = ("code_sha256", "circuit_tests")


def _item(r: Record) -> tuple[str, str, str, str]:
    return (r.spec_file, r.spec, r.checkpoint, r.claim)


def merge_files(paths: Sequence[str | Path]) -> tuple[list[Record], dict[str, Any], bool, str | None]:
    """Records, merged environment, completeness and the incomplete shards' reasons; CircuitTestsError on conflicts."""
    if not paths:
        raise CircuitTestsError("merge: no results files given")
    files = [(Path(p), read_results(p)) for p in paths]
    first_path, first = files[0]
    for key in CODE_KEYS:
        if key not in first.environment:
            raise CircuitTestsError(f"{first_path}: no {key} in its environment (written by an older circuit_tests "
                                    "or not by pytest --circuit-json); cannot check that the shards ran the same code")
    for p, f in files[1:]:
        for key in CODE_KEYS:
            if f.environment.get(key) != first.environment.get(key):
                raise CircuitTestsError(f"mixed code versions: {first_path} has {key} {first.environment.get(key)!r}, "
                                        f"{p} has {f.environment.get(key)!r}; re-run the shards on one commit")
    seen: dict[tuple[str, str, str, str], Path] = {}
    records: list[Record] = []
    for p, f in files:
        for r in f.records:
            k = _item(r)
            if k in seen:
                where = "twice in" if seen[k] == p else f"in {seen[k]} and in"
                raise CircuitTestsError(f"duplicated item {r.spec} @ {r.checkpoint}: {r.claim} ({r.spec_file}) "
                                        f"{where} {p}; shards must not overlap")
            seen[k] = p
            records.append(r)
    env: dict[str, Any] = {}
    for key in dict.fromkeys(k for _, f in files for k in f.environment):
        vals = list(dict.fromkeys(repr(f.environment.get(key)) for _, f in files))
        env[key] = first.environment.get(key) if len(vals) == 1 else [f.environment.get(key) for _, f in files]
    reasons = [f"{p}: {f.incomplete_reason or 'incomplete'}" for p, f in files if not f.complete]
    return records, env, not reasons, "; ".join(reasons) or None


def merge(paths: Sequence[str | Path], out: str | Path) -> tuple[Path, int]:
    """Write the merged file to ``out``; return its path and the number of records."""
    records, env, complete, reason = merge_files(paths)
    path = write_json(records, out, complete=complete, incomplete_reason=reason, environment=env)
    return Path(path) if path is not None else Path(out), len(records)
