"""The user cache of derived model files (fetched wheels' GGUFs, their converted safetensors directories).

Why a module of its own: every writer into the cache must publish atomically (write into a temporary sibling,
then one ``rename``), so a process killed mid-way never leaves a half file or half directory that a later
run would take for a complete one; and every reader must agree where the cache is.

Location: ``$CIRCUIT_TESTS_CACHE`` if set, else ``$XDG_CACHE_HOME/circuit_tests``, else
``~/.cache/circuit_tests``. Stdlib only: resolution runs at pytest collection time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["cache_root", "atomic_dir", "atomic_file", "sha256_file", "exclusive", "CACHE_ENV"]

CACHE_ENV = "CIRCUIT_TESTS_CACHE"
_TMP_MARK = ".tmp-"


def cache_root() -> Path:
    """The cache directory, read from the environment now (not created)."""
    env = os.environ
    if env.get(CACHE_ENV):
        return Path(os.path.expandvars(os.path.expanduser(env[CACHE_ENV])))
    xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "circuit_tests"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, under another user
        return True
    return True


def _sweep(final: Path) -> None:
    """Remove temporaries of ``final`` left by processes that no longer exist (a killed conversion)."""
    parent = final.parent
    if not parent.is_dir():
        return
    prefix = f".{final.name}{_TMP_MARK}"
    for p in parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


@contextmanager
def exclusive(final: str | Path) -> Iterator[None]:
    """Hold an advisory lock for producing ``final`` (``.<name>.lock`` next to it), so parallel processes (pytest-xdist
    workers) wait for one download or conversion instead of each doing it. No-op where ``fcntl`` is missing."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: atomic publishing alone keeps the cache consistent
        yield
        return
    with open(final.parent / f".{final.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``final``; on success it becomes ``final`` in one rename.

    On an exception the temporary is removed and ``final`` is untouched. If another process published
    ``final`` first, its copy is kept and ours is discarded (both were built from the same input).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{_TMP_MARK}{os.getpid()}-", dir=final.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # lost a race: an identical copy is already there
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary file path next to ``final``; on success it replaces ``final`` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep(final)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}{_TMP_MARK}{os.getpid()}-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
