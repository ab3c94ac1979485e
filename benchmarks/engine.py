"""Engine cost as ratios measured in one run (absolute times on shared machines are noise).

For a GPT-2-small-shaped, a Pythia-160m-shaped and a SmolLM2-135M-shaped random-init model (LLaMA family: 30
layers, d_model 576, 9 query heads over 3 key/value heads, RMSNorm, rotary, no biases; batch 16 x 32 tokens, a
random circuit of ~5% of the edges, interchange ablation):
- faithfulness_eval_over_forward: one whole-circuit evaluation (the batched clean+corrupted pass plus the
  patched pass) / one plain forward of the clean batch.   Target <= 3.0 (issue 13, item 7).
- engine_over_naive: the engine / the naive edge-by-edge reference of tests/reference.py (same circuit,
  same outputs).   Target <= 0.1.
  For the GQA model the naive reference runs on the ungrouped multi-head copy (tests/reference.py
  ``ungrouped_copy``: per-query-head k/v inputs, the graph's convention).
- path_patching_over_loop (GPT-2-small- and SmolLM2-shaped): all senders' path-patching effects on the q inputs
  of two heads at 3/4 depth, batched / two hooked forwards per sender (benchmarks/path_patching.py; CPU-time
  ratio, loop timed on a subset of senders and scaled).   Target <= 0.1.
Prints a human-readable line per model and, as the last line, one JSON object.

    python benchmarks/engine.py [--repeats 5] [--models gpt2_small_shaped,smollm2_135m_shaped]
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
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from circuit_tests.engine import PatchingEngine  # noqa: E402
from circuit_tests.graph import Circuit  # noqa: E402
from circuit_tests.models import bridge_from_hf  # noqa: E402
from tests.helpers import random_task  # noqa: E402
from tests.reference import naive_circuit_logits, ungrouped_copy  # noqa: E402


def smollm2_135m():
    """Random-init SmolLM2-135M (its config.json values, reference/smollm2.md): LLaMA with GQA 9/3, no biases."""
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
        max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)).eval()


MODELS = ("gpt2_small_shaped", "pythia_160m_shaped", "smollm2_135m_shaped")


def models(names=MODELS):
    torch.manual_seed(0)
    build = {
        "gpt2_small_shaped": lambda: GPT2LMHeadModel(GPT2Config()),
        "pythia_160m_shaped": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(
            hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=50304,
            rotary_pct=0.25, max_position_embeddings=2048, use_parallel_residual=True, tie_word_embeddings=False)),
        "smollm2_135m_shaped": smollm2_135m,
    }
    for name in MODELS:  # same seed sequence whichever subset runs
        hf = build[name]()
        if name in names:
            yield name, hf


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
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    args = ap.parse_args()
    wanted = args.models.split(",")
    unknown = sorted(set(wanted) - set(MODELS))
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    out = {}
    for name, hf in models(wanted):
        grouped = hf.config.to_dict().get("num_key_value_heads", None) not in (None, hf.config.num_attention_heads)
        ref_bridge = bridge_from_hf(ungrouped_copy(hf)) if grouped else None  # before wrapping: it mutates hf
        bridge = bridge_from_hf(hf)
        ref_bridge = ref_bridge or bridge
        engine = PatchingEngine(bridge)
        g = engine.graph
        task = random_task(vocab=hf.config.vocab_size, n=16, seq=32, seed=0)
        rng = random.Random(0)
        circuit = Circuit(g, frozenset(e for e in g.edges() if rng.random() < args.fraction))
        with torch.no_grad():
            t_fwd = timed(lambda: bridge(task.clean), args.repeats)
        t_eval = timed(lambda: engine.evaluate(task, circuit, batch_size=16), args.repeats)
        t0 = time.perf_counter()
        naive = naive_circuit_logits(ref_bridge, task, circuit)
        t_naive = time.perf_counter() - t0
        fast = engine.evaluate(task, circuit, batch_size=16).circuit
        err = float((fast - naive).abs().max())
        out[name] = {"faithfulness_eval_over_forward": round(t_eval / t_fwd, 3), "engine_over_naive": round(t_eval / t_naive, 4),
                     "circuit_edges": len(circuit.edges), "total_edges": g.n_edges, "max_abs_diff_vs_naive": err}
        print(f"{name}: forward {t_fwd * 1e3:.0f} ms, evaluation {t_eval * 1e3:.0f} ms, naive {t_naive * 1e3:.0f} ms, "
              f"{len(circuit.edges)}/{g.n_edges} edges, max|engine - naive| = {err:.1e}", flush=True)
        del bridge, engine, hf, ref_bridge
    if not args.skip_path_patching:
        from benchmarks import path_patching

        for name, pp_model in (("gpt2_small_shaped", "gpt2"), ("smollm2_135m_shaped", "smollm2")):
            if name not in wanted:
                continue
            pp = path_patching.run(argparse.Namespace(loop_senders=6, repeats=1, threads=1, batch=16, seq=32,
                                                      model=pp_model))
            out[name]["path_patching_over_loop"] = pp["path_patching_over_loop"]
            out[name]["path_patching_over_loop_worst_case"] = pp["path_patching_over_loop_worst_case_q"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
