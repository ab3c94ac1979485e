"""Per-checkpoint overhead of a checkpoint sweep, as ratios measured in one run.

A sweep pays, at every checkpoint, for more than the circuit evaluation: hashing the weights (duplicate
detection, cache keys), loading them into a TransformerBridge (plus the integrity checks and resolving the
circuit against the graph), building the task's prompts, and releasing the model afterwards (the checkpoint
node's teardown: dropping the bridge and, for large models, a garbage collection). This script times those
phases the way ``runner.evaluate_checkpoint`` and the teardown run them, checkpoint by checkpoint in one process,
and reports

- overhead_over_evaluation: (hash + load + task + release) / the circuit evaluation (the engine's batched clean+corrupted
  and patched passes), per checkpoint (median) and over the sweep.   Target <= 1 (issue 13, item 7).
- overhead_over_claims: the same overhead / measuring all the spec's claims at that checkpoint (the circuit
  evaluation, role scores, path patching, baselines: what a sweep spends per checkpoint besides the overhead).
The first checkpoint of the first sweep also pays for the imports; the medians are what a long sweep sees.

Sweeps measured:
- each shipped zoo spec (``specs/*.circuit.yaml``: tiny models, where the fixed cost of building a bridge shows);
- ``pythia_160m_shaped``: a Pythia-160m-shaped body (GPT-NeoX, 12 layers, d_model 768, 12 heads, rotary 0.25,
  parallel residual; random init, one seed per checkpoint) with the zoo IOI vocabulary so that the zoo's IOI task
  runs on it; 3 checkpoints written as safetensors into a temporary directory and swept like a local
  ``step<N>/`` source (the spec's ``circuit`` is the zoo IOI spec's heads).

    python benchmarks/sweep.py [--sweeps induction,ioi,greater_than,pythia_160m_shaped] [--checkpoints 4]

Prints one line per checkpoint and, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from circuit_tests.runtime import configure  # noqa: E402

configure()

ZOO_SPECS = {"induction": "induction.circuit.yaml", "ioi": "ioi.circuit.yaml", "greater_than": "greater_than.circuit.yaml"}
SWEEPS = (*ZOO_SPECS, "pythia_160m_shaped")

PYTHIA_SPEC = """name: pythia-shaped-sweep
model:
  source: {source}
  checkpoints: all
task:
  name: ioi
  size: 64
  seed: 0
  corruption: s2_io_flip
circuit:
  nodes: [a0.h1, a2.h0, a2.h1, a1.h0, a1.h1, a1.h3, a5.h2, a9.h9, a10.h7, m3, m7, m11]
ablation: corrupted
claims:
  - type: faithfulness
    normalization: normalized
    min: 0.8
"""


def pythia_shaped_sweep(root: Path, n: int) -> Path:
    """Write ``n`` random-init Pythia-160m-shaped checkpoints (zoo IOI vocabulary) as step<N>/ dirs and a spec."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    zoo_ioi = ROOT / "circuit_tests" / "zoo" / "models" / "ioi" / "step2500"
    vocab = json.loads((zoo_ioi / "config.json").read_text())["vocab_size"]
    cfg = GPTNeoXConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        vocab_size=vocab, rotary_pct=0.25, max_position_embeddings=2048, use_parallel_residual=True,
                        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    for i in range(n):
        torch.manual_seed(i)
        d = root / "ckpts" / f"step{1000 * i}"
        GPTNeoXForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
        for f in zoo_ioi.iterdir():
            if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
                shutil.copy(f, d / f.name)
    spec = root / "pythia.circuit.yaml"
    spec.write_text(PYTHIA_SPEC.format(source=str(root / "ckpts")))
    return spec


