"""Shards: `circuit-tests merge` refuses mixed code and overlapping shards; two shards merged = one run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

# Heavy modules are imported before pytester's in-process runs snapshot sys.modules (see test_plugin.py).
import circuit_tests.collect  # noqa: F401,E402
import circuit_tests.engine  # noqa: F401,E402
import circuit_tests.sources  # noqa: F401,E402
import circuit_tests.tasks  # noqa: F401,E402
import transformer_lens.model_bridge  # noqa: F401,E402
from circuit_tests.cache import run_environment  # noqa: E402
from circuit_tests.cli import main  # noqa: E402
from circuit_tests.errors import CircuitTestsError  # noqa: E402
from circuit_tests.merge import merge_files  # noqa: E402
from circuit_tests.results import Record, read_results, write_json  # noqa: E402

ZOO = Path(circuit_tests.sources.__file__).resolve().parent / "zoo" / "models" / "induction"


def rec(checkpoint: str, claim: str = "faith", value: float = 0.9, spec: str = "s") -> Record:
    return Record(spec=spec, spec_file=f"/x/{spec}.circuit.yaml", line=3, model="zoo:m", checkpoint=checkpoint,
                  step=int(checkpoint[4:]), claim=claim, claim_type="faithfulness", outcome="passed", measured="pass",
                  verdict="pass", value=value, threshold_min=0.8)


def test_refuses_duplicated_items_naming_both_files(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_json([rec("step1"), rec("step2")], a, environment=run_environment())
    write_json([rec("step2")], b, environment=run_environment())
    with pytest.raises(CircuitTestsError, match=r"duplicated item s @ step2: faith .* in .*a\.json and in .*b\.json"):
        merge_files([a, b])


def test_refuses_mixed_code_versions_and_files_without_a_code_hash(tmp_path):
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    write_json([rec("step1")], a, environment=run_environment())
    write_json([rec("step2")], b, environment={**run_environment(), "code_sha256": "0" * 64})
    with pytest.raises(CircuitTestsError, match="mixed code versions: .*code_sha256"):
        merge_files([a, b])
    write_json([rec("step2")], c, environment={"torch": "2"})
    with pytest.raises(CircuitTestsError, match="no code_sha256"):
        merge_files([c, a])


def test_merge_keeps_incompleteness_and_differing_environment(tmp_path):
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "all.json"
    write_json([rec("step1")], a, environment=run_environment())
    write_json([rec("step2")], b, environment={**run_environment(), "machine": "other"}, complete=False,
               incomplete_reason="stopped early")
    assert main(["merge", str(a), str(b), "-o", str(out)]) == 0
    f = read_results(out)
    assert [r.checkpoint for r in f.records] == ["step1", "step2"]
    assert not f.complete and "stopped early" in f.incomplete_reason
    assert len(f.environment["machine"]) == 2 and isinstance(f.environment["code_sha256"], str)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["merge", str(tmp_path / "missing.json"), "-o", str(tmp_path / "o.json")]) == 2
    assert "no such results file" in capsys.readouterr().err


SPEC = """\
name: induction-shards
model:
  source: ./models
task:
  name: induction
  size: 16
  seed: 0
  seq_len: 12
  prepend_bos: true
circuit:  # nodes, not roles: roles with a criterion would add role_check items (docs/roles.md)
  nodes: [a0.h3, a0.h2, a1.h0, a1.h1, a1.h2, a1.h3]
claims:
  - type: faithfulness
    id: faith
    normalization: normalized
    min: 0.8
  - type: faithfulness
    id: faith_ci
    normalization: ratio
    min: 0.8
    gate: ci
    bootstrap: {method: percentile, resamples: 500, seed: 1}
"""


def test_two_shards_merged_give_the_same_report_as_one_run(pytester, tmp_path):
    for step in (2300, 3000):
        shutil.copytree(ZOO / f"step{step}", pytester.path / "models" / f"step{step}")
    pytester.makefile(".circuit.yaml", spec=SPEC)
    base = ["-p", "no:cacheprovider", "-q"]
    whole = pytester.runpytest_inprocess(*base, "--circuit-json", "one.json")
    assert whole.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED)
    pytester.runpytest_inprocess(*base, "-k", "step2300", "--circuit-json", "a.json")
    pytester.runpytest_inprocess(*base, "-k", "step3000", "--circuit-json", "b.json")
    p = pytester.path
    assert main(["merge", str(p / "a.json"), str(p / "b.json"), "-o", str(p / "all.json")]) == 0
    one, merged = read_results(p / "one.json"), read_results(p / "all.json")
    assert one.records == merged.records and one.counts == merged.counts and merged.complete
    for name in ("one", "all"):
        assert main(["report", str(p / f"{name}.json"), "--html", str(p / f"html-{name}"), "--markdown",
                     str(p / f"{name}.md")]) == 0
    assert (p / "html-one" / "index.html").read_text() == (p / "html-all" / "index.html").read_text()
    assert (p / "one.md").read_text() == (p / "all.md").read_text()
    assert main(["merge", str(p / "a.json"), str(p / "one.json"), "-o", str(tmp_path / "x.json")]) == 2  # overlap
    assert len(json.loads((p / "all.json").read_text())["records"]) == 4
