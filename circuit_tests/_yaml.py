"""YAML → plain data plus a map from key paths to source positions, so every spec error names file:line:col.

Why not ``yaml.safe_load``: it forgets where values came from and silently keeps the last of two duplicate
keys. This walks the composed node tree of a ``SafeLoader`` (no arbitrary object construction), rejects
duplicate keys, and turns off the YAML 1.1 timestamp resolver (dates stay strings).

Hostile files are bounded before they can cost anything: size (``MAX_SPEC_BYTES``), nesting depth
(``MAX_DEPTH``, checked on the event stream before any recursive composition), alias expansion
(``MAX_VALUES`` values after expanding aliases: a "billion laughs" fails in milliseconds), recursive aliases,
``<<`` merge keys (they silently override keys; rejected) and non-UTF-8 bytes, each a located SpecError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import SpecError

Path_ = tuple[Any, ...]

MAX_SPEC_BYTES = 1 << 20   # 1 MiB: a spec is a page of YAML
MAX_DEPTH = 64             # nesting of mappings/sequences
MAX_VALUES = 100_000       # values after alias expansion
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader without implicit timestamps."""


_SpecLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


@dataclass
class Located:
    """Parsed YAML data with the position (1-based line, column) of every value and every mapping key."""

    data: Any
    filename: str
    values: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path_, tuple[int, int]] = field(default_factory=dict)

    def position(self, path: Path_, *, key: bool = False) -> tuple[int, int]:
        """Position of ``path``, or of its closest recorded ancestor (a missing key points at its parent)."""
        table = self.keys if key else self.values
        p = tuple(path)
        while p:
            if p in table:
                return table[p]
            if p in self.values:
                return self.values[p]
            p = p[:-1]
        return self.values.get((), (1, 1))

    def where(self, path: Path_, *, key: bool = False) -> str:
        line, col = self.position(path, key=key)
        return f"{self.filename}:{line}:{col}"


