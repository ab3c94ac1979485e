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
- **A config that is not the weights' model.** A bare ``{"model_type": "gpt_neox"}`` next to a tiny model's weights
  describes the library's default ~20B-parameter model; building it (transformers initialises every tensor the files
  do not fit) takes tens of GB before any load error. ``check_config_fits_weights`` runs before every load
  (``models.load_bridge``, which every local, zoo and converted-GGUF route goes through): it reads the safetensors
  headers only, sizes the config's model from 1- and 2-layer meta-device builds (allocation-free), and refuses a
  tensor whose config-implied shape differs from the file's, or a parameter count the weight files cannot hold.
- **Non-finite weights.** NaN/inf parameters make every number NaN: ``nonfinite_parameters`` names them.

Zoo checkpoints are also verified against the sha256 their manifest records (``CheckpointRef.weights_sha256``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelLoadError
from .sources import CheckpointRef

__all__ = ["weights_hashes", "find_duplicates", "duplicate_reason", "DuplicateFinder", "missing_tensors",
           "nonfinite_parameters", "check_loaded", "check_config_fits_weights", "safetensors_headers"]


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

@dataclass(frozen=True)
class _MetaReport:
    """What transformers' meta-device load of a directory reports (no tensor data read)."""

    missing: tuple[str, ...]  # tensors the config needs that the files lack (transformers would invent them)
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]  # (name, file shape, config shape)


_MISSING_MEMO: dict[str, _MetaReport | None] = {}
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
    found = _meta_report(Path(model_dir))
    return None if found is None else list(found.missing)


def _meta_report(d: Path) -> _MetaReport | None:
    """``_missing_tensors(d)``, memoised by ``_layout_key``."""
    key = _layout_key(d)
    if key is not None and key in _MISSING_MEMO:
        return _MISSING_MEMO[key]
    found = _missing_tensors(d)
    if key is not None:
        _MISSING_MEMO[key] = found
    return found


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' load report goes to stderr (we report instead); hub kernels off (they fail on "meta")."""
    import logging

    tf_log = logging.getLogger("transformers")
    level = tf_log.level
    tf_log.setLevel(logging.ERROR)
    kernels = os.environ.get("USE_HUB_KERNELS")
    os.environ["USE_HUB_KERNELS"] = "NO"  # transformers >= 5.25 would kernelize the model, which fails on "meta"
    try:
        yield
    finally:
        tf_log.setLevel(level)
        if kernels is None:
            os.environ.pop("USE_HUB_KERNELS", None)
        else:
            os.environ["USE_HUB_KERNELS"] = kernels


def _missing_tensors(d: Path) -> _MetaReport | None:
    """transformers' meta-device load report of ``d``; None when it cannot build the config's model here.

    ``ignore_mismatched_sizes``: a shape mismatch is reported, not raised (raising made the check skip the very
    configs that do not fit their weights)."""
    try:
        with _quiet_transformers():
            from transformers import AutoModelForCausalLM

            _, info = AutoModelForCausalLM.from_pretrained(str(d), output_loading_info=True, device_map="meta",
                                                           ignore_mismatched_sizes=True)
    except Exception:
        return None
    mismatched = tuple(sorted((str(k), tuple(int(x) for x in a), tuple(int(x) for x in b))
                              for k, a, b in (info.get("mismatched_keys") or [])))
    return _MetaReport(tuple(sorted(info.get("missing_keys") or [])), mismatched)


# ----------------------------------------------------------------------------------------------------------------
# Does the config fit the weight files? Checked before any model is built.
# ----------------------------------------------------------------------------------------------------------------

_MAX_PARAMS_PER_BYTE = 4  # 2-bit weights: anything denser is a config that is not these weights' model
_SHOWN = 4  # mismatching tensors named in an error


