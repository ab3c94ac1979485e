"""Checkpoint integrity: which checkpoints are really the same weights under another name.

Checkpoint series are not always what their names say: Pythia's ``step0`` and ``step1`` hold identical
weights (EleutherAI/pythia#83), and some branches served the final weights instead of their step
(EleutherAI/pythia#205). A claim "evaluated" on such a checkpoint would silently repeat another
checkpoint's result, so the plugin reports every claim on a duplicate as not_evaluated
("duplicate of step0") instead.

Hashes come from ``CheckpointRef.weights_sha256()`` (``circuit_tests.models.weights_sha256``: names, dtypes,
shapes and bytes of every tensor), so two checkpoints are duplicates exactly when every tensor is equal.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from .errors import ModelLoadError
from .sources import CheckpointRef

__all__ = ["weights_hashes", "find_duplicates", "duplicate_reason"]


def weights_hashes(refs: Iterable[CheckpointRef]) -> dict[str, str]:
    """label -> weights sha256 for every ref that is available here; unavailable refs are left out."""
    out: dict[str, str] = {}
    for ref in refs:
        if ref.sha256_hint is None and ref.unavailable_reason() is not None:
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


def duplicate_reason(label: str, original: str, hashes: Mapping[str, str] | None = None) -> str:
    """The not_evaluated reason for a duplicate: ``duplicate of step0 (identical weights, sha256 1a2b3c4d5e6f)``."""
    sha = (hashes or {}).get(label)
    return f"duplicate of {original} (identical weights" + (f", sha256 {sha[:12]})" if sha else ")")
