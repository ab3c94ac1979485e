"""pytest plugin entry point (``pytest11``): options, spec collection, result gathering, end-of-run report.

Kept thin on purpose: nothing here imports torch or transformers, so ``pytest --help`` stays fast; the
collection and evaluation modules load on first use.
Spec files: ``*.circuit.yaml`` / ``*.circuit.yml`` under the paths pytest is given (e.g. ``pytest specs/``).
Records travel on the test reports (``user_properties``), so they reach the controller under pytest-xdist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

RECORD_KEY = "circuit_tests_record"


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
    parser.addini("circuit_spec_suffixes", "spec file suffixes to collect", type="linelist",
                  default=[".circuit.yaml", ".circuit.yml"])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "circuit(spec, model, task, checkpoint): a circuit claim item")
    from .runtime import configure

    configure(online=True if config.getoption("circuit_online") else None, import_torch=False)
    if config.getoption("circuit_plot", None):
        from .errors import CircuitTestsError
        from .plot import require_matplotlib

        try:
            require_matplotlib()
        except CircuitTestsError as e:
            raise pytest.UsageError(f"--circuit-plot: {e}") from None
    config.pluginmanager.register(ResultCollector(config), "circuit_tests_results")


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> Any:
    if any(file_path.name.endswith(s) for s in parent.config.getini("circuit_spec_suffixes")):
        from .collect import SpecFile

        return SpecFile.from_parent(parent, path=file_path)
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    """Point skip reports (not_evaluated) at the claim's line in the spec, not at plugin code."""
    rep = yield
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

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for key, value in getattr(report, "user_properties", ()):
            if key == RECORD_KEY:
                self.raw[value] = None

    def records(self) -> list[Any]:
        if len(self._records) != len(self.raw):
            from .results import Record

            self._records = [Record.from_json(v) for v in self.raw]
        return self._records

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if hasattr(self.config, "workerinput") or not self.raw:
            return
        from .report import table

        terminalreporter.section("circuit_tests")
        terminalreporter.write_line(table(self.records()))
        for p in self.plots:
            terminalreporter.write_line(f"plot: {p}")

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(self.config, "workerinput"):
            return
        path = self.config.getoption("circuit_json", None)
        if path:
            from .results import write_json

            write_json(self.records(), path)
        plot_dir = self.config.getoption("circuit_plot", None)
        if plot_dir and self.raw:
            from .plot import plot_results

            self.plots = plot_results(self.records(), plot_dir)
