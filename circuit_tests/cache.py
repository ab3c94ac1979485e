"""Incremental runs: reuse a claim's result when nothing it depends on has changed.

Why: a pull request that touches nothing relevant should not re-load every checkpoint. A result is keyed by
everything that can change it, hashed together:

- ``claim``: the claim's own content (its YAML mapping, parsed) and resolved gate;
- ``spec``: the spec parts the claim depends on: name, model source/revision, task, circuit, ablation, gate and
  bootstrap defaults (not the other claims, not the checkpoint list, not comments);
- ``checkpoint``: label, step, weights sha256 (memoised across runs by each weight file's device, inode, ctime,
  size and mtime: an in-place rewrite changes ctime, which ``utime`` cannot restore), the other files of the
  checkpoint directory (config, tokenizer) and whether it duplicates another checkpoint;
- ``task_data``: the content of every file a task parameter names (custom prompt files);
- ``code``: package version and a hash of every ``circuit_tests/**/*.py``;
- ``environment``: python, torch/transformers/transformer_lens versions, CPU kernels (``runtime.environment``).

Storage: pytest's ``config.cache`` (``--circuit-cache``) or a directory (``--circuit-cache-dir``); one JSON
value per key. Unavailable checkpoints are never cached (they cost nothing to re-check and may appear).

Checked, not trusted: a cache directory is as writable as the workspace, so a stored entry is re-validated before
it is reused (``check_entry``): the record's fields and types (the types ``results.schema.json`` is generated
from), that it belongs to this spec, claim and checkpoint (and these weights), that its thresholds are the claim's,
and that ``measured`` and ``verdict`` follow from its numbers (``stats.gate``, the random baseline's
``require_level``, ``runner._apply_expectation``). Anything else is a miss with a ``CacheWarning`` naming the key
and the reason; the claim is then measured and the entry overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from dataclasses import fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from .errors import ModelLoadError
from .results import Record, finite

log = logging.getLogger("circuit_tests")

KEY_PARTS = ("claim", "spec", "checkpoint", "task_data", "code", "environment")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tree_sha256(root: Path, pattern: str = "*.py") -> str:
    """sha256 over the relative paths and contents of the files below ``root`` matching ``pattern``."""
    h = hashlib.sha256()
    for p in sorted(root.rglob(pattern)):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


@lru_cache(maxsize=None)
def code_fingerprint() -> dict[str, str | None]:
    """Package version and a sha256 over every module of the package (memoised: the code of this process)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v: str | None = version("circuit-tests")
    except PackageNotFoundError:
        v = None
    return {"version": v, "code_sha256": tree_sha256(Path(__file__).resolve().parent)}


def environment_fingerprint() -> dict[str, Any]:
    """The runtime environment, with torch imported so the CPU kernels are known."""
    from .runtime import configure, environment

    configure()
    return environment()


def _file_sha(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_files(d: Path | None) -> dict[str, str]:
    """sha256 of the non-weight files of a checkpoint directory (config, tokenizer, manifest)."""
    if d is None or not Path(d).is_dir():
        return {}
    return {p.name: _file_sha(p) for p in sorted(Path(d).iterdir()) if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES)}


def task_data(params: dict[str, Any], spec_dir: Path) -> dict[str, str]:
    """sha256 of every file a task parameter names (relative to the spec's directory)."""
    out = {}
    for k, v in sorted(params.items()):
        if isinstance(v, str) and v and len(v) < 4096:
            p = (spec_dir / v)
            try:
                if p.is_file():
                    out[k] = _file_sha(p)
            except OSError:
                continue
    return out


def key_parts(run: Any, ref: Any, index: int) -> dict[str, Any] | None:
    """Everything claim ``index`` at ``ref`` depends on, by part (None: not cacheable: unavailable, or weights
    that cannot be hashed, whose error record ``measure_claim`` then writes). Hashes come from the run's lazy
    duplicate finder, so the evaluation that may follow reuses them."""
    if ref.unavailable_reason() is not None:
        return None
    loaded, spec = run.loaded, run.loaded.spec
    claim = spec.claims[index]
    dups = run.duplicates()
    try:
        sha = dups.sha256(ref)
        dup = dups.original_of(ref)
    except ModelLoadError:
        return None
    spec_part = {"name": spec.name, "model": {"source": spec.model.source, "revision": spec.model.revision},
                 "task": spec.task.model_dump(mode="json"), "circuit": spec.circuit.model_dump(mode="json"),
                 "ablation": spec.ablation, "gate": spec.gate if "gate" in spec.model_fields_set else None,
                 "bootstrap": spec.bootstrap.model_dump(mode="json")}
    return {
        "claim": {"id": spec.claim_ids()[index], "content": claim.model_dump(mode="json"), "gate": run.gate_of(claim)},
        "spec": spec_part,
        "checkpoint": {"label": ref.label, "step": ref.step, "weights_sha256": sha, "duplicate_of": dup,
                       "files": checkpoint_files(ref.local_dir())},
        "task_data": task_data(spec.task.params, loaded.dir),
        "code": code_fingerprint(),
        "environment": environment_fingerprint(),
    }


