"""YAML → plain data plus a map from key paths to source positions, so every spec error names file:line:col.

Why not ``yaml.safe_load``: it forgets where values came from and silently keeps the last of two duplicate
keys. This walks the composed node tree of a ``SafeLoader`` (no arbitrary object construction), rejects
duplicate keys, and turns off the YAML 1.1 timestamp resolver (dates stay strings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import SpecError

Path_ = tuple[Any, ...]


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


def load_located(text: str, filename: str) -> Located:
    """Parse one YAML document; syntax errors and duplicate keys raise SpecError with file:line:col."""
    loader = _SpecLoader(text)
    loc = Located(data=None, filename=filename)
    try:
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            where = f"{filename}:{mark.line + 1}:{mark.column + 1}" if mark else filename
            problem = e.problem or e.context or "invalid YAML"
            raise SpecError(f"{where}: YAML syntax error: {problem}") from None
        except yaml.YAMLError as e:
            raise SpecError(f"{filename}: YAML error: {e}") from None
        if node is None:
            raise SpecError(f"{filename}:1:1: the spec file is empty")

        def build(n: yaml.Node, path: Path_) -> Any:
            loc.values[path] = (n.start_mark.line + 1, n.start_mark.column + 1)
            plain = {yaml.MappingNode: "tag:yaml.org,2002:map", yaml.SequenceNode: "tag:yaml.org,2002:seq"}.get(type(n))
            if plain is not None and n.tag != plain:
                raise SpecError(f"{filename}:{n.start_mark.line + 1}:{n.start_mark.column + 1}: {format_path(path)}: "
                                f"unsupported YAML tag {n.tag!r} (specs are plain data)")
            if isinstance(n, yaml.MappingNode):
                loader.flatten_mapping(n)
                out: dict[Any, Any] = {}
                for knode, vnode in n.value:
                    if not isinstance(knode, yaml.ScalarNode):
                        raise SpecError(f"{filename}:{knode.start_mark.line + 1}:{knode.start_mark.column + 1}: "
                                        f"{format_path(path)}: mapping keys must be plain scalars")
                    key = loader.construct_object(knode)
                    if key in out:
                        raise SpecError(f"{filename}:{knode.start_mark.line + 1}:{knode.start_mark.column + 1}: "
                                        f"{format_path(path + (key,))}: duplicate key {key!r} (YAML would silently keep the last)")
                    loc.keys[path + (key,)] = (knode.start_mark.line + 1, knode.start_mark.column + 1)
                    out[key] = build(vnode, path + (key,))
                return out
            if isinstance(n, yaml.SequenceNode):
                return [build(item, path + (i,)) for i, item in enumerate(n.value)]
            try:
                return loader.construct_object(n)
            except yaml.constructor.ConstructorError:
                raise SpecError(f"{filename}:{n.start_mark.line + 1}:{n.start_mark.column + 1}: {format_path(path)}: "
                                f"unsupported YAML tag {n.tag!r} (specs are plain data)") from None

        loc.data = build(node, ())
    finally:
        loader.dispose()
    return loc
