"""Emergence plots (``--circuit-plot``, ``circuit-tests plot``): series built from records, PNGs written,
clear errors for missing matplotlib and bad results files."""

from __future__ import annotations

import pytest

from circuit_tests.errors import CircuitTestsError
from circuit_tests.plot import claim_series, plot_results, require_matplotlib
from circuit_tests.results import Record, pytest_outcome, read_json, write_json


def rec(claim, checkpoint, step, value, outcome="pass", expected="present", line=10, spec="toy", spec_file="a.circuit.yaml",
        tmin=0.5):
    return Record(spec=spec, spec_file=spec_file, line=line, model="zoo:toy", checkpoint=checkpoint, step=step,
                  claim=claim, claim_type="faithfulness", outcome=pytest_outcome(outcome, expected), measured=outcome,
                  verdict=outcome, expected=expected,
                  value=value, threshold_min=tmin)


def toy_records():
    return [
        # claim "late" (spec line 20) is listed first here: series follow the spec's order, not the input's
        rec("late", "step1000", 1000, 0.9, line=20), rec("late", "step0", 0, 0.1, expected="absent", line=20),
        rec("late", "step100", 100, None, outcome="not_evaluated", line=20),
        rec("faith", "step0", 0, None, expected="absent"), rec("faith", "step100", 100, 0.7),
        rec("faith", "step1000", 1000, 0.4, outcome="fail"),
    ]


def test_claim_series_order_positions_and_formation():
    (key, series), = claim_series(toy_records()).items()
    assert key == ("a.circuit.yaml", "toy") and [s.claim for s in series] == ["faith", "late"]
    faith, late = series
    assert faith.x == [0.0, 100.0, 1000.0] and faith.labels == ["step0", "step100", "step1000"]
    assert faith.values == [None, 0.7, 0.4] and faith.outcomes == ["pass", "pass", "fail"]
    assert faith.formation_x == 50.0 and faith.threshold_min == 0.5 and faith.by_step
    assert late.expected == ["absent", "present", "present"] and late.formation_x == 50.0
    # checkpoints without a step (hub revisions such as "main"): ordinal positions, labels kept
    (_, (s,)), = claim_series([rec("c", "main", None, 0.8), rec("c", "v2", None, 0.9)]).items()
    assert s.x == [0.0, 1.0] and not s.by_step and s.formation_x is None


def test_plot_results_writes_one_png_per_spec(tmp_path):
    pytest.importorskip("matplotlib")
    recs = toy_records()
    recs += [rec("faith", "step0", 0, 0.6, spec_file="b.circuit.yaml")]            # same spec name, other file
    recs += [rec("x", "main", None, None, outcome="not_evaluated", spec="uncached")]  # nothing measured: no plot
    paths = plot_results(recs, tmp_path / "plots")
    assert [p.name for p in paths] == ["toy.png", "toy-2.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # same records, same picture
    again = plot_results(recs, tmp_path / "again")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]


def test_missing_matplotlib_is_a_clear_error(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(CircuitTestsError, match=r"pip install 'circuit-tests\[plots\]'"):
        require_matplotlib()
    with pytest.raises(CircuitTestsError, match="matplotlib"):
        plot_results(toy_records(), tmp_path)
    assert not any(tmp_path.iterdir())


def test_read_json_round_trip_and_errors(tmp_path):
    p = tmp_path / "r.json"
    write_json(toy_records(), p)
    assert sorted(r.to_json() for r in read_json(p)) == sorted(r.to_json() for r in toy_records())
    with pytest.raises(CircuitTestsError, match="no such results file.*--circuit-json"):
        read_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    for text, msg in (("{not json", "not a circuit_tests results file"), ('{"a": 1}', "no 'records'"),
                      ('{"schema_version": 99, "records": []}', "schema version 99"),
                      ('{"schema_version": 1, "records": []}', "schema version 1, this circuit_tests reads 2"),
                      ('{"schema_version": 2, "records": [{"spec": "x"}]}', "malformed results file: "),
                      ('{"schema_version": 2, "complete": true, "incomplete_reason": null, "counts": {}, '
                       '"environment": {}, "records": [{"spec": "x"}]}', r"malformed results file: record 0 \(x\): field spec_file: "
                       r"missing \(required\)"), ("[1, 2", "not a circuit_tests results file"), ("", "not a circuit_tests")):
        bad.write_text(text)
        with pytest.raises(CircuitTestsError, match=msg):
            read_json(bad)


def test_cli_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from circuit_tests import cli

    p = tmp_path / "r.json"
    write_json(toy_records(), p)
    assert cli.main(["plot", str(p), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "toy.png")
    assert cli.main(["plot", str(tmp_path / "nope.json")]) == 2
    assert "no such results file" in capsys.readouterr().err
