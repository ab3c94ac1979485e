"""pytest plugin entry point (``pytest11``): options, spec collection, result gathering, end-of-run report.

Kept thin on purpose: nothing here imports torch or transformers, so ``pytest --help`` stays fast; the
collection and evaluation modules load on first use.
Spec files: ``*.circuit.yaml`` / ``*.circuit.yml`` under the paths pytest is given (e.g. ``pytest specs/``).
Records travel on the call reports (an attribute, serialised by pytest-xdist), so they reach the controller
under pytest-xdist without becoming JUnit ``<properties>`` (invalid in the default xunit2 schema).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .state import COMPARE_RECORDS, RECORD_KEY, RESULT_CACHE, SCOPE  # session state lives in config.stash

if TYPE_CHECKING:
    from .outputs import Kind


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("circuit_tests", "circuit specs (circuit_tests)")
    g.addoption("--circuit-json", metavar="PATH", default=None,
                help="write every circuit result record (spec, checkpoint, claim, outcome, numbers, weights sha256) as JSON")
    g.addoption("--circuit-plot", metavar="DIR", default=None,
                help="write one PNG per spec into DIR: each claim's value across checkpoints, thresholds, outcomes "
                     "(needs matplotlib: pip install 'circuit-tests[plots]')")
    g.addoption("--circuit-not-evaluated", choices=("skip", "fail"), default="skip",
                help="how a claim that cannot be evaluated is reported (default: skip, with the reason)")
    g.addoption("--circuit-online", action="store_true", default=False,
                help="allow downloading hub models (default: offline; uncached hub checkpoints are not_evaluated)")
    g.addoption("--circuit-gate", choices=("point", "ci"), default=None,
                help="gate of claims whose spec and claim set none: point value (default) or the whole bootstrap "
                     "interval (ci; a straddling interval is 'uncertain')")
    g.addoption("--circuit-strict", action="store_true", default=False,
                help="fail uncertain claims (default: skip them with the reason)")
    g.addoption("--circuit-cache", action="store_true", default=False,
                help="reuse a claim's result from pytest's cache when nothing it depends on changed (spec parts, "
                     "weights sha256, task data, code, environment)")
    g.addoption("--circuit-cache-dir", metavar="DIR", default=None,
                help="like --circuit-cache, but keep the results in DIR (e.g. a CI cache path)")
    g.addoption("--circuit-report", metavar="DIR", default=None,
                help="write a self-contained HTML report (DIR/index.html): tables, plots, failures, specs, provenance")
    g.addoption("--circuit-compare", metavar="OLD_JSON", default=None,
                help="mark claims whose outcome flipped or whose value moved since OLD_JSON (a --circuit-json file)")
    g.addoption("--circuit-compare-tolerance", metavar="X", type=float, default=None,
                help="absolute value change that counts as moved (default 0.02)")
    g.addoption("--circuit-threads", metavar="N", type=int, default=None,
                help="torch threads while specs are evaluated (default: ini circuit_threads, else 1: deterministic "
                     "and fast under CPU load); restored at the end of the session")
    parser.addini("circuit_spec_suffixes", "spec file suffixes to collect", type="linelist",
                  default=[".circuit.yaml", ".circuit.yml"])
    parser.addini("circuit_threads", "torch threads while specs are evaluated (default 1)", default="1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "circuit(spec, model, task, checkpoint): a circuit claim item")
    # Nothing process-wide changes here (this plugin loads in every pytest session of the environment): the
    # settings are applied when the first spec item runs and restored in pytest_unconfigure.
    from .runtime import EvaluationScope, set_online

    threads = config.getoption("circuit_threads", None)
    if threads is None:
        ini = str(config.getini("circuit_threads")).strip()
        if not ini.isdigit():
            raise pytest.UsageError(f"ini circuit_threads = {ini!r}: expected a positive integer")
        threads = int(ini)
    if threads < 1:
        raise pytest.UsageError(f"--circuit-threads {threads}: expected a positive integer")
    online = True if config.getoption("circuit_online") else None
    config.stash[SCOPE] = EvaluationScope(threads=threads, online=online)
    if online:
        set_online(True)  # hub availability is judged at collection too
    _check_output_paths(config)
    _check_tolerance(config)
    if config.getoption("circuit_plot", None):
        from .errors import CircuitTestsError
        from .plot import require_matplotlib

        try:
            require_matplotlib()
        except CircuitTestsError as e:
            raise pytest.UsageError(f"--circuit-plot: {e}") from None
    if config.getoption("circuit_cache", False) or config.getoption("circuit_cache_dir", None):
        from .cache import DirStore, ResultCache

        d = config.getoption("circuit_cache_dir", None)
        store = DirStore(d) if d else getattr(config, "cache", None)
        if store is None:
            raise pytest.UsageError("--circuit-cache needs pytest's cacheprovider (drop -p no:cacheprovider) or use "
                                    "--circuit-cache-dir DIR")
        config.stash[RESULT_CACHE] = ResultCache(store)
    old = config.getoption("circuit_compare", None)
    if old and not hasattr(config, "workerinput"):
        from .errors import CircuitTestsError
        from .results import read_json

        try:
            config.stash[COMPARE_RECORDS] = read_json(old)
        except CircuitTestsError as e:
            raise pytest.UsageError(f"--circuit-compare: {e}") from None
    config.pluginmanager.register(ResultCollector(config), "circuit_tests_results")
    if not hasattr(config, "workerinput"):  # first-use model fetch/convert progress on the terminal (not in CI logs)
        from .user_cache import use_terminal

        use_terminal(_TerminalProgress(config))


# Every output path: (option as the user wrote it, how it is written). Checked before anything is evaluated.
OUTPUT_OPTIONS: tuple[tuple[str, str, Kind], ...] = (
    ("circuit_json", "--circuit-json", "file"),
    ("circuit_plot", "--circuit-plot", "dir"),
    ("circuit_report", "--circuit-report", "dir"),
    ("circuit_cache_dir", "--circuit-cache-dir", "dir"),
)


def _check_output_paths(config: pytest.Config) -> None:
    """Refuse an unusable output path before anything is evaluated (not as a traceback after minutes of work):
    one usage error naming the option, the path and why (outputs.output_path_problem)."""
    import os

    from .outputs import output_path_problem

    if hasattr(config, "workerinput"):  # the controller checked them
        return
    paths: list[tuple[str, str | None, Kind]] = [(flag, config.getoption(dest, None), kind)
                                                 for dest, flag, kind in OUTPUT_OPTIONS]
    # the GitHub step summary: set by the runner, appended to; empty means unset (as GitHub treats it)
    paths.append(("$GITHUB_STEP_SUMMARY", os.environ.get("GITHUB_STEP_SUMMARY") or None, "append"))
    for flag, path, kind in paths:
        if path is None:
            continue
        problem = output_path_problem(path, kind)
        if problem is not None:
            raise pytest.UsageError(f"{flag} {path}: {problem}")


def _check_tolerance(config: pytest.Config) -> None:
    """--circuit-compare-tolerance must be a finite number >= 0: NaN compares false with everything (every move
    would pass unnoticed) and a negative one cannot be met."""
    import math

    tol = config.getoption("circuit_compare_tolerance", None)
    if tol is not None and (not math.isfinite(tol) or tol < 0):
        raise pytest.UsageError(f"--circuit-compare-tolerance {tol}: expected a finite number >= 0 (an absolute "
                                f"change in a claim's value, default 0.02)")


class _TerminalProgress:
    """Progress lines of a first-use model fetch/convert (user_cache.Progress), written to pytest's terminal with
    output capture suspended: without it they would land in the capture file and show after the wait, if at all."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def isatty(self) -> bool:
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        try:
            return bool(tr is not None and tr._tw._file.isatty())
        except (AttributeError, ValueError, OSError):
            return False

    def write(self, text: str) -> int:
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        capman = self.config.pluginmanager.get_plugin("capturemanager")
        if tr is None:
            return 0
        if capman is not None:
            with capman.global_and_fixture_disabled():
                tr.write("\n" + text.rstrip("\n"), flush=True)
        else:
            tr.write("\n" + text.rstrip("\n"), flush=True)
        return len(text)

    def flush(self) -> None:
        pass


