"""The plugin's runtime contract: no side effects on sessions that collect no spec, settings restored after sessions
that do, safe and self-describing results files, clean errors for unusable output paths, ``--lf``, ``-n 2``, and the
public API (``circuit_tests.run``) with its progress log."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import circuit_tests.collect  # noqa: F401  (imported before pytester snapshots sys.modules)
import circuit_tests.engine  # noqa: F401
import circuit_tests.sources  # noqa: F401
import circuit_tests.tasks  # noqa: F401
import transformer_lens.model_bridge  # noqa: F401

# One zoo checkpoint pair, a small task and cheap claims: step2200 is before the phase change (the previous-token
# role score is low), step3000 after it (high). holds_from makes step2200's item an expected absence (xfailed).
SPEC = """\
name: rt
model:
  source: zoo:induction
  checkpoints: [2200, 3000]
task:
  name: induction
  size: 8
  seed: 0
  seq_len: 20
circuit:
  roles:  # role names without a criterion (docs/roles.md): no role_check items, just the two claims
    prev_heads: [a0.h3]
    ind_heads: [a1.h1, a1.h2, a1.h3]
claims:
  - type: role_score
    id: prev
    role: prev_heads
    score: previous_token
    min: 0.5
    holds_from: 2400
  - type: role_score
    id: prev_always
    role: prev_heads
    score: previous_token
    min: 0.5
"""
HF_VARS = ("HF_HUB_OFFLINE", "TQDM_DISABLE", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS", "USE_HUB_KERNELS")


def inproc(pytester, *args, spec=SPEC):
    pytester.makefile(".circuit.yaml", rt=spec)
    # no_reraise_ctrlc: an interrupted inner session (tested below) must not interrupt this one
    return pytester.runpytest_inprocess("-W", "ignore::pytest.PytestAssertRewriteWarning", *args, no_reraise_ctrlc=True)


def test_session_without_a_spec_leaves_the_process_untouched(pytester, monkeypatch):
    """Same environment, same test, plugin enabled vs disabled (-p no:circuit_tests): os.environ, torch threads,
    the hub's offline constant, logger levels and warning filters seen by the test are identical."""
    for var in HF_VARS:  # this suite's own process sets them (tests/conftest.py); a user's session would not
        monkeypatch.delenv(var, raising=False)
    pytester.makepyfile(test_dump="""
        import json, logging, os, sys, warnings
        from pathlib import Path

        def test_dump():
            import torch
            import huggingface_hub.constants as hc
            state = {"env": {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"},
                     "threads": torch.get_num_threads(), "hf_offline": hc.HF_HUB_OFFLINE,
                     "loggers": {n: logging.getLogger(n).level for n in ("transformers", "transformer_lens")},
                     "filters": [repr(f) for f in warnings.filters]}
            Path("dump.json").write_text(json.dumps(state, sort_keys=True))
    """)
    states = []
    for extra in (["-p", "no:circuit_tests"], []):
        r = pytester.runpytest_subprocess("-p", "no:cacheprovider", *extra)
        r.assert_outcomes(passed=1)
        states.append(json.loads((pytester.path / "dump.json").read_text()))
    assert states[0] == states[1]
    assert not any(v in states[1]["env"] for v in HF_VARS)  # nothing of ours leaked into the session


def test_scope_loads_models_without_hub_kernels_unless_the_environment_asks(monkeypatch):
    """transformers >= 5.25 replaces layers with code from the hub ("kernels") in every from_pretrained by default:
    remote code and another implementation of the numbers. Evaluation turns it off (restored after); an explicit
    USE_HUB_KERNELS is respected."""
    from circuit_tests import sources
    from circuit_tests.runtime import EvaluationScope
    from circuit_tests.sources import resolve_checkpoints

    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    (ref,) = resolve_checkpoints("zoo:induction", None, [3000], ".")
    with EvaluationScope():
        assert os.environ["USE_HUB_KERNELS"] == "NO"
        try:
            assert getattr(ref.load().original_model, "use_kernels", False) is False
        finally:
            sources.release_all()
    assert "USE_HUB_KERNELS" not in os.environ
    monkeypatch.setenv("USE_HUB_KERNELS", "YES")
    with EvaluationScope():
        assert os.environ["USE_HUB_KERNELS"] == "YES"


