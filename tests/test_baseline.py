"""Random-circuit baselines, ablation sensitivity and the ci gate end to end on the zoo induction model."""

from __future__ import annotations

from math import comb
from pathlib import Path

import pytest
import yaml

# Heavy modules are imported before pytester's in-process runs snapshot sys.modules (see test_plugin.py).
import circuit_tests.collect  # noqa: F401,E402
import circuit_tests.engine  # noqa: F401,E402
import circuit_tests.sources  # noqa: F401,E402
import circuit_tests.tasks  # noqa: F401,E402
import transformer_lens.model_bridge  # noqa: F401,E402
from hypothesis import given, settings
from hypothesis import strategies as st

from circuit_tests.baseline import random_circuits, require_level
from circuit_tests.graph import Circuit, Graph, node_circuit

ROOT = Path(__file__).resolve().parents[1]


def _heads_mlps(c) -> tuple[int, int]:
    inner = [n for n in c.nodes if n not in ("input", "logits")]
    return sum(n.startswith("a") for n in inner), sum(n.startswith("m") for n in inner)


@settings(max_examples=30, deadline=None)
@given(layers=st.integers(1, 4), heads=st.integers(1, 4), parallel=st.booleans(), data=st.data())
def test_node_matched_draws_keep_head_and_mlp_counts(layers, heads, parallel, data):
    g = Graph(n_layers=layers, n_heads=heads, parallel=parallel)
    inner = [n for n in g.nodes if n not in ("input", "logits")]
    chosen = data.draw(st.lists(st.sampled_from(inner), min_size=1, max_size=len(inner), unique=True))
    c = node_circuit(g, chosen)
    seed = data.draw(st.integers(0, 2**31 - 1))
    n_h, n_m = _heads_mlps(c)
    n_heads, n_mlps = sum(n.startswith("a") for n in inner), sum(n.startswith("m") for n in inner)
    if comb(n_heads, n_h) * comb(n_mlps, n_m) == 1:  # no other circuit of this size exists
        with pytest.raises(ValueError, match="no random circuit of this size differs"):
            random_circuits(c, 5, seed, "nodes")
        return
    draws = random_circuits(c, 5, seed, "nodes")
    assert len(draws) == 5
    for d in draws:
        assert _heads_mlps(d) == _heads_mlps(c)
        assert d.edges != c.edges
    assert [d.edges for d in random_circuits(c, 5, seed, "nodes")] == [d.edges for d in draws]  # seeded


@settings(max_examples=30, deadline=None)
@given(layers=st.integers(1, 3), heads=st.integers(1, 3), data=st.data())
def test_edge_matched_draws_keep_the_edge_count_and_are_distinct(layers, heads, data):
    g = Graph(n_layers=layers, n_heads=heads, parallel=False)
    edges = list(g.edges())
    k_edges = data.draw(st.integers(1, len(edges) - 1))
    c = Circuit(g, frozenset(edges[:k_edges]), level="edge")
    draws = random_circuits(c, 4, data.draw(st.integers(0, 1000)), None)  # default: the circuit's level (edges)
    assert all(len(d.edges) == k_edges and d.edges != c.edges for d in draws)
    assert len({d.edges for d in draws}) == len(draws) or len(edges) <= 6


def test_require_level():
    import numpy as np

    v = np.arange(101, dtype=float)
    assert require_level("p95", v) == 95.0
    assert require_level("max", v) == 100.0
    assert require_level("none", v) is None


@pytest.fixture(scope="module")
def induction_run(tmp_path_factory):
    """specs/induction.circuit.yaml at its last checkpoint, with the first faithfulness claim given a random
    baseline, all three ablations and the ci gate."""
    from circuit_tests.runner import SpecRun
    from circuit_tests.sources import resolve_checkpoints
    from circuit_tests.spec import load_spec

    data = yaml.safe_load((ROOT / "specs" / "induction.circuit.yaml").read_text())
    claim = dict(data["claims"][0])
    claim.update(gate="ci", baseline={"kind": "random", "k": 20, "seed": 0, "require": "p95"},
                 ablations=["corrupted", "mean", "zero"])
    data["claims"] = [claim, dict(claim, id="edge_baseline", baseline={"k": 20, "seed": 1, "match": "edges"},
                                  ablations=None)]
    data["model"]["checkpoints"] = [3000]
    p = tmp_path_factory.mktemp("spec") / "induction.circuit.yaml"
    p.write_text(yaml.safe_dump(data))
    loaded = load_spec(p)
    m = loaded.spec.model
    refs = resolve_checkpoints(m.source, m.revision, m.checkpoints, loaded.dir)
    return SpecRun(loaded, refs), refs[0]


