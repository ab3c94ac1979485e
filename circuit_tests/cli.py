"""``circuit-tests`` command line: spec schema, the model zoo, role-score discovery."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def _schema(args: argparse.Namespace) -> int:
    from .spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def _zoo_list(args: argparse.Namespace) -> int:
    from .zoo import zoo_list_text

    print(zoo_list_text())
    return 0


def _zoo_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .runtime import configure

    configure()
    from .zoo import train_model

    out = train_model(args.name, Path(args.out) if args.out else None)
    print(f"trained {args.name} into {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="circuit-tests", description="Circuit claims as pytest tests. Run specs with "
                                "`pytest specs/`; this command holds the helpers around them.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("schema", help="print the JSON Schema of spec files (for editor completion/validation)")
    s.set_defaults(fn=_schema)
    z = sub.add_parser("zoo", help="the shipped zoo models")
    zsub = z.add_subparsers(dest="zoo_command", required=True)
    zl = zsub.add_parser("list", help="list zoo models, their checkpoints and formation steps")
    zl.set_defaults(fn=_zoo_list)
    zt = zsub.add_parser("train", help="re-train a zoo model deterministically (1 thread) into a directory")
    zt.add_argument("name")
    zt.add_argument("--out", help="output directory (default: a new temporary directory)")
    zt.set_defaults(fn=_zoo_train)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import CircuitTestsError

    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except CircuitTestsError as e:
        print(f"circuit-tests: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
