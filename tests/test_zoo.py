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
