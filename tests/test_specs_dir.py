"""The main job (`pytest specs/`) as a test: every shipped spec runs offline on the zoo, nothing fails, and
each spec's table shows its circuit absent before and present from its formation step."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import circuit_tests.collect  # noqa: F401  (imported before pytester snapshots sys.modules)
import circuit_tests.engine  # noqa: F401
import circuit_tests.sources  # noqa: F401
import circuit_tests.tasks  # noqa: F401
import transformer_lens.model_bridge  # noqa: F401

SPECS = Path(__file__).resolve().parents[1] / "specs"


def test_shipped_specs_pass_and_show_emergence(pytester, tmp_path):
    out = tmp_path / "results.json"
    zoo_specs = sorted(str(p) for p in SPECS.glob("*.circuit.yaml"))
    assert len(zoo_specs) >= 3
    r = pytester.runpytest_inprocess(*zoo_specs, f"--circuit-json={out}", "-p", "no:cacheprovider")
    outcomes = r.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("errors", 0) == 0, r.stdout.str()
    records = json.loads(out.read_text())["records"]
    by_claim = defaultdict(list)
    for x in records:
        by_claim[(x["spec"], x["claim"])].append(x)
    for (spec, claim), recs in by_claim.items():
        recs.sort(key=lambda x: x["step"])
        kinds = [("absent" if x["expected"] == "absent" else x["outcome"]) for x in recs]
        assert "absent" in kinds and "pass" in kinds, (spec, claim, kinds)
        first_pass = kinds.index("pass")
        assert all(k == "absent" for k in kinds[:first_pass]) and all(k == "pass" for k in kinds[first_pass:]), (spec, claim, kinds)
    assert "circuit_tests" in r.stdout.str()
