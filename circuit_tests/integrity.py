"""Checkpoint integrity: is this checkpoint really what its name says, and really the model its config describes?

Three faults would otherwise give silently wrong numbers:

- **Duplicates.** Checkpoint series are not always what their names say: Pythia's ``step0`` and ``step1`` hold
  identical weights (EleutherAI/pythia#83), and some branches served the final weights instead of their step
  (EleutherAI/pythia#205). A claim "evaluated" on such a checkpoint would silently repeat another checkpoint's
  result, so every claim on a duplicate is reported not_evaluated ("duplicate of step0") instead.
  Hashes come from ``CheckpointRef.weights_sha256()`` (``circuit_tests.models.weights_sha256``: names, dtypes,
  shapes and bytes of every tensor), so two checkpoints are duplicates exactly when every tensor is equal.
  ``DuplicateFinder`` hashes lazily, one checkpoint at a time and only as far back as needed, so a pytest-xdist
  worker hashes the checkpoints it runs and (with the cross-run hash cache) re-reads nothing on later runs.
- **Weights that do not cover the config.** transformers fills tensors missing from the weight files with random
  values (a config.json declaring more layers than the weights hold loads "fine", and passes or fails at random):
  ``missing_tensors`` asks transformers which tensors its load would have to invent.
- **Non-finite weights.** NaN/inf parameters make every number NaN: ``nonfinite_parameters`` names them.

Zoo checkpoints are also verified against the sha256 their manifest records (``CheckpointRef.weights_sha256``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ModelLoadError
from .sources import CheckpointRef

__all__ = ["weights_hashes", "find_duplicates", "duplicate_reason", "DuplicateFinder", "missing_tensors",
           "nonfinite_parameters", "check_loaded"]


def weights_hashes(refs: Iterable[CheckpointRef]) -> dict[str, str]:
    """label -> weights sha256 for every ref that is available here; unavailable or unreadable refs are left out."""
    out: dict[str, str] = {}
    for ref in refs:
        if ref.unavailable_reason() is not None:
            continue
        try:
            out[ref.label] = ref.weights_sha256()
        except ModelLoadError:
            continue
    return out


def find_duplicates(refs: Sequence[CheckpointRef], hashes: Mapping[str, str]) -> dict[str, str]:
    """Map each checkpoint whose weights equal an earlier one's to the earliest such label.

    "Earlier" is the order of ``refs`` (``resolve_checkpoints`` sorts by step). Refs without a hash (not
    available here) are neither duplicates nor originals. Example: Pythia step0/step1/step2 with
    step0 == step1 gives ``{"step1": "step0"}``.
    """
    first_with: dict[str, str] = {}
    dups: dict[str, str] = {}
    for ref in refs:
        sha = hashes.get(ref.label)
        if sha is None:
            continue
        if sha in first_with:
            dups[ref.label] = first_with[sha]
        else:
            first_with[sha] = ref.label
    return dups


class DuplicateFinder:
    """Lazy, per-checkpoint duplicate detection over an ordered series of refs.

    ``sha256(ref)`` hashes one checkpoint (ModelLoadError when it cannot be read or fails its manifest);
    ``original_of(ref)`` hashes the earlier checkpoints only until one matches. A checkpoint that cannot be hashed
    is never an original (its own items report why). ``store`` persists hashes across runs (pytest's cache).
    """

    def __init__(self, refs: Sequence[CheckpointRef], store: Any = None,
                 hash_fn: Callable[[CheckpointRef], str] | None = None):
        self.refs = list(refs)
        self.store = store
        self._hash_fn = hash_fn
        self._sha: dict[str, str | ModelLoadError] = {}

    def sha256(self, ref: CheckpointRef) -> str:
        got = self._sha.get(ref.label)
        if got is None:
            try:
                got = self._hash_fn(ref) if self._hash_fn is not None else ref.weights_sha256(self.store)
            except ModelLoadError as e:
                got = e
            self._sha[ref.label] = got
        if isinstance(got, ModelLoadError):
            raise got
        return got

    def original_of(self, ref: CheckpointRef) -> str | None:
        """The earliest checkpoint before ``ref`` with identical weights, or None."""
        mine = self.sha256(ref)
        for earlier in self.refs:
            if earlier.label == ref.label:
                return None
            if earlier.unavailable_reason() is not None:
                continue
            try:
                if self.sha256(earlier) == mine:
                    return earlier.label
            except ModelLoadError:
                continue
        return None


def duplicate_reason(label: str, original: str, hashes: Mapping[str, str] | None = None) -> str:
    """The not_evaluated reason for a duplicate: ``duplicate of step0 (identical weights, sha256 1a2b3c4d5e6f)``."""
    sha = (hashes or {}).get(label)
    return f"duplicate of {original} (identical weights" + (f", sha256 {sha[:12]})" if sha else ")")


# ----------------------------------------------------------------------------------------------------------------
# Does the loaded model hold what its weight files hold?
# ----------------------------------------------------------------------------------------------------------------

_MISSING_MEMO: dict[str, list[str] | None] = {}
_MAX_HEADER = 64 * 2**20  # a safetensors header larger than this is not read for the memo key (no memo)


def _layout_key(d: Path) -> str | None:
    """sha256 over what transformers' missing-key report reads: config.json's bytes, the names of the weight files
    and each safetensors header (tensor names, dtypes, shapes, offsets). None when that cannot be read cheaply (no
    config, a ``.bin`` weight file, an unreadable or oversized header): then nothing is memoised.

    Checkpoints of one sweep share a layout, so the meta-device load runs once per layout, not per checkpoint.
    """
    files = sorted(d.glob("*.safetensors"))
    if not files or any(d.glob("pytorch_model*.bin")):
        return None
    h = hashlib.sha256()
    try:
        h.update((d / "config.json").read_bytes())
        index = d / "model.safetensors.index.json"
        h.update(index.read_bytes() if index.is_file() else b"-")
        for f in files:
            with open(f, "rb") as fh:
                head = fh.read(8)
                if len(head) != 8:
                    return None
                n = int.from_bytes(head, "little")
                if n > _MAX_HEADER:
                    return None
                body = fh.read(n)
                if len(body) != n:
                    return None
            h.update(f.name.encode() + b"\0" + head + body)
    except OSError:
        return None
    return h.hexdigest()


def missing_tensors(model_dir: str | Path) -> list[str] | None:
    """Parameters the directory's config.json needs that its weight files do not hold (transformers would fill them
    with random values), sorted; None when transformers cannot build the config's model here (check skipped).

    Asks transformers itself (``from_pretrained(..., output_loading_info=True)``) on the meta device: its own
    renames, tied weights and base-model prefixes apply, no tensor data is read, ~15 ms for a tiny model: more than
    loading it, so the answer is memoised per process by ``_layout_key`` (the answer depends on nothing else).
    """
    d = Path(model_dir)
    key = _layout_key(d)
    if key is not None and key in _MISSING_MEMO:
        found = _MISSING_MEMO[key]
    else:
        found = _missing_tensors(d)
        if key is not None:
            _MISSING_MEMO[key] = found
    return None if found is None else list(found)


def _missing_tensors(d: Path) -> list[str] | None:
    import logging
    import os

    tf_log = logging.getLogger("transformers")
    level = tf_log.level
    tf_log.setLevel(logging.ERROR)  # its load report lists the missing keys on stderr; we report them instead
    kernels = os.environ.get("USE_HUB_KERNELS")
    os.environ["USE_HUB_KERNELS"] = "NO"  # transformers >= 5.25 would kernelize the model, which fails on "meta"
    try:
        from transformers import AutoModelForCausalLM

        _, info = AutoModelForCausalLM.from_pretrained(str(d), output_loading_info=True, device_map="meta")
    except Exception:
        return None
    finally:
        tf_log.setLevel(level)
        if kernels is None:
            os.environ.pop("USE_HUB_KERNELS", None)
        else:
            os.environ["USE_HUB_KERNELS"] = kernels
    return sorted(info.get("missing_keys") or [])


def nonfinite_parameters(module: Any, limit: int = 5) -> list[str]:
    """Names of parameters holding NaN or ±inf (at most ``limit``), ``name (NaN)`` / ``name (inf)``."""
    import torch

    bad: list[str] = []
    for name, p in module.named_parameters():
        if not torch.isfinite(p).all():
            kind = "NaN" if torch.isnan(p).any() else "inf"
            bad.append(f"{name.replace('._original_component', '')} ({kind})")
            if len(bad) >= limit:
                break
    return bad


def check_loaded(ref: CheckpointRef, bridge: Any) -> None:
    """ModelLoadError when a loaded checkpoint's weights do not cover its config or are not finite."""
    d = ref.local_dir()
    if d is not None and (d / "config.json").is_file():
        missing = missing_tensors(d)
        if missing:
            shown = ", ".join(missing[:6]) + (f", … ({len(missing)} in all)" if len(missing) > 6 else "")
            raise ModelLoadError(f"{d}: the weights do not cover {d / 'config.json'}: {len(missing)} tensor(s) the "
                                 f"config needs are not in the weight files ({shown}); transformers would fill them "
                                 "with random values (does config.json declare more layers or a larger shape than "
                                 "the weights hold?)")
    hf = getattr(bridge, "original_model", None)
    bad = nonfinite_parameters(hf if hf is not None else bridge)
    if bad:
        where = d if d is not None else ref.display
        raise ModelLoadError(f"{where}: non-finite weights: {', '.join(bad)}; every measurement would be NaN")