def pytest_unconfigure(config: pytest.Config) -> None:
    """Undo the evaluation settings (threads, hub mode, environment, warning filters, logger levels)."""
    from .user_cache import use_terminal

    use_terminal(None)
    scope = config.stash.get(SCOPE, None)
    if scope is not None:
        scope.restore()
        if scope.online:
            from .runtime import set_online

            set_online(None)


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> Any:
    if any(file_path.name.endswith(s) for s in parent.config.getini("circuit_spec_suffixes")):
        from .collect import SpecFile

        return SpecFile.from_parent(parent, path=file_path)
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    """Point skip reports (not_evaluated) at the claim's line in the spec, not at plugin code."""
    rep = yield
    if rep.when == "call" and getattr(item, RECORD_KEY, None):
        setattr(rep, RECORD_KEY, getattr(item, RECORD_KEY))
    where = getattr(item, "circuit_location", None)
    if where and rep.skipped and isinstance(rep.longrepr, tuple):
        rep.longrepr = (where[0], where[1], rep.longrepr[2])
    return rep


class ResultCollector:
    """Gathers result records from reports (on the controller) and writes the table and the JSON file."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.raw: dict[str, None] = {}
        self._records: list[Any] = []      # parsed self.raw (which only grows), reused by JSON, plot and table
        self.plots: list[Path] = []
        self.changes: dict[Any, Any] = {}
        self.html: Path | None = None
        self.notes: list[str] = []         # what happened to the output files (partial results, write errors)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        value = getattr(report, RECORD_KEY, None)
        if value:
            self.raw[value] = None

    def records(self) -> list[Any]:
        if len(self._records) != len(self.raw):
            from .results import Record

            self._records = [Record.from_json(v) for v in self.raw]
        return self._records

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if hasattr(self.config, "workerinput") or not (self.raw or self.notes):
            return
        terminalreporter.section("circuit_tests")
        if not self.raw:  # nothing measured, but an output could not be written: say so
            for note in self.notes:
                terminalreporter.write_line(note)
            return
        from .report import table

        terminalreporter.write_line(table(self.records(), self.changes))
        if self.changes:
            from .compare import summary

            for line in summary(self.changes) or ["no claim flipped or moved since the compared run"]:
                terminalreporter.write_line(f"changed: {line}")
        cache = self.config.stash.get(RESULT_CACHE, None)
        if cache is not None:
            from .cache import reused

            n = sum(map(reused, self.records()))
            terminalreporter.write_line(f"cache: {n} of {len(self.records())} results reused")
        for p in self.plots:
            terminalreporter.write_line(f"plot: {p}")
        for note in self.notes:
            terminalreporter.write_line(note)
        if self.html:
            terminalreporter.write_line(f"report: {self.html}")

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if hasattr(self.config, "workerinput"):
            return
        from .errors import CircuitTestsError

        path = self.config.getoption("circuit_json", None)
        if path:
            self._write_json(session, exitstatus, path)
        plot_dir = self.config.getoption("circuit_plot", None)
        if plot_dir and self.raw:
            from .plot import plot_results

            try:
                self.plots = plot_results(self.records(), plot_dir)
            except (CircuitTestsError, OSError) as e:
                self._error(session, f"--circuit-plot: {e}")
        self._ci_outputs(session)

    def _error(self, session: pytest.Session, text: str) -> None:
        """An output that could not be written: one line in the summary; it fails an otherwise green run (the
        artefact CI expects is missing) but never changes a claim's outcome."""
        self.notes.append(f"circuit_tests error: {text}")
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def _write_json(self, session: pytest.Session, exitstatus: int, path: str) -> None:
        """Atomic; a run that stopped early never replaces a complete file: its records go to PATH.partial.json,
        marked ``complete: false`` with the reason."""
        from .errors import CircuitTestsError
        from .results import partial_path, write_json

        reason = None
        if exitstatus == pytest.ExitCode.INTERRUPTED:
            reason = "interrupted" + (f": {session.shouldstop}" if isinstance(session.shouldstop, str) else
                                      " (Ctrl-C or a collection error)")
        elif exitstatus == pytest.ExitCode.INTERNAL_ERROR:
            reason = "pytest internal error"
        elif session.shouldfail or session.shouldstop:
            reason = f"stopped early: {session.shouldfail or session.shouldstop}"
        if reason is not None and not self.raw:
            self.notes.append(f"circuit_tests: run {reason}; no results to write, {path} left as it was")
            return
        target = Path(path) if reason is None else partial_path(path)
        try:
            from .cache import run_environment

            env = run_environment()  # with the code hash: merge refuses mixed code versions
            scope = self.config.stash.get(SCOPE, None)
            if scope is not None:  # the threads the specs were evaluated with (also on the xdist controller)
                env["threads"] = scope.threads
            write_json(self.records(), target, complete=reason is None, incomplete_reason=reason, environment=env)
        except CircuitTestsError as e:
            self._error(session, f"--circuit-json: {e}")
            return
        if reason is not None:
            self.notes.append(f"circuit_tests: run {reason}; partial results in {target} (complete: false); "
                              f"{path} left as it was")

    def _ci_outputs(self, session: pytest.Session) -> None:
        """--circuit-compare, --circuit-report and the GitHub step summary ($GITHUB_STEP_SUMMARY). The paths were
        checked at configure; a write that still fails (disk full, directory removed meanwhile) is one line."""
        import os

        from .errors import CircuitTestsError

        if not self.raw:
            return
        old = self.config.stash.get(COMPARE_RECORDS, None)
        if old is not None:
            from .compare import DEFAULT_TOLERANCE, compare

            tol = self.config.getoption("circuit_compare_tolerance", None)
            self.changes = compare(old, self.records(), DEFAULT_TOLERANCE if tol is None else tol)
        report_dir = self.config.getoption("circuit_report", None)
        if report_dir:
            from .html_report import write_report

            try:
                self.html = write_report(self.records(), report_dir, self.changes,  # the JSON file's provenance rows
                                         threads=getattr(self.config.stash.get(SCOPE, None), "threads", None))
            except (CircuitTestsError, OSError) as e:
                self._error(session, f"--circuit-report {report_dir}: {_write_failure(e)}")
        step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if step_summary:
            from .html_report import markdown_summary

            text = markdown_summary(self.records(), self.changes)
            try:
                with open(step_summary, "a", encoding="utf-8") as f:
                    f.write(text)
            except OSError as e:
                self._error(session, f"$GITHUB_STEP_SUMMARY {step_summary}: {_write_failure(e)}")


def _write_failure(e: Exception) -> str:
    """``cannot write FILE: REASON`` from an OSError (its file name and strerror, no errno noise)."""
    if isinstance(e, OSError) and e.strerror:
        return f"cannot write {e.filename}: {e.strerror}" if e.filename else f"cannot write: {e.strerror}"
    return str(e)
