"""GGUF files as a model source: dequantize once into a cached safetensors HF directory, then load that.

Why convert instead of loading the GGUF each time: transformers' GGUF reader dequantizes every tensor on
each load (about 20 s and 1.1 GB for SmolLM2-135M), while the float32 safetensors directory reloads in
about 2 s and goes through the same loader, hashing and graph code as every other local directory.

The directory is ``<cache_root>/gguf/<sha256 of the GGUF>/`` (``circuit_tests.user_cache``): keyed by content,
so a renamed or moved file reuses it and a changed file never does. It is published atomically and holds
``config.json``, ``model.safetensors``, the tokenizer files (a directory without them would load with an
empty tokenizer) and ``circuit_tests_gguf.json``: the GGUF's sha256, file name, quantization type and tensor
types, the float32 weights' sha256, the sha256 of every file beside it (``files``) and the library versions that
did the conversion.

Trust: the directory name alone proves nothing (anyone can put another model's conversion there), so every use
re-checks it (``verify_dir``): the record must name this GGUF sha256 (for a wheel-hosted model, the one pinned
in ``zoo.wheels``) and every file in the directory must be listed with the sha256 it has on disk. A directory
that fails is never used: ``convert`` logs why and converts again (``cached_dir`` reports it as not cached).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

from .errors import ModelLoadError
from .user_cache import Progress, atomic_dir, cache_root, exclusive, sha256_file_cached

__all__ = ["META_FILE", "gguf_installed", "gguf_missing_reason", "converted_dir", "cached_dir", "read_meta",
           "verify_dir", "gguf_sha256", "convert", "conversions"]

META_FILE = "circuit_tests_gguf.json"
log = logging.getLogger("circuit_tests")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CONVERSIONS = [0]  # conversions done by this process (tests check that a cached directory is reused)


def gguf_installed() -> bool:
    """Whether the ``gguf`` package (transformers' GGUF reader needs it) is importable; no import."""
    return importlib.util.find_spec("gguf") is not None


def gguf_missing_reason(what: str) -> str | None:
    if gguf_installed():
        return None
    return f"{what}: reading GGUF files needs the gguf package, which is not installed (pip install 'gguf>=0.10')"


def conversions() -> int:
    """How many GGUF conversions this process has run."""
    return _CONVERSIONS[0]


def gguf_sha256(path: str | Path) -> str:
    """sha256 of a GGUF file, memoised per process by (path, device, inode, ctime, size, mtime)."""
    return sha256_file_cached(path)


def converted_dir(sha256: str) -> Path:
    """Where the conversion of the GGUF with this sha256 lives (whether or not it exists yet)."""
    return cache_root() / "gguf" / sha256


def cached_dir(sha256: str) -> Path | None:
    """The converted directory for this GGUF sha256 if it passes ``verify_dir``, else None. Stdlib only
    (collection time); file hashes are memoised per process, so only the first call reads the weights."""
    d = converted_dir(sha256)
    return d if d.is_dir() and verify_dir(d, sha256) is None else None


def verify_dir(model_dir: str | Path, sha256: str) -> str | None:
    """Why ``model_dir`` must not be used as the conversion of the GGUF with ``sha256``, or None when it may.

    It may when its record names that GGUF and lists exactly the files the directory holds (besides the
    record), each with the sha256 it has now; config.json and the weights must be among them."""
    d = Path(model_dir)
    if not (d / META_FILE).is_file():
        return f"it has no conversion record ({META_FILE})"
    meta = read_meta(d)
    if not meta:
        return f"its {META_FILE} is unreadable"
    if meta.get("gguf_sha256") != sha256:
        return f"its record names GGUF sha256 {str(meta.get('gguf_sha256'))[:16]}…, not {sha256[:16]}…"
    files = meta.get("files")
    if not isinstance(files, dict) or not files or not all(
            isinstance(k, str) and isinstance(v, str) and _HEX64.fullmatch(v) for k, v in files.items()):
        return "its record lists no file hashes (converted by an older circuit_tests)"
    if "config.json" not in files or not any(k.endswith(".safetensors") for k in files):
        return "its record lists no config.json or no weights"
    try:
        present = {p.name for p in d.iterdir() if p.name != META_FILE}
        if present != set(files):
            extra, missing = sorted(present - set(files)), sorted(set(files) - present)
            return ("its files differ from the record: " + "; ".join(
                x for x in (f"unrecorded {', '.join(extra)}" if extra else "",
                            f"missing {', '.join(missing)}" if missing else "") if x))
        for name, want in sorted(files.items()):
            f = d / name
            if not f.is_file():
                return f"{name} is not a file"
            if sha256_file_cached(f) != want:
                return f"{name} does not match the sha256 recorded at conversion"
    except OSError as e:
        return f"it cannot be read ({type(e).__name__}: {e})"
    return None


def read_meta(model_dir: str | Path) -> dict[str, Any]:
    """The conversion record of a converted directory ({} when it has none or it is unreadable)."""
    try:
        data = json.loads((Path(model_dir) / META_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _header(path: Path) -> tuple[dict[str, Any], list[int]]:
    """(scalar and string metadata, tensor type ids) from a GGUF (v2/v3) header, skipping arrays.

    Why not ``gguf.GGUFReader``: it builds a numpy view per array element, which takes 7-25 s on a
    49k-token vocabulary; this walk takes milliseconds and reads only the header."""
    import mmap
    import struct

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError("no GGUF magic")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version < 2:
            raise ValueError(f"GGUF version {version} (only v2/v3 headers are read)")
        pos = 24

        def string() -> str:
            nonlocal pos
            (n,) = struct.unpack_from("<Q", buf, pos)
            pos += 8 + n
            return bytes(buf[pos - n:pos]).decode("utf-8", "replace")

        def value(vtype: int) -> Any:
            nonlocal pos
            if vtype == 8:
                return string()
            if vtype == 9:
                etype, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if etype in _SCALAR:
                    pos += struct.calcsize(_SCALAR[etype]) * count
                else:
                    for _ in range(count):
                        value(etype)
                return None
            fmt = _SCALAR[vtype]
            (v,) = struct.unpack_from(fmt, buf, pos)
            pos += struct.calcsize(fmt)
            return v

        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            (vtype,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            v = value(vtype)
            if v is not None:
                meta[key] = v
        types: list[int] = []
        elements = 0
        for _ in range(n_tensors):
            string()
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            pos += 4 + 8 * n_dims
            (ttype,) = struct.unpack_from("<I", buf, pos)
            pos += 12  # type + data offset
            types.append(ttype)
            elements += math.prod(dims)
        meta[_ELEMENTS] = elements
    return meta, types


_ELEMENTS = "circuit_tests.tensor_elements"  # not a GGUF key: the header walk's count of tensor elements
MAX_PARAMS_PER_ELEMENT = 2.5  # untied output layers the file omits can double a small model; a lie is far beyond


def _check_declared_size(p: Path, elements: int) -> None:
    """Refuse a GGUF whose metadata describes a model much larger than its tensors before transformers builds it:
    ``from_pretrained`` instantiates the metadata's architecture at full size first, so a header claiming a 20B model
    over a few small tensors would take tens of GB. The count comes from the metadata's config built on the meta
    device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # the real load reports unreadable or unsupported files with its own message
        log.debug("size check of %s skipped: %s", p, e)
        return
    n = sum(t.numel() for t in model.parameters())
    if n > MAX_PARAMS_PER_ELEMENT * elements + 1_000_000:
        raise ModelLoadError(f"{p}: its metadata describes a model of {n:,} parameters but the file holds "
                             f"{elements:,} tensor elements; refused before building the model (the header does "
                             "not describe these tensors)")


def _describe(path: Path) -> dict[str, Any]:
    """Quantization (``general.file_type``, e.g. Q4_1), tensor-type counts and architecture from the GGUF header."""
    from collections import Counter

    import gguf

    meta, types = _header(path)
    counts = Counter(gguf.GGMLQuantizationType(t).name for t in types)
    quant = None
    if isinstance(meta.get("general.file_type"), int):
        try:
            quant = gguf.LlamaFileType(meta["general.file_type"]).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            quant = None
    if quant is None:  # no file type stated: the most common non-float tensor type, else the float type
        quantized = [(n, t) for t, n in counts.items() if t not in ("F32", "F16", "BF16")]
        quant = max(quantized)[1] if quantized else (max((n, t) for t, n in counts.items())[1] if counts else "none")
    arch = meta.get("general.architecture")
    return {"quantization": quant, "tensor_types": dict(sorted(counts.items())),
            "architecture": arch if isinstance(arch, str) else None, "tensor_elements": int(meta.get(_ELEMENTS, 0))}


def convert(path: str | Path, *, sha256: str | None = None) -> Path:
    """The converted float32 HF directory of a GGUF file, converting it (once per content) if needed.

    ``sha256``: the file's known hash (a pinned download); computed when omitted. Raises ModelLoadError
    when the file is missing, the gguf package is absent, or transformers cannot read the file.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"GGUF file {p} does not exist")
    sha = sha256 or gguf_sha256(p)
    done = cached_dir(sha)
    if done is not None:
        return done
    reason = gguf_missing_reason(str(p))
    if reason:
        raise ModelLoadError(reason)
    with exclusive(converted_dir(sha)):
        done = cached_dir(sha)  # another process may have converted it while we waited
        if done is not None:
            return done
        if sha256 is not None and gguf_sha256(p) != sha256:  # the cache is keyed by this hash: never mislabel it
            raise ModelLoadError(f"{p}: sha256 {gguf_sha256(p)} differs from the expected {sha256} (the file changed "
                                 "after it was fetched); delete it to fetch it again")
        _discard_untrusted(converted_dir(sha), sha, p)
        return _convert(p, sha)


def _discard_untrusted(d: Path, sha: str, source: Path) -> None:
    """Remove a directory at ``d`` that failed ``verify_dir`` (logging why), so the new conversion can take its
    place; atomic publishing would otherwise keep the old one. Called under the conversion lock."""
    if not d.exists() and not d.is_symlink():
        return
    why = verify_dir(d, sha) if d.is_dir() else "it is not a directory"
    log.warning("circuit_tests: not using the cached conversion %s: %s; converting %s again", d, why, source)
    trash = d.with_name(f".{d.name}.tmp-{os.getpid()}-untrusted")
    try:
        os.rename(d, trash)  # one step, so no reader sees a half-deleted directory
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash)
        else:
            trash.unlink()
    except OSError as e:
        raise ModelLoadError(f"{d}: a cached conversion that cannot be trusted ({why}) could not be removed: "
                             f"{type(e).__name__}: {e}; delete it by hand") from None


def _convert(p: Path, sha: str) -> Path:
    from .runtime import configure

    configure()
    from .models import _quiet, weights_sha256

    _quiet()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress = Progress(f"converting {p.name}")
    steps = 5
    progress.step(1, steps, "reading the GGUF header")
    try:
        info = _describe(p)
    except Exception as e:  # gguf raises ValueError/IndexError/struct errors on a truncated or foreign file
        first = str(e).splitlines()[0] if str(e) else ""
        raise ModelLoadError(f"{p}: not a readable GGUF file ({type(e).__name__}: {first})") from e
    n_tensors = sum(info["tensor_types"].values())
    _check_declared_size(p, info["tensor_elements"])
    with atomic_dir(converted_dir(sha)) as tmp:
        try:
            progress.step(2, steps, "reading the tokenizer")
            tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
            progress.step(3, steps, f"dequantizing {n_tensors} tensors ({info['quantization']} -> float32)")
            model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
        except Exception as e:  # transformers raises ValueError/KeyError/RuntimeError for unsupported files
            first = str(e).splitlines()[0] if str(e) else ""
            raise ModelLoadError(f"{p}: transformers could not read this GGUF (architecture "
                                 f"{info['architecture']!r}, {info['quantization']}): {type(e).__name__}: {first}") from e
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:  # weights are already plain float32; this only lifts save_pretrained's refusal
            quantizer.remove_quantization_config(model)
        progress.step(4, steps, "writing float32 safetensors and the tokenizer")
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        if not (tmp / "tokenizer.json").is_file():
            raise ModelLoadError(f"{p}: the tokenizer read from the GGUF did not save a tokenizer.json")
        del model
        progress.step(5, steps, "hashing the converted files")
        files = {f.name: sha256_file_cached(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        meta = {"gguf_sha256": sha, "gguf_file": p.name, "gguf_size": p.stat().st_size, **info,
                "weights_sha256": weights_sha256(tmp), "files": files, "dtype": "float32",
                "transformers": transformers.__version__, "gguf": _version("gguf"), "torch": torch.__version__}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    _CONVERSIONS[0] += 1
    progress.done(f"converted into {converted_dir(sha)}")
    out = cached_dir(sha)
    if out is None:  # pragma: no cover - rename succeeded but the files are gone
        raise ModelLoadError(f"{p}: conversion into {converted_dir(sha)} did not leave a complete directory")
    return out


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
