"""Incremental runs: reuse a claim's result when nothing it depends on has changed.

Why: a pull request that touches nothing relevant should not re-load every checkpoint. A result is keyed by
everything that can change it, hashed together:

- ``claim``: the claim's own content (its YAML mapping, parsed) and resolved gate;
- ``spec``: the spec parts the claim depends on: name, model source/revision, task, circuit, ablation, gate and
  bootstrap defaults (not the other claims, not the checkpoint list, not comments);
- ``checkpoint``: label, step, weights sha256 (memoised across runs by path/size/mtime), the other files of the
  checkpoint directory (config, tokenizer) and whether it duplicates another checkpoint;
- ``task_data``: the content of every file a task parameter names (custom prompt files);
- ``code``: package version and a hash of every ``circuit_tests/**/*.py``;
- ``environment``: python, torch/transformers/transformer_lens versions, CPU kernels (``runtime.environment``).

Storage: pytest's ``config.cache`` (``--circuit-cache``) or a directory (``--circuit-cache-dir``); one JSON
value per key. Unavailable checkpoints are never cached (they cost nothing to re-check and may appear).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import ModelLoadError
from .results import Record

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
        try:
            return json.loads(self._path(key).read_text())
        except (OSError, json.JSONDecodeError):
            return default

    def set(self, key: str, value: Any) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        p = self._path(key)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(value, sort_keys=True))
        tmp.replace(p)  # atomic: a concurrent xdist worker never reads half a file


class ResultCache:
    """Claim results keyed by ``cache_key``; a hit returns the stored record marked ``extra['cache'] = 'reused'``."""

    PREFIX = "circuit_tests/results/"

    def __init__(self, store: Any):
        self.store = store
        self.hits = 0
        self.misses = 0

    def lookup(self, run: Any, ref: Any, index: int) -> tuple[str | None, Record | None]:
        parts = key_parts(run, ref, index)
        if parts is None:
            return None, None
        key = cache_key(parts)
        data = self.store.get(self.PREFIX + key, None)
        if not isinstance(data, dict):
            self.misses += 1
            return key, None
        try:
            rec = Record(**data)
        except TypeError:  # written by another Record layout (the code hash should have caught it)
            self.misses += 1
            return key, None
        loaded = run.loaded
        rec.spec_file, rec.line = str(loaded.path), loaded.line_of("claims", index)  # comments may have moved it
        rec.extra["cache"] = "reused"
        self.hits += 1
        return key, rec

    def store_record(self, key: str | None, rec: Record) -> None:
        if key is None:
            return
        data = json.loads(rec.to_json())
        data.get("extra", {}).pop("cache", None)
        self.store.set(self.PREFIX + key, data)


def reused(rec: Record) -> bool:
    return rec.extra.get("cache") == "reused"


def run_environment() -> dict[str, Any]:
    """``runtime.environment()`` plus this package's version and code hash: written into results files, so that
    ``circuit-tests merge`` can refuse shards produced by different code."""
    from .runtime import environment

    code = code_fingerprint()
    return {**environment(), "circuit_tests": code["version"], "code_sha256": code["code_sha256"]}