@dataclass(frozen=True)
class TensorHeader:
    """One tensor as a safetensors header describes it (no data read)."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def safetensors_headers(model_dir: str | Path) -> dict[str, TensorHeader]:
    """name -> header entry of every tensor in the directory's ``*.safetensors`` files, from the headers alone.

    ModelLoadError naming the file when a header cannot be parsed (truncated, bit-flipped, not safetensors).
    """
    out: dict[str, TensorHeader] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                head = fh.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                if not 0 < n <= min(_MAX_HEADER, f.stat().st_size - 8):
                    raise ValueError(f"header length {n} does not fit the file ({f.stat().st_size} bytes)")
                header = json.loads(fh.read(n))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                lo, hi = entry["data_offsets"]
                out[name] = TensorHeader(f, str(entry["dtype"]), tuple(int(x) for x in entry["shape"]), int(hi) - int(lo))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{f}: unreadable safetensors file: {type(e).__name__}: {str(e)[:200]}") from None
    return out


def _weights_bytes(d: Path, headers: Mapping[str, TensorHeader]) -> int:
    """Bytes of tensor data in the weight files (safetensors: from the headers; ``.bin``: the file sizes)."""
    if headers:
        return sum(h.nbytes for h in headers.values())
    return sum(f.stat().st_size for f in d.glob("pytorch_model*.bin"))


def _config_size(d: Path) -> tuple[int, dict[str, tuple[int, ...]], str] | None:
    """(parameter count the config implies, tensor shapes of its first two layers and every non-layer tensor,
    base-model prefix) from 1- and 2-layer builds on the meta device (no memory, milliseconds, whatever the
    config's size); the count is ``n(1) + (L - 1) * (n(2) - n(1))``. None when transformers cannot build it."""
    try:
        with _quiet_transformers():
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM

            cfg = AutoConfig.from_pretrained(str(d))
            layers = getattr(cfg, "num_hidden_layers", None)
            if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
                return None
            counts: list[int] = []
            shapes: dict[str, tuple[int, ...]] = {}
            prefix = ""
            for k in (1, 2):
                small = copy.deepcopy(cfg)
                small.num_hidden_layers = k
                types = getattr(small, "layer_types", None)
                if isinstance(types, list) and len(types) >= k:
                    small.layer_types = types[:k]
                with torch.device("meta"):
                    model = AutoModelForCausalLM.from_config(small)
                counts.append(sum(p.numel() for p in model.parameters()))
                shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
                prefix = str(getattr(model, "base_model_prefix", "") or "")
    except Exception:
        return None
    return counts[0] + (layers - 1) * (counts[1] - counts[0]), shapes, prefix


def _file_name(name: str, prefix: str, headers: Mapping[str, TensorHeader]) -> str | None:
    """The weight files' name for a model tensor: as is, or with the base-model prefix dropped or added."""
    candidates = [name]
    if prefix:
        candidates += [name[len(prefix) + 1:]] if name.startswith(prefix + ".") else [f"{prefix}.{name}"]
    return next((c for c in candidates if c in headers), None)


def _human_bytes(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def check_config_fits_weights(model_dir: str | Path) -> None:
    """ModelLoadError unless the directory's config.json describes the model its weight files hold.

    Runs before any model is built (a config that does not fit would otherwise be built at its own size, e.g. a
    bare ``{"model_type": "gpt_neox"}``: the default 20B parameters, 80 GB): reads the safetensors headers,
    compares their shapes with the config's (meta-device builds) and the config's parameter count with the bytes
    the files hold, then asks transformers' meta-device load for what it would have to invent or resize. Each
    refusal names config.json, the tensor, the config-implied and the file shape. A directory transformers cannot
    build a model from is left to the load, which reports that.
    """
    d = Path(model_dir)
    config = d / "config.json"
    if not config.is_file():
        return
    headers = safetensors_headers(d)
    sized = _config_size(d)
    if sized is not None:
        n_params, shapes, prefix = sized
        bad: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
        for name, shape in shapes.items():
            key = _file_name(name, prefix, headers)
            if key is not None and headers[key].shape != shape:
                bad.append((key, headers[key].shape, shape))
        data = _weights_bytes(d, headers)
        absurd = n_params > _MAX_PARAMS_PER_BYTE * data + 1024
        if bad or absurd:
            why = []
            if bad:
                why.append(_mismatch_text(bad, headers))
            if absurd:
                why.append(f"it implies {n_params:,} parameters ({_human_bytes(4.0 * n_params)} as float32) but the "
                           f"weight files hold {_human_bytes(data)} of tensors in all")
            raise ModelLoadError(f"{config} does not describe the weights in {d}: " + "; ".join(why)
                                 + " (is config.json this model's? a bare or foreign config falls back to the "
                                 "library's default sizes); refused before building the model")
    report = _meta_report(d)
    if report is None:
        return
    if report.mismatched:
        raise ModelLoadError(f"{config} does not describe the weights in {d}: "
                             f"{_mismatch_text(list(report.mismatched), headers)}; refused before building the model")
    if report.missing:
        missing = report.missing
        shown = ", ".join(missing[:6]) + (f", … ({len(missing)} in all)" if len(missing) > 6 else "")
        raise ModelLoadError(f"{d}: the weights do not cover {config}: {len(missing)} tensor(s) the "
                             f"config needs are not in the weight files ({shown}); transformers would fill them "
                             "with random values (does config.json declare more layers or a larger shape than "
                             "the weights hold?)")


def _mismatch_text(bad: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]],
                   headers: Mapping[str, TensorHeader]) -> str:
    """``tensor X: config implies (a, b), model.safetensors holds (c, d)`` for the first few mismatches."""
    parts = []
    for name, file_shape, cfg_shape in bad[:_SHOWN]:
        where = headers[name].file.name if name in headers else "the weight files"
        parts.append(f"tensor {name}: the config implies shape {tuple(cfg_shape)}, {where} holds {tuple(file_shape)}")
    more = f" (and {len(bad) - _SHOWN} more)" if len(bad) > _SHOWN else ""
    return "; ".join(parts) + more


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
        check_config_fits_weights(d)  # memoised: ``load_bridge`` ran it before building; other routes get it here
    hf = getattr(bridge, "original_model", None)
    bad = nonfinite_parameters(hf if hf is not None else bridge)
    if bad:
        where = d if d is not None else ref.display
        raise ModelLoadError(f"{where}: non-finite weights: {', '.join(bad)}; every measurement would be NaN")
