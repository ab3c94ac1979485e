"""Output paths and --circuit-compare (issue 19): every output path (--circuit-json, --circuit-plot, --circuit-report,
--circuit-cache-dir, $GITHUB_STEP_SUMMARY) is checked before anything runs (one usage error naming the option, the path
and why; exit 4, no traceback); a write that still fails at the end is one line and changes no claim's outcome;
the compare tolerance is refused unless finite and >= 0; a value that became NaN counts as moved; changes are
listed in training order."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import circuit_tests.collect  # noqa: F401  (imported before pytester snapshots sys.modules)
import circuit_tests.engine  # noqa: F401
import circuit_tests.sources  # noqa: F401
import circuit_tests.tasks  # noqa: F401
import transformer_lens.model_bridge  # noqa: F401
from circuit_tests.compare import compare, summary
from circuit_tests.results import Record

# The zoo induction pair: step2200 before the phase change, step3000 after it. With holds_from the low score at
# step2200 is an expected absence (xfailed) and step3000 passes: a run that is otherwise OK (exit 0).
SPEC = """\
name: out
model:
  source: zoo:induction
  checkpoints: [2200, 3000]
task:
  name: induction
  size: 8
  seed: 0
  seq_len: 20
circuit:
  roles:
    prev_heads: [a0.h3]
    ind_heads: [a1.h1, a1.h2, a1.h3]
claims:
  - type: role_score
    id: prev
    role: prev_heads
    score: previous_token
    min: 0.5
    holds_from: 2400
"""

FILE_OPTIONS = ("--circuit-json", "$GITHUB_STEP_SUMMARY")            # a file written whole / appended to
DIR_OPTIONS = ("--circuit-plot", "--circuit-report", "--circuit-cache-dir")


@pytest.fixture(autouse=True)
def _no_step_summary(monkeypatch):
    """The inner sessions must not append to a real step summary (this suite may itself run in GitHub Actions)."""
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


def run(pytester, monkeypatch, option: str | None = None, path: str | Path | None = None, *args: str):
    pytester.makefile(".circuit.yaml", out=SPEC)
    extra = list(args)
    if option == "$GITHUB_STEP_SUMMARY":
        monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(path))
    elif option is not None:
        extra.append(f"{option}={path}")
    return pytester.runpytest_inprocess("-W", "ignore::pytest.PytestAssertRewriteWarning", "-p", "no:cacheprovider",
                                        *extra, no_reraise_ctrlc=True)


def assert_usage_error(r, message: str) -> None:
    out = r.stdout.str() + r.stderr.str()
    assert r.ret == pytest.ExitCode.USAGE_ERROR, out
    assert message in r.stderr.str(), out
    assert "Traceback" not in out and "passed" not in out and "failed" not in out, out


@pytest.fixture
def unwritable(tmp_path):
    """An existing directory nobody can create files in. Root ignores permission bits (os.access is always true),
    so there it is /sys, whose directories refuse new files even to root; skipped where that is not so."""
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o500)
        yield d
        d.chmod(0o700)
        return
    d = Path("/sys")
    try:
        (d / ".circuit-tests-probe").touch()
    except OSError:
        yield d
        return
    (d / ".circuit-tests-probe").unlink()
    pytest.skip("no directory here refuses writes to this user")


@pytest.mark.parametrize("option", FILE_OPTIONS + DIR_OPTIONS)
def test_path_under_a_file_is_a_usage_error(pytester, monkeypatch, tmp_path, option):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    path = a_file / "sub" / "out.json"
    r = run(pytester, monkeypatch, option, path)
    assert_usage_error(r, f"{option} {path}: {a_file} is a file, not a directory")
    assert a_file.read_text() == "x"


@pytest.mark.parametrize("option", DIR_OPTIONS)
def test_directory_option_given_a_file_is_a_usage_error(pytester, monkeypatch, tmp_path, option):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    r = run(pytester, monkeypatch, option, a_file)
    assert_usage_error(r, f"{option} {a_file}: {a_file} is a file, not a directory")


@pytest.mark.parametrize("option", FILE_OPTIONS)
def test_file_option_given_a_directory_is_a_usage_error(pytester, monkeypatch, tmp_path, option):
    assert_usage_error(run(pytester, monkeypatch, option, tmp_path), f"{option} {tmp_path}: is a directory")


@pytest.mark.parametrize("option", FILE_OPTIONS + DIR_OPTIONS)
def test_unwritable_location_is_a_usage_error(pytester, monkeypatch, unwritable, option):
    path = unwritable / "out.json"
    if option in FILE_OPTIONS:  # the file would be created in (renamed into) that directory
        expect = f"{option} {path}: directory {unwritable} is not writable"
    else:                       # the directory would have to be created there
        expect = f"{option} {path}: cannot create directory {path}"
    assert_usage_error(run(pytester, monkeypatch, option, path), expect)


@pytest.mark.parametrize("option", DIR_OPTIONS)
def test_existing_unwritable_directory_is_a_usage_error(pytester, monkeypatch, unwritable, option):
    assert_usage_error(run(pytester, monkeypatch, option, unwritable),
                       f"{option} {unwritable}: directory {unwritable} is not writable")


@pytest.mark.parametrize("option", ("--circuit-json", "--circuit-plot", "--circuit-report", "--circuit-cache-dir"))
def test_empty_path_is_a_usage_error(pytester, monkeypatch, option):
    assert_usage_error(run(pytester, monkeypatch, option, ""), f"{option} : empty path")


def test_usable_paths_are_checked_without_leaving_a_trace(pytester, monkeypatch, tmp_path):
    """The probe creates and removes: missing directories are not left behind, an existing summary is not touched."""
    pytest.importorskip("matplotlib")
    summary_file = tmp_path / "summary.md"
    summary_file.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary_file))
    r = run(pytester, monkeypatch, None, None, "--collect-only", f"--circuit-plot={tmp_path}/plots/a",
            f"--circuit-report={tmp_path}/report",
            f"--circuit-cache-dir={tmp_path}/cache/b")
    assert r.ret == pytest.ExitCode.OK, r.stdout.str() + r.stderr.str()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.md"]
    assert summary_file.read_text() == "earlier step\n"


@pytest.mark.parametrize("kind", ["file", "append", "dir"])
def test_probe_leaves_no_trace(tmp_path, kind):
    """(--circuit-json is left out above: a --collect-only session still writes its results file.)"""
    from circuit_tests.outputs import output_path_problem

    base = tmp_path / "base"
    base.mkdir()
    target = base / "j" / "k" / "r.json" if kind != "append" else base / "r.md"
    assert output_path_problem(target, kind) is None
    assert list(base.iterdir()) == []


# Replaces output locations with files once collection is done: every write at the end fails after configure
# accepted the paths (a directory removed meanwhile; the same code path as a full disk).
BREAK_OUTPUTS = """\
import os, shutil

