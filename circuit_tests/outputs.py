"""Output paths (results file, plot/report/cache directories, the GitHub step summary), checked before a run.

Why: an unusable path used to surface as a traceback after minutes of evaluation (or, for the cache directory,
inside an item). Writability is tested for real, by creating and removing a probe file (and any missing
directories): permission bits say nothing when running as root (``os.access`` is always true there) and nothing
about read-only mounts. Light on purpose (no torch): the pytest plugin calls it from ``pytest_configure``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

# file: written whole (atomically: a temporary file in its directory, then renamed over it);
# append: appended to in place (the step summary); dir: a directory that is created and written into.
Kind = Literal["file", "append", "dir"]


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def _probe(existing: Path, missing: list[Path]) -> str | None:
    """Create ``missing`` (top-down, below ``existing``) and a probe file in the deepest, then remove them all.
    None when that worked, else the reason."""
    created: list[Path] = []
    try:
        for d in missing:
            try:
                d.mkdir()
            except FileExistsError:  # made meanwhile by someone else: ours to use, not to remove
                continue
            except OSError as e:
                return f"cannot create directory {d} ({_why(e)})"
            created.append(d)
        target = missing[-1] if missing else existing
        try:
            fd, name = tempfile.mkstemp(prefix=".circuit-tests-probe-", dir=target)
        except OSError as e:
            return f"directory {target} is not writable ({_why(e)})"
        os.close(fd)
        os.unlink(name)
        return None
    finally:
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass


def _split(directory: Path) -> tuple[Path, list[Path]]:
    """The nearest existing ancestor-or-self of ``directory`` and the missing directories below it, top-down."""
    missing: list[Path] = []
    d = directory
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    return d, missing[::-1]


def output_path_problem(path: str | Path, kind: Kind) -> str | None:
    """Why ``path`` cannot be used as an output of this ``kind`` (``is a directory``, ``X is a file, not a
    directory``, ``directory X is not writable``, ``cannot create directory X``), or None when it can."""
    if str(path) == "":
        return "empty path"
    try:
        return _problem(Path(path), kind)
    except OSError as e:  # stat itself failed: a name too long, a loop of symlinks
        return f"cannot be used ({_why(e)})"


def _problem(p: Path, kind: Kind) -> str | None:
    if kind == "dir":
        if p.exists() and not p.is_dir():
            return f"{p} is a file, not a directory"
        existing, missing = _split(p)
    else:
        if p.is_dir():
            return (f"is a directory; give a file path such as {p / 'results.json'}" if kind == "file"
                    else "is a directory, not a file")
        if kind == "file" and p.exists() and not p.is_file():
            return "exists and is not a regular file"
        existing, missing = _split(p.parent)
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if kind == "append":
        if missing:
            return f"cannot be created: directory {missing[0]} does not exist"
        if p.exists():  # appended in place: opening it for append (and writing nothing) is the real test
            try:
                with open(p, "a", encoding="utf-8"):
                    pass
            except OSError as e:
                return f"is not writable ({_why(e)})"
            return None
    return _probe(existing, missing)
