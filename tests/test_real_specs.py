"""specs/real/: papers' circuits on hub models. No weights can be downloaded here, so the loading path, the
graph and the head names are proven on a random-init GPT-2 small built from its real config and placed in a
local HF-cache layout; offline and uncached, every item is not_evaluated quickly with the fetch command."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import circuit_tests.collect  # noqa: F401  (imported before pytester snapshots sys.modules)
import circuit_tests.engine  # noqa: F401
import circuit_tests.path_patching  # noqa: F401
import circuit_tests.scores  # noqa: F401
import circuit_tests.sources  # noqa: F401
import circuit_tests.tasks  # noqa: F401
import transformer_lens.model_bridge  # noqa: F401

SPEC = Path(__file__).resolve().parents[1] / "specs" / "real" / "ioi-gpt2-small.circuit.yaml"


@pytest.fixture(scope="module")
def fake_hf_home(tmp_path_factory):
    """$HF_HOME/hub/models--gpt2 with refs/main -> a snapshot holding random-init GPT-2 small + a tokenizer."""
    import hashlib

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from circuit_tests.zoo import checkpoint_dirs
    from circuit_tests.models import load_tokenizer

    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / "models--gpt2"
    commit = hashlib.sha1(b"random-init").hexdigest()
    snap = repo / "snapshots" / commit
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(snap)
    load_tokenizer(checkpoint_dirs("ioi")[-1][1]).save_pretrained(snap)  # word-level: has IOI words as tokens
    return home


def _env(monkeypatch, home):
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(Path(home) / "hub"))


def test_gpt2_ioi_spec_runs_on_real_shapes(pytester, monkeypatch, fake_hf_home, tmp_path):
    _env(monkeypatch, fake_hf_home)
    spec = pytester.makefile(".circuit.yaml", ioi_gpt2=SPEC.read_text().replace("size: 64", "size: 8"))
    out = tmp_path / "r.json"
    r = pytester.runpytest_inprocess(str(spec), f"--circuit-json={out}", "-p", "no:cacheprovider", "-rs")
    assert r.ret in (0, 1), r.stdout.str()  # no collection error: every head name fits GPT-2 small's graph
    recs = {x["claim"]: x for x in json.loads(out.read_text())["records"]}
    assert set(recs) == {"faithfulness", "name_movers_copy", "negative_name_movers_suppress", "s_inhibition_to_name_mover_queries"}
    assert all(x["checkpoint"] == "main" and x["weights_sha256"] for x in recs.values())
    # a random-init model cannot do IOI: faithfulness and path ratios are not evaluated, never passed
    assert recs["faithfulness"]["outcome"] == "not_evaluated" and "cannot do the task" in recs["faithfulness"]["reason"]
    assert recs["s_inhibition_to_name_mover_queries"]["outcome"] == "not_evaluated"
    # role scores are computed on every named head (random weights: measured, and below the paper's values)
    per_head = recs["name_movers_copy"]["extra"]["per_head"]
    assert set(per_head) == {"a9.h6", "a9.h9", "a10.h0"} and recs["name_movers_copy"]["outcome"] == "fail"


def test_uncached_is_not_evaluated_quickly(pytester, monkeypatch, tmp_path):
    _env(monkeypatch, tmp_path / "empty")
    t0 = time.perf_counter()
    r = pytester.runpytest_inprocess(str(SPEC), "-p", "no:cacheprovider", "-rs")
    elapsed = time.perf_counter() - t0
    r.assert_outcomes(skipped=4)
    out = r.stdout.str()
    assert "gpt2@main is not in the local HF cache" in out and "download gpt2" in out
    assert elapsed < 20  # collection + 4 skips, no model load, no network retries
