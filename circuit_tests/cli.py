"""``circuit-tests`` command line: spec schema, the model zoo, role-score discovery, emergence plots."""

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
    from .zoo import list_models, load_manifest, train_model

    out = train_model(args.name, Path(args.out) if args.out else None)
    print(f"trained {args.name} into {out}")
    if args.name not in list_models():
        return 0
    from .zoo.reproduce import compare

    rep = compare(load_manifest(args.name), json.loads((out / "manifest.json").read_text()))
    print(rep.text())
    return 0 if rep.reproduced else 1


def _scores(args: argparse.Namespace) -> int:
    """Every head's role scores and direct effects for a spec's task at one checkpoint (to decide which heads to name)."""
    from pathlib import Path

    from .runtime import configure

    configure()
    from .errors import ModelLoadError
    from .runner import prepend_bos
    from .scores import scores_table
    from .sources import resolve_checkpoints
    from .spec import load_spec
    from .tasks import build_task
    from .tasks.base import BuildContext

    loaded = load_spec(Path(args.spec))
    m = loaded.spec.model
    refs = resolve_checkpoints(m.source, m.revision, m.checkpoints, loaded.dir)
    want = str(args.checkpoint)
    pick = [r for r in refs if r.label in (want, f"step{want}") or str(r.step) == want] if args.checkpoint else refs[-1:]
    if not pick:
        raise ModelLoadError(f"no checkpoint {want!r} in {m.source}; available: {', '.join(r.label for r in refs)}")
    ref = pick[0]
    reason = ref.unavailable_reason()
    if reason:
        raise ModelLoadError(reason)
    bridge = ref.load()
    prepend = prepend_bos(loaded.spec, ref, bridge)
    task = build_task(loaded.spec.task.name, bridge.tokenizer, loaded.spec.task.params,
                      BuildContext(spec_dir=str(loaded.dir), prepend_bos=prepend))
    print(f"{loaded.spec.name} @ {ref.label} ({m.source}); task {loaded.spec.task.name}, {len(task)} examples")
    print(scores_table(bridge, task, roles={k: list(v) for k, v in loaded.spec.circuit.roles.items()}))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .plot import plot_results
    from .results import read_json

    for p in plot_results(read_json(args.results), args.out):
        print(p)
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
    zt = zsub.add_parser("train", help="re-train a zoo model deterministically (1 thread) into a directory and "
                         "compare it with the shipped one (exit 1 if it does not reproduce)")
    zt.add_argument("name", help="a zoo model (see `circuit-tests zoo list`)")
    zt.add_argument("--out", help="output directory (default: a new temporary directory)")
    zt.set_defaults(fn=_zoo_train)
    pl = sub.add_parser("plot", help="draw one PNG per spec from a results file (pytest --circuit-json): each "
                                     "claim's value across checkpoints, with thresholds and outcomes (needs matplotlib)")
    pl.add_argument("results", help="a JSON file written by pytest --circuit-json")
    pl.add_argument("--out", default="circuit-plots", help="output directory (default: circuit-plots)")
    pl.set_defaults(fn=_plot)
    sc = sub.add_parser("scores", help="print every head's role scores and path-patching effects for a spec's "
                                         "task at one checkpoint (to choose which heads to name)")
    sc.add_argument("spec", help="a spec file (its model, task and roles are used)")
    sc.add_argument("--checkpoint", help="step or label (default: the last checkpoint)")
    sc.set_defaults(fn=_scores)
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
