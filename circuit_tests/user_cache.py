"""The user cache of derived model files (fetched wheels' GGUFs, their converted safetensors directories).

Why a module of its own: every writer into the cache must publish atomically (write into a temporary sibling,
then one ``rename``), so a process killed mid-way never leaves a half file or half directory that a later
run would take for a complete one; and every reader must agree where the cache is.

Location: ``$CIRCUIT_TESTS_CACHE`` if set, else ``$XDG_CACHE_HOME/circuit_tests``, else
``~/.cache/circuit_tests``. Stdlib only: resolution runs at pytest collection time.

Also here: ``sha256_file_cached`` (readers re-check what they take from the cache against a recorded sha256,
so the hash is memoised per process by what an in-place rewrite cannot keep), and ``Progress``, the one
progress line writer used by the first-use fetch and conversion (minutes of silence otherwise).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

__all__ = ["cache_root", "atomic_dir", "atomic_file", "sha256_file", "sha256_file_cached", "file_identity",
           "exclusive", "CACHE_ENV", "PROGRESS_ENV", "progress_stream", "Progress"]

CACHE_ENV = "CIRCUIT_TESTS_CACHE"
PROGRESS_ENV = "CIRCUIT_TESTS_PROGRESS"
_TMP_MARK = ".tmp-"
_SHA_MEMO: dict[tuple, str] = {}  # file_identity -> sha256, per process


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


def file_identity(path: str | Path) -> tuple[int, int, int, int, int]:
    """(device, inode, ctime_ns, size, mtime_ns): what an in-place rewrite cannot keep (every write sets ctime,
    which ``utime`` cannot set back), so a hash memoised under it is never stale."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size, st.st_mtime_ns)


def sha256_file_cached(path: str | Path) -> str:
    """``sha256_file``, memoised per process by ``file_identity`` (not the path: a file renamed into place,
    e.g. with its freshly converted directory, keeps its identity and needs no second read).

    Why: cached model files are re-checked against their recorded hash on every use (a 540 MB file takes
    about 0.7 s), and a process uses them many times."""
    key = file_identity(path)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = sha256_file(path)
    return _SHA_MEMO[key]


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


# ---------------------------------------------------------------------------------------------------------
# progress of the first-use fetch and conversion
# ---------------------------------------------------------------------------------------------------------

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def _isatty(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError):  # closed, detached, or not a stream
        return False


_terminal: TextIO | None = None  # set by the pytest plugin: a stream that writes past pytest's output capture


def use_terminal(stream: TextIO | None) -> None:
    """Send progress lines to ``stream`` instead of ``sys.__stderr__`` (None: back to it). The pytest plugin passes
    its terminal, since under pytest's fd-level capture the real stderr is a capture file, not the terminal."""
    global _terminal
    _terminal = stream


def progress_stream(environ: Mapping[str, str] | None = None, stream: TextIO | None = None) -> TextIO | None:
    """Where progress lines go, or None for none.

    ``$CIRCUIT_TESTS_PROGRESS`` = 1/true/yes/on forces them on, 0/false/no/off off. Otherwise they are shown
    only on a terminal and never in CI logs (``$CI`` set). The stream is ``sys.__stderr__``, not ``sys.stderr``:
    pytest replaces the latter with a capture buffer, so progress would appear, if at all, after the wait.
    (Under pytest's fd-level capture the real stderr is a capture file: the plugin hands its terminal to
    ``use_terminal``, so ``pytest specs/`` on a terminal shows the lines too.)
    """
    env = os.environ if environ is None else environ
    out = stream if stream is not None else (_terminal or sys.__stderr__ or sys.stderr)
    forced = env.get(PROGRESS_ENV, "").strip().lower()
    if forced in _OFF:
        return None
    if forced in _ON:
        return out
    if env.get("CI", "").strip().lower() not in ("",) + _OFF:
        return None
    return out if _isatty(out) else None


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _elapsed(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


class Progress:
    """Progress lines for one slow step: ``circuit_tests: <what>: <detail>, <elapsed>`` on ``progress_stream()``.

    Plain lines, not a redrawn bar: pytest-xdist workers write to the same terminal. Byte counts are rate
    limited to one line per ``interval`` seconds (plus the final one); steps are always written. A no-op when
    progress is off, so callers need no conditionals.
    """

    def __init__(self, what: str, *, stream: TextIO | None = None, environ: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic, interval: float = 2.0) -> None:
        self.what = what
        self.stream = progress_stream(environ, stream)
        self._clock = clock
        self._start = clock()
        self._interval = interval
        self._last: float | None = None

    @property
    def enabled(self) -> bool:
        return self.stream is not None

    def _write(self, detail: str) -> None:
        if self.stream is None:
            return
        try:
            self.stream.write(f"circuit_tests: {self.what}: {detail}, {_elapsed(self._clock() - self._start)}\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken terminal must not fail the fetch
            self.stream = None

    def bytes(self, done: int, total: int | None = None) -> None:
        """``45.2 of 93.4 MB (48%)``; written at most every ``interval`` seconds, and when complete."""
        now = self._clock()
        complete = total is not None and done >= total
        if self._last is not None and now - self._last < self._interval and not complete:
            return
        self._last = now
        if total:
            self._write(f"{_mb(done)} of {_mb(total)} ({min(100, int(100 * done / total))}%)")
        else:
            self._write(_mb(done))

    def step(self, index: int, count: int, text: str) -> None:
        """``[2/5] dequantizing 272 tensors``."""
        self._write(f"[{index}/{count}] {text}")

    def done(self, text: str = "done") -> None:
        self._write(text)
