"""Deterministic training of the zoo models (raw ``GPTNeoXForCausalLM``, i.e. Pythia-shaped).

Reproducibility contract: same recipe + same seed + same torch thread count (fixed to 1 here) + same
torch/transformers versions + same CPU kernels (``torch.backends.cpu.get_cpu_capability()``, recorded in the
manifest) => bit-identical weights at every checkpoint. On other CPU kernels the float32 sums differ in the
last bits and the weights drift; the metrics, formation step and role heads still agree (``reproduce.py``;
checked by ``tests/test_zoo.py::test_retrain_induction_reproduces``, opt-in with ``--run-slow``).
Everything random draws from explicitly seeded generators: ``torch.manual_seed(seed)`` right before
the model is built (init), and one ``torch.Generator`` seeded with ``seed + 1`` for the training data.

"Attention-only" models keep GPT-NeoX's MLP modules (so the graph has ``m{L}`` nodes and the bridge
loads them unchanged) with every MLP weight and bias set to zero and frozen: their output is exactly
0 at every checkpoint. They use a tiny ``intermediate_size`` to keep the shipped zoo small.

CLI: ``python -m circuit_tests.zoo.train NAME [--out ROOT]`` (``all`` for every model; the shipped zoo is
rebuilt with ``--out circuit_tests/zoo/models``); ``--reanalyze`` re-measures existing checkpoints only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..runtime import configure

configure(threads=1)

import torch  # noqa: E402

from ..names import parse_head  # noqa: E402
from . import data as D  # noqa: E402
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, build_word_tokenizer  # noqa: E402

__all__ = ["Recipe", "RECIPES", "build_tokenizer", "build_model", "train", "build", "reanalyze", "write_manifest", "main"]

THREADS = 1


@dataclass(frozen=True)
class Arch:
    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int                 # intermediate_size
    attn_only: bool            # MLP weights zero and frozen
    n_ctx: int = 64            # max_position_embeddings (rotary; no learned positions)
    rotary_pct: float = 0.25   # as Pythia


@dataclass(frozen=True)
class Optim:
    steps: int
    batch_size: int
    lr: float = 1e-3
    warmup: int = 100          # linear warmup steps, then constant
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    arch: Arch
    optim: Optim
    checkpoints: tuple[int, ...]
    data: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    task_metric: str = ""


RECIPES: dict[str, Recipe] = {
    "induction": Recipe(
        name="induction",
        description="2-layer attention-only; random words where half the 16-word chunks copy an earlier span: "
                    "a previous-token head in L0 and induction heads in L1 form in an abrupt phase change",
        arch=Arch(n_layers=2, d_model=64, n_heads=4, d_mlp=16, attn_only=True, n_ctx=128),
        optim=Optim(steps=3000, batch_size=32, lr=1e-3),
        checkpoints=(0, 500, 1000, 1500, 2000, 2100, 2200, 2300, 2400, 2500, 2600, 2700, 2800, 3000),
        data={"kind": "induction", "n_words": 96, "seq_len": 64, "chunk": 16, "p_copy": 0.5},
        task_metric="induction score of the best layer-1 head on BOS + r + r (|r| = 20 random words)",
    ),
    "ioi": Recipe(
        name="ioi",
        description="3-layer attention-only on IOI template sentences (BABA and ABBA mixed, half of the training "
                    "sentences with a distractor name after S2): L1 name movers + L2 S-suppression heads",
        arch=Arch(n_layers=3, d_model=64, n_heads=4, d_mlp=16, attn_only=True, n_ctx=64),
        optim=Optim(steps=2500, batch_size=64, lr=1e-3),
        checkpoints=(0, 250, 500, 550, 600, 650, 700, 750, 800, 900, 1000, 1250, 1500, 2000, 2500),
        data={"kind": "ioi", "p_distractor": 0.5},
        task_metric="logit diff logit(IO) - logit(S) at END on held-out prompts (BABA and ABBA)",
    ),
    "greater_than": Recipe(
        name="greater_than",
        description="2-layer with MLPs on 'The {noun} lasted from the year {XX}{YY} to the year {XX}{ZZ}', ZZ > YY",
        arch=Arch(n_layers=2, d_model=64, n_heads=4, d_mlp=256, attn_only=False, n_ctx=32),
        optim=Optim(steps=1500, batch_size=64, lr=1e-3),
        checkpoints=(0, 50, 100, 150, 200, 225, 250, 275, 300, 350, 400, 500, 750, 1000, 1500),
        data={"kind": "greater_than", "centuries": [11, 17], "yy_range": [2, 98]},
        task_metric="prob diff sum p(YY' > YY) - sum p(YY' <= YY) at END (over the 100 two-digit tokens)",
    ),
}


# --------------------------------------------------------------------------- building blocks
def vocab_words(recipe: Recipe) -> list[str]:
    kind = recipe.data["kind"]
    if kind == "induction":
        return D.induction_vocab(recipe.data["n_words"])
    if kind == "ioi":
        return D.ioi_vocab()
    if kind == "greater_than":
        return D.greater_than_vocab()
    raise ValueError(kind)


def build_tokenizer(recipe: Recipe):
    return build_word_tokenizer(vocab_words(recipe))


def hf_config(recipe: Recipe, vocab_size: int):
    from transformers import GPTNeoXConfig

    a = recipe.arch
    return GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=a.d_model, num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
        intermediate_size=a.d_mlp, max_position_embeddings=a.n_ctx, rotary_pct=a.rotary_pct, hidden_act="gelu",
        use_parallel_residual=True, attention_dropout=0.0, hidden_dropout=0.0, tie_word_embeddings=False,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, attn_implementation="eager",
    )


def build_model(recipe: Recipe, vocab_size: int):
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(recipe.seed)
    model = GPTNeoXForCausalLM(hf_config(recipe, vocab_size))
    if recipe.arch.attn_only:
        for layer in model.gpt_neox.layers:
            for p in layer.mlp.parameters():
                with torch.no_grad():
                    p.zero_()
                p.requires_grad_(False)
    return model.float()


def data_source(recipe: Recipe, tok):
    d = recipe.data
    if d["kind"] == "induction":
        return D.InductionData(vocab_size=len(tok), seq_len=d["seq_len"], chunk=d["chunk"], p_copy=d["p_copy"])
    if d["kind"] == "ioi":
        return D.IOIData(tok, **{k: v for k, v in d.items() if k != "kind"})
    if d["kind"] == "greater_than":
        return D.GreaterThanData(tok, centuries=tuple(d["centuries"]), yy_range=tuple(d["yy_range"]))
    raise ValueError(d["kind"])


def _quiet_progress() -> None:
    try:
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging

        disable_progress_bars()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - cosmetic only
        pass


def save_checkpoint(model, tok, out: Path) -> None:
    """``save_pretrained`` (safetensors, fp32) + tokenizer; generation_config.json is dropped."""
    out.mkdir(parents=True, exist_ok=True)
    _quiet_progress()
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    for junk in ("generation_config.json",):
        (out / junk).unlink(missing_ok=True)


def train(recipe: Recipe, out_dir: Path | None, *, callback=None, log_every: int = 0) -> dict[str, Any]:
    """Train ``recipe``; save each checkpoint step to ``out_dir/step{N}`` (if ``out_dir``), call
    ``callback(step, model)`` at each checkpoint (e.g. for exploration). Returns timing info."""
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)
    tok = build_tokenizer(recipe)
    model = build_model(recipe, len(tok))
    model.train()
    src = data_source(recipe, tok)
    g = torch.Generator().manual_seed(recipe.seed + 1)
    o = recipe.optim
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, betas=o.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / o.warmup) if o.warmup else 1.0)
    ckpts = set(recipe.checkpoints)
    t0 = time.perf_counter()
    losses = []
    for step in range(o.steps + 1):
        if step in ckpts:
            model.eval()
            if out_dir is not None:
                save_checkpoint(model, tok, Path(out_dir) / f"step{step}")
            if callback is not None:
                callback(step, model)
            model.train()
        if step == o.steps:
            break
        x, labels = src.batch(g, o.batch_size)
        loss = model(input_ids=x, labels=labels).loss
        loss.backward()
        if o.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"[{recipe.name}] step {step + 1} loss {sum(losses[-log_every:]) / log_every:.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    return {"train_seconds": round(time.perf_counter() - t0, 1), "final_train_loss": losses[-1] if losses else None}


# --------------------------------------------------------------------------- evaluation, analysis, manifest
EVAL_SEED_OFFSET = 1000   # held-out sets: Generator(seed + 1000) (probe/eval prompts), seed + 1001 (LM loss rows)

ROLE_RULES: dict[str, list[dict[str, Any]]] = {
    # role, score key, comparison, threshold, layer filter (None = any); a head holds a role at a
    # checkpoint when its score passes the threshold; ``holds_from`` = first checkpoint from which it
    # passes at every later checkpoint.
    "induction": [
        {"role": "previous_token", "score": "prev_token", "op": ">=", "threshold": 0.5, "layers": [0]},
        {"role": "induction", "score": "induction", "op": ">=", "threshold": 0.3, "layers": [1]},
    ],
    "ioi": [
        {"role": "name_mover", "score": "name_boost", "op": ">=", "threshold": 1.0, "layers": None},
        {"role": "s_suppression", "score": "dla", "op": ">=", "threshold": 1.0, "layers": None,
         "also": {"score": "dla_s", "op": "<=", "threshold": -1.0}},
        {"role": "s_inhibition", "score": "s_inhibition", "op": "<=", "threshold": -0.05, "layers": None},
        {"role": "duplicate_token", "score": "duplicate", "op": ">=", "threshold": 0.3, "layers": None},
        {"role": "induction", "score": "induction", "op": ">=", "threshold": 0.3, "layers": None},
        {"role": "previous_token", "score": "prev_token", "op": ">=", "threshold": 0.4, "layers": None},
    ],
    "greater_than": [
        {"role": "yy_attending", "score": "attn_yy", "op": ">=", "threshold": 0.3, "layers": None},
        {"role": "important_head", "score": "patch", "op": "<=", "threshold": -0.2, "layers": None},
    ],
}

ROLE_DOCS = {
    "previous_token": "attends to the previous token (prev_token score = mean A[q, q-1])",
    "induction": "attends to the token after the previous occurrence of the current token (prefix matching)",
    "name_mover": "at END, directly raises the logits of the prompt's names: name_boost = min(dla_io, dla_s) "
                  "(direct logit effect on IO and on S, relative to the mean over all names)",
    "s_suppression": "at END, attends to S2 and directly lowers logit(S): dla (IO - S) >= 1 and dla_s <= -1",
    "s_inhibition": "path patching (ABC-corrupted output at END -> query input of the name movers) lowers "
                    "the normalized logit diff by >= 0.05",
    "duplicate_token": "at S2, attends to S1 (A[S2, S1])",
    "yy_attending": "at END, attends to the YY token (A[END, YY])",
    "important_head": "replacing its z (all positions) by the corrupted run's (YY := 01) removes >= 20% of "
                      "the clean-vs-corrupted prob-diff gap",
}


def _passes(v: float | None, op: str, thr: float) -> bool:
    if v is None:   # normalized score not evaluated at this checkpoint (no clean-vs-corrupted gap)
        return False
    return v >= thr if op == ">=" else v <= thr


def _eval_sets(recipe: Recipe, tok) -> dict[str, Any]:
    src = data_source(recipe, tok)
    g_eval = torch.Generator().manual_seed(recipe.seed + EVAL_SEED_OFFSET)
    g_loss = torch.Generator().manual_seed(recipe.seed + EVAL_SEED_OFFSET + 1)
    kind = recipe.data["kind"]
    heldout = src.batch(g_loss, 128)[0]
    if kind == "induction":
        return {"probe": src.repeated(g_eval, 64, 20), "half": 20, "heldout": heldout,
                "doc": "probe: 64 x (BOS + r + r), |r| = 20 random words, Generator(seed+1000); "
                       "loss: 128 training-distribution rows, Generator(seed+1001)"}
    if kind == "ioi":
        return {"ev": src.eval_set(g_eval, 200), "heldout": heldout,
                "doc": "200 held-out IOI prompts (plain BABA/ABBA templates, no distractor) with ABC corruptions, "
                       "Generator(seed+1000); loss: 128 training-distribution sentences, Generator(seed+1001)"}
    return {"ev": src.eval_set(g_eval, 194), "heldout": heldout,
            "doc": "194 held-out prompts, YY cycling over 02..98 twice, corrupted YY := 01, Generator(seed+1000); "
                   "loss: 128 training-distribution sentences, Generator(seed+1001)"}


def _measure(recipe: Recipe, step_dir: Path, ev: dict[str, Any], receivers=None) -> dict[str, Any]:
    from . import analysis as A

    kind = recipe.data["kind"]
    if kind == "induction":
        return A.induction_step(step_dir, ev["probe"], ev["half"], ev["heldout"])
    if kind == "ioi":
        r = A.ioi_step(step_dir, ev["ev"], ev["heldout"], name_movers=receivers)
        r["heads"]["name_boost"] = {k: round(min(v, r["heads"]["dla_s"][k]), 4) for k, v in r["heads"]["dla_io"].items()}
        return r
    return A.greater_than_step(step_dir, ev["ev"], ev["heldout"])


TASK_METRIC_KEY = {"induction": "induction_score", "ioi": "logit_diff", "greater_than": "prob_diff"}
# greater-than: the prob diff first rises without looking at YY (the model learns that late two-digit
# tokens are likely); the circuit is what separates clean from corrupted (YY := 01) prompts.
FORMATION_KEY = {"induction": "induction_score", "ioi": "logit_diff", "greater_than": "prob_diff_gap"}


def _formation_step(steps: list[int], values: list[float]) -> int | None:
    """First checkpoint from which the task metric stays at or above the halfway point between its
    step-0 and final values (None if the final value does not exceed the step-0 value)."""
    lo, hi = values[0], values[-1]
    if hi <= lo:
        return None
    mid = lo + 0.5 * (hi - lo)
    for i, s in enumerate(steps):
        if all(v >= mid for v in values[i:]):
            return s
    return None


def _roles(name: str, per_step: list[dict[str, Any]]) -> dict[str, Any]:
    final = per_step[-1]["heads"]
    out: dict[str, Any] = {}
    for rule in ROLE_RULES[name]:
        sc = {h: v for h, v in final[rule["score"]].items() if v is not None}
        heads = []
        for head, v in sc.items():
            layer = parse_head(head)[0]
            if rule["layers"] is not None and layer not in rule["layers"]:
                continue
            ok = lambda hs, h=head: _passes(hs[rule["score"]][h], rule["op"], rule["threshold"]) and (  # noqa: E731
                "also" not in rule or _passes(hs[rule["also"]["score"]][h], rule["also"]["op"], rule["also"]["threshold"]))
            if not ok(final):
                continue
            holds_from = None
            for i in range(len(per_step)):
                if all(ok(ps["heads"]) for ps in per_step[i:]):
                    holds_from = per_step[i]["step"]
                    break
            heads.append({"head": head, "score": v, "holds_from": holds_from,
                          "trajectory": [ps["heads"][rule["score"]][head] for ps in per_step]})
        heads.sort(key=lambda e: -e["score"] if rule["op"] == ">=" else e["score"])
        best = max(sc.items(), key=lambda kv: kv[1] if rule["op"] == ">=" else -kv[1])
        out[rule["role"]] = {"criterion": f"{rule['score']} {rule['op']} {rule['threshold']}"
                             + (f" and {rule['also']['score']} {rule['also']['op']} {rule['also']['threshold']}" if "also" in rule else "")
                             + (f" (layers {rule['layers']})" if rule["layers"] is not None else "")
                             + " at the final checkpoint",
                             "meaning": ROLE_DOCS.get(rule["role"], ""), "heads": heads,
                             "best_any_head": {"head": best[0], "score": best[1]}}
    return out


def _versions() -> dict[str, str | int | None]:
    from ..runtime import environment

    env = environment()
    env.pop("threads")          # recorded next to it as "threads"
    return env


def build(name: str, root: Path, *, log: bool = True) -> Path:
    """Train zoo model ``name`` into ``root/name`` (atomically replaced), measure every checkpoint,
    write ``manifest.json``; return ``root/name``."""
    recipe = RECIPES[name]
    _quiet_progress()
    root = Path(root)
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    info = train(recipe, tmp, log_every=500 if log else 0)
    write_manifest(name, tmp, info, log=log)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def reanalyze(name: str, model_dir: Path, *, log: bool = True) -> Path:
    """Re-measure the checkpoints already in ``model_dir`` (no training) and rewrite its manifest,
    keeping the recorded training time/loss; for changes to the analysis code only."""
    old = json.loads((Path(model_dir) / "manifest.json").read_text())
    # the weights were trained elsewhere: keep that environment, not this machine's
    write_manifest(name, Path(model_dir), {"train_seconds": old["training"]["train_seconds"],
                                           "final_train_loss": old["training"]["final_train_loss"],
                                           "versions": old["versions"]}, log=log)
    return Path(model_dir)


def write_manifest(name: str, tmp: Path, info: dict[str, Any], *, log: bool = True) -> None:
    """Measure every ``step<N>`` checkpoint of ``tmp`` and write ``tmp/manifest.json``."""
    from ..models import weights_sha256

    recipe = RECIPES[name]
    _quiet_progress()
    tok = build_tokenizer(recipe)
    ev = _eval_sets(recipe, tok)
    t0 = time.perf_counter()
    steps = sorted(recipe.checkpoints)
    receivers = None
    if recipe.data["kind"] == "ioi":   # S-inhibition receivers = the final checkpoint's name movers
        fin = _measure(recipe, tmp / f"step{steps[-1]}", ev)
        nm = [h for h, v in fin["heads"]["name_boost"].items() if v >= 1.0]
        receivers = [parse_head(h) for h in nm]
    per_step = []
    for s in steps:
        d = tmp / f"step{s}"
        r = _measure(recipe, d, ev, receivers)
        per_step.append({"step": s, "dir": f"step{s}", "sha256": weights_sha256(d), **r})
        if log:
            print(f"[{name}] step {s}: {r['metrics']}", file=sys.stderr, flush=True)
    analysis_s = round(time.perf_counter() - t0, 1)
    key, fkey = TASK_METRIC_KEY[name], FORMATION_KEY[name]
    vals = [ps["metrics"][fkey] for ps in per_step]
    cfg = json.loads((tmp / f"step{steps[-1]}" / "config.json").read_text())
    a = recipe.arch
    manifest = {
        "format_version": 1,
        "name": name,
        "description": recipe.description,
        "architecture": {"hf_class": "GPTNeoXForCausalLM", "family": "Pythia-shaped (parallel attention/MLP, rotary)",
                         "n_layers": a.n_layers, "n_heads": a.n_heads, "d_model": a.d_model, "d_head": a.d_model // a.n_heads,
                         "d_mlp": a.d_mlp, "attn_only": a.attn_only, "vocab_size": len(tok), "n_ctx": a.n_ctx,
                         "rotary_pct": a.rotary_pct,
                         "note": ("MLP weights and biases are zero and frozen at every step (output exactly 0); "
                                  "nodes m{L} exist but do nothing") if a.attn_only else "MLPs trained"},
        "hf_config": {k: cfg.get(k) for k in ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                              "intermediate_size", "vocab_size", "max_position_embeddings", "rotary_pct",
                                              "rotary_emb_base", "use_parallel_residual", "hidden_act", "layer_norm_eps",
                                              "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
                                              "torch_dtype", "dtype")},
        "tokenizer": {"kind": "word-level (circuit_tests.zoo.tokenizer.build_word_tokenizer)", "vocab_size": len(tok),
                      "specials": {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3},
                      "pre_tokenizer": "whitespace + punctuation split + digit runs in pairs",
                      "prepend_bos": True, "note": "every training row starts with <bos>; prepend it to prompts"},
        "training": {"objective": "causal LM cross-entropy on every non-pad token", "optimizer": "AdamW",
                     **asdict(recipe.optim), "schedule": "linear warmup then constant", "data": recipe.data,
                     "seed": recipe.seed, "init": "torch.manual_seed(seed) before building the model",
                     "data_generator": "torch.Generator().manual_seed(seed + 1)", "threads": THREADS,
                     "precision": "float32", "train_seconds": info["train_seconds"],
                     "final_train_loss": round(info["final_train_loss"], 4)},
        "seed": recipe.seed,
        "threads": THREADS,
        "versions": info.get("versions") or _versions(),   # of the training run
        "task_metric": {"key": key, "description": recipe.task_metric},
        "eval": {"doc": ev["doc"], "seed_offset": EVAL_SEED_OFFSET},
        "steps": steps,
        "formation_step": _formation_step(steps, vals),
        "formation_criterion": (f"first checkpoint from which metrics.{fkey} stays >= its step-0 value + 50% of "
                                "the way to its final value, at every later checkpoint"),
        "analysis": {"step": steps[-1], "roles": _roles(name, per_step), "analysis_seconds": analysis_s,
                     "scores_doc": "see circuit_tests/zoo/analysis.py (module docstring)"},
        "checkpoints": per_step,
        "reproduce": f"python -m circuit_tests.zoo.train {name} --out DIR   (or circuit_tests.zoo.train_model('{name}', DIR))",
    }
    if recipe.data["kind"] == "greater_than":
        manifest["analysis"]["mlps"] = per_step[-1]["mlps"]
        manifest["analysis"]["mlps_doc"] = (
            "m{L}: normalized effect of replacing the MLP output (all positions) by its corrupted-run value "
            "(-1 = carries the whole clean-vs-corrupted gap); m{L}_zero_ablation_pd: prob diff with the MLP "
            "output set to zero")
    if receivers is not None:
        manifest["analysis"]["s_inhibition_receivers"] = [f"a{l}.h{h}" for l, h in receivers]
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m circuit_tests.zoo.train", description=__doc__.splitlines()[0])
    ap.add_argument("name", help=f"one of {', '.join(RECIPES)} or 'all'")
    ap.add_argument("--out", type=Path, default=None,
                    help="zoo root to write <name>/ into (default: a fresh temp dir; the shipped zoo is "
                         "circuit_tests/zoo/models)")
    ap.add_argument("--reanalyze", action="store_true",
                    help="do not train: re-measure the checkpoints in OUT/<name> and rewrite its manifest")
    args = ap.parse_args(argv)
    from . import train_model

    if args.reanalyze:
        if args.out is None:
            ap.error("--reanalyze needs --out (the zoo root holding <name>/)")
        for n in (list(RECIPES) if args.name == "all" else [args.name]):
            print(reanalyze(n, args.out / n))
        return 0

    names = list(RECIPES) if args.name == "all" else [args.name]
    for n in names:
        print(train_model(n, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