def sweep(spec_path: Path, limit: int) -> list[dict[str, float]]:
    """Time hash / load / task / evaluation per checkpoint, as ``runner._evaluate_into`` runs them."""
    from circuit_tests.engine import PatchingEngine
    from circuit_tests.graph import Graph
    from circuit_tests.integrity import check_loaded
    from circuit_tests.runner import SpecRun, circuit_for, measure_claim, prepend_bos
    from circuit_tests.sources import resolve_checkpoints
    from circuit_tests.spec import load_spec
    from circuit_tests.tasks import build_task
    from circuit_tests.tasks.base import BuildContext

    loaded = load_spec(spec_path)
    spec = loaded.spec
    refs = resolve_checkpoints(spec.model.source, spec.model.revision, spec.model.checkpoints, loaded.dir)
    refs = refs[-limit:]  # the last ones: formed circuits, as a sweep mostly sees
    run = SpecRun(loaded, refs)
    rows = []
    for ref in refs:
        t = time.perf_counter()
        dups = run.duplicates()
        dups.sha256(ref)
        dups.original_of(ref)
        t_hash = time.perf_counter() - t
        t = time.perf_counter()
        bridge = ref.load()
        check_loaded(ref, bridge)
        graph = Graph.from_bridge(bridge)
        circuit = circuit_for(loaded, graph)
        t_load = time.perf_counter() - t
        t = time.perf_counter()
        ctx = BuildContext(spec_dir=str(loaded.dir), prepend_bos=prepend_bos(spec, ref, bridge))
        task = build_task(spec.task.name, bridge.tokenizer, spec.task.params, ctx)
        t_task = time.perf_counter() - t
        t = time.perf_counter()
        PatchingEngine(bridge, graph).evaluate(task, circuit, spec.ablation, spec.task.batch_size)
        t_eval = time.perf_counter() - t
        t = time.perf_counter()  # every claim, as the items run them (model, hash and task are memoised by now)
        for i in range(len(spec.claims)):
            measure_claim(run, ref, i)
        t_claims = time.perf_counter() - t
        t = time.perf_counter()  # as the checkpoint node's teardown does it
        run.evaluations.pop(ref.label, None)
        del bridge
        ref.release()
        t_release = time.perf_counter() - t
        over = t_hash + t_load + t_task + t_release
        rows.append({"checkpoint": ref.label, "hash_s": t_hash, "load_s": t_load, "task_s": t_task,
                     "release_s": t_release, "eval_s": t_eval,
                     "claims_s": t_claims, "overhead_over_evaluation": over / t_eval,
                     "overhead_over_claims": over / t_claims})
        print(f"  {ref.label}: hash {t_hash * 1e3:.0f} ms, load {t_load * 1e3:.0f} ms, task {t_task * 1e3:.0f} ms, "
              f"release {t_release * 1e3:.0f} ms, "
              f"circuit evaluation {t_eval * 1e3:.0f} ms, all {len(spec.claims)} claims {t_claims * 1e3:.0f} ms -> "
              f"overhead / circuit evaluation {over / t_eval:.2f}, overhead / claims {over / t_claims:.2f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweeps", default=",".join(SWEEPS), help=f"comma-separated subset of {', '.join(SWEEPS)}")
    ap.add_argument("--checkpoints", type=int, default=4, help="checkpoints per zoo sweep (the last ones)")
    ap.add_argument("--pythia-checkpoints", type=int, default=3)
    args = ap.parse_args()
    wanted = args.sweeps.split(",")
    unknown = sorted(set(wanted) - set(SWEEPS))
    if unknown:
        ap.error(f"unknown sweep(s) {', '.join(unknown)}; choose from {', '.join(SWEEPS)}")
    out = {}
    with tempfile.TemporaryDirectory(prefix="circuit-sweep-bench-") as tmp:
        for name in wanted:
            print(name, flush=True)
            if name == "pythia_160m_shaped":
                rows = sweep(pythia_shaped_sweep(Path(tmp), args.pythia_checkpoints), args.pythia_checkpoints)
            else:
                rows = sweep(ROOT / "specs" / ZOO_SPECS[name], args.checkpoints)
            over = sum(r["hash_s"] + r["load_s"] + r["task_s"] + r["release_s"] for r in rows)
            out[name] = {
                "overhead_over_evaluation_median": round(statistics.median(r["overhead_over_evaluation"] for r in rows), 3),
                "overhead_over_evaluation_sweep": round(over / sum(r["eval_s"] for r in rows), 3),
                "overhead_over_claims_median": round(statistics.median(r["overhead_over_claims"] for r in rows), 3),
                "overhead_over_claims_sweep": round(over / sum(r["claims_s"] for r in rows), 3),
                "phases_median_ms": {k: round(1e3 * statistics.median(r[k] for r in rows), 1)
                                     for k in ("hash_s", "load_s", "task_s", "release_s", "eval_s", "claims_s")},
                "checkpoints": len(rows),
            }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