def pytest_collection_finish(session):
    for name in os.environ["BREAK_PATHS"].split(os.pathsep):
        if os.path.isdir(name):
            shutil.rmtree(name)
        with open(name, "w") as f:
            f.write("in the way")
"""


def test_failed_end_of_run_writes_leave_outcomes_as_measured(pytester, monkeypatch, tmp_path):
    """Report directory, step summary's directory, results file's directory and the cache directory all turn into
    files during the run: the claims keep their measured outcomes (1 passed, 1 xfailed), each failed write is one
    line, no traceback; the run was otherwise OK, so the exit status is 1 (the artefacts CI expects are missing)."""
    report, summary_dir, json_dir, cache = (tmp_path / n for n in ("report", "summary", "json", "cache"))
    summary_dir.mkdir()
    (summary_dir / "step.md").write_text("")
    monkeypatch.setenv("BREAK_PATHS", os.pathsep.join(map(str, (report, summary_dir, json_dir, cache))))
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary_dir / "step.md"))
    pytester.makeconftest(BREAK_OUTPUTS)
    r = run(pytester, monkeypatch, None, None, f"--circuit-report={report}", f"--circuit-json={json_dir}/r.json",
            f"--circuit-cache-dir={cache}")
    out = r.stdout.str() + r.stderr.str()
    r.assert_outcomes(passed=1, xfailed=1)
    assert r.ret == pytest.ExitCode.TESTS_FAILED, out
    assert "Traceback" not in out and "INTERNALERROR" not in out, out
    lines = [ln for ln in r.stdout.lines if ln.startswith("circuit_tests error:")]
    assert len(lines) == 3, out
    assert any(ln.startswith(f"circuit_tests error: --circuit-report {report}: cannot write") for ln in lines), out
    assert any(ln.startswith(f"circuit_tests error: $GITHUB_STEP_SUMMARY {summary_dir / 'step.md'}: cannot write")
               for ln in lines), out
    assert any(ln.startswith("circuit_tests error: --circuit-json: cannot write results file") for ln in lines), out
    assert "pass 0." in out  # the table still shows the measured values


def test_failed_write_is_reported_even_when_nothing_was_measured(pytester, monkeypatch, tmp_path):
    """Every item deselected: no table, but the results file that could not be written is still one line (and
    the exit status stays pytest's own: no tests ran, 5)."""
    json_dir = tmp_path / "json"
    monkeypatch.setenv("BREAK_PATHS", str(json_dir))
    pytester.makeconftest(BREAK_OUTPUTS)
    r = run(pytester, monkeypatch, "--circuit-json", json_dir / "r.json", "-k", "no_such_item")
    out = r.stdout.str() + r.stderr.str()
    assert r.ret == pytest.ExitCode.NO_TESTS_COLLECTED, out
    assert f"circuit_tests error: --circuit-json: cannot write results file {json_dir / 'r.json'}" in out, out
    assert "Traceback" not in out, out


@pytest.mark.parametrize("tol", ["-1", "nan", "inf", "-inf"])
def test_bad_compare_tolerance_is_a_usage_error(pytester, monkeypatch, tmp_path, tol):
    old = tmp_path / "old.json"
    old.write_text("{}")  # never read: the tolerance is refused first
    r = run(pytester, monkeypatch, None, None, f"--circuit-compare-tolerance={tol}", f"--circuit-compare={old}")
    assert_usage_error(r, "--circuit-compare-tolerance")
    assert "expected a finite number >= 0" in r.stderr.str()


def rec(checkpoint: str, step: int | None, value: float | None, verdict: str = "pass", claim: str = "c") -> Record:
    return Record(spec="s", spec_file="s.circuit.yaml", line=1, model="m", checkpoint=checkpoint, step=step,
                  claim=claim, claim_type="faithfulness", outcome="passed" if verdict == "pass" else "failed",
                  measured=verdict, verdict=verdict, value=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("tol", [-1.0, float("nan"), float("inf")])
def test_compare_refuses_a_tolerance_that_is_not_finite_and_non_negative(tol):
    with pytest.raises(ValueError, match="finite number >= 0"):
        compare([rec("step1", 1, 0.5)], [rec("step1", 1, 1.0)], tol)


@pytest.mark.parametrize("old,new", [(0.5, float("nan")), (float("nan"), 0.5), (0.5, None), (None, 0.5),
                                     (0.5, float("inf")), (float("inf"), float("-inf"))])
def test_a_value_that_became_nan_or_missing_counts_as_moved(old, new):
    (change,) = compare([rec("step1", 1, old)], [rec("step1", 1, new)]).values()
    assert change.moved and change.delta is None
    (line,) = summary({("s", "step1", "c"): change})
    assert line.startswith("s @ step1: c: value ")


@pytest.mark.parametrize("old,new", [(None, None), (float("nan"), float("nan")), (None, float("nan")), (0.5, 0.51)])
def test_values_equally_absent_or_within_tolerance_did_not_move(old, new):
    (change,) = compare([rec("step1", 1, old)], [rec("step1", 1, new)]).values()
    assert not change.moved and not change.flipped and summary({("s", "step1", "c"): change}) == []


def test_changes_are_listed_in_training_order_flips_first():
    steps = (250, 1000, 1500, 20000)
    old = [rec(f"step{s}", s, 0.1) for s in steps]
    new = [rec(f"step{s}", s, 0.9, verdict="fail" if s == 1500 else "pass") for s in reversed(steps)]
    lines = summary(compare(old, new))
    assert [ln.split(": ")[0] for ln in lines] == ["s @ step1500", "s @ step250", "s @ step1000", "s @ step20000"]
    assert lines[0] == "s @ step1500: c: pass -> fail; value 0.1 -> 0.9 (+0.8)"
    assert list(compare(old, new)) == [("s", f"step{s}", "c") for s in steps]
