"""The main job (`pytest specs/`) as a test: every shipped spec runs offline on the zoo without an error, and each
spec's claims show their circuit absent before and present from its formation step.

Why a margin: some shipped claims sit within 1-2% of their threshold at some checkpoint (measured here:
ioi-zoo faithfulness 0.808 vs min 0.8 at step 900 and 0.788 (expected absent) at steps 600 and 800, all three
reported uncertain by the specs' ``gate: ci``; the IOI suppression share 0.823 vs 0.82 at step 900, point-gated).
Such an outcome flips with the last bits of a float32 sum (another CPU's kernels) or a dataset change, so
asserting it would make this test rot rather than catch regressions. Outcomes are asserted for every item whose value clears
its threshold by MARGIN (relative); items inside the margin must still be evaluated (a number, no error) and are
listed in a warning, so a spec whose claims drift towards their thresholds shows up in every run.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from pathlib import Path

import circuit_tests.collect  # noqa: F401  (imported before pytester snapshots sys.modules)
import circuit_tests.engine  # noqa: F401
import circuit_tests.sources  # noqa: F401
import circuit_tests.tasks  # noqa: F401
import transformer_lens.model_bridge  # noqa: F401

SPECS = Path(__file__).resolve().parents[1] / "specs"
MARGIN = 0.02  # relative distance to a threshold inside which an outcome is numerically fragile


def near_threshold(rec: dict) -> bool:
    """Whether the record's value lies within MARGIN of one of its thresholds (never for an unmeasured value)."""
    v = rec["value"]
    if v is None or rec["claim_type"] == "role_check":  # a count of heads (pass = all of them), not a float sum
        return False
    return any(t is not None and abs(v - t) < MARGIN * max(abs(t), 1e-12)
               for t in (rec["threshold_min"], rec["threshold_max"]))


def test_shipped_specs_pass_and_show_emergence(pytester, tmp_path):
    out = tmp_path / "results.json"
    zoo_specs = sorted(str(p) for p in SPECS.glob("*.circuit.yaml"))
    assert len(zoo_specs) >= 3
    r = pytester.runpytest_inprocess(*zoo_specs, f"--circuit-json={out}", "-p", "no:cacheprovider")
    outcomes = r.parseoutcomes()
    assert outcomes.get("errors", 0) == 0, r.stdout.str()
    data = json.loads(out.read_text())
    records = data["records"]
    assert data["complete"] and data["counts"] == {k: outcomes.get(k, 0) for k in data["counts"]}
    assert not [x for x in records if x["measured"] == "error"], [x["reason"] for x in records if x["measured"] == "error"]
    fragile = [x for x in records if near_threshold(x)]
    if fragile:
        warnings.warn("shipped claims within {:.0%} of their threshold (outcome not asserted): ".format(MARGIN) + "; ".join(
            f"{x['spec']} {x['claim']} @ {x['checkpoint']}: {x['value']:.4g} vs {x['threshold_min']}" for x in fragile))
    by_claim = defaultdict(list)
    for x in records:
        if not near_threshold(x):
            by_claim[(x["spec"], x["claim"])].append(x)
    for (spec, claim), recs in by_claim.items():
        recs.sort(key=lambda x: x["step"])
        # pytest outcomes: xfailed = absent as declared (before holds_from), passed = holds
        assert all(x["outcome"] in ("passed", "xfailed") for x in recs), (spec, claim, [(x["step"], x["outcome"]) for x in recs])
        kinds = [x["outcome"] for x in recs]
        assert "xfailed" in kinds and "passed" in kinds, (spec, claim, kinds)
        first_pass = kinds.index("passed")
        assert all(k == "xfailed" for k in kinds[:first_pass]) and all(k == "passed" for k in kinds[first_pass:]), (spec, claim, kinds)
    assert "circuit_tests" in r.stdout.str()
