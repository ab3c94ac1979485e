"""Edge-attribution cost and the minimal-circuit search's evaluation count, as ratios measured in one run.

- eap_ig_over_passes (GPT-2-small-, Pythia-160m- and SmolLM2-135M-shaped random-init models from their real
  configs; batch 8 x 16 tokens; m = 5): EAP-IG attribution CPU time for one batch / ((m + 1) x (one plain
  forward + one backward of the same batch)); least of ``--repeats`` alternating runs, one thread. The baseline
  is what a user runs: ``bridge(tokens)`` on the model as loaded (grouped-query attention stays grouped; the
  logits of every position), then a backward of Σ metric to the input embeddings with the parameters frozen
  (no weight gradients, as in attribution). Attribution is charged for everything else: its hooks, the
  per-query-head k/v, the per-receiver contractions and the cached clean+corrupted pass (the "+1").
  Target <= 1.3. ``eap_ig_over_passes_end_only`` is the same with a stricter baseline that, like attribution,
  unembeds only the END position (the full-vocabulary unembedding of every position is ~10% of a
  SmolLM2-shaped forward+backward).
- search_evaluations (zoo models at their last checkpoint, EAP-IG m = 5, greedy, normalized >= 0.8): how many
  engine evaluations the smallest-circuit search needed, against the graph's edge count (a linear scan over
  every size would need one evaluation per size).
Prints a line per measurement and, as the last line, one JSON object.

    python benchmarks/attribution.py [--repeats 3] [--models gpt2_small_shaped,pythia_160m_shaped] [--no-search]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from circuit_tests.runtime import configure  # noqa: E402

configure()

import torch  # noqa: E402

from circuit_tests.attribution import attribute  # noqa: E402
from circuit_tests.metrics import metric_values  # noqa: E402
from circuit_tests.models import bridge_from_hf  # noqa: E402
from tests.helpers import gpt2_small, pythia_160m, random_task  # noqa: E402

M = 5


def smollm2_135m():
    from benchmarks.engine import smollm2_135m as build

    return build()


BUILDERS = {"gpt2_small_shaped": gpt2_small, "pythia_160m_shaped": pythia_160m, "smollm2_135m_shaped": smollm2_135m}


def _plain_fwd_bwd(bridge, task) -> None:
    """One forward of the clean batch and one backward of Σ metric to the token embeddings (parameters frozen)."""
    box = {}

    def leaf(t, hook):
        box["e"] = t.detach().requires_grad_(True)
        return box["e"]

    with bridge.hooks(fwd_hooks=[("hook_embed", leaf)]):
        logits = bridge(task.clean)[torch.arange(len(task)), task.end]
    metric_values("logit_diff", logits, task.targets, task.signs).sum().backward()


def _plain_fwd_bwd_end(bridge, task) -> None:
    """As ``_plain_fwd_bwd`` but unembedding only the END position (what attribution computes)."""
    box = {}

    def leaf(t, hook):
        box["e"] = t.detach().requires_grad_(True)
        return box["e"]

    def stop(x, hook):
        box["x"] = x
        raise _Stop

    try:
        with bridge.hooks(fwd_hooks=[("hook_embed", leaf), ("ln_final.hook_in", stop)]):
            bridge(task.clean)
    except _Stop:
        pass
    x = box["x"][torch.arange(len(task)), task.end]
    logits = bridge.unembed(bridge.ln_final(x[:, None, :]))[:, 0]
    metric_values("logit_diff", logits, task.targets, task.signs).sum().backward()


class _Stop(Exception):
    pass


def _interleaved(fns, repeats: int) -> list[float]:
    """Least CPU time (``process_time``, one thread) of each function, run alternately: robust to the other
    processes of a shared machine, which change wall-clock times by 2-3x between runs."""
    for fn in fns:  # warm-up
        fn()
    ts: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t_fn in zip(fns, ts):
            t = time.process_time()
            fn()
            t_fn.append(time.process_time() - t)
    return [min(t) for t in ts]


def attribution_ratio(name: str, repeats: int) -> dict:
    torch.manual_seed(0)
    bridge = bridge_from_hf(BUILDERS[name]().eval())
    task = random_task(vocab=1000, n=8, seq=16, seed=0)

    def frozen(fn):
        def run():
            for p in bridge.parameters():
                p.requires_grad_(False)
            try:
                fn(bridge, task)
            finally:
                for p in bridge.parameters():
                    p.requires_grad_(True)
        return run

    plain, plain_end, attr = _interleaved(
        [frozen(_plain_fwd_bwd), frozen(_plain_fwd_bwd_end),
         lambda: attribute(bridge, task, method="eap-ig", steps=M, batch_size=len(task))], repeats)
    ratio, strict = attr / ((M + 1) * plain), attr / ((M + 1) * plain_end)
    print(f"{name}: EAP-IG (m={M}) {attr:.3f} s, forward+backward {plain:.3f} s (CPU time) -> ratio {ratio:.2f} "
          f"(target <= 1.3); END-only baseline {plain_end:.3f} s -> {strict:.2f}")
    return {"model": name, "eap_ig_cpu_seconds": attr, "fwd_bwd_cpu_seconds": plain, "eap_ig_over_passes": ratio,
            "fwd_bwd_end_only_cpu_seconds": plain_end, "eap_ig_over_passes_end_only": strict}


def search_counts() -> list[dict]:
    from circuit_tests.discovery import discover
    from circuit_tests.runner import prepend_bos
    from circuit_tests.sources import resolve_checkpoints
    from circuit_tests.spec import load_spec
    from circuit_tests.tasks import build_task
    from circuit_tests.tasks.base import BuildContext

    out = []
    for spec in ("induction.circuit.yaml", "ioi.circuit.yaml", "greater_than.circuit.yaml"):
        loaded = load_spec(ROOT / "specs" / spec)
        m = loaded.spec.model
        ref = resolve_checkpoints(m.source, m.revision, m.checkpoints, loaded.dir)[-1]
        bridge = ref.load()
        pb = prepend_bos(loaded.spec, ref, bridge)
        task = build_task(loaded.spec.task.name, bridge.tokenizer, loaded.spec.task.params,
                          BuildContext(spec_dir=str(loaded.dir), prepend_bos=pb))
        for method in ("eap", "eap-ig"):
            d = discover(bridge, task, method=method, steps=M, target=0.8, prepend_bos=pb)
            r = d.search
            from circuit_tests.graph import Graph

            E = Graph.from_bridge(bridge).n_edges
            row = {"spec": spec, "checkpoint": ref.label, "method": method, "edges_total": E,
                   "found_edges": r.point.edges if r.point else None,
                   "faithfulness": r.point.faithfulness if r.point else None, "evaluations": r.n_evaluations,
                   "attribution_seconds": d.seconds_attribution, "search_seconds": d.seconds_search}
            print(f"{spec} @ {ref.label} {method}: {row['found_edges']} of {E} edges, faithfulness "
                  f"{row['faithfulness'] if row['faithfulness'] is None else round(row['faithfulness'], 3)}, "
                  f"{r.n_evaluations} engine evaluations; scores {d.seconds_attribution:.1f} s, search "
                  f"{d.seconds_search:.1f} s")
            out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="gpt2_small_shaped,pythia_160m_shaped,smollm2_135m_shaped")
    ap.add_argument("--no-search", action="store_true")
    a = ap.parse_args()
    res = {"attribution": [attribution_ratio(n, a.repeats) for n in a.models.split(",") if n]}
    if not a.no_search:
        res["search"] = search_counts()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
