"""specs/real/: papers' circuits on hub models. No weights can be downloaded here, so the loading path, the
graph and the head names are proven on random-init GPT-2 small / Pythia-160m models built from their real
configs and placed in a local HF-cache layout; offline and uncached, every item is not_evaluated quickly with
the fetch command."""

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

REAL = Path(__file__).resolve().parents[1] / "specs" / "real"
SPEC = REAL / "ioi-gpt2-small.circuit.yaml"
PYTHIA_SPEC = REAL / "ioi-pythia-160m.circuit.yaml"


def _env(monkeypatch, home):
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(Path(home) / "hub"))


def _records(pytester, spec: Path, out: Path) -> dict:
    """Run ``spec`` (shrunk to 8 examples) in-process; its records by claim id. A collection error (a head
    name outside the model's graph) fails here."""
    small = pytester.makefile(".circuit.yaml", **{spec.name.split(".")[0]: spec.read_text().replace("size: 64", "size: 8")})
    r = pytester.runpytest_inprocess(str(small), f"--circuit-json={out}", "-p", "no:cacheprovider", "-rs")
    assert r.ret in (0, 1), r.stdout.str()
    return {x["claim"]: x for x in json.loads(out.read_text())["records"]}


def test_gpt2_ioi_spec_runs_on_real_shapes(pytester, monkeypatch, real_config_hf_home, tmp_path):
    _env(monkeypatch, real_config_hf_home)
    recs = _records(pytester, SPEC, tmp_path / "r.json")  # every head name fits GPT-2 small's graph
    checks = {f"role_check_{r}" for r in ("name_mover", "negative_name_mover", "s_inhibition", "induction",
                                          "duplicate_token", "previous_token")}  # backup_name_mover: no criterion
    assert set(recs) == {"faithfulness", "name_movers_copy", "negative_name_movers_suppress",
                         "s_inhibition_to_name_mover_queries"} | checks
    for c in checks:  # every label is judged on the real shapes (random weights: measured, never an error)
        assert recs[c]["measured"] in ("pass", "fail", "not_evaluated") and recs[c]["extra"]["per_head"], recs[c]
    assert recs["role_check_name_mover"]["measured"] == "fail"  # random weights copy no name
    assert all(x["checkpoint"] == "main" and x["weights_sha256"] for x in recs.values())
    # a random-init model cannot do IOI: faithfulness and path ratios are not evaluated, never passed
    assert recs["faithfulness"]["measured"] == "not_evaluated" and "cannot do the task" in recs["faithfulness"]["reason"]
    assert recs["s_inhibition_to_name_mover_queries"]["measured"] == "not_evaluated"
    assert recs["faithfulness"]["outcome"] == "skipped"
    # role scores are computed on every named head (random weights: measured, and below the paper's values)
    per_head = recs["name_movers_copy"]["extra"]["per_head"]
    assert set(per_head) == {"a9.h6", "a9.h9", "a10.h0"} and recs["name_movers_copy"]["measured"] == "fail"


def test_pythia_ioi_spec_runs_on_real_shapes(pytester, monkeypatch, real_config_hf_home, tmp_path):
    _env(monkeypatch, real_config_hf_home)
    recs = _records(pytester, PYTHIA_SPEC, tmp_path / "r.json")  # every head name fits Pythia-160m's graph
    checks = {f"role_check_{r}" for r in ("name_mover", "copy_suppression", "s_inhibition", "induction")}
    assert set(recs) == {"name_movers_copy", "s_inhibition_three_conditions", "copy_suppression_negative_copy"} | checks
    assert all(x["checkpoint"] == "step143000" and x["weights_sha256"] for x in recs.values())
    # each claim scored exactly the heads the spec names (the authors' lists), on Pythia-160m's 12 x 12 grid
    assert set(recs["name_movers_copy"]["extra"]["per_head"]) == {"a8.h2", "a8.h10"}
    assert set(recs["s_inhibition_three_conditions"]["extra"]["per_head"]) == {"a6.h6", "a7.h2", "a7.h9"}
    assert set(recs["copy_suppression_negative_copy"]["extra"]["per_head"]) == {"a8.h9"}
    # random weights cannot copy names into the top 5 of 50,304 tokens
    assert recs["name_movers_copy"]["measured"] == "fail" and recs["name_movers_copy"]["outcome"] == "failed"


@pytest.mark.parametrize("spec, n_items, repo, fetch", [
    (SPEC, 4 + 6, "gpt2@main", "download gpt2"),  # the declared claims + one role check per role with a criterion
    (PYTHIA_SPEC, 3 + 4, "EleutherAI/pythia-160m@step143000", "download EleutherAI/pythia-160m --revision step143000"),
])
def test_uncached_is_not_evaluated_quickly(pytester, monkeypatch, tmp_path, spec, n_items, repo, fetch):
    _env(monkeypatch, tmp_path / "empty")
    t0 = time.perf_counter()
    r = pytester.runpytest_inprocess(str(spec), "-p", "no:cacheprovider", "-rs")
    elapsed = time.perf_counter() - t0
    r.assert_outcomes(skipped=n_items)
    out = r.stdout.str()
    assert f"{repo} is not in the local HF cache" in out and fetch in out
    assert elapsed < 20  # collection + skips, no model load, no network retries
