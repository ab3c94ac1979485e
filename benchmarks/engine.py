"""Engine cost as ratios measured in one run (absolute times on shared machines are noise).

For a GPT-2-small-shaped and a Pythia-160m-shaped random-init model (batch 16 x 32 tokens, a random circuit of
~5% of the edges, interchange ablation):
- faithfulness_eval_over_forward: one whole-circuit evaluation (the batched clean+corrupted pass plus the
  patched pass) / one plain forward of the clean batch.   Target <= 3.3.
- engine_over_naive: the engine / the naive edge-by-edge reference of tests/reference.py (same circuit,
  same outputs).   Target <= 0.1.
- path_patching_over_loop (GPT-2-small-shaped): all 144 senders' path-patching effects on the q inputs of two
  layer-9 heads, batched / two hooked forwards per sender (benchmarks/path_patching.py; CPU-time ratio, loop
  timed on a subset of senders and scaled).   Target <= 0.1.
Prints a human-readable line per model and, as the last line, one JSON object.

    python benchmarks/engine.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from circuit_tests.runtime import configure  # noqa: E402

configure()

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: E402

from circuit_tests.engine import PatchingEngine  # noqa: E402
from circuit_tests.graph import Circuit  # noqa: E402
from circuit_tests.models import bridge_from_hf  # noqa: E402
from tests.helpers import random_task  # noqa: E402
from tests.reference import naive_circuit_logits  # noqa: E402


def models():
    torch.manual_seed(0)
    yield "gpt2_small_shaped", GPT2LMHeadModel(GPT2Config())
    yield "pythia_160m_shaped", GPTNeoXForCausalLM(GPTNeoXConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=50304,
        rotary_pct=0.25, max_position_embeddings=2048, use_parallel_residual=True, tie_word_embeddings=False))


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fraction", type=float, default=0.05, help="fraction of edges in the circuit")
    ap.add_argument("--skip-path-patching", action="store_true", help="skip the path-patching benchmark (slow: minutes)")
    args = ap.parse_args()
    out = {}
    for name, hf in models():
        bridge = bridge_from_hf(hf)
        engine = PatchingEngine(bridge)
        g = engine.graph
        task = random_task(vocab=hf.config.vocab_size, n=16, seq=32, seed=0)
        rng = random.Random(0)
        circuit = Circuit(g, frozenset(e for e in g.edges() if rng.random() < args.fraction))
        with torch.no_grad():
            t_fwd = timed(lambda: bridge(task.clean), args.repeats)
        t_eval = timed(lambda: engine.evaluate(task, circuit, batch_size=16), args.repeats)
        t0 = time.perf_counter()
        naive = naive_circuit_logits(bridge, task, circuit)
        t_naive = time.perf_counter() - t0
        fast = engine.evaluate(task, circuit, batch_size=16).circuit
        err = float((fast - naive).abs().max())
        out[name] = {"faithfulness_eval_over_forward": round(t_eval / t_fwd, 3), "engine_over_naive": round(t_eval / t_naive, 4),
                     "circuit_edges": len(circuit.edges), "total_edges": g.n_edges, "max_abs_diff_vs_naive": err}
        print(f"{name}: forward {t_fwd * 1e3:.0f} ms, evaluation {t_eval * 1e3:.0f} ms, naive {t_naive * 1e3:.0f} ms, "
              f"{len(circuit.edges)}/{g.n_edges} edges, max|engine - naive| = {err:.1e}", flush=True)
        del bridge, engine, hf
    if not args.skip_path_patching:
        from benchmarks import path_patching

        pp = path_patching.run(argparse.Namespace(loop_senders=6, repeats=1, threads=1, batch=16, seq=32))
        out["gpt2_small_shaped"]["path_patching_over_loop"] = pp["path_patching_over_loop"]
        out["gpt2_small_shaped"]["path_patching_over_loop_worst_case"] = pp["path_patching_over_loop_worst_case_q"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
