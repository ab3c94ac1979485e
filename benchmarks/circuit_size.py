"""Faithfulness vs circuit size of circuit-discovery methods (issue 20 item 4: minimal circuits worth reading).

What it measures, for one task spec (model + task + corruption) and each method:

- scores on the *search* prompts (the spec's task with ``--score-seed``, default 1),
- the curve of normalized faithfulness ``(m(C) - m(M')) / (m(M) - m(M'))`` (interchange ablation with the corrupted
  prompts, the patching engine, ``CircuitEvaluator``) on the *held-out* prompts (the spec's own seed, default 0)
  at each size of ``--sizes`` (edges asked for; the circuit is the top-n real edges by the method's ranking,
  pruned of dangling nodes — MIB's ``apply_topn`` + ``prune``; the table reports the edges left after pruning),
- the smallest size reaching ``--target`` (default 0.8): the bracketing grid points, then up to ``--bisect``
  extra evaluations bisecting (log-spaced) between them. The bisection reads the held-out prompts too, so that
  size is selected on them (the grid values are purely held out),
- optionally (``--mib``) MIB's CPR (signed top-n) and CMD (|score| top-n) with ``discovery.mib_areas`` on the
  held-out prompts (20 more evaluations per method),
- wall and CPU seconds of scoring and of each evaluation.

Methods (``--methods``, comma-separated):

- ``eap``: EAP, one gradient on the clean run (``discovery.edge_scores``).
- ``eap-ig``: EAP-IG, m = ``--ig-steps`` (5) interpolation steps; ``eap-ig30``: the same with m = 30.
- ``iterative``: iterative re-attribution. EAP-IG (m = 5) scores every edge; then, repeatedly, the lowest-|score|
  ``--iter-drop`` (50 %) of the edges still in the circuit are ablated (patched with the corrupted run) and every
  edge is re-scored by one gradient of the metric with respect to the edge masks of the masked model
  (``edge_pruning._MaskedModel`` at the current 0/1 mask: the EAP score of each edge *given* the current
  circuit), down to ``--iter-min`` edges. Ranking: edges that survived more rounds first, within a round by the
  |score| of the round that dropped them. Circuits of every size are nested.
- ``node``: node-level ranking. Heads and MLPs ranked by the summed |EAP-IG (m = 5) score| of their incoming and
  outgoing edges; the circuit of the top k nodes is every edge among them (plus input and logits). k is chosen per
  requested size as the smallest k whose pruned circuit has at least that many edges.
- ``edge-pruning``: Edge Pruning (``edge_pruning.prune_edges``), ``--ep-steps`` optimiser steps, target sparsity
  ``--ep-sparsity``; the curve ranks edges by the learned mask logits (signed), and the learned hard circuit itself
  is evaluated as an extra point.

    python benchmarks/circuit_size.py --task-spec specs/real/ioi-smollm2-135m.circuit.yaml \
        --methods eap,eap-ig,iterative,node --out /tmp/abc.json
    python benchmarks/circuit_size.py --task-spec specs/ioi.circuit.yaml --source zoo:ioi --sizes 10,30,100 \
        --methods eap,eap-ig,iterative,node --out /tmp/zoo.json            # fast smoke run
    python benchmarks/circuit_size.py --plot docs/circuit_size.png --inputs /tmp/abc.json /tmp/flip.json

Deterministic (no sampling except Edge Pruning's seeded generator). Prints a table per method and, as the last
line, the JSON written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_SIZES = "250,500,1000,2500,5000,10000,20000,40000"


class Clock:
    def __init__(self) -> None:
        self.w, self.c = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.w, time.process_time() - self.c


def load(args):
    import yaml

    from circuit_tests.sources import resolve_checkpoints
    from circuit_tests.tasks import build_task
    from circuit_tests.tasks.base import BuildContext

    spec_path = Path(args.task_spec)
    spec = yaml.safe_load(spec_path.read_text())
    source = args.source or spec["model"]["source"]
    refs = resolve_checkpoints(source, None, None, spec_path.parent)
    ref = refs[-1]  # the last checkpoint (zoo models ship several)
    bridge = ref.load()
    t = dict(spec["task"])
    name = t.pop("name")
    bos = bool(t.pop("prepend_bos", True))
    eval_seed = t.get("seed", 0) if args.eval_seed is None else args.eval_seed
    ctx = BuildContext(spec_dir=str(spec_path.parent), prepend_bos=bos)
    score_task = build_task(name, bridge.tokenizer, {**t, "seed": args.score_seed}, ctx)
    eval_task = build_task(name, bridge.tokenizer, {**t, "seed": eval_seed}, ctx)
    info = {"spec": str(spec_path), "source": source, "checkpoint": str(getattr(ref, "name", ref)), "task": name,
            "task_params": t, "prepend_bos": bos, "score_seed": args.score_seed, "eval_seed": eval_seed,
            "corruption": t.get("corruption")}
    return bridge, score_task, eval_task, info


# ------------------------------------------------------------------ scoring methods

def masked_model_grad(bridge, task, mask, batch_size: int, mm=None, cache=None):
    """d mean-metric / d z for every edge mask z, at z = ``mask`` (0/1), edges outside ``mask`` ablated."""
    import torch

    from circuit_tests.edge_pruning import _MaskedModel
    from circuit_tests.metrics import metric_values

    mm = mm or _MaskedModel(bridge)
    if cache is None:
        cache = []
        for start in range(0, len(task), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(task)))
            out, _ = mm.corrupted_outputs(task.clean[idx], task.corrupted[idx], task.end[idx])
            cache.append((idx, out))
    frozen = [p for p in bridge.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    grad = torch.zeros(mask.shape, dtype=torch.float64)
    try:
        for idx, out in cache:
            z = mask.to(torch.float32).clone().requires_grad_(True)
            logits = mm.logits(task.clean[idx], task.end[idx], out, z)
            m = metric_values(task.default_metric, logits, task.targets[idx], task.signs[idx]).sum()
            m.backward()
            grad += z.grad.double()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return grad / len(task), mm, cache


def score_iterative(bridge, task, real, base_scores, drop: float, n_min: int, batch_size: int, log):
    """Rank key (higher = kept longer) from iterative re-attribution; see the module docstring."""
    import torch

    key = torch.full(real.shape, float("-inf"), dtype=torch.float64)
    cur = real.clone()
    scores = base_scores.abs()
    rnd, mm, cache, rounds = 0, None, None, []
    while True:
        n_cur = int(cur.sum())
        n_keep = max(n_min, int(n_cur * (1 - drop))) if n_cur > n_min else 0
        s = scores.masked_fill(~cur, float("-inf")).flatten()
        order = torch.argsort(s, descending=True, stable=True)
        dropped = order[n_keep:n_cur]
        # edges dropped this round: rank band `rnd`, ordered within it by this round's |score| (in [0, 1))
        a = s[dropped]
        band = (a - a.min()) / (a.max() - a.min() + 1e-30) if len(a) else a
        key.view(-1)[dropped] = rnd + band * 0.999
        new = torch.zeros(cur.numel(), dtype=torch.bool)
        new[order[:n_keep]] = True
        cur = new.view_as(cur)
        rnd += 1
        if n_keep == 0:
            break
        clk = Clock()
        g, mm, cache = masked_model_grad(bridge, task, cur, batch_size, mm, cache)
        w, c = clk.read()
        rounds.append({"edges_in": n_keep, "wall_s": w, "cpu_s": c})
        log(f"    iterative round {rnd}: {n_keep} edges kept, re-scored in {w:.1f} s wall / {c:.1f} s CPU")
        scores = g.abs()
    return key, rounds


def node_scores(graph, scores, real):
    """Per sender node: summed |score| of its outgoing edges and of the incoming edges of its receivers."""
    from circuit_tests.discovery import sender_to_receivers

    a = scores.abs().masked_fill(~real, 0)
    out = a.sum(1)
    inc = sender_to_receivers(graph).double() @ a.sum(0)
    return out + inc


def node_mask(graph, order, k: int, owner, real):
    import torch

    from circuit_tests.discovery import prune

    keep = torch.zeros(len(graph.senders), dtype=torch.bool)
    keep[0] = True  # input
    keep[order[:k]] = True
    recv = (keep.float() @ owner.float()) > 0
    recv[-1] = True  # logits
    return prune(graph, real & keep[:, None] & recv[None, :])


# ------------------------------------------------------------------ curves

def run_method(method, bridge, score_task, ev, real, sizes, args, log, shared):
    import torch

    from circuit_tests.discovery import edge_scores, faithfulness_value, mib_areas, topn, _count_nodes

    g = ev.graph
    E = int(real.sum())
    res = {"method": method, "points": [], "scoring": {}}
    clk = Clock()
    absolute = True
    if method in ("eap", "eap-ig", "eap-ig30"):
        steps = {"eap": 1, "eap-ig": args.ig_steps, "eap-ig30": 30}[method]
        s, _ = edge_scores(bridge, score_task, "eap" if method == "eap" else "eap-ig", steps=steps,
                           batch_size=args.batch_size)
        key = s
        if method == "eap-ig" and steps == args.ig_steps:
            shared["eap-ig"] = s
        res["scoring"]["steps"] = steps
    elif method in ("iterative", "node"):
        if "eap-ig" not in shared:
            shared["eap-ig"], _ = edge_scores(bridge, score_task, "eap-ig", steps=args.ig_steps,
                                              batch_size=args.batch_size)
            res["scoring"]["includes_eap_ig"] = True
        s = shared["eap-ig"]
        if method == "iterative":
            key, rounds = score_iterative(bridge, score_task, real, s, args.iter_drop, args.iter_min,
                                          args.mm_batch_size, log)
            res["scoring"]["rounds"] = rounds
        else:
            key = node_scores(g, s, real)
    elif method == "edge-pruning":
        from circuit_tests.edge_pruning import prune_edges

        r = prune_edges(bridge, score_task, target_sparsity=args.ep_sparsity, steps=args.ep_steps, seed=0,
                        batch_size=args.mm_batch_size)
        key, absolute = r.log_alpha.double(), False
        res["scoring"].update(steps=args.ep_steps, target_sparsity=args.ep_sparsity, learned_edges=int(r.mask.sum()))
        shared["ep_mask"] = r.mask
    else:
        raise SystemExit(f"unknown method {method!r}")
    w, c = clk.read()
    res["scoring"].update(wall_s=w, cpu_s=c)
    log(f"  {method}: scored in {w:.1f} s wall / {c:.1f} s CPU")

    evals = []

    if method == "node":
        owner = __import__("circuit_tests.discovery", fromlist=["x"]).sender_to_receivers(g)
        ns = key.clone()
        ns[0] = float("-inf")
        order = torch.argsort(ns, descending=True, stable=True)[: len(g.senders) - 1]
        counts: dict[int, int] = {}

        def edges_at(k):
            if k not in counts:
                counts[k] = int(node_mask(g, order, k, owner, real).sum())
            return counts[k]

        def k_for(n):  # smallest k with at least n edges (edges grow with k)
            lo, hi = 1, len(order)
            if edges_at(hi) < n:
                return hi
            while lo < hi:
                mid = (lo + hi) // 2
                if edges_at(mid) >= n:
                    hi = mid
                else:
                    lo = mid + 1
            return lo

        def build(n):
            return node_mask(g, order, k_for(n), owner, real)
    else:
        def build(n):
            return topn(g, key, real, n, absolute)

    seen: dict[bytes, dict] = {}

    def point(n):
        mask = build(n)
        k = mask.numpy().tobytes()
        if k in seen:
            p = dict(seen[k], n=n)
        else:
            clk = Clock()
            f = ev(mask)
            w, c = clk.read()
            evals.append((w, c))
            p = {"n": n, "edges": int(mask.sum()), "nodes": _count_nodes(g, mask),
                 "faithfulness": faithfulness_value(f, "normalized"), "m_C": f.m_C, "eval_wall_s": w, "eval_cpu_s": c}
            seen[k] = p
        res["points"].append(p)
        log(f"    n={n:>7} edges={p['edges']:>7} nodes={p['nodes']:>4} faithfulness={p['faithfulness']:.3f}")
        return p

    for n in sizes:
        point(min(n, E))
    # smallest passing size: bracket on the grid, then log-spaced bisection
    grid = sorted(res["points"], key=lambda p: p["n"])
    passing = [p for p in grid if p["faithfulness"] >= args.target]
    if passing:
        hi = passing[0]["n"]
        below = [p["n"] for p in grid if p["n"] < hi]
        lo = max(below) if below else 0
        for _ in range(args.bisect):
            if hi - lo <= max(1, hi // 50):
                break
            mid = int(round(math.sqrt(max(lo, 1) * hi)))
            mid = min(max(mid, lo + 1), hi - 1)
            p = point(mid)
            if p["faithfulness"] >= args.target:
                hi = mid
            else:
                lo = mid
    ok = [p for p in res["points"] if p["faithfulness"] >= args.target]
    res["smallest"] = min(ok, key=lambda p: p["edges"]) if ok else None
    if method == "edge-pruning":
        from circuit_tests.discovery import prune

        m = prune(g, shared["ep_mask"])
        clk = Clock()
        f = ev(m)
        w, c = clk.read()
        evals.append((w, c))
        res["learned_circuit"] = {"edges": int(m.sum()), "faithfulness": faithfulness_value(f, "normalized")}
        log(f"    learned circuit: {int(m.sum())} edges, faithfulness {res['learned_circuit']['faithfulness']:.3f}")
    if args.mib and method != "node":
        clk = Clock()
        cpr, cmd = mib_areas(ev, key, real)
        w, _ = clk.read()
        res["mib"] = {"cpr": cpr.cpr, "cmd": cmd.cmd, "cpr_curve": cpr.faithfulness, "cmd_curve": cmd.faithfulness,
                      "fractions": list(cpr.fractions), "wall_s": w}
        log(f"    MIB CPR {cpr.cpr:.3f}  CMD {cmd.cmd:.3f}  ({w:.0f} s)")
    res["evaluations"] = len(evals)
    res["eval_wall_s_mean"] = sum(e[0] for e in evals) / max(1, len(evals))
    res["eval_cpu_s_mean"] = sum(e[1] for e in evals) / max(1, len(evals))
    return res


def table(res, E, target) -> str:
    lines = [f"{res['method']}  (scoring {res['scoring']['wall_s']:.0f} s wall / {res['scoring']['cpu_s']:.0f} s CPU; "
             f"{res['evaluations']} evaluations, {res['eval_wall_s_mean']:.1f} s wall each)",
             f"  {'asked':>7} {'edges':>7} {'%edges':>7} {'nodes':>5} {'faithfulness':>12}"]
    for p in sorted(res["points"], key=lambda p: (p["n"], p["edges"])):
        lines.append(f"  {p['n']:>7} {p['edges']:>7} {100 * p['edges'] / E:>6.2f}% {p['nodes']:>5} {p['faithfulness']:>12.3f}")
    s = res["smallest"]
    lines.append(f"  smallest >= {target}: " + (f"{s['edges']} edges ({100 * s['edges'] / E:.2f}%), {s['nodes']} nodes, "
                                                  f"{s['faithfulness']:.3f}" if s else "none within the sizes tried"))
    return "\n".join(lines)


def plot(inputs, out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, list] = {}  # one panel per (model, task, corruption); methods of several files merged
    for path in inputs:
        d = json.loads(Path(path).read_text())
        i = d["info"]
        panels.setdefault((i["source"], i["task"], i["corruption"]), []).append(d)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False, sharey=True)
    for ax, ds in zip(axes[0], panels.values()):
        d = ds[0]
        E = d["edges_total"]
        for r in [r for dd in ds for r in dd["methods"]]:
            pts = sorted(r["points"], key=lambda p: p["edges"])
            pts = [p for i, p in enumerate(pts) if p["edges"] > 0 and (i == 0 or p["edges"] != pts[i - 1]["edges"])]
            ax.plot([p["edges"] for p in pts] + [E], [p["faithfulness"] for p in pts] + [1.0], marker="o", ms=3,
                    label=r["method"])
        ax.axhline(d["target"], color="grey", ls="--", lw=0.8)
        ax.axvline(0.02 * E, color="grey", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("edges in circuit (after pruning; log)")
        ax.set_title(f"{d['info']['source']} {d['info']['task']} / {d['info']['corruption']} (held-out seed {d['info']['eval_seed']})",
                     fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("normalized faithfulness")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def markdown(inputs) -> str:
    """Markdown tables (one per method and input file) from the JSON of earlier runs."""
    out = []
    for path in inputs:
        d = json.loads(Path(path).read_text())
        E, info = d["edges_total"], d["info"]
        for r in d["methods"]:
            sc = r["scoring"]
            out.append(f"#### {r['method']} — {info['corruption']}\n")
            out.append(f"Scoring {sc['wall_s']:.0f} s wall / {sc['cpu_s']:.0f} s CPU; {r['evaluations']} evaluations, "
                       f"{r['eval_wall_s_mean']:.1f} s wall / {r['eval_cpu_s_mean']:.1f} s CPU each.\n")
            out.append("| asked n | edges (pruned) | % of edges | nodes | normalized faithfulness |")
            out.append("|---:|---:|---:|---:|---:|")
            for p in sorted(r["points"], key=lambda p: (p["n"], p["edges"])):
                out.append(f"| {p['n']} | {p['edges']} | {100 * p['edges'] / E:.2f} | {p['nodes']} | {p['faithfulness']:.3f} |")
            out.append(f"| all | {E} | 100 | all | 1.000 (full model, by definition; not evaluated) |")
            s = r["smallest"]
            out.append("")
            line = (f"Smallest >= {d['target']}: " + (f"**{s['edges']} edges ({100 * s['edges'] / E:.2f} %), "
                                                       f"{s['nodes']} nodes, {s['faithfulness']:.3f}**" if s else "none within the sizes tried"))
            if "mib" in r:
                line += f"; MIB CPR {r['mib']['cpr']:.3f}, CMD {r['mib']['cmd']:.3f}"
            if "learned_circuit" in r:
                lc = r["learned_circuit"]
                line += f"; learned hard circuit {lc['edges']} edges, faithfulness {lc['faithfulness']:.3f}"
            out += [line + ".", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task-spec", default="specs/real/ioi-smollm2-135m.circuit.yaml")
    ap.add_argument("--source", default=None, help="override the spec's model source (e.g. zoo:ioi for a smoke run)")
    ap.add_argument("--methods", default="eap,eap-ig,iterative,node")
    ap.add_argument("--sizes", default=DEFAULT_SIZES)
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--bisect", type=int, default=3, help="extra evaluations bisecting the smallest passing size")
    ap.add_argument("--score-seed", type=int, default=1)
    ap.add_argument("--eval-seed", type=int, default=None, help="default: the spec's seed")
    ap.add_argument("--ig-steps", type=int, default=5)
    ap.add_argument("--iter-drop", type=float, default=0.5)
    ap.add_argument("--iter-min", type=int, default=250)
    ap.add_argument("--ep-steps", type=int, default=100)
    ap.add_argument("--ep-sparsity", type=float, default=0.98)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--mm-batch-size", type=int, default=8, help="batch of the masked-model passes")
    ap.add_argument("--mib", action="store_true", help="also MIB CPR/CMD (20 evaluations per method)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, help="only plot --inputs (JSON files of earlier runs) to this PNG")
    ap.add_argument("--markdown", action="store_true", help="only print markdown tables of --inputs")
    ap.add_argument("--inputs", nargs="*", default=[])
    args = ap.parse_args(argv)
    if args.plot:
        plot(args.inputs, args.plot)
        return 0
    if args.markdown:
        print(markdown(args.inputs))
        return 0

    from circuit_tests.runtime import configure

    configure()
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    from circuit_tests.attribution import real_edge_mask
    from circuit_tests.discovery import CircuitEvaluator

    def log(msg):
        print(msg, flush=True)

    clk = Clock()
    bridge, score_task, eval_task, info = load(args)
    log(f"loaded {info['source']} in {clk.read()[0]:.1f} s; task {info['task']} {info['corruption']} "
        f"score seed {info['score_seed']} eval seed {info['eval_seed']}")
    ev = CircuitEvaluator(bridge, eval_task)
    real = real_edge_mask(ev.graph)
    E = int(real.sum())
    sizes = sorted({min(int(s), E) for s in args.sizes.split(",")})
    out = {"info": info, "edges_total": E, "target": args.target, "sizes": sizes, "args": vars(args),
           "threads": torch.get_num_threads(), "methods": []}
    shared: dict = {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        r = run_method(method, bridge, score_task, ev, real, sizes, args, log, shared)
        out["methods"].append(r)
        log(table(r, E, args.target))
        if args.out:  # written after every method, so a cut-off run keeps what it measured
            Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    m = ev._ref
    out["m_M"], out["m_Mprime"] = (m if m else (None, None))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps({k: v for k, v in out.items() if k != "methods"} | {
        "smallest": {r["method"]: r["smallest"] and r["smallest"]["edges"] for r in out["methods"]}}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
