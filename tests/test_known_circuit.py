"""A model whose circuit is known: the zoo induction model (a deterministic training run whose heads were
identified by attention-pattern analysis, recorded in its manifest). The true circuit passes; variants that
drop a necessary head fail — with the measured numbers in the failure message."""

from __future__ import annotations

import json

import pytest

import circuit_tests.collect  # noqa: F401  (imported before pytester snapshots sys.modules)
import circuit_tests.engine  # noqa: F401
import circuit_tests.sources  # noqa: F401
import circuit_tests.tasks  # noqa: F401
import transformer_lens.model_bridge  # noqa: F401
from circuit_tests.zoo import load_manifest

SPEC = """\
name: {name}
model:
  source: zoo:induction
  checkpoints: [2400, 3000]
task:
  name: induction
  size: 32
  seq_len: 20
circuit:  # the heads as nodes: this test is about faithfulness (role labels are checked in tests/test_roles.py)
  nodes: [{roles}]
claims:
  - type: faithfulness
    normalization: normalized
    min: 0.8
"""


def roles_from_manifest() -> dict[str, list[str]]:
    """The heads the manifest's analysis names (independent of this test): previous-token and induction heads."""
    roles = load_manifest("induction")["analysis"]["roles"]
    return {r: [h["head"] for h in roles[r]["heads"]] for r in ("previous_token", "induction")}


def run(pytester, name, roles, tmp_path):
    text = ", ".join(h for hs in roles.values() for h in hs)
    path = pytester.makefile(".circuit.yaml", **{name: SPEC.format(name=name, roles=text)})
    out = tmp_path / f"{name}.json"
    r = pytester.runpytest_inprocess(str(path), f"--circuit-json={out}", "-p", "no:cacheprovider")
    return r, {x["checkpoint"]: x for x in json.loads(out.read_text())["records"]}


def test_manifest_names_the_expected_structure():
    roles = roles_from_manifest()
    assert [h[:3] for h in roles["previous_token"]] == ["a0."] and all(h.startswith("a1.") for h in roles["induction"])


def test_true_circuit_passes_and_head_less_variants_fail(pytester, tmp_path):
    roles = roles_from_manifest()
    # at step 3000 a second previous-token head (a0.h2) has joined; the spec in specs/ names it
    full = {"previous_token": roles["previous_token"] + ["a0.h2"], "induction": roles["induction"]}
    r, recs = run(pytester, "true_circuit", full, tmp_path)
    r.assert_outcomes(passed=2)
    assert all(x["value"] > 0.9 for x in recs.values())

    no_prev = {"induction": roles["induction"]}  # without previous-token heads, induction cannot work
    r, recs = run(pytester, "no_prev", no_prev, tmp_path)
    r.assert_outcomes(failed=2)
    assert all(x["value"] < 0.2 for x in recs.values())
    assert "claim 'faithfulness' does not hold at step2400" in r.stdout.str()
    assert "m(M) =" in r.stdout.str() and "no_prev.circuit.yaml:12" in r.stdout.str()

    # the early circuit (only a0.h3) still holds at 2400 but no longer at 3000: a role gained over training
    early = {"previous_token": roles["previous_token"], "induction": roles["induction"]}
    r, recs = run(pytester, "early", early, tmp_path)
    r.assert_outcomes(passed=1, failed=1)
    assert recs["step2400"]["outcome"] == "passed" and recs["step3000"]["outcome"] == "failed"
