"""The terminal table (report.table): counts in pytest's words, the same line as the page and the JSON."""

from __future__ import annotations

from circuit_tests.report import table
from circuit_tests.results import Record, count_line, pytest_outcome


def _r(ck: int, claim: str, verdict: str, expected: str = "present", **kw) -> Record:
    return Record(spec="s", spec_file="/elsewhere/s.circuit.yaml", line=3, model="zoo:m", checkpoint=f"step{ck}", step=ck,
                  claim=claim, claim_type="faithfulness", outcome=pytest_outcome(verdict, expected), measured=verdict,
                  expected=expected, verdict=verdict, value=0.5, **kw)


def test_table_counts_are_pytest_outcomes_and_reused_in_one_line():
    recs = [_r(0, "a", "pass", "absent"), _r(1, "a", "pass"), _r(1, "b", "fail"), _r(2, "a", "uncertain"),
            _r(2, "b", "not_evaluated", extra={"cache": "reused"})]
    t = table(recs)
    assert "  1 passed, 1 failed, 1 xfailed, 2 skipped, 1 reused\n" in t
    assert count_line(recs) == "1 passed, 1 failed, 1 xfailed, 2 skipped, 1 reused"


def test_table_names_a_spec_below_the_working_directory_relative(tmp_path, monkeypatch):
    """As the plots do (and as the README shows): ``specs/x.circuit.yaml``, not the absolute path."""
    monkeypatch.chdir(tmp_path)
    rec = _r(0, "a", "pass")
    rec.spec_file = str(tmp_path / "specs" / "s.circuit.yaml")
    assert table([rec]).startswith("s  (specs/s.circuit.yaml; zoo:m; ablation None)")
