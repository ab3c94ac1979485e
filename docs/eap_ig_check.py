"""Check graph JSON interchange with EAP-IG for real: same m(C) per example on both sides, both directions.

EAP-IG (github hannamw/EAP-IG) is not on PyPI and is built on TransformerLens 2.x ``HookedTransformer``, which
TransformerLens 4.x (this project's dependency) no longer has. So the check runs two processes on one machine
and exchanges files in a work directory:

* this project's environment (``--side project``, the default, which also drives the whole check):
  builds the models, the task tokens and the circuits, writes EAP-IG graph JSON with the project
  (``circuit-tests discover --graph-json`` and ``graph.circuit_to_json``), and evaluates every circuit with
  ``PatchingEngine``;
* a second virtual environment with TransformerLens 2.x and an EAP-IG checkout (``--side eap-ig``, started by
  the first with ``--venv-python``): loads the same weights as a ``HookedTransformer`` (no weight processing,
  ``use_attn_result`` / ``use_split_qkv_input`` / ``use_hook_mlp_in`` as EAP-IG requires), reads each file with
  ``Graph.from_json`` and runs ``evaluate_graph`` / ``evaluate_baseline`` on the same token ids; it also writes
  graphs of its own with ``Graph.to_json``, which the project then reads (``graph.circuit_from_json`` and a spec
  with ``circuit: {graph: FILE}``) and evaluates.

The one thing replaced on the EAP-IG side is its tokenization (``eap.evaluate.tokenize_plus``): both sides get
the project's token ids for the task (with the zoo's BOS, right-padded), with an all-ones attention mask (causal
attention: padding after END cannot reach it). Metrics are computed at the task's END position on both sides
with the same formula. Models: zoo greater_than (GPT-NeoX, parallel blocks, MLPs), zoo ioi (3 layers, variable
prompt lengths) and a random-init GPT-2 (sequential blocks). Circuits: the CLI's discovered circuit (edge level,
q/k/v edges), a hand-written edge circuit with q/k/v edges and dangling parts, a node-level circuit, a random
quarter of the edges, full and empty; a q<->k swapped copy of the hand circuit is the negative control (the
check must see the swap). Zero ablation is compared too and reported, but not gated: EAP-IG prunes dangling
parts first, which changes zero-ablation m(C) (the "zero, pruned" rows evaluate that pruned circuit with the
project's engine). The last column repeats the comparison on a HookedTransformer loaded with
``from_pretrained``'s default weight processing.

Usage (see docs/eap_ig_interop.md for the venv recipe)::

    python docs/eap_ig_check.py --eap-ig /path/to/EAP-IG --venv-python /path/to/venv/bin/python --workdir /tmp/w

Exit status 0 when every interchange-ablation quantity agrees within ``--tol`` and the control differs by more
than 100 x ``--tol``; 1 otherwise. Both processes use one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

# model name -> (zoo model and checkpoint the CLI discovers on, or None; task)
MODELS = {"zoo-greater_than": ("greater_than", 1500, "greater_than"), "zoo-ioi": ("ioi", 2500, "ioi"),
          "gpt2-random": (None, None, "greater_than")}
N_EXAMPLES = 64
BATCH = 16


# ====================================================================== shared helpers (both environments)

def _metrics(logits: Any, targets: Any, signs: Any) -> dict[str, Any]:
    """Per-example logit_diff and prob_diff at END (the formulas of circuit_tests.metrics, restated so the EAP-IG
    side, which cannot import this project, computes exactly the same numbers)."""
    import torch

    lg = logits.double()
    vals = lg.gather(-1, targets)
    pos, neg = (signs > 0).double(), (signs < 0).double()
    ld = (vals * pos).sum(-1) / pos.sum(-1).clamp_min(1) - (vals * neg).sum(-1) / neg.sum(-1).clamp_min(1)
    pd = (lg.softmax(-1).gather(-1, targets) * signs.double()).sum(-1)
    return {"logit_diff": ld, "prob_diff": pd, "end_logits": logits.detach().to(torch.float64)}


# ====================================================================== EAP-IG side (TransformerLens 2.x venv)

def _hooked_transformer(model_dir: Path, processing: bool = False) -> Any:
    """The HF model in ``model_dir`` as a HookedTransformer with EAP-IG's flags; no weight processing, or (with
    ``processing``) what ``HookedTransformer.from_pretrained`` does by default (fold_ln, center_writing_weights,
    center_unembed, fold_value_biases): EAP-IG leaves the loading to its user, and that is what a plain
    ``from_pretrained(name)`` gives."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config, get_pretrained_state_dict
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    cd = convert_hf_model_config(str(model_dir))
    cd["tokenizer_name"] = None  # token ids come from the project; the zoo tokenizer files are transformers-5 format
    cfg = HookedTransformerConfig(**cd, use_attn_result=True, use_split_qkv_input=True, use_hook_mlp_in=True,
                                  device="cpu", dtype=torch.float32)
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(get_pretrained_state_dict(str(model_dir), cfg, hf_model=hf), fold_ln=processing,
                                      center_writing_weights=processing, center_unembed=processing,
                                      fold_value_biases=processing, refactor_factored_attn_matrices=False)
    model.eval()
    probe = torch.arange(3, 3 + 12).remainder(cfg.d_vocab).view(1, -1)
    with torch.no_grad():  # center_unembed shifts each position's logits by a constant: compare centered logits
        a, b = hf(probe).logits, model(probe)
        hf_vs_tl = float(((a - a.mean(-1, keepdim=True)) - (b - b.mean(-1, keepdim=True))).abs().max())
    model.hf_vs_tl = hf_vs_tl  # type: ignore[attr-defined]
    return model


