"""The pytest plugin end to end (pytester): collection, item ids, errors at collection, outcomes, table, JSON.

Uses a random-init Pythia-shaped model saved as a local HF directory: it cannot do any task, so its claims
must come out not_evaluated (never passed); the known-circuit tests (test_known_circuit.py) cover pass/fail.
"""

from __future__ import annotations

import json

import pytest

# Heavy modules are imported here, before pytester's in-process runs snapshot sys.modules: re-importing them
# later (after a snapshot restore) would register pyarrow extension types twice.
import circuit_tests.collect  # noqa: F401,E402
import circuit_tests.engine  # noqa: F401,E402
import circuit_tests.sources  # noqa: F401,E402
import circuit_tests.tasks  # noqa: F401,E402
import transformer_lens.model_bridge  # noqa: F401,E402
from circuit_tests.models import load_bridge  # noqa: F401,E402


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from circuit_tests.tasks.wordlists import NAMES
    from circuit_tests.zoo.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer([f"tok{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + list(NAMES))
    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
                                          vocab_size=len(tok), max_position_embeddings=64, rotary_pct=0.25,
                                          bos_token_id=1, eos_token_id=2, pad_token_id=0))
    d = tmp_path_factory.mktemp("models") / "tiny"
    for step in (0, 10):
        hf.save_pretrained(d / f"step{step}")
        tok.save_pretrained(d / f"step{step}")
        with torch.no_grad():  # the next checkpoint differs
            next(hf.parameters()).add_(0.01)
        hf.save_pretrained(d / "step20") if step == 0 else None
    # step20 holds the weights saved right after step0's perturbation, i.e. identical to step10: a duplicate
    tok.save_pretrained(d / "step20")
    return d


SPEC = """\
name: tiny-induction
model:
  source: {src}
task:
  name: induction
  size: 8
  seq_len: 6
  prepend_bos: true
circuit:
  roles:  # role names without a criterion: no role_check items (docs/roles.md) in these plugin-mechanics tests
    ind: [a1.h0]
    prev: [a0.h1]
claims:
  - type: faithfulness
    normalization: normalized
    min: 0.5
  - type: faithfulness
    id: ratio
    normalization: ratio
    min: 0.5
    holds_from: 10
"""


def run(pytester, spec_text, *args):
    pytester.makefile(".circuit.yaml", tiny=spec_text)
    # the in-process session finds circuit_tests already imported (by this suite) and warns that it cannot
    # assert-rewrite it; that warning is about the test harness, not about the output under test
    return pytester.runpytest_inprocess("-W", "ignore::pytest.PytestAssertRewriteWarning", *args)


def test_plot_option(pytester, random_model_dir, monkeypatch):
    """--circuit-plot writes a PNG per spec that measured something and names it in the summary; without
    matplotlib it is a usage error before anything runs."""
    pytest.importorskip("matplotlib")
    out = pytester.path / "plots"
    # role scores are measured even on a random model (faithfulness is not: it cannot do the task)
    spec = SPEC.format(src=random_model_dir) + "  - type: role_score\n    role: ind\n    score: induction\n    min: 0.5\n"
    r = run(pytester, spec, f"--circuit-plot={out}", "-p", "no:cacheprovider")
    png = out / "tiny-induction.png"
    assert f"plot: {png}" in r.stdout.str() and png.read_bytes()[:4] == b"\x89PNG"

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    r = run(pytester, SPEC.format(src=random_model_dir), f"--circuit-plot={out}", "-p", "no:cacheprovider")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    assert "--circuit-plot: plots need matplotlib: pip install 'circuit-tests[plots]'" in r.stderr.str()


def test_items_ids_outcomes_table_and_json(pytester, random_model_dir):
    out = pytester.path / "res.json"
    r = run(pytester, SPEC.format(src=random_model_dir), "-v", "-rs", f"--circuit-json={out}", "-p", "no:cacheprovider")
    text = r.stdout.str()
    for ck in ("step0", "step10", "step20"):
        assert f"tiny.circuit.yaml::{ck}::faithfulness[{ck}]" in text and f"tiny.circuit.yaml::{ck}::ratio[{ck}]" in text
    # a random model cannot do induction: nothing may pass; step20 duplicates step10
    assert "not_evaluated: full model cannot do the task" in text
    assert "duplicate of step10" in text
    assert "== circuit_tests ==" in text.replace("=", "=") or "circuit_tests" in text
    assert "tiny-induction" in text and "n.e." in text
    outcomes = r.parseoutcomes()
    assert outcomes.get("passed", 0) == 0 and outcomes.get("failed", 0) == 0
    data = json.loads(out.read_text())
    assert data["schema_version"] == 2 and len(data["records"]) == 6 and data["complete"] is True
    # the file's counts and the table's are pytest's own: 1 xfailed (step0 ratio, absent as declared), 5 skipped
    assert data["counts"] == {"passed": 0, "failed": 0, "xfailed": outcomes["xfailed"], "skipped": outcomes["skipped"]}
    assert f"{outcomes['xfailed']} xfailed, {outcomes['skipped']} skipped" in text
    env = data["environment"]      # what bit-for-bit agreement with another run depends on
    assert env["threads"] == 1 and env["cpu_capability"] and env["torch"] and env["transformers"]
    by = {(x["checkpoint"], x["claim"]): x for x in data["records"]}
    assert by[("step20", "ratio")]["duplicate_of"] == "step10" and by[("step20", "ratio")]["outcome"] == "skipped"
    assert by[("step20", "ratio")]["measured"] == "not_evaluated" and by[("step0", "ratio")]["outcome"] == "xfailed"
    assert by[("step0", "faithfulness")]["weights_sha256"] and by[("step0", "faithfulness")]["m_M"] is not None
    assert by[("step0", "ratio")]["expected"] == "absent"


