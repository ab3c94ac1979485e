"""Benchmark: batched exact path patching vs the two-hooked-forwards-per-sender loop, measured in one run.

Model: GPT-2-small shape (``GPT2Config()`` defaults: 12 layers x 12 heads, d_model 768, vocab 50257), random
init, float32, eval mode. Data: 16 prompts x 32 random tokens, IOI-like: the corrupted prompt differs from
the clean one at one position (an "S2" token between positions 20 and 27, replaced by the "IO" token),
answers = (IO, S). Senders: all 144 heads. Receivers: the q inputs of heads a9.h6 and a9.h9, and
``logits``. A second case ("worst case") corrupts position 0 as well, so every position differs and the
fast engine cannot skip the shared prefix.

The loop is timed on a subset of senders (``--loop-senders``, spread over the layers) and scaled to 144:
its cost per sender does not depend on the sender (two full forwards with the same hooks), which the
script checks by reporting the per-sender spread. Each side's timing includes its two cached
clean/corrupted forwards once. The machine is shared (other processes compete for its 2 cores), so both
sides are timed interleaved, best of ``--repeats``, in process CPU time (torch runs 1 thread) as well as
wall time; ``path_patching_over_loop`` is the CPU-time ratio for the q receivers on IOI-like data. Absolute
times are noise; read the ratios. The last line is a JSON object.

``--model smollm2``: the same on a SmolLM2-135M-shaped random-init model (LLaMA family: 30 layers x 9 query
heads over 3 key/value heads, d_model 576, RMSNorm, rotary, no biases; 270 senders), with receivers the q
inputs of a22.h2 and a22.h7 (different key/value groups), ``logits``, and their k inputs (per query head:
the loop runs on the ungrouped multi-head copy, tests/reference.py ``ungrouped_copy``).

    python benchmarks/path_patching.py [--loop-senders 6] [--repeats 1] [--threads 1] [--model gpt2|smollm2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests.reference

from circuit_tests.runtime import configure  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loop-senders", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--model", choices=("gpt2", "smollm2"), default="gpt2")
    args = ap.parse_args()
    configure(threads=args.threads)
    print(json.dumps(run(args)))


def run(args: argparse.Namespace) -> dict:
    """All cases; returns the summary dict (also used by benchmarks/engine.py)."""

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from circuit_tests.models import bridge_from_hf
    from circuit_tests.path_patching import Receivers, path_patch
    from circuit_tests.tasks.base import TaskData
    from tests.reference import naive_path_patch, ungrouped_copy

    model = getattr(args, "model", "gpt2")
    torch.manual_seed(0)
    if model == "smollm2":
        from benchmarks.engine import smollm2_135m

        hf = smollm2_135m()
        ref_bridge = bridge_from_hf(ungrouped_copy(hf))  # before wrapping hf (wrapping mutates it)
        bridge = bridge_from_hf(hf)
        recv_heads = [(22, 2), (22, 7)]
        model_desc = "SmolLM2-135M config (LlamaForCausalLM, GQA 9/3) random init, float32"
    else:
        bridge = bridge_from_hf(GPT2LMHeadModel(GPT2Config()))
        ref_bridge = bridge
        recv_heads = [(9, 6), (9, 9)]
        model_desc = "GPT2Config() random init, float32"
    L, H = bridge.cfg.n_layers, bridge.cfg.n_heads
    B, T = args.batch, args.seq

    def make_task(worst: bool) -> TaskData:
        g = torch.Generator().manual_seed(1)
        clean = torch.randint(1000, 20000, (B, T), generator=g)
        corr = clean.clone()
        names = torch.randint(20000, 30000, (B, 2), generator=g)
        s2 = torch.randint(20, 28, (B,), generator=g)
        rows = torch.arange(B)
        clean[:, 2], clean[:, 4] = names[:, 0], names[:, 1]
        corr[:, 2], corr[:, 4] = names[:, 0], names[:, 1]
        clean[rows, s2] = names[:, 1]
        corr[rows, s2] = names[:, 0]
        if worst:
            corr[:, 0] = (clean[:, 0] + 1) % 20000 + 1000
        return TaskData(name="bench", clean=clean, corrupted=corr, end=torch.full((B,), T - 1),
                        targets=names, signs=torch.tensor([[1.0, -1.0]]).repeat(B, 1), default_metric="logit_diff",
                        positions={"IO": torch.full((B,), 2), "S1": torch.full((B,), 4), "S2": s2,
                                   "END": torch.full((B,), T - 1)})

    def loop_time(task: TaskData, recv: Receivers, senders: list[tuple[int, int]]):
        """Two hooked forwards per sender (tests/reference.py): ((wall, cpu) of the caches, [(wall, cpu) per sender])."""
        timings: list = []
        on = ref_bridge if any(c in ("k", "v") for _, _, c in recv.heads) else bridge
        naive_path_patch(on, task, recv, senders, timings=timings)
        return tuple(timings[0][1:]), [tuple(t[1:]) for t in timings[1:]]

    step = max(1, (L * H) // args.loop_senders)
    subset = [(i // H, i % H) for i in range(0, L * H, step)][: args.loop_senders]
    results = {}
    for case in ("ioi_like", "worst_case"):
        task = make_task(case == "worst_case")
        cases = [("q", Receivers.of_heads(recv_heads, "q")), ("logits", Receivers.logits())]
        if model == "smollm2":
            cases.append(("k", Receivers.of_heads(recv_heads, "k")))
        for rname, recv in cases:
            fast_w, fast_c, loop_w, loop_c = [], [], [], []
            for _ in range(args.repeats):  # interleaved, best of each: the machine is shared
                w0, c0 = time.perf_counter(), time.process_time()
                res = path_patch(bridge, task, recv, method="fast", batch_size=B)
                fast_w.append(time.perf_counter() - w0)
                fast_c.append(time.process_time() - c0)
                (cw, cc), per = loop_time(task, recv, subset)
                loop_w.append(cw + statistics.mean(p[0] for p in per) * L * H)
                loop_c.append(cc + statistics.mean(p[1] for p in per) * L * H)
            key = f"{case}/{rname}"
            pw = [p[0] for p in per]
            results[key] = {
                "batched_wall_s": round(min(fast_w), 2), "batched_cpu_s": round(min(fast_c), 2),
                "loop_wall_s_scaled": round(min(loop_w), 1), "loop_cpu_s_scaled": round(min(loop_c), 1),
                "ratio_cpu": round(min(fast_c) / min(loop_c), 4), "ratio_wall": round(min(fast_w) / min(loop_w), 4),
                "loop_per_sender_wall_spread": round((max(pw) - min(pw)) / statistics.mean(pw), 3),
                "method": res.method,
            }
            r = results[key]
            print(f"{key:20s} batched {r['batched_cpu_s']:7.1f} s cpu ({r['batched_wall_s']:7.1f} wall) | "
                  f"loop {r['loop_cpu_s_scaled']:7.1f} s cpu ({r['loop_wall_s_scaled']:7.1f} wall), scaled from "
                  f"{len(subset)} senders | ratio {r['ratio_cpu']:.4f} cpu, {r['ratio_wall']:.4f} wall", flush=True)
    out = {
        "benchmark": "path_patching",
        "model": model_desc,
        "receiver_heads": [f"a{l}.h{h}" for l, h in recv_heads],
        "batch": [B, T],
        "threads": args.threads,
        "senders": L * H,
        "loop_senders_timed": len(subset),
        "repeats": args.repeats,
        "path_patching_over_loop": results["ioi_like/q"]["ratio_cpu"],
        "path_patching_over_loop_wall": results["ioi_like/q"]["ratio_wall"],
        "path_patching_over_loop_logits": results["ioi_like/logits"]["ratio_cpu"],
        "path_patching_over_loop_worst_case_q": results["worst_case/q"]["ratio_cpu"],
        "path_patching_over_loop_worst_case_logits": results["worst_case/logits"]["ratio_cpu"],
        **({"path_patching_over_loop_worst_case_k": results["worst_case/k"]["ratio_cpu"]} if model == "smollm2" else {}),
        "methods": sorted({r["method"] for r in results.values()}),
        "cases": results,
    }
    return out


if __name__ == "__main__":
    main()