def eap_ig_side(work: Path, checkout: Path) -> None:
    """Evaluate every project-written graph with EAP-IG and write EAP-IG graphs for the reverse direction."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(checkout / "src"))
    from importlib.metadata import version

    import eap.evaluate as ev
    from eap.graph import Graph

    def tokenize_plus(model: Any, inputs: Any, max_length: int | None = None) -> tuple:
        return inputs, torch.ones_like(inputs), torch.full((len(inputs),), inputs.shape[1]), inputs.shape[1]

    ev.tokenize_plus = tokenize_plus  # the project's token ids (see module docstring)
    manifest = json.loads((work / "manifest.json").read_text())
    out: dict[str, Any] = {"transformer_lens": version("transformer_lens"), "transformers": version("transformers"),
                          "torch": str(torch.__version__), "models": {}}
    for mname, minfo in manifest["models"].items():
        model = _hooked_transformer(Path(minfo["dir"]))
        data = torch.load(work / f"{mname}.tokens.pt")
        batches = []
        for s in range(0, len(data["clean"]), BATCH):
            sl = slice(s, s + BATCH)
            label = (data["targets"][sl], data["signs"][sl], data["end"][sl])
            batches.append((data["clean"][sl], data["corrupted"][sl], label))

        def metric(key: str):
            def f(logits: Any, clean_logits: Any, input_lengths: Any, label: Any) -> Any:
                t, sg, end = label
                return _metrics(logits[torch.arange(len(end)), end], t, sg)[key]
            return f

        mets = [metric("logit_diff"), metric("prob_diff"), metric("end_logits")]
        res: dict[str, Any] = {"hf_vs_tl_max_abs_logit": model.hf_vs_tl,
                               "clean": ev.evaluate_baseline(model, batches, mets, quiet=True),
                               "corrupted": ev.evaluate_baseline(model, batches, mets, run_corrupted=True, quiet=True),
                               "circuits": {}, "written": {}}
        for cname in minfo["circuits"]:
            for intervention in ("patching", "zero"):
                g = Graph.from_json(str(work / f"{mname}.{cname}.json"))
                declared, matrix = int(g.count_included_edges()), g.in_graph.clone()
                vals = ev.evaluate_graph(model, g, batches, mets, quiet=True, intervention=intervention)
                res["circuits"][f"{cname}/{intervention}"] = {"values": vals, "declared_edges": declared,
                                                              "edges_after_prune": int(g.count_included_edges()),
                                                              "in_graph": matrix, "in_graph_pruned": g.in_graph.clone()}
        # the same files on a model loaded with from_pretrained's default weight processing
        processed = _hooked_transformer(Path(minfo["dir"]), processing=True)
        res["processed"] = {"hf_vs_tl_max_abs_logit": processed.hf_vs_tl, "circuits": {}}
        for cname in minfo["circuits"]:
            for intervention in ("patching", "zero"):
                g = Graph.from_json(str(work / f"{mname}.{cname}.json"))
                vals = ev.evaluate_graph(processed, g, batches, mets, quiet=True, intervention=intervention)
                res["processed"]["circuits"][f"{cname}/{intervention}"] = {"values": vals}
        # reverse direction: graphs built and written by EAP-IG itself
        gen = torch.Generator().manual_seed(0)
        for n in (12, 40):
            g = Graph.from_model(model)
            g.scores[:] = torch.randn(g.scores.shape, generator=gen) * g.real_edge_mask
            g.apply_topn(n, absolute=True)  # prunes (one prune() pass: not always a fixpoint, see the doc)
            name = f"eapig-top{n}"
            g.to_json(str(work / f"{mname}.{name}.json"))
            written, qkv = int(g.count_included_edges()), sum(1 for e in g.edges.values() if e.in_graph and e.qkv)
            vals = ev.evaluate_graph(model, g, batches, mets, quiet=True, intervention="patching")  # prunes again
            res["written"][name] = {"values": vals, "edges": written, "qkv_edges": qkv,
                                    "edges_evaluated": int(g.count_included_edges())}
        out["models"][mname] = res
    torch.save(out, work / "eapig_results.pt")


# ====================================================================== project side (this project's env)

def _gpt2_random(work: Path, tokenizer_dir: Path) -> Path:
    """A small random-init GPT-2 (sequential blocks, learned positions) saved in HF format with the zoo tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    d = work / "gpt2-random"
    if not (d / "config.json").exists():
        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=32, n_ctx=32, vocab_size=130, initializer_range=0.1,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
        GPT2LMHeadModel(cfg).eval().save_pretrained(str(d))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / f, d / f)
    return d


