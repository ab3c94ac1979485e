"""docs/ci-workflow.yml: valid against GitHub's workflow schema, and every command it runs exists here."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "docs" / "ci-workflow.yml"


def _workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def _runs() -> list[str]:
    return [s["run"] for job in _workflow()["jobs"].values() for s in job["steps"] if "run" in s]


def _check_jsonschema() -> str:
    exe = shutil.which("check-jsonschema")
    if exe is None:
        pytest.skip("check-jsonschema is not installed (pip install 'circuit-tests[test]')")
    return exe


def test_workflow_is_valid_for_the_github_workflow_schema():
    out = subprocess.run([_check_jsonschema(), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_schema_checker_rejects_a_broken_workflow(tmp_path):
    """The check above can fail: a job without runs-on is refused."""
    wf = _workflow()
    del wf["jobs"]["report"]["runs-on"]
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump(wf))
    out = subprocess.run([_check_jsonschema(), "--builtin-schema", "vendor.github-workflows", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode != 0


def test_pytest_options_used_by_the_workflow_exist():
    from circuit_tests.plugin import pytest_addoption

    names: set[str] = set()

    class Group:
        def addoption(self, *opts, **kw):
            names.update(opts)

    class Parser:
        def getgroup(self, *a, **kw):
            return Group()

        def addini(self, *a, **kw):
            pass

    pytest_addoption(Parser())  # type: ignore[arg-type]
    used = {o for run in _runs() for o in re.findall(r"--circuit-[a-z-]+", run)}
    assert used and used <= names, used - names


def test_cli_commands_used_by_the_workflow_parse():
    from circuit_tests.cli import build_parser

    for run in _runs():
        for line in run.splitlines():
            if line.strip().startswith("circuit-tests "):
                argv = line.strip().split()[1:]
                argv = [a.strip('"') for a in argv]
                build_parser().parse_args(argv)  # SystemExit on an unknown subcommand or option


def test_matrix_groups_cover_every_item_once():
    """The -k groups partition the items of specs/: none is run twice or never."""
    groups = [m["select"] for m in _workflow()["jobs"]["claims"]["strategy"]["matrix"]["include"]]

    def ids(*extra: str) -> set[str]:
        out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              "specs/", *extra], cwd=ROOT, capture_output=True, text=True)
        return {line for line in out.stdout.splitlines() if "::" in line}

    every = ids()
    parts = [ids("-k", g) for g in groups]
    assert every and set().union(*parts) == every
    assert sum(map(len, parts)) == len(every)
    shards = [m["shard"] for m in _workflow()["jobs"]["claims"]["strategy"]["matrix"]["include"]]
    merge = next(r for r in _runs() if "circuit-tests merge" in r)
    assert all(f"results/{s}.json" in merge for s in shards)  # the merge job takes every shard's file
