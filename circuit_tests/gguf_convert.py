"""GGUF files as a model source: dequantize once into a cached safetensors HF directory, then load that.

Why convert instead of loading the GGUF each time: transformers' GGUF reader dequantizes every tensor on
each load (about 20 s and 1.1 GB for SmolLM2-135M), while the float32 safetensors directory reloads in
about 2 s and goes through the same loader, hashing and graph code as every other local directory.

The directory is ``<cache_root>/gguf/<sha256 of the GGUF>/`` (``circuit_tests.user_cache``): keyed by content,
so a renamed or moved file reuses it and a changed file never does. It is published atomically and holds
``config.json``, ``model.safetensors``, the tokenizer files (a directory without them would load with an
empty tokenizer) and ``circuit_tests_gguf.json``: the GGUF's sha256, file name, quantization type and tensor
types, the float32 weights' sha256 and the library versions that did the conversion.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from .errors import ModelLoadError
from .user_cache import atomic_dir, cache_root, exclusive, sha256_file

__all__ = ["META_FILE", "gguf_installed", "gguf_missing_reason", "converted_dir", "cached_dir", "read_meta",
           "gguf_sha256", "convert", "conversions"]

META_FILE = "circuit_tests_gguf.json"
_SHA: dict[tuple, str] = {}  # (resolved path, size, mtime_ns) -> sha256, per process
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
    """sha256 of a GGUF file, memoised per process by (path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA:
        _SHA[key] = sha256_file(p)
    return _SHA[key]


def converted_dir(sha256: str) -> Path:
    """Where the conversion of the GGUF with this sha256 lives (whether or not it exists yet)."""
    return cache_root() / "gguf" / sha256


def cached_dir(sha256: str) -> Path | None:
    """The complete converted directory for this GGUF sha256, or None. Stdlib only (collection time)."""
    d = converted_dir(sha256)
    return d if (d / META_FILE).is_file() and (d / "config.json").is_file() else None


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
        for _ in range(n_tensors):
            string()
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            pos += 4 + 8 * n_dims
            (ttype,) = struct.unpack_from("<I", buf, pos)
            pos += 12  # type + data offset
            types.append(ttype)
    return meta, types


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
            "architecture": arch if isinstance(arch, str) else None}


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
        return _convert(p, sha)


def _convert(p: Path, sha: str) -> Path:
    from .runtime import configure

    configure()
    from .models import _quiet, weights_sha256

    _quiet()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        info = _describe(p)
    except Exception as e:  # gguf raises ValueError/IndexError/struct errors on a truncated or foreign file
        first = str(e).splitlines()[0] if str(e) else ""
        raise ModelLoadError(f"{p}: not a readable GGUF file ({type(e).__name__}: {first})") from e
    with atomic_dir(converted_dir(sha)) as tmp:
        try:
            tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
            model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
        except Exception as e:  # transformers raises ValueError/KeyError/RuntimeError for unsupported files
            first = str(e).splitlines()[0] if str(e) else ""
            raise ModelLoadError(f"{p}: transformers could not read this GGUF (architecture "
                                 f"{info['architecture']!r}, {info['quantization']}): {type(e).__name__}: {first}") from e
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:  # weights are already plain float32; this only lifts save_pretrained's refusal
            quantizer.remove_quantization_config(model)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        if not (tmp / "tokenizer.json").is_file():
            raise ModelLoadError(f"{p}: the tokenizer read from the GGUF did not save a tokenizer.json")
        del model
        meta = {"gguf_sha256": sha, "gguf_file": p.name, "gguf_size": p.stat().st_size, **info,
                "weights_sha256": weights_sha256(tmp), "dtype": "float32",
                "transformers": transformers.__version__, "gguf": _version("gguf"), "torch": torch.__version__}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    _CONVERSIONS[0] += 1
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