def _hand_edges(parallel: bool) -> list[str]:
    """A hand-written edge-level circuit with q, k and v edges, plus dangling parts EAP-IG prunes away
    (a1.h1 has no outgoing edge; a0.h3 has no incoming edge)."""
    edges = ["input->a0.h1<q>", "input->a0.h1<k>", "input->a0.h1<v>", "input->a0.h2<v>",
             "a0.h1->a1.h0<q>", "a0.h1->a1.h0<v>", "a0.h2->a1.h2<k>", "m0->a1.h2<q>", "input->a1.h2<v>",
             "input->m0", "m0->logits", "a1.h0->logits", "a1.h2->logits", "m1->logits", "input->m1",
             "a0.h3->a1.h1<q>", "a0.h3->logits", "a0.h2->a1.h1<k>"]
    # a head feeding the MLP of its own layer exists only in sequential blocks
    edges += ["a0.h1->m1", "a0.h2->m1"] if parallel else ["a0.h1->m0", "a1.h2->m1"]
    return edges


def project_side(args: argparse.Namespace) -> int:
    """Write the project's graphs and values, run the EAP-IG side, read its graphs back, compare; the exit status."""
    import torch

    from circuit_tests import runtime

    runtime.configure(threads=1)
    import circuit_tests.zoo as zoo
    from circuit_tests.discovery import build, circuit_to_mask, edge_scores, mask_to_circuit, prune, real_edge_pairs
    from circuit_tests.engine import PatchingEngine
    from circuit_tests.graph import Circuit, Graph, circuit_from_json, circuit_to_json, node_circuit, resolve_circuit
    from circuit_tests.models import load_bridge
    from circuit_tests.runner import circuit_for
    from circuit_tests.spec import load_spec
    from circuit_tests.tasks import build_task
    from circuit_tests.tasks.base import BuildContext

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    zoo_root = Path(zoo.__file__).parent / "models"
    dirs = {m: zoo_root / z / f"step{step}" for m, (z, step, _) in MODELS.items() if z}
    dirs["gpt2-random"] = _gpt2_random(work, dirs["zoo-greater_than"])
    for mname, (z, step, tname) in MODELS.items():  # discovered circuits: the project's own CLI, as a user runs it
        if z:
            subprocess.run(["circuit-tests", "discover", f"zoo:{z}", "--task", tname, "--checkpoint", str(step),
                            "--method", "eap-ig", "-o", str(work / f"{mname}.found.circuit.yaml"),
                            "--graph-json", str(work / f"{mname}.discovered.json")],
                           check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

    bridges = {m: load_bridge(d) for m, d in dirs.items()}
    tasks = {m: build_task(t, bridges[m].tokenizer, {"size": N_EXAMPLES}, BuildContext(prepend_bos=True))
             for m, (_, _, t) in MODELS.items()}  # prepend_bos: the zoo rule (runner.prepend_bos)
    for m, task in tasks.items():
        torch.save({"clean": task.clean, "corrupted": task.corrupted, "end": task.end, "targets": task.targets,
                    "signs": task.signs}, work / f"{m}.tokens.pt")

    manifest: dict[str, Any] = {"models": {}}
    graphs = {m: Graph.from_bridge(b) for m, b in bridges.items()}
    ours: dict[str, dict[str, Any]] = {}
    for mname, bridge in bridges.items():
        task = tasks[mname]
        g = Graph.from_bridge(bridge)
        eng = PatchingEngine(bridge)
        d_model = int(bridge.cfg.d_model)
        circuits: dict[str, tuple[Circuit, dict | None]] = {}
        if MODELS[mname][0]:
            found = json.loads((work / f"{mname}.discovered.json").read_text())
            circuits["discovered"] = (circuit_from_json(g, found), None)
        else:  # EAP-IG scores + greedy construction + pruning, as discover does, at a fixed size
            sc, _ = edge_scores(bridge, task, "eap-ig", batch_size=BATCH)
            real = torch.zeros_like(sc, dtype=torch.bool)
            for i, j in real_edge_pairs(g):
                real[i, j] = True
            mask = prune(g, build(g, sc, real, 24, "greedy"))
            scores = {(g.senders[i], g.receivers[j]): float(sc[i, j]) for i, j in real_edge_pairs(g)}
            circuits["discovered"] = (mask_to_circuit(g, mask), scores)
        circuits["hand"] = (resolve_circuit(g, {}, [], _hand_edges(g.parallel), "edge"), None)
        circuits["nodes"] = (node_circuit(g, ["a0.h0", "a1.h2", "a1.h3", "m0"]), None)
        gen = torch.Generator().manual_seed(1)
        all_edges = list(g.edges())
        pick = torch.randperm(len(all_edges), generator=gen)[: len(all_edges) // 4].tolist()
        circuits["random25"] = (Circuit(g, frozenset(all_edges[i] for i in pick)), None)
        hand = circuits["hand"][0]
        swap = {"<q>": "<k>", "<k>": "<q>"}
        swapped = frozenset((s_, r[:-3] + swap.get(r[-3:], r[-3:])) for s_, r in hand.edges)
        circuits["hand-qk-swapped"] = (Circuit(g, swapped), None)
        circuits["full"] = (Circuit(g, frozenset(all_edges)), None)
        circuits["empty"] = (Circuit(g, frozenset()), None)
        res: dict[str, Any] = {}
        for cname, (c, scores) in circuits.items():
            path = work / f"{mname}.{cname}.json"
            if not (MODELS[mname][0] and cname == "discovered"):  # the CLI wrote that one
                path.write_text(json.dumps(circuit_to_json(c, d_model=d_model, scores=scores)))
            back = circuit_from_json(g, json.loads(path.read_text()))
            if back.edges != c.edges:
                raise SystemExit(f"{path}: the project does not read back what it wrote")
            for abl, key in (("corrupted", "patching"), ("zero", "zero")):
                e = eng.evaluate(task, c, ablation=abl, batch_size=BATCH)
                res[f"{cname}/{key}"] = {"values": _metrics(e.circuit, task.targets, task.signs),
                                         "edges": len(c.edges), "dangling": c.dangling(),
                                         "effect": float((e.circuit - e.clean).abs().max())}
            pruned = mask_to_circuit(g, prune(g, circuit_to_mask(c)))
            if pruned.edges != c.edges:  # diagnosis: zero ablation of what EAP-IG evaluates (it prunes first)
                e = eng.evaluate(task, pruned, ablation="zero", batch_size=BATCH)
                res[f"{cname}/zero, pruned"] = {"values": _metrics(e.circuit, task.targets, task.signs),
                                                "edges": len(pruned.edges), "dangling": pruned.dangling(),
                                                "effect": float((e.circuit - e.clean).abs().max()),
                                                "eapig_key": f"{cname}/zero"}
            if cname == "full":
                res["clean"] = _metrics(e.clean, task.targets, task.signs)
                res["corrupted"] = _metrics(e.corrupted, task.targets, task.signs)
        ours[mname] = res
        manifest["models"][mname] = {"dir": str(dirs[mname]), "circuits": list(circuits)}
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1))

    r = subprocess.run([args.venv_python, str(Path(__file__).resolve()), "--side", "eap-ig", "--eap-ig",
                        str(Path(args.eap_ig).resolve()), "--workdir", str(work)],
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode:
        print(f"EAP-IG side failed (exit {r.returncode})")
        return 1
    theirs = torch.load(work / "eapig_results.pt")

    def as_dict(b: Any) -> dict[str, Any]:
        return dict(zip(("logit_diff", "prob_diff", "end_logits"), b)) if isinstance(b, (list, tuple)) else b

    def means(a: dict, b: Any) -> dict[str, float]:
        """Dataset means m(C) on both sides (what a faithfulness claim is computed from)."""
        b = as_dict(b)
        return {f"mean_{k}_{side}": float(v[k].double().mean()) for k in ("logit_diff", "prob_diff")
                for side, v in (("ours", a), ("eapig", b))}

    def diff(a: dict, b: Any, centered: bool = False) -> dict[str, float]:
        """max |ours - theirs| per quantity; ``centered``: logits compared after removing each row's mean (a model
        with center_unembed differs from the unprocessed one by exactly that constant)."""
        vals = as_dict(b)
        out = {k: float((a[k] - vals[k].double()).abs().max()) for k in ("logit_diff", "prob_diff")}
        x, y = a["end_logits"], vals["end_logits"].double()
        if centered:
            x, y = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
        out["end_logits"] = float((x - y).abs().max())
        return out

    rows: list[dict[str, Any]] = []
    ok = True
    print(f"\nEAP-IG side: transformer_lens {theirs['transformer_lens']}, transformers {theirs['transformers']}, "
          f"torch {theirs['torch']}")
    print("edges: ours / what EAP-IG evaluates after its prune(); effect: max |circuit - clean| END logit (ours);\n"
          "d: max |ours - EAP-IG| over the examples (ld logit diff, pd prob diff, logit: the whole END logit row);\n"
          "last column: max |d| of all three against a HookedTransformer with from_pretrained's default processing")
    print(f"{'model':17} {'circuit':24} {'edges':>8} {'mean ld':>8} {'effect':>8} {'d ld':>9} {'d pd':>9} {'d logit':>9} "
          f"{'d (proc.)':>9}")
    for mname in bridges:
        t, o = theirs["models"][mname], ours[mname]
        tp = t["processed"]
        print(f"{mname}: HF vs HookedTransformer END logits max |diff| {t['hf_vs_tl_max_abs_logit']:.2e} "
              f"(default processing, centered: {tp['hf_vs_tl_max_abs_logit']:.2e})")
        entries = [("baseline clean", o["clean"], t["clean"], "", None, None),
                   ("baseline corrupted", o["corrupted"], t["corrupted"], "", None, None)]
        for key, v in o.items():
            if "/" in key:
                k2 = v.get("eapig_key", key)
                tc = t["circuits"][k2]
                entries.append((key, v["values"], tc["values"], f"{v['edges']}/{tc['edges_after_prune']}", v["effect"],
                                tp["circuits"][k2]["values"]))
        for cname in manifest["models"][mname]["circuits"]:  # same (sender, receiver) matrix, before and after prune
            c = circuit_from_json(graphs[mname], json.loads((work / f"{mname}.{cname}.json").read_text()))
            tc = t["circuits"][f"{cname}/patching"]
            same = torch.equal(tc["in_graph"], c.in_graph())
            same_pruned = torch.equal(tc["in_graph_pruned"], prune(graphs[mname], c.in_graph()))
            ok &= same and same_pruned
            if not (same and same_pruned):
                print(f"{'':17} {cname}: EAP-IG's in_graph matrix differs from ours "
                      f"({'after' if same else 'before'} pruning)  MISMATCH")
        print(f"{'':17} in_graph matrices of EAP-IG's from_json and ours (before and after pruning) compared "
              f"for {len(manifest['models'][mname]['circuits'])} files")
        for label, a, b, edges, effect, bp in entries:
            dd = diff(a, b)
            dp = max(diff(a, bp, centered=True).values()) if bp is not None else float("nan")
            interchange = "/zero" not in label
            bad = interchange and (max(dd.values()) > args.tol or (bp is not None and dp > args.tol))
            ok &= not bad
            rows.append({"model": mname, "circuit": label, "edges_ours/eapig_pruned": edges, "effect": effect,
                         **means(a, b), **{f"max_abs_diff_{k}": x for k, x in dd.items()}, "max_abs_diff_processed": dp})
            eff = f"{effect:8.3f}" if effect is not None else f"{'':8}"
            print(f"{'':17} {label:24} {edges:>8} {float(a['logit_diff'].mean()):8.4f} {eff} {dd['logit_diff']:9.2e} "
                  f"{dd['prob_diff']:9.2e} {dd['end_logits']:9.2e} {dp:9.2e}" + ("  MISMATCH" if bad else ""))
        # negative control: the check must see a q/k mix-up
        dd = diff(o["hand/patching"]["values"], t["circuits"]["hand-qk-swapped/patching"]["values"])
        sensitive = max(dd.values()) > 100 * args.tol
        ok &= sensitive
        rows.append({"model": mname, "circuit": "control: ours(hand) vs EAP-IG(hand, q<->k)",
                     **{f"max_abs_diff_{k}": x for k, x in dd.items()}})
        print(f"{'':17} {'control: q<->k swapped':24} {'':8} {'':8} {'':8} {dd['logit_diff']:9.2e} {dd['prob_diff']:9.2e} "
              f"{dd['end_logits']:9.2e}" + ("" if sensitive else "  INSENSITIVE"))
        # reverse: EAP-IG wrote the graph; the project reads it (directly and through a spec) and evaluates it
        bridge, g, task = bridges[mname], Graph.from_bridge(bridges[mname]), tasks[mname]
        eng = PatchingEngine(bridge)
        for name, w in t["written"].items():
            path = work / f"{mname}.{name}.json"
            c = circuit_from_json(g, json.loads(path.read_text()))
            spec = work / f"{mname}.{name}.circuit.yaml"
            spec.write_text(f"name: {name}\nmodel: {{source: {dirs[mname]}}}\ntask: {{name: {MODELS[mname][2]}}}\n"
                            f"circuit: {{graph: {path.name}}}\nclaims:\n"
                            "- {type: faithfulness, normalization: normalized, min: 0.0}\n")
            c_spec = circuit_for(load_spec(spec), g)
            if c_spec.edges != c.edges or len(c.edges) != w["edges"]:
                raise SystemExit(f"{path}: spec route read {len(c_spec.edges)} edges, circuit_from_json "
                                 f"{len(c.edges)}, EAP-IG wrote {w['edges']}")
            e = eng.evaluate(task, c, ablation="corrupted", batch_size=BATCH)
            a = _metrics(e.circuit, task.targets, task.signs)
            dd = diff(a, w["values"])
            bad = max(dd.values()) > args.tol
            ok &= not bad
            label = f"{name} (reverse)"
            effect = float((e.circuit - e.clean).abs().max())
            edges = f"{len(c.edges)}/{w['edges_evaluated']}"
            rows.append({"model": mname, "circuit": label, "edges_ours/eapig_pruned": edges, "effect": effect,
                         "qkv_edges_written": w["qkv_edges"], **means(a, w["values"]),
                         **{f"max_abs_diff_{k}": x for k, x in dd.items()}})
            print(f"{'':17} {label:24} {edges:>8} {float(a['logit_diff'].mean()):8.4f} {effect:8.3f} "
                  f"{dd['logit_diff']:9.2e} {dd['prob_diff']:9.2e} {dd['end_logits']:9.2e}" + ("  MISMATCH" if bad else ""))
    versions = {k: theirs[k] for k in ("transformer_lens", "transformers", "torch")}
    (work / "summary.json").write_text(json.dumps(versions | {"rows": rows}, indent=1))
    print(f"\n{'all interchange-ablation values agree' if ok else 'MISMATCH'} (tolerance {args.tol:g}); "
          f"summary in {work / 'summary.json'}")
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--side", choices=("project", "eap-ig"), default="project")
    p.add_argument("--eap-ig", required=True, help="EAP-IG checkout (contains src/eap/graph.py)")
    p.add_argument("--venv-python", help="python of the TransformerLens 2.x venv (project side)")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "eap_ig_check"))
    p.add_argument("--tol", type=float, default=1e-4, help="max |difference| allowed (logits, logit/prob diffs)")
    args = p.parse_args()
    if args.side == "eap-ig":
        eap_ig_side(Path(args.workdir), Path(args.eap_ig))
        return 0
    if not args.venv_python:
        p.error("--venv-python is required on the project side")
    return project_side(args)


if __name__ == "__main__":
    sys.exit(main())