def test_importing_the_package_and_engine_changes_nothing():
    import subprocess
    import sys

    code = ("import os, torch; e, t = dict(os.environ), torch.get_num_threads(); torch.set_num_threads(2)\n"
            "import circuit_tests, circuit_tests.engine, circuit_tests.models, circuit_tests.runner, circuit_tests.plugin\n"
            "print(e == dict(os.environ), torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in HF_VARS}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["True", "2"]


def test_spec_session_applies_threads_and_offline_mode_then_restores_them(pytester, monkeypatch, tmp_path):
    import huggingface_hub.constants as hc
    import torch

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    threads_before = torch.get_num_threads()
    out = tmp_path / "r.json"
    r = inproc(pytester, f"--circuit-json={out}", f"--circuit-threads={threads_before + 1}", "-p", "no:cacheprovider")
    r.assert_outcomes(passed=2, failed=1, xfailed=1)
    assert json.loads(out.read_text())["environment"]["threads"] == threads_before + 1   # applied while evaluating
    assert torch.get_num_threads() == threads_before and "HF_HUB_OFFLINE" not in os.environ  # and restored
    assert hc.HF_HUB_OFFLINE is False
    r = inproc(pytester, "--circuit-threads=0")
    assert r.ret == pytest.ExitCode.USAGE_ERROR and "--circuit-threads 0: expected a positive integer" in r.stderr.str()


def test_results_file_is_complete_typed_and_matches_its_schema(pytester, tmp_path):
    """The written file validates against the shipped JSON Schema (which is what results_json_schema() generates),
    reads back through the typed reader, and its counts are pytest's."""
    jsonschema = pytest.importorskip("jsonschema")
    from circuit_tests.results import read_results, results_json_schema

    shipped = json.loads((Path(circuit_tests.collect.__file__).parent / "results.schema.json").read_text())
    assert shipped == results_json_schema(), "regenerate circuit_tests/results.schema.json from results_json_schema()"
    out = tmp_path / "new" / "dir" / "r.json"  # a missing directory is created
    r = inproc(pytester, f"--circuit-json={out}", "-p", "no:cacheprovider")
    data = json.loads(out.read_text())
    jsonschema.Draft202012Validator(shipped).validate(data)
    assert data["complete"] is True and data["incomplete_reason"] is None
    assert data["counts"] == {k: r.parseoutcomes().get(k, 0) for k in ("passed", "failed", "xfailed", "skipped")}
    by = {(x["checkpoint"], x["claim"]): x for x in data["records"]}
    early = by[("step2200", "prev")]
    assert (early["outcome"], early["measured"], early["expected"], early["verdict"]) == ("xfailed", "fail", "absent", "pass")
    late = by[("step2200", "prev_always")]
    assert (late["outcome"], late["measured"], late["verdict"]) == ("failed", "fail", "fail")
    assert len(read_results(out).records) == 4
    data["records"][0]["outcome"] = "pass"  # the old tri-state name is not a pytest outcome
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(shipped).validate(data)


def test_interrupted_run_never_replaces_a_complete_results_file(pytester, tmp_path):
    out = tmp_path / "r.json"
    inproc(pytester, f"--circuit-json={out}", "-p", "no:cacheprovider")
    complete = out.read_text()
    pytester.makeconftest("""
        def pytest_runtest_call(item):
            if "step3000" in item.nodeid:
                raise KeyboardInterrupt
    """)
    r = inproc(pytester, f"--circuit-json={out}", "-p", "no:cacheprovider")
    assert r.ret == pytest.ExitCode.INTERRUPTED
    assert out.read_text() == complete                      # the previous complete file is untouched
    partial = json.loads((tmp_path / "r.partial.json").read_text())
    assert partial["complete"] is False and partial["incomplete_reason"].startswith("interrupted")
    assert {x["checkpoint"] for x in partial["records"]} == {"step2200"}
    assert "partial results in" in r.stdout.str() and str(out) in r.stdout.str()
    assert not list(tmp_path.glob(".*.tmp"))                 # no temporary file left behind


def test_unusable_output_paths_are_one_line_usage_errors(pytester, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [(f"--circuit-json={a_file}/r.json", f"--circuit-json {a_file}/r.json: {a_file} is a file, not a directory"),
             (f"--circuit-json={tmp_path}", f"--circuit-json {tmp_path}: is a directory"),
             (f"--circuit-plot={a_file}", f"--circuit-plot {a_file}: {a_file} is a file")]
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root writes anywhere: no read-only directory to test with
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        cases.append((f"--circuit-json={ro}/r.json", f"directory {ro} is not writable"))
    for arg, msg in cases:
        if arg.startswith("--circuit-plot"):
            pytest.importorskip("matplotlib")
        r = inproc(pytester, arg)
        assert r.ret == pytest.ExitCode.USAGE_ERROR, arg
        assert msg in r.stderr.str() and "Traceback" not in r.stderr.str() + r.stdout.str(), r.stderr.str()


def test_cli_plot_on_truncated_or_odd_json_is_a_one_line_error(tmp_path, capsys):
    from circuit_tests import cli
    from circuit_tests.results import Record, write_json

    good = tmp_path / "r.json"
    write_json([Record(spec="s", spec_file="s.circuit.yaml", line=1, model="m", checkpoint="step0", step=0, claim="c",
                       claim_type="faithfulness", outcome="passed", measured="pass", verdict="pass", value=0.9)], good)
    text = good.read_text()
    for name, content in (("trunc.json", text[: len(text) // 2]), ("list.json", "[]"), ("deep.json", "[" * 100000),
                          ("nan.json", text.replace('"value": 0.9', '"value": "high"'))):
        (tmp_path / name).write_text(content)
        assert cli.main(["plot", str(tmp_path / name), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"circuit-tests: error: {tmp_path / name}: ") and err.count("\n") == 1, err
    pytest.importorskip("matplotlib")
    assert cli.main(["plot", str(good), "--out", str(good)]) == 2  # onto a file
    assert f"cannot create plot directory {good}" in capsys.readouterr().err


def test_last_failed_reruns_only_the_failed_items(pytester):
    """pytest >= 9.2 compares structured node ids: the spec items' ids must parse as the ids read back from the
    cache (``claim[checkpoint]`` = name + params), or --lf finds "1 known failures not in selected tests" and reruns
    everything."""
    r = inproc(pytester)
    r.assert_outcomes(passed=2, failed=1, xfailed=1)
    r = inproc(pytester, "--lf", "-v")
    r.assert_outcomes(failed=1)
    out = r.stdout.str()
    assert "rt.circuit.yaml::step2200::prev_always[step2200] FAILED" in out
    assert "not in selected tests" not in out and "rerun previous 1 failure" in out


def test_failed_first_and_stepwise_on_spec_items(pytester):
    """--ff runs the failed item first, then the rest; --sw stops at the failure and the next --sw starts there."""
    inproc(pytester).assert_outcomes(passed=2, failed=1, xfailed=1)
    r = inproc(pytester, "--ff", "-v")
    r.assert_outcomes(passed=2, failed=1, xfailed=1)
    lines = [ln for ln in r.stdout.lines if ln.startswith("rt.circuit.yaml::")]
    assert lines[0].startswith("rt.circuit.yaml::step2200::prev_always[step2200] FAILED"), lines
    r = inproc(pytester, "--sw", "-v")
    r.assert_outcomes(failed=1, xfailed=1)  # stops at the first failure
    r = inproc(pytester, "--sw", "-v")
    out = r.stdout.str()
    assert "skipping 1 already passed items" in out or "skipping" in out
    first = [ln for ln in r.stdout.lines if ln.startswith("rt.circuit.yaml::")][0]
    assert first.startswith("rt.circuit.yaml::step2200::prev_always[step2200]"), first


def test_two_xdist_workers_give_the_same_results(pytester, tmp_path):
    pytest.importorskip("xdist")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    r1 = inproc(pytester, f"--circuit-json={one}", "-p", "no:cacheprovider")
    r2 = pytester.runpytest_subprocess("-n", "2", "--dist", "loadscope", f"--circuit-json={two}", "-p", "no:cacheprovider")
    assert r1.parseoutcomes() == r2.parseoutcomes() == {"passed": 2, "failed": 1, "xfailed": 1}
    a, b = (json.loads(p.read_text()) for p in (one, two))
    assert a["records"] == b["records"] and a["counts"] == b["counts"]
    assert "2 passed, 1 failed, 1 xfailed" in r2.stdout.str()  # the table's counts, from the controller


def test_api_run_returns_records_and_logs_progress(tmp_path, caplog):
    """circuit_tests.run on the zoo induction spec at one checkpoint: the same records as the plugin (outcome names,
    values), progress on the "circuit_tests" logger, and the caller's thread count untouched."""
    import logging

    import torch

    import circuit_tests

    spec = tmp_path / "rt.circuit.yaml"
    spec.write_text(SPEC)
    threads = torch.get_num_threads()
    with caplog.at_level(logging.INFO, logger="circuit_tests"):
        recs = circuit_tests.run(spec, checkpoints=[3000], threads=threads + 1)
    assert [(r.checkpoint, r.claim, r.outcome) for r in recs] == [("step3000", "prev", "passed"),
                                                                  ("step3000", "prev_always", "passed")]
    assert recs[0].value == recs[1].value and recs[0].value > 0.5 and recs[0].weights_sha256
    text = caplog.text
    assert "rt @ step3000: loading" in text and "rt @ step3000: prev: passed" in text
    assert torch.get_num_threads() == threads
    with pytest.raises(circuit_tests.ModelLoadError, match="checkpoint.s. 1234 not among the spec's checkpoints"):
        circuit_tests.run(spec, checkpoints=[1234])
    assert set(circuit_tests.__all__) >= {"run", "load_spec", "PatchingEngine", "Record"}


@pytest.fixture(autouse=True)
def _clean():
    yield
    circuit_tests.sources.release_all()