def test_random_circuits_fail_while_the_true_circuit_clears_their_p95(induction_run):
    from circuit_tests.runner import measure_claim

    run, ref = induction_run
    rec = measure_claim(run, ref, 0)
    b = rec.extra["baseline"]
    threshold = rec.threshold_min
    assert len(b["values"]) == 20 and b["match"] == "nodes"
    assert all(v < threshold for v in b["values"]), f"a random 6-head circuit passes the claim: {b['values']}"
    assert rec.ci_low > b["required_value"]  # the whole interval clears the baseline's 95th percentile
    assert b["beats"] == "pass" and b["margin"] > 0 and b["quantile"] == 1.0
    assert rec.verdict == "pass" and rec.extra["gate"] == "ci"
    edge = measure_claim(run, ref, 1)
    assert edge.extra["baseline"]["match"] == "edges"
    assert max(edge.extra["baseline"]["values"]) < threshold and edge.verdict == "pass"


def test_ablations_are_all_evaluated_and_the_first_gates(induction_run):
    from circuit_tests.engine import PatchingEngine
    from circuit_tests.measures import faithfulness
    from circuit_tests.runner import evaluate_checkpoint, measure_claim

    run, ref = induction_run
    rec = measure_claim(run, ref, 0)
    assert rec.ablation == "corrupted"
    others = rec.extra["ablations"]
    assert set(others) == {"mean", "zero"}
    res = evaluate_checkpoint(run, ref)
    claim = run.loaded.spec.claims[0]
    for ab in ("mean", "zero"):  # each recorded value equals an independent evaluation under that ablation
        ev = PatchingEngine(res.bridge, res.circuit.graph).evaluate(res.task, res.circuit, ab, run.loaded.spec.task.batch_size)
        assert others[ab]["value"] == pytest.approx(faithfulness(ev, res.task, claim).value, abs=1e-6)
    assert len({round(rec.value, 6), *(round(o["value"], 6) for o in others.values())}) == 3  # ablation matters


STRADDLE = """\
name: induction-straddle
model:
  source: ./models
task:
  name: induction
  size: 24
  seed: 0
  seq_len: 12
  prepend_bos: true
circuit:  # nodes, not roles: roles with a criterion would add role_check items (docs/roles.md)
  nodes: [a0.h3, a0.h2, a1.h0, a1.h1, a1.h2, a1.h3]
gate: ci
bootstrap: {{method: {method}, resamples: 400, seed: {seed}}}
claims:
  - type: faithfulness
    id: faith
    normalization: ratio
    min: {min!r}
"""


def test_straddling_claim_is_uncertain_whatever_the_seed_and_fails_only_when_strict(pytester):
    """The threshold is set to the measured value: the interval straddles it, so every resampling seed gives
    'uncertain' (skipped), never pass or fail; --circuit-strict turns it into a failure."""
    import json
    import shutil

    import circuit_tests.sources

    zoo = Path(circuit_tests.sources.__file__).resolve().parent / "zoo" / "models" / "induction"
    shutil.copytree(zoo / "step3000", pytester.path / "models" / "step3000")
    pytester.makefile(".circuit.yaml", spec=STRADDLE.format(method="bca", seed=0, min=0.5))
    pytester.runpytest_inprocess("-p", "no:cacheprovider", "--circuit-json", "r.json").assert_outcomes(passed=1)
    value = json.loads((pytester.path / "r.json").read_text())["records"][0]["value"]
    for method, seed in (("bca", 0), ("bca", 7), ("percentile", 123)):
        pytester.makefile(".circuit.yaml", spec=STRADDLE.format(method=method, seed=seed, min=value))
        res = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rs", "--circuit-json", "r.json")
        res.assert_outcomes(skipped=1)
        rec = json.loads((pytester.path / "r.json").read_text())["records"][0]
        assert rec["verdict"] == "uncertain" and rec["ci_low"] < value < rec["ci_high"]
        assert rec["extra"]["ci_method"] == method and rec["extra"]["ci_seed"] == seed
        assert "uncertain" in res.stdout.str() and "unc." in res.stdout.str()
    strict = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--circuit-strict")
    strict.assert_outcomes(failed=1)
    assert "is uncertain (interval straddles the threshold)" in strict.stdout.str()
