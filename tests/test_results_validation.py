"""Results files are validated when read (issue 19): a wrong type anywhere a report looks, nested entries
included, is one located CircuitTestsError (file, record, field, what was expected), and the CLI prints it as one
line with exit code 2 instead of "unexpected error: AttributeError" while rendering."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest

from circuit_tests.cli import main
from circuit_tests.errors import CircuitTestsError
from circuit_tests.results import Record, pytest_outcome, read_json, write_json


def _good(tmp_path: Path) -> dict[str, Any]:
    recs = [Record(spec="alpha", spec_file="a.circuit.yaml", line=3, model="zoo:m", checkpoint=f"step{s}", step=s,
                   claim="faith", claim_type="faithfulness", outcome=pytest_outcome("pass", "present"), measured="pass",
                   verdict="pass", value=0.9, threshold_min=0.8,
                   extra={"baseline": {"k": 20, "match": "nodes", "p50": 0.2, "p95": 0.6, "quantile": 1.0, "margin": 0.3,
                                       "require": "p95", "beats": "pass", "values": [0.1, 0.2]},
                          "ablations": {"mean": {"value": 0.7, "outcome": "fail", "reason": "r"}},
                          "per_head": {"a1.h0": 0.5, "a1.h1": {"earned": True, "why": "ok"}},
                          "effects": {"a0.h3": -0.6}, "warnings": ["dangling: m0"], "ci_method": "bca",
                          "details": {"anything": ["goes", 1]}})
            for s in (0, 100)]
    p = tmp_path / "good.json"
    write_json(recs, p, environment={"torch": "2.x", "code_sha256": "abc"})
    return json.loads(p.read_text())


def _set(*path: Any, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        d = doc
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return mutate


def _drop(*path: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        d = doc
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]
    return mutate


# (mutation, the field as named in the message, what the message says was expected)
CASES = {
    "string field": (_set("records", 1, "spec", value=5), "record 1", "field spec:", "expected a valid string"),
    "number field": (_set("records", 1, "value", value="high"), "record 1 (alpha, faith @ step100)", "field value:",
                     "expected a valid number"),
    "integer field": (_set("records", 0, "line", value=[3]), "record 0", "field line:", "expected a valid integer"),
    "outcome word": (_set("records", 1, "outcome", value="won"), "record 1", "field outcome:",
                     "expected 'passed', 'failed', 'xfailed' or 'skipped'"),
    "missing field": (_drop("records", 0, "claim"), "record 0", "field claim:", "missing (required)"),
    "extra not an object": (_set("records", 1, "extra", value="x"), "record 1", "field extra:", "expected a valid dictionary"),
    "baseline not an object": (_set("records", 1, "extra", "baseline", value="<b>"), "record 1", "field extra.baseline:",
                               "expected a valid dictionary"),
    "baseline number": (_set("records", 0, "extra", "baseline", "p50", value="x"), "record 0",
                        "field extra.baseline.p50:", "expected a valid number"),
    "baseline word": (_set("records", 0, "extra", "baseline", "beats", value=1), "record 0",
                      "field extra.baseline.beats:", "expected a valid string"),
    "ablation not an object": (_set("records", 1, "extra", "ablations", "mean", value=3), "record 1",
                               "field extra.ablations.mean:", "expected a valid dictionary"),
    "ablation value": (_set("records", 1, "extra", "ablations", "mean", "value", value="0.7x"), "record 1",
                       "field extra.ablations.mean.value:", "expected a valid number"),
    "per-head entry": (_set("records", 0, "extra", "per_head", "a1.h0", value="x"), "record 0",
                       "field extra.per_head.a1.h0:", "expected a number, null or an object"),
    "sender effect": (_set("records", 0, "extra", "effects", "a0.h3", value=[1]), "record 0",
                      "field extra.effects.a0.h3:", "expected a valid number"),
    "warnings": (_set("records", 0, "extra", "warnings", value="one"), "record 0", "field extra.warnings:",
                 "expected a valid list"),
    "environment": (_set("environment", value=["torch"]), "", "field environment:", "expected a valid dictionary"),
    "counts": (_set("counts", "passed", value="two"), "", "field counts.passed:", "expected a valid integer"),
    "records not a list": (_set("records", value={"a": 1}), "", "field records:", "expected a valid list"),
    "record not an object": (_set("records", 1, value=7), "record 1", "field (the record itself):",
                             "expected an object (a result record)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_wrong_type_is_a_located_error(tmp_path, case):
    mutate, where, field, expected = CASES[case]
    doc = _good(tmp_path)
    mutate(doc)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(CircuitTestsError) as e:
        read_json(bad)
    msg = str(e.value)
    assert msg.startswith(f"{bad}: malformed results file: {where}"), msg
    assert field in msg and expected in msg and "\n" not in msg, msg
    assert ", got " in msg or case == "missing field", msg


@pytest.mark.parametrize("case", ["baseline not an object", "ablation not an object", "per-head entry"])
def test_cli_report_prints_one_located_line_and_exits_2(tmp_path, capsys, case):
    """Before: a baseline or ablation entry of the wrong type passed the reader and crashed the page
    ("unexpected error: AttributeError", exit 1)."""
    mutate, where, field, _ = CASES[case]
    doc = _good(tmp_path)
    mutate(doc)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    code = main(["report", str(bad), "--html", str(tmp_path / "html"), "--no-plots"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"circuit-tests: error: {bad}: malformed results file: ")
    assert where in err and field in err and "unexpected" not in err and "AttributeError" not in err
    assert not (tmp_path / "html" / "index.html").exists()


def test_valid_file_keeps_unknown_extra_keys_and_reads_back(tmp_path):
    doc = _good(tmp_path)
    recs = read_json(tmp_path / "good.json")
    assert [r.extra for r in recs] == [r["extra"] for r in doc["records"]]
    assert recs[0].extra["details"] == {"anything": ["goes", 1]}
