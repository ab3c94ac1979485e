"""The shipped model zoo: manifests match the files, checkpoints load through the bridge, the trained
models do their task (measured here independently of the zoo's own analysis code), and retraining
reproduces them (slow, opt-in: bit for bit in the shipped build's environment)."""

from __future__ import annotations

import json

import pytest

from circuit_tests import zoo
from circuit_tests.errors import ModelLoadError

MODELS = ("greater_than", "induction", "ioi")


def test_list_models_and_table():
    names = zoo.list_models()
    assert set(MODELS) <= set(names)
    assert names == sorted(names)
    text = zoo.zoo_list_text()
    for n in MODELS:
        assert n in text
    assert "formation" in text.splitlines()[0]


@pytest.mark.parametrize("call", [zoo.load_manifest, zoo.checkpoint_dirs])
def test_unknown_name_lists_known(call):
    with pytest.raises(ModelLoadError) as ei:
        call("no-such-model")
    msg = str(ei.value)
    assert "no-such-model" in msg and all(n in msg for n in MODELS)


def test_train_model_unknown_name(tmp_path):
    with pytest.raises(ModelLoadError, match="known: "):
        zoo.train_model("no-such-model", tmp_path)


@pytest.mark.parametrize("name", MODELS)
def test_manifest_integrity(name):
    from circuit_tests.models import weights_sha256

    m = zoo.load_manifest(name)
    assert m["name"] == name
    steps = [c["step"] for c in m["checkpoints"]]
    assert steps == sorted(steps) == m["steps"] and steps[0] == 0 and len(set(steps)) == len(steps)
    assert m["formation_step"] in steps
    dirs = zoo.checkpoint_dirs(name)
    assert [s for s, _ in dirs] == steps
    for (step, d), ck in zip(dirs, m["checkpoints"]):
        files = {p.name for p in d.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files, d
        assert "generation_config.json" not in files
        assert weights_sha256(d) == ck["sha256"], f"{name} step {step}: weights differ from the manifest"
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["architectures"] == ["GPTNeoXForCausalLM"]
        assert cfg["num_hidden_layers"] == m["architecture"]["n_layers"]
        assert ck["metrics"] and ck["heads"]
    for role in m["analysis"]["roles"].values():
        for h in role["heads"]:
            assert h["head"].startswith("a") and ".h" in h["head"]


def test_tokenizer_word_level_roundtrip(tmp_path):
    from transformers import AutoTokenizer

    from circuit_tests.zoo.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer(["The", "year", "to", "Mary", ",", "."] + [f"{i:02d}" for i in range(100)])
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    ids = tok("The year 1732 to Mary, zebra.")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["The", "year", "17", "32", "to", "Mary", ",", "<unk>", "."]
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok2("The year 1732 to Mary, zebra.")["input_ids"] == ids
    known = ids[:7]
    assert tok2(tok2.decode(known))["input_ids"] == known
    with pytest.raises(ValueError, match="pre-tokenize"):
        build_word_tokenizer(["w12"])


def test_ioi_data_options():
    """The IOI generator's experimental knobs: S, S, IO sentences answer IO; induction rows repeat a span;
    at their default (0) they draw nothing, so the shipped recipe's data stream is unchanged."""
    import torch

    from circuit_tests.zoo import data as D
    from circuit_tests.zoo.train import RECIPES, build_tokenizer

    tok = build_tokenizer(RECIPES["ioi"])
    src = D.IOIData(tok)
    ex = src.example(torch.Generator().manual_seed(3), unique_last=True)
    names = [ex.ids[p] for p in (ex.pos_s1, ex.pos_s2, ex.pos_io)]
    assert names == [ex.s, ex.s, ex.io] and ex.pos_s1 < ex.pos_s2 < ex.pos_io and ex.ids[-1] == ex.io
    assert ex.order == "SSIO"
    words = tok.convert_ids_to_tokens(ex.ids)
    assert sum(w == tok.convert_ids_to_tokens(ex.s) for w in words) == 2
    plain = src.batch(torch.Generator().manual_seed(5), 8)[0]
    zeros = D.IOIData(tok, p_unique_last=0.0, p_induction=0.0).batch(torch.Generator().manual_seed(5), 8)[0]
    assert torch.equal(plain, zeros)
    mixed = D.IOIData(tok, p_induction=1.0, induction_len=32, induction_chunk=8)
    row = mixed.training_row(torch.Generator().manual_seed(0))
    assert len(row) == 33 and row[0] == tok.bos_token_id and min(row[1:]) >= 4
    ssio = D.IOIData(tok, p_unique_last=1.0).training_example(torch.Generator().manual_seed(1))
    assert [ssio.ids[p] for p in (ssio.pos_s1, ssio.pos_s2, ssio.pos_io)] == [ssio.s, ssio.s, ssio.io]
    # K-name sentences: the answer is the only first-clause name the second clause does not repeat
    multi = D.IOIData(tok, p_multi=1.0, multi_max=4, p_multi_new=0.5)
    name_ids = set(multi.name_ids)
    comma = tok.convert_tokens_to_ids(",")
    g = torch.Generator().manual_seed(2)
    sizes, with_new = set(), 0
    for _ in range(40):
        row = multi.training_row(g)
        mentions = [(i, t) for i, t in enumerate(row) if t in name_ids]
        answer = row[-1]
        assert answer in name_ids and [t for _, t in mentions].count(answer) == 2      # first clause + answer
        first_io = next(i for i, t in mentions if t == answer)
        # the first clause is the run of names (joined by "," / "and") that holds IO's first mention
        run, i = [answer], first_io
        while i + 2 < len(row) and row[i + 1] in (comma, multi.and_id) and row[i + 2] in name_ids:
            run.append(row[i + 2]); i += 2
        i = first_io
        while i - 2 >= 0 and row[i - 1] in (comma, multi.and_id) and row[i - 2] in name_ids:
            run.insert(0, row[i - 2]); i -= 2
        counts = {t: [m for _, m in mentions].count(t) for t in run}
        assert 3 <= len(run) <= 4 and len(set(run)) == len(run)
        assert all(counts[t] == 2 for t in run), counts       # each subject repeated once, IO answered once
        others = [t for _, t in mentions if t not in run]
        assert len(others) <= 1                                # at most one new second-clause name
        sizes.add(len(run)); with_new += len(others)
    assert sizes == {3, 4} and 0 < with_new < 40
    assert torch.equal(D.IOIData(tok, p_multi=0.0).batch(torch.Generator().manual_seed(5), 8)[0], plain)
    # crowd rows: a plain IOI sentence with a sentence of 2..3 other names spliced in before it or before S2
    for pair in (False, True):
        crowd = D.IOIData(tok, p_crowd=1.0, crowd_max=3, crowd_pair=pair)
        g = torch.Generator().manual_seed(4)
        for _ in range(20):
            row = crowd.training_row(g)
            names = [t for t in row if t in name_ids]
            io = row[-1]
            s = next(t for t in names if names.count(t) == 2 and t != io)
            extra = [t for t in names if t not in (io, s)]
            assert names.count(io) == 2 and names.count(s) == 2 and len(set(extra)) == len(extra)
            assert (len(extra) == 2) if pair else (2 <= len(extra) <= 3)
    assert torch.equal(D.IOIData(tok, p_crowd=0.0).batch(torch.Generator().manual_seed(5), 8)[0], plain)


# --------------------------------------------------------------------------- task metrics, computed here
def _ids(tok, text):
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids, text
    return [tok.bos_token_id] + ids


def _induction_metric(bridge, tok):
    """Mean log-prob of the correct token on the second copy of BOS + r + r (higher = better)."""
    import torch

    g = torch.Generator().manual_seed(0)
    r = torch.randint(4, len(tok), (16, 12), generator=g)
    x = torch.cat([torch.full((16, 1), tok.bos_token_id), r, r], 1)
    with torch.no_grad():
        lp = bridge(x).log_softmax(-1)
    return float(lp[:, 13:-1].gather(-1, x[:, 14:, None]).mean())


def _ioi_metric(bridge, tok):
    """logit(IO) - logit(S) at END on BABA and ABBA prompts built from the word lists."""
    import torch

    from circuit_tests.tasks import wordlists as W

    vals = []
    for i in range(12):
        a, b = W.NAMES[i], W.NAMES[-1 - i]
        for tpl in (W.IOI_BABA_TEMPLATES[i % 3], W.IOI_ABBA_TEMPLATES[i % 3]):
            text = tpl.replace("[A]", a).replace("[B]", b).replace("[PLACE]", W.PLACES[i % 8]).replace("[OBJECT]", W.OBJECTS[i % 8])
            prompt = text[: text.rindex(" " + a)]
            x = torch.tensor([_ids(tok, prompt)])
            with torch.no_grad():
                lg = bridge(x)[0, -1]
            vals.append(float(lg[tok.convert_tokens_to_ids(a)] - lg[tok.convert_tokens_to_ids(b)]))
    return sum(vals) / len(vals)


def _gt_metric(bridge, tok):
    """sum p(ZZ > YY) - sum p(ZZ <= YY) over the 100 two-digit tokens at END."""
    import torch

    from circuit_tests.tasks import wordlists as W

    num = torch.tensor([tok.convert_tokens_to_ids(f"{i:02d}") for i in range(100)])
    vals = []
    for i, yy in enumerate(range(5, 95, 6)):
        prompt = W.GREATER_THAN_TEMPLATE.replace("[NOUN]", W.GREATER_THAN_NOUNS[i % 20]).replace("[XX]", "15").replace("[YY]", f"{yy:02d}")
        x = torch.tensor([_ids(tok, prompt)])
        with torch.no_grad():
            p = bridge(x)[0, -1].softmax(-1)[num]
        vals.append(float(p[yy + 1:].sum() - p[: yy + 1].sum()))
    return sum(vals) / len(vals)


METRIC = {"induction": (_induction_metric, 1.0), "ioi": (_ioi_metric, 3.0), "greater_than": (_gt_metric, 0.3)}


@pytest.mark.parametrize("name", MODELS)
def test_final_checkpoint_beats_step0(name):
    from circuit_tests.models import load_bridge

    dirs = zoo.checkpoint_dirs(name)
    fn, margin = METRIC[name]
    values = {}
    for step, d in (dirs[0], dirs[-1]):
        bridge = load_bridge(d)
        tok = bridge.tokenizer
        text = "The year 1732 to the" if name == "greater_than" else ("Mary and John , ." if name == "ioi" else "ba be bi")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok(tok.decode(ids), add_special_tokens=False)["input_ids"] == ids
        values[step] = fn(bridge, tok)
    first, last = values[dirs[0][0]], values[dirs[-1][0]]
    assert last > first + margin, f"{name}: final {last:.3f} vs step 0 {first:.3f}"


@pytest.mark.slow
def test_retrain_induction_reproduces(tmp_path):
    """Re-training matches the manifest: bit for bit in the shipped build's environment (versions and CPU
    kernels), otherwise the same formation step and role heads with the task metric within tolerance."""
    from circuit_tests.zoo.reproduce import compare

    out = zoo.train_model("induction", tmp_path)
    rep = compare(zoo.load_manifest("induction"), json.loads((out / "manifest.json").read_text()))
    if rep.same_environment:
        assert rep.bit_identical, rep.text()
    assert rep.reproduced, rep.text()


def _manifest(**over):
    m = {"name": "toy", "task_metric": {"key": "score"}, "formation_step": 200,
         "versions": {"torch": "2.13.0+cpu", "transformers": "5.23.0", "machine": "x86_64", "cpu_capability": "AVX2"},
         "analysis": {"roles": {"induction": {"heads": [{"head": "a1.h2"}, {"head": "a1.h0"}]}}},
         "checkpoints": [{"step": s, "sha256": f"h{s}", "metrics": {"score": v}}
                         for s, v in ((0, 0.03), (100, 0.05), (200, 0.60), (300, 0.80))]}
    m.update(over)
    return m


def test_reproduction_verdicts():
    """compare(): which re-trains count as reproduced, against hand-made manifests."""
    import copy

    from circuit_tests.zoo.reproduce import compare

    shipped = _manifest()
    same = compare(shipped, copy.deepcopy(shipped))
    assert same.bit_identical and same.reproduced and same.same_environment and "bit-identical" in same.text()

    def retrained(env=None, scores=(0.03, 0.05, 0.62, 0.77), **over):
        m = _manifest(**over)
        for c, v in zip(m["checkpoints"], scores):
            c["sha256"], c["metrics"]["score"] = "x" + c["sha256"], v
        if env:
            m["versions"] = {**m["versions"], **env}
        return m

    other_cpu = compare(shipped, retrained(env={"cpu_capability": "AVX512"}))
    assert not other_cpu.bit_identical and other_cpu.reproduced and other_cpu.same_environment is False
    assert other_cpu.environment_diffs == {"cpu_capability": ("AVX2", "AVX512")}
    assert "AVX512" in other_cpu.text() and "within tolerance" in other_cpu.text()
    # same environment but different weights: non-determinism, never "reproduced"
    nondet = compare(shipped, retrained())
    assert not nondet.reproduced and "not deterministic" in nondet.problems[0]
    # an old manifest without cpu_capability: environment unknown, judged on metrics
    old = _manifest(versions={"torch": "2.13.0+cpu", "transformers": "5.23.0", "machine": "x86_64"})
    unknown = compare(old, retrained(env={"cpu_capability": "AVX512"}))
    assert unknown.same_environment is None and unknown.reproduced
    drift = compare(old, retrained(env={"cpu_capability": "AVX512"}, scores=(0.03, 0.05, 0.62, 0.65)))
    assert not drift.reproduced and any("step 300" in p for p in drift.problems)
    late = compare(old, retrained(env={"cpu_capability": "AVX512"}, formation_step=300))
    assert not late.reproduced and any("formation step 200" in p for p in late.problems)
    moved = retrained(env={"cpu_capability": "AVX512"})
    moved["analysis"]["roles"]["induction"]["heads"] = [{"head": "a1.h3"}, {"head": "a1.h0"}]
    rep = compare(old, moved)
    assert not rep.reproduced and any("role induction" in p for p in rep.problems) and "NOT reproduced" in rep.text()
    fewer = retrained(env={"cpu_capability": "AVX512"})
    fewer["checkpoints"] = fewer["checkpoints"][:3]
    assert any("step 300 only in the shipped" in p for p in compare(old, fewer).problems)


@pytest.mark.parametrize("drift", [0.0, 0.3])
def test_cli_zoo_train_reports_reproduction(tmp_path, monkeypatch, capsys, drift):
    """`circuit-tests zoo train NAME` compares the re-train with the shipped manifest; exit 1 if not reproduced.
    (Training itself is replaced by a copy of the shipped manifest, shifted by ``drift``.)"""
    from circuit_tests import cli

    def fake_train(name, out):
        m = zoo.load_manifest(name)
        if drift:
            m["versions"]["cpu_capability"] = "SOMETHING-ELSE"
            for c in m["checkpoints"][1:]:
                c["sha256"] = "0" * 64
                c["metrics"][m["task_metric"]["key"]] += drift
        d = tmp_path / name
        d.mkdir()
        (d / "manifest.json").write_text(json.dumps(m))
        return d

    monkeypatch.setattr(zoo, "train_model", fake_train)
    rc = cli.main(["zoo", "train", "induction", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    if drift:
        assert rc == 1 and "NOT reproduced" in out and "induction_score at step 3000" in out
    else:
        assert rc == 0 and "bit-identical to the shipped checkpoints" in out


# --------------------------------------------------------------------------- re-analysis of shipped checkpoints
# The analysis (circuit_tests/zoo/analysis.py) now reduces attention patterns through scores.mean_attention in
# float64 (it summed float32 before), reads head weights through gqa.head_weights and patches through the
# engine's hook functions. The manifests record every number rounded to 4 decimals; re-analysis must give them
# back to within one unit of that last printed place (ANALYSIS_TOL), and the same role heads / holds_from exactly.
ANALYSIS_TOL = 1e-4 + 1e-9


def _reanalyze_steps(name, steps):
    from circuit_tests.names import parse_head
    from circuit_tests.zoo import train as T

    man = zoo.load_manifest(name)
    recipe = T.RECIPES[name]
    ev = T._eval_sets(recipe, T.build_tokenizer(recipe))
    recv = [parse_head(h) for h in man["analysis"].get("s_inhibition_receivers", [])] or None
    root = zoo.checkpoint_dirs(name)[0][1].parent
    return man, [{"step": s, **T._measure(recipe, root / f"step{s}", ev, recv)} for s in steps]


def _assert_close(got, want, where):
    if isinstance(want, dict):
        assert set(got) == set(want), f"{where}: keys {sorted(set(got) ^ set(want))}"
        for k in want:
            _assert_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(got, str):
        assert got is not None and abs(got - want) <= ANALYSIS_TOL, f"{where}: {got} vs manifest {want}"
    else:
        assert got == want, f"{where}: {got!r} vs manifest {want!r}"


@pytest.mark.parametrize("name", ["induction", "ioi"])
def test_reanalysis_reproduces_final_checkpoint(name):
    """Every recorded score grid and metric of the final checkpoint (IOI: attention, DLA, copy score through
    gqa.head_weights, head patching, S-inhibition path patching) comes back from the shared primitives."""
    man = zoo.load_manifest(name)
    want = man["checkpoints"][-1]
    _, (got,) = _reanalyze_steps(name, [want["step"]])
    _assert_close(got["metrics"], want["metrics"], f"{name}.metrics")
    _assert_close(got["heads"], want["heads"], f"{name}.heads")
    if "name_mover_receivers" in want:
        assert got["name_mover_receivers"] == want["name_mover_receivers"]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_reanalysis_reproduces_manifest_roles(name):
    """Re-measuring every shipped checkpoint gives the manifest's analysis: the same role heads, holds_from and
    best heads, with scores and trajectories within ANALYSIS_TOL (greater-than also its MLP effects; IOI with
    the manifest's recorded S-inhibition receivers)."""
    from circuit_tests.zoo.train import _roles

    man = zoo.load_manifest(name)
    _, per_step = _reanalyze_steps(name, man["steps"])
    _assert_close(_roles(name, per_step), man["analysis"]["roles"], f"{name}.roles")
    if "mlps" in man["analysis"]:
        _assert_close(per_step[-1]["mlps"], man["analysis"]["mlps"], f"{name}.mlps")


def test_mean_attention_matches_naive_loops():
    """scores.mean_attention (shared by the role scores and the zoo analysis) against explicit loops."""
    import torch

    from circuit_tests.scores import mean_attention

    g = torch.Generator().manual_seed(0)
    pat = torch.rand(3, 2, 6, 6, generator=g)
    q, k = torch.arange(1, 6), torch.arange(0, 5)
    naive = [sum(float(pat[b, h, i, j]) for b in range(3) for i, j in zip(q, k)) / 15 for h in range(2)]
    assert torch.allclose(mean_attention(pat, q, k), torch.tensor(naive, dtype=torch.float64))
    w = (torch.rand(3, 5, generator=g) > 0.3).float()
    naive = [sum(float(pat[b, h, i, j] * w[b, n]) for b in range(3) for n, (i, j) in enumerate(zip(q, k)))
             / float(w.sum()) for h in range(2)]
    assert torch.allclose(mean_attention(pat, q, k, weight=w), torch.tensor(naive, dtype=torch.float64))
    rows, qq, kk = torch.arange(3), torch.tensor([5, 4, 3]), torch.tensor([1, 0, 2])
    naive = [sum(float(pat[b, h, qq[b], kk[b]]) for b in range(3)) / 3 for h in range(2)]
    assert torch.allclose(mean_attention(pat, qq, kk, rows=rows), torch.tensor(naive, dtype=torch.float64))


# --------------------------------------------------------------------------- `circuit-tests scores` bad input
def _scores_spec(tmp_path, heads="[a1.h0, a9.h0]", config=None):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(zoo.checkpoint_dirs("induction")[-1][1], model)
    if config is not None:
        (model / "config.json").write_text(config)
    spec = tmp_path / "s.circuit.yaml"
    spec.write_text("name: bad-input\nmodel:\n  source: model\ntask:\n  name: induction\n  size: 8\n  seq_len: 10\n"
                    f"circuit:\n  roles:\n    previous_token: [a0.h3]\n    induction: {heads}\n"
                    "claims:\n  - type: faithfulness\n    normalization: normalized\n    min: 0.5\n")
    return spec


def _run_cli(argv, capsys):
    from circuit_tests.cli import main

    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.err


def test_cli_scores_out_of_range_head_is_located_error(tmp_path, capsys):
    """A head the model does not have is an error at its file:line naming the valid range, never dropped."""
    spec = _scores_spec(tmp_path)
    rc, err = _run_cli(["scores", str(spec)], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"{spec}:11:" in lines[0] and "a9.h0" in lines[0], err
    assert "model has layers 0-1, heads 0-3" in lines[0], err
    rc, err = _run_cli(["scores", str(_scores_spec(tmp_path / "h", heads="[a1.h7]"))], capsys)
    assert rc == 2 and "a1.h7: no head 7; model has layers 0-1, heads 0-3" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("config", ['{"garbage', "[1, 2]"])
def test_cli_scores_garbage_config_is_clean_error(tmp_path, capsys, config):
    spec = _scores_spec(tmp_path, heads="[a1.h0]", config=config)
    rc, err = _run_cli(["scores", str(spec)], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("circuit-tests: error:") and str(tmp_path / "model") in lines[0], err


def test_analysis_on_bias_free_gqa_model(tmp_path):
    """The zoo analysis on a LLaMA-style model (no attention biases, 2 query heads per key/value head): the copy
    score reads per-query-head weights (it read ``b_V`` / ``W_V[l, h]`` directly before, which fails on such
    models) and equals a recomputation from the HF projection matrices (head h uses v_proj block h // 2)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from circuit_tests.models import load_bridge
    from circuit_tests.zoo import analysis as A
    from circuit_tests.zoo import train as T

    recipe = T.RECIPES["ioi"]
    tok = T.build_tokenizer(recipe)
    sets = T._eval_sets(recipe, tok)
    ev = {k: (v[:40] if torch.is_tensor(v) and v.ndim and len(v) == len(sets["ev"]["END"]) else v)
          for k, v in sets["ev"].items()}
    torch.manual_seed(0)
    L, H, KV, d, dh = 2, 4, 2, 32, 8
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=d, intermediate_size=64, num_hidden_layers=L,
                      num_attention_heads=H, num_key_value_heads=KV, max_position_embeddings=64,
                      attention_bias=False, tie_word_embeddings=False)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    got = A.ioi_step(tmp_path, ev, sets["heldout"][:8])["heads"]["copy"]
    assert len(got) == L * H and any(v > 0 for v in got.values()), got  # not a vacuous all-zero grid

    b = load_bridge(tmp_path)
    ar = torch.arange(len(ev["END"]))
    names = torch.unique(torch.cat([ev["io"], ev["s"]]))
    W_U, gain = hf.lm_head.weight.detach().T, hf.model.norm.weight.detach()
    with torch.no_grad():
        _, cache = b.run_with_cache(ev["clean"], names_filter=lambda n: n.endswith("ln1.hook_normalized"))
    for l in range(L):
        attn = hf.model.layers[l].self_attn
        xn = cache[f"blocks.{l}.ln1.hook_normalized"][ar, ev["IO"]]
        for h in range(H):
            Wv = attn.v_proj.weight.detach().view(KV, dh, d)[h // (H // KV)]      # [dh, d]
            Wo = attn.o_proj.weight.detach()[:, h * dh:(h + 1) * dh]               # [d, dh]
            o = xn @ Wv.T @ Wo.T
            o = (o - o.mean(-1, keepdim=True)) / o.std(-1, keepdim=True, unbiased=False).clamp_min(1e-6) * gain
            want = float((names[(o @ W_U[:, names]).argmax(-1)] == ev["io"]).float().mean())
            assert got[f"a{l}.h{h}"] == round(want, 4), (l, h)