def format_path(path: Path_) -> str:
    """``('claims', 1, 'min')`` → ``claims[1].min``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _line_col(text: str, index: int) -> tuple[int, int]:
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def read_spec_text(path: str | Path) -> str:
    """The spec file as text: at most MAX_SPEC_BYTES, UTF-8 (a bad byte is reported with its line and column)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise SpecError(f"{p}: cannot read spec file: {e.strerror or e}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"{p}: the spec file is larger than {MAX_SPEC_BYTES} bytes (the limit for a spec); "
                        "is this the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        good = raw[: e.start].decode("utf-8")
        line, col = _line_col(good, len(good))
        raise SpecError(f"{p}:{line}:{col}: the spec file is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                        f"{e.start}); save it as UTF-8") from None
    return text.removeprefix("\ufeff")


def _check_events(text: str, filename: str) -> None:
    """Nesting depth on the (iterative) event stream, before the recursive composer could overflow."""
    depth = 0
    for ev in yaml.parse(text, Loader=_SpecLoader):
        if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                m = ev.start_mark
                raise SpecError(f"{filename}:{m.line + 1}:{m.column + 1}: nesting deeper than {MAX_DEPTH} levels "
                                "(the limit for a spec)")
        elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _syntax_error(e: yaml.YAMLError, text: str, filename: str) -> SpecError:
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = f"{filename}:{mark.line + 1}:{mark.column + 1}" if mark else filename
        problem = e.problem or e.context or "invalid YAML"
        if "\\t" in problem or "\t" in problem:
            problem += " (tabs cannot indent YAML: use spaces)"
        return SpecError(f"{where}: YAML syntax error: {problem}")
    pos = getattr(e, "position", None)
    if isinstance(pos, int):  # yaml.reader.ReaderError: a character YAML does not allow
        line, col = _line_col(text, pos)
        return SpecError(f"{filename}:{line}:{col}: YAML error: character {getattr(e, 'character', '?')!r} is not "
                         "allowed in YAML text")
    return SpecError(f"{filename}: YAML error: {e}")


def load_located(text: str, filename: str) -> Located:
    """Parse one YAML document; syntax errors, duplicate keys and the bounds above raise SpecError with
    file:line:col."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_SPEC_BYTES:
        raise SpecError(f"{filename}: the spec is larger than {MAX_SPEC_BYTES} bytes (the limit for a spec)")
    loc = Located(data=None, filename=filename)
    try:
        _check_events(text, filename)
    except yaml.YAMLError as e:
        raise _syntax_error(e, text, filename) from None
    loader = _SpecLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.YAMLError as e:
            raise _syntax_error(e, text, filename) from None
        except RecursionError:  # unreachable after _check_events; kept so no input can produce a traceback
            raise SpecError(f"{filename}: nesting too deep (the limit for a spec is {MAX_DEPTH} levels)") from None
        if node is None:
            raise SpecError(f"{filename}:1:1: the spec file is empty")
        budget = [MAX_VALUES]
        active: set[int] = set()

        def at(n: yaml.Node) -> str:
            return f"{filename}:{n.start_mark.line + 1}:{n.start_mark.column + 1}"

        def scalar(n: yaml.Node, path: Path_) -> Any:
            try:
                return loader.construct_object(n)
            except yaml.constructor.ConstructorError:
                raise SpecError(f"{at(n)}: {format_path(path)}: unsupported YAML tag {n.tag!r} (specs are plain data)") from None
            except Exception as e:  # noqa: BLE001  (e.g. `!!int abc`, 5000-digit ints): report, never a traceback
                raise SpecError(f"{at(n)}: {format_path(path)}: cannot read {n.value[:40]!r} as {n.tag.rsplit(':', 1)[-1]}: "
                                f"{e}") from None

        def build(n: yaml.Node, path: Path_) -> Any:
            budget[0] -= 1
            if budget[0] < 0:
                raise SpecError(f"{at(n)}: {format_path(path)}: more than {MAX_VALUES} values after expanding "
                                "aliases (the limit for a spec; a 'billion laughs' alias bomb?)")
            if len(path) > MAX_DEPTH:
                raise SpecError(f"{at(n)}: nesting deeper than {MAX_DEPTH} levels after expanding aliases "
                                "(the limit for a spec)")
            if id(n) in active:
                raise SpecError(f"{at(n)}: {format_path(path)}: recursive alias (an anchor used inside itself)")
            loc.values[path] = (n.start_mark.line + 1, n.start_mark.column + 1)
            plain = {yaml.MappingNode: "tag:yaml.org,2002:map", yaml.SequenceNode: "tag:yaml.org,2002:seq"}.get(type(n))
            if plain is not None and n.tag != plain:
                raise SpecError(f"{at(n)}: {format_path(path)}: unsupported YAML tag {n.tag!r} (specs are plain data)")
            if isinstance(n, yaml.MappingNode):
                active.add(id(n))
                out: dict[Any, Any] = {}
                for knode, vnode in n.value:
                    if knode.tag == _MERGE_TAG:
                        raise SpecError(f"{at(knode)}: {format_path(path)}: merge keys ('<<') are not supported: they "
                                        "silently let one mapping override another; write the keys out")
                    if not isinstance(knode, yaml.ScalarNode):
                        raise SpecError(f"{at(knode)}: {format_path(path)}: mapping keys must be plain scalars")
                    key = scalar(knode, path)
                    if key in out:
                        raise SpecError(f"{filename}:{knode.start_mark.line + 1}:{knode.start_mark.column + 1}: "
                                        f"{format_path(path + (key,))}: duplicate key {key!r} (YAML would silently keep the last)")
                    loc.keys[path + (key,)] = (knode.start_mark.line + 1, knode.start_mark.column + 1)
                    out[key] = build(vnode, path + (key,))
                active.discard(id(n))
                return out
            if isinstance(n, yaml.SequenceNode):
                active.add(id(n))
                items = [build(item, path + (i,)) for i, item in enumerate(n.value)]
                active.discard(id(n))
                return items
            return scalar(n, path)

        loc.data = build(node, ())
    finally:
        loader.dispose()
    return loc