def test_k_selects_by_checkpoint_and_claim(pytester, random_model_dir):
    r = run(pytester, SPEC.format(src=random_model_dir), "-k", "ratio and step10", "--collect-only", "-q")
    lines = [l for l in r.stdout.lines if "::" in l]
    assert lines == [l for l in lines if "step10::ratio[step10]" in l] and len(lines) == 1


def test_not_evaluated_can_fail_the_run(pytester, random_model_dir):
    r = run(pytester, SPEC.format(src=random_model_dir), "--circuit-not-evaluated=fail", "-k", "step0 and faithfulness")
    r.assert_outcomes(failed=1)
    assert "not evaluated at step0" in r.stdout.str()


@pytest.mark.parametrize("edit,expect", [
    (("a1.h0", "a9.h0"), ["tiny.circuit.yaml:11:11: circuit.roles.ind[0]: a9.h0: no layer 9; model has layers 0-1"]),
    (("min: 0.5\n  - type", "min: high\n  - type"), ["tiny.circuit.yaml:16:10: claims[0].min: expected a number, got 'high'"]),
    (("  seq_len: 6", "  seq_lne: 6"), ["tiny.circuit.yaml:7:3: task.seq_lne: unknown key 'seq_lne' (did you mean 'seq_len'?)"]),
])
def test_spec_mistakes_fail_collection_without_traceback(pytester, random_model_dir, edit, expect):
    text = SPEC.format(src=random_model_dir).replace(*edit)
    r = run(pytester, text)
    out = r.stdout.str()
    assert r.ret == 2  # collection error (interrupted)
    for e in expect:
        assert e in out, out
    assert "Traceback" not in out and "site-packages" not in out


def test_missing_model_names_where_it_looked(pytester, tmp_path):
    r = run(pytester, SPEC.format(src="./no/such/dir"))
    out = r.stdout.str()
    assert r.ret == 2 and "model:" in out and "no/such/dir" in out and "Traceback" not in out


def test_uncached_hub_model_is_not_evaluated_fast(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hf_home" / "hub"))
    text = SPEC.format(src="EleutherAI/pythia-160m").replace("  source: EleutherAI/pythia-160m\n",
                                                           "  source: EleutherAI/pythia-160m\n  checkpoints: [0, 1000]\n")
    r = run(pytester, text, "-rs")
    out = r.stdout.str()
    r.assert_outcomes(skipped=4)
    assert "not in the local HF cache" in out and "step1000" in out


def test_plugin_module_is_thin(tmp_path):
    """Loading the pytest11 entry point must not import torch/transformers (pytest --help stays fast)."""
    import subprocess
    import sys

    heavy = "sorted(m for m in ('torch', 'transformers', 'transformer_lens') if m in sys.modules)"
    code = f"import sys, circuit_tests.plugin; print({heavy})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
    # the whole `pytest --help` path (option registration and pytest_configure) too
    code = ("import contextlib, io, sys, pytest\n"
            "with contextlib.redirect_stdout(io.StringIO()): pytest.main(['--help', '-p', 'no:cacheprovider'])\n"
            f"print({heavy})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path).stdout.strip()  # outside this repo: its tests/conftest.py imports torch
    assert out.splitlines()[-1] == "[]"


def test_fetch_progress_reaches_the_terminal_through_output_capture(pytester, monkeypatch):
    """A first-use model fetch/convert inside a pytest run writes its progress lines to pytest's terminal with output
    capture suspended (they would otherwise sit in the capture file until the wait is over); CIRCUIT_TESTS_PROGRESS
    forces them here because pytester's terminal is not a tty, and =0 silences them."""
    pytester.makepyfile(test_p="""
from circuit_tests.user_cache import Progress

def test_fetch():
    p = Progress("fetching demo-model")
    p.step(1, 2, "downloading")
    p.bytes(50, 100)
    p.done("converted")
""")
    monkeypatch.setenv("CIRCUIT_TESTS_PROGRESS", "1")
    monkeypatch.delenv("CI", raising=False)
    out = pytester.runpytest_inprocess("-p", "no:cacheprovider").stdout.str()
    assert "circuit_tests: fetching demo-model: [1/2] downloading" in out
    assert "circuit_tests: fetching demo-model: 0.0 MB of 0.0 MB (50%)" in out and "converted" in out
    monkeypatch.setenv("CIRCUIT_TESTS_PROGRESS", "0")
    out = pytester.runpytest_inprocess("-p", "no:cacheprovider").stdout.str()
    assert "fetching demo-model" not in out