def cache_key(parts: dict[str, Any]) -> str:
    return _digest({k: parts[k] for k in KEY_PARTS})


class DirStore:
    """A ``get``/``set`` store of JSON values in a directory (same interface as pytest's ``config.cache``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / (key.replace("/", "__") + ".json")

    def get(self, key: str, default: Any) -> Any:
        """The stored value, or ``default`` when there is none; an unreadable entry (truncated or non-JSON bytes,
        nesting too deep to parse) is also ``default``, with a ``CacheWarning``: a cache never ends a run."""
        p = self._path(key)
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return default
        except (OSError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
            cache_warning(key, f"unreadable entry {p} ({type(e).__name__}: {str(e)[:200]})")
            return default

    def set(self, key: str, value: Any) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        p = self._path(key)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(value, sort_keys=True))
        tmp.replace(p)  # atomic: a concurrent xdist worker never reads half a file


class CacheWarning(UserWarning):
    """A cache entry was not reused (malformed, inconsistent or not this claim's) or could not be stored."""


def cache_warning(key: str, reason: str, outcome: str = "treated as a miss (the claim is measured again)") -> None:
    """Warn that cache entry ``key`` was not used (or not stored), and why. Under ``-W error`` the warning would
    raise inside the item; then it goes to the ``circuit_tests`` log instead: a cache problem never fails a claim."""
    text = f"circuit_tests cache: entry {key}: {reason}; {outcome}"
    try:
        warnings.warn(text, CacheWarning, stacklevel=3)
    except Warning:
        log.warning("%s", text)


class InvalidEntry(Exception):
    """Internal: why a stored record cannot be reused (``ResultCache.lookup`` turns it into a miss + warning)."""


# The thresholds each claim type writes into its record (claims.py), from the claim: (min, max, max_kl). A type not
# listed here (one registered by a user) is not cached: its verdict could not be re-derived from a stored record.
_THRESHOLDS: dict[str, Callable[[Any], tuple[float | None, float | None, float | None]]] = {
    "faithfulness": lambda c: (c.min, c.max, c.max_kl),
    "role_score": lambda c: (c.min, None, None),
    "path_ratio": lambda c: (c.min, c.max, None),
    "role_check": lambda c: (1.0, None, None),
}
_RECORD_FIELDS = frozenset(f.name for f in fields(Record))


@lru_cache(maxsize=1)
def _record_adapter() -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(Record)


def _shown(x: Any) -> str:
    s = repr(x)
    return s if len(s) <= 60 else s[:57] + "..."


def _same(a: float | None, b: float | None) -> bool:
    """Equal numbers (up to float noise from a JSON round trip), or both absent."""
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def validate_record(data: Any) -> Record:
    """A stored value as a ``Record``, type-checked field by field (pydantic, strict: the types the results JSON
    Schema is generated from, so no jsonschema is needed at run time); InvalidEntry naming the first bad field."""
    from pydantic import ValidationError

    if not isinstance(data, dict):
        raise InvalidEntry(f"not a result record (a JSON {type(data).__name__})")
    unknown = sorted(str(k) for k in data if k not in _RECORD_FIELDS)
    if unknown:
        raise InvalidEntry(f"unknown field(s) {', '.join(_shown(k) for k in unknown[:5])}")
    try:
        if finite(data) != data:
            raise InvalidEntry("a non-finite number (NaN/Infinity) in the record")
        return _record_adapter().validate_json(json.dumps(data), strict=True)
    except RecursionError:  # parsed, but nested too deeply to walk here
        raise InvalidEntry("nested too deeply") from None
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "(the record)"
        bad = err.get("input")
        got = "missing" if err["type"] == "missing" else f"got {type(bad).__name__} {_shown(bad)}"
        raise InvalidEntry(f"field {where}: {err['msg']} ({got})") from None


def _reason_kind(rec: Record, claim: Any) -> str:
    """``cannot_do_task`` when the record's own numbers put the full model's effect below the claim's floor
    (measures.faithfulness / measures.path_ratio), else ""."""
    from .measures import CANNOT_DO_TASK, DEFAULT_MIN_EFFECT

    if claim.type == "faithfulness" and rec.m_M is not None and rec.metric in DEFAULT_MIN_EFFECT:
        floor = claim.min_effect if claim.min_effect is not None else DEFAULT_MIN_EFFECT[rec.metric]
        if rec.normalization == "ratio":
            den = rec.m_M
        elif rec.m_Mprime is not None:
            den = rec.m_M - rec.m_Mprime
        else:
            raise InvalidEntry("m_Mprime missing for a normalized faithfulness value")
        return CANNOT_DO_TASK if den < floor else ""
    x = rec.extra
    numbers = (x.get("m_clean"), x.get("m_corrupted"))
    if claim.type == "path_ratio" and all(isinstance(v, (int, float)) for v in numbers):
        floor = claim.min_effect if claim.min_effect is not None else DEFAULT_MIN_EFFECT.get(rec.metric or "", 0.05)
        return CANNOT_DO_TASK if x["m_clean"] - x["m_corrupted"] < floor else ""
    return ""


def _derived_measured(rec: Record, claim: Any, gate_mode: str, bounds: tuple[float | None, ...]) -> str:
    """``measured`` as the claim type derives it from a value (measures.py, baseline.py): the threshold gate, then
    for faithfulness max_kl and the random baseline; InvalidEntry where the record's numbers disagree."""
    from .baseline import require_level
    from .stats import UNCERTAIN, gate, normalized, ratio_of_means

    if rec.value is None:
        raise InvalidEntry("no value to gate")
    lo, hi, max_kl = bounds
    if claim.type != "faithfulness":
        return gate(rec.value, None, None, lo, hi, "point")
    if rec.normalization != claim.normalization:
        raise InvalidEntry(f"normalization {rec.normalization!r}, the claim asks for {claim.normalization!r}")
    if rec.m_M is not None and rec.m_C is not None:  # the value is a function of the recorded means
        want = (ratio_of_means(rec.m_C, rec.m_M) if claim.normalization == "ratio" or rec.m_Mprime is None
                else normalized(rec.m_C, rec.m_M, rec.m_Mprime))
        if not _same(float(want), rec.value):
            raise InvalidEntry(f"value {rec.value!r} does not follow from m(C), m(M), m(M') (gives {float(want)!r})")
    out = gate(rec.value, rec.ci_low, rec.ci_high, lo, hi, gate_mode)
    if max_kl is not None:
        if rec.kl is None:
            raise InvalidEntry(f"no kl recorded for max_kl {max_kl:g}")
        if rec.kl > max_kl:
            out = "fail"
    if claim.baseline is not None:
        import numpy as np

        b = rec.extra.get("baseline")
        if not isinstance(b, dict):
            raise InvalidEntry("no random-baseline result recorded for a claim with a baseline")
        vals = np.array([v for v in b.get("values", []) if v is not None], dtype=np.float64)
        need = require_level(claim.baseline.require, vals) if len(vals) else None
        if not _same(need, b.get("required_value")):
            raise InvalidEntry(f"baseline required_value {b.get('required_value')!r} does not follow from its values")
        if need is not None:
            beats = gate(rec.value, rec.ci_low, rec.ci_high, need, None, gate_mode)
            if beats != "pass" and out != "fail":
                out = "fail" if beats == "fail" else (UNCERTAIN if out == "pass" else out)
    return out


def check_entry(rec: Record, run: Any, ref: Any, index: int, parts: dict[str, Any]) -> None:
    """InvalidEntry unless ``rec`` is claim ``index`` of this spec at ``ref`` with these weights, with the claim's
    thresholds and expectation, and ``measured``/``verdict`` are what its numbers give."""
    from .runner import _apply_expectation

    spec = run.loaded.spec
    claim = spec.claims[index]
    ck = parts["checkpoint"]
    for what, got, want in (("spec", rec.spec, spec.name), ("claim", rec.claim, spec.claim_ids()[index]),
                            ("claim_type", rec.claim_type, claim.type), ("model", rec.model, spec.model.source),
                            ("checkpoint", rec.checkpoint, ref.label), ("step", rec.step, ref.step)):
        if got != want:
            raise InvalidEntry(f"{what} {_shown(got)}, looked up for {_shown(want)}")
    early_error = rec.measured == "error"  # an error before hashing (e.g. GGUF provenance) records no sha/duplicate
    if rec.duplicate_of != ck["duplicate_of"] and not (early_error and rec.duplicate_of is None):
        raise InvalidEntry(f"duplicate_of {_shown(rec.duplicate_of)}, the checkpoint's is {_shown(ck['duplicate_of'])}")
    if rec.weights_sha256 != ck["weights_sha256"] and not (early_error and rec.weights_sha256 is None):
        raise InvalidEntry(f"weights_sha256 {_shown(rec.weights_sha256)}, "
                           f"the weights hash to {ck['weights_sha256'][:16]}…")
    holds_from = getattr(claim, "holds_from", None)
    expected = "absent" if holds_from is not None and ref.step is not None and ref.step < holds_from else "present"
    if rec.expected != expected:
        raise InvalidEntry(f"expected {rec.expected!r}, the claim's holds_from gives {expected!r}")
    bounds = _THRESHOLDS[claim.type](claim)
    stored = (rec.threshold_min, rec.threshold_max, rec.max_kl)
    if not all(map(_same, stored, bounds)) and not (rec.value is None and stored == (None, None, None)):
        raise InvalidEntry(f"thresholds (min, max, max_kl) {stored}, the claim's are {bounds}")
    if rec.measured == "error":  # checkpoint/claim errors skip the expectation (runner._measure_into)
        if rec.value is not None or rec.verdict != "error":
            raise InvalidEntry(f"measured 'error' with value {rec.value!r} and verdict {rec.verdict!r}")
        return
    if ck["duplicate_of"] is not None:  # a duplicate is never measured
        if (rec.value, rec.measured, rec.verdict) != (None, "not_evaluated", "not_evaluated"):
            raise InvalidEntry(f"a duplicate checkpoint's record says {rec.measured!r}/{rec.verdict!r}")
        return
    kind = _reason_kind(rec, claim)
    if rec.value is None:
        if rec.measured != "not_evaluated":
            raise InvalidEntry(f"measured {rec.measured!r} without a value")
        if claim.type == "faithfulness" and rec.m_M is not None and not kind:
            raise InvalidEntry("not_evaluated, but its m(M) clears the claim's floor")
    else:
        if kind:
            raise InvalidEntry(f"measured {rec.measured!r}, but its numbers say the model cannot do the task")
        gate_mode = run.gate_of(claim) if claim.type == "faithfulness" else "point"
        derived = _derived_measured(rec, claim, gate_mode, bounds)
        if rec.measured != derived:
            raise InvalidEntry(f"measured {rec.measured!r}, its value {rec.value!r} against the claim's thresholds "
                               f"gives {derived!r}")
    verdict = _apply_expectation(replace(rec, extra={}), kind, holds_from)
    if rec.verdict != verdict:
        raise InvalidEntry(f"verdict {rec.verdict!r}, measured {rec.measured!r} with expectation {rec.expected!r} "
                           f"gives {verdict!r}")


class ResultCache:
    """Claim results keyed by ``cache_key``; a hit returns the stored record marked ``extra['cache'] = 'reused'``,
    after ``check_entry`` (any doubt is a miss with a ``CacheWarning``)."""

    PREFIX = "circuit_tests/results/"

    def __init__(self, store: Any):
        self.store = store
        self.hits = 0
        self.misses = 0

    def _miss(self, key: str, reason: str | None = None) -> tuple[str, None]:
        if reason is not None:
            cache_warning(self.PREFIX + key, reason)
        self.misses += 1
        return key, None

    def lookup(self, run: Any, ref: Any, index: int) -> tuple[str | None, Record | None]:
        """``(key, record)`` on a hit, ``(key, None)`` on a miss (store the measured record under ``key``),
        ``(None, None)`` when the claim is not cacheable here."""
        parts = key_parts(run, ref, index)
        if parts is None or run.loaded.spec.claims[index].type not in _THRESHOLDS:
            return None, None
        key = cache_key(parts)
        try:
            data = self.store.get(self.PREFIX + key, None)
        except Exception as e:  # any store failure (pytest's cache on a deeply nested entry): a miss, never a crash
            return self._miss(key, f"unreadable entry ({type(e).__name__}: {str(e)[:200]})")
        if data is None:
            return self._miss(key)
        try:
            rec = validate_record(data)
            check_entry(rec, run, ref, index, parts)
        except InvalidEntry as e:
            return self._miss(key, str(e))
        loaded = run.loaded
        rec.spec_file, rec.line = str(loaded.path), loaded.line_of("claims", index)  # comments may have moved it
        rec.extra["cache"] = "reused"
        self.hits += 1
        return key, rec

    def store_record(self, key: str | None, rec: Record) -> None:
        """Store ``rec`` under ``key``; a store that cannot be written (read-only, full) warns and keeps the run."""
        if key is None:
            return
        data = json.loads(rec.to_json())
        data.get("extra", {}).pop("cache", None)
        try:
            self.store.set(self.PREFIX + key, data)
        except OSError as e:
            cache_warning(self.PREFIX + key, f"cannot be written ({type(e).__name__}: {e.strerror or e})",
                          "the result is not cached")


def reused(rec: Record) -> bool:
    return rec.extra.get("cache") == "reused"


def run_environment() -> dict[str, Any]:
    """``runtime.environment()`` plus this package's version and code hash: written into results files, so that
    ``circuit-tests merge`` can refuse shards produced by different code."""
    from .runtime import environment

    code = code_fingerprint()
    return {**environment(), "circuit_tests": code["version"], "code_sha256": code["code_sha256"]}
