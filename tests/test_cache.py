"""Incremental runs (--circuit-cache): every key part invalidates, and a warm rerun evaluates nothing.

The checkpoint is a copy of the zoo induction model's step3000 in a temporary local directory, so weights and
tokenizer files can be changed for real.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

# Heavy modules are imported before pytester's in-process runs snapshot sys.modules (see test_plugin.py).
import circuit_tests.collect  # noqa: F401,E402
import circuit_tests.engine  # noqa: F401,E402
import circuit_tests.sources  # noqa: F401,E402
import circuit_tests.tasks  # noqa: F401,E402
import transformer_lens.model_bridge  # noqa: F401,E402
from circuit_tests import cache as cache_mod  # noqa: E402
from circuit_tests.cache import DirStore, ResultCache, cache_key, key_parts, task_data, tree_sha256  # noqa: E402

ZOO = Path(circuit_tests.sources.__file__).resolve().parent / "zoo" / "models" / "induction"

SPEC = """\
name: induction-cached
model:
  source: ./models
  checkpoints: [3000]
task:
  name: induction
  size: 16
  seed: 0
  seq_len: 12
  prepend_bos: true
circuit:
  roles:
    previous_token: [a0.h3, a0.h2]
    induction: [a1.h0, a1.h1, a1.h2, a1.h3]
ablation: corrupted
claims:
  - type: faithfulness
    id: faith
    normalization: normalized
    min: 0.8
  # a comment
  - type: faithfulness
    id: faith_ratio
    normalization: ratio
    min: 0.8
"""


@pytest.fixture
def workdir(tmp_path):
    shutil.copytree(ZOO / "step3000", tmp_path / "models" / "step3000")
    (tmp_path / "spec.circuit.yaml").write_text(SPEC)
    return tmp_path


def _keys(d: Path, spec_text: str | None = None) -> list[str]:
    from circuit_tests.runner import SpecRun
    from circuit_tests.sources import resolve_checkpoints
    from circuit_tests.spec import load_spec

    if spec_text is not None:
        (d / "spec.circuit.yaml").write_text(spec_text)
    loaded = load_spec(d / "spec.circuit.yaml")
    m = loaded.spec.model
    refs = resolve_checkpoints(m.source, m.revision, m.checkpoints, loaded.dir)
    run = SpecRun(loaded, refs)
    return [cache_key(key_parts(run, refs[0], i)) for i in range(len(loaded.spec.claims))]


def test_spec_edits_invalidate_only_what_depends_on_them(workdir):
    k0 = _keys(workdir)
    assert k0[0] != k0[1]
    assert _keys(workdir, SPEC.replace("# a comment", "# another comment")) == k0          # comments: nothing
    k = _keys(workdir, SPEC.replace("    min: 0.8\n  # a comment", "    min: 0.7\n  # a comment"))
    assert k[0] != k0[0] and k[1] == k0[1]                                                 # one claim: that claim
    for edit in (("size: 16", "size: 17"), ("[a1.h0, a1.h1, a1.h2, a1.h3]", "[a1.h0, a1.h1, a1.h2]"),
                 ("ablation: corrupted", "ablation: mean"), ("name: induction-cached", "name: other")):
        k = _keys(workdir, SPEC.replace(*edit))
        assert k[0] != k0[0] and k[1] != k0[1], edit                                       # shared parts: all
    assert _keys(workdir, SPEC.replace("ablation: corrupted", "ablation: corrupted\ngate: ci")) != k0  # gate default


def test_weights_tokenizer_code_and_environment_invalidate(workdir, monkeypatch):
    k0 = _keys(workdir)
    ck = workdir / "models" / "step3000"
    tok = ck / "tokenizer.json"
    tok.write_text(tok.read_text() + " ")                                                  # tokenizer file
    k1 = _keys(workdir)
    assert k1[0] != k0[0]
    w = ck / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1                                                                          # one weight bit
    w.write_bytes(bytes(data))
    k2 = _keys(workdir)
    assert k2[0] != k1[0]
    real = cache_mod.code_fingerprint()
    monkeypatch.setattr(cache_mod, "code_fingerprint", lambda: {**real, "code_sha256": "other"})
    k3 = _keys(workdir)
    assert k3[0] != k2[0]
    monkeypatch.setattr(cache_mod, "code_fingerprint", lambda: {**real, "version": "9.9"})
    assert _keys(workdir)[0] not in (k2[0], k3[0])
    monkeypatch.undo()
    assert _keys(workdir) == k2
    import circuit_tests.runtime as rt

    real_env = rt.environment
    monkeypatch.setattr(rt, "environment", lambda: {**real_env(), "torch": "0.0"})
    assert _keys(workdir)[0] != k2[0]
    monkeypatch.setattr(rt, "environment", lambda: {**real_env(), "cpu_capability": "NO_AVX"})
    assert _keys(workdir)[0] != k2[0]


def test_task_data_and_code_hashes_follow_file_content(tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"clean": "a", "corrupted": "b", "answer": "c", "wrong": "d"}\n')
    before = task_data({"path": "prompts.jsonl", "size": 3}, tmp_path)
    assert set(before) == {"path"}
    f.write_text('{"clean": "a", "corrupted": "b", "answer": "c", "wrong": "e"}\n')
    assert task_data({"path": "prompts.jsonl"}, tmp_path) != before
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("x = 1\n")
    h = tree_sha256(tmp_path / "pkg")
    (tmp_path / "pkg" / "m.py").write_text("x = 2\n")
    assert tree_sha256(tmp_path / "pkg") != h


def test_dir_store_round_trip_and_atomic_layout(tmp_path):
    s = DirStore(tmp_path / "c")
    assert s.get("circuit_tests/results/abc", None) is None
    s.set("circuit_tests/results/abc", {"a": 1})
    assert s.get("circuit_tests/results/abc", None) == {"a": 1}
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["circuit_tests__results__abc.json"]


def _table(out: str) -> str:
    """The circuit_tests table without the cache's own marks (``*`` cells, ``N reused`` count) and padding."""
    text = out[out.index("circuit_tests ===="):].split("\ncells:")[0]
    return re.sub(r"[ ]+", " ", re.sub(r"\*|, \d+ reused", "", text))


def test_warm_rerun_evaluates_nothing_and_one_changed_claim_is_re_evaluated(pytester, workdir, monkeypatch):
    pytester.chdir()
    shutil.copytree(workdir / "models", pytester.path / "models")
    pytester.makefile(".circuit.yaml", spec=SPEC)
    args = ["-p", "no:cacheprovider", "--circuit-cache-dir", str(pytester.path / "cache"), "-q"]
    first = pytester.runpytest_inprocess(*args, "--circuit-json", "first.json")
    first.assert_outcomes(passed=2)
    assert "cache: 0 of 2 results reused" in first.stdout.str()

    from circuit_tests.sources import CheckpointRef

    def no_load(self, *a, **k):
        raise AssertionError("a cached rerun loaded a model")

    monkeypatch.setattr(CheckpointRef, "load", no_load)
    second = pytester.runpytest_inprocess(*args, "--circuit-json", "second.json")
    second.assert_outcomes(passed=2)
    assert "cache: 2 of 2 results reused" in second.stdout.str()
    assert _table(second.stdout.str()) == _table(first.stdout.str())
    a, b = (json.loads((pytester.path / f).read_text())["records"] for f in ("first.json", "second.json"))
    for r in b:
        assert r["extra"].pop("cache") == "reused"
    assert a == b
    monkeypatch.undo()

    # one claim edited: the cache answers a miss for that claim only (lookup is what decides re-evaluation)
    from circuit_tests.runner import SpecRun
    from circuit_tests.sources import resolve_checkpoints
    from circuit_tests.spec import load_spec

    spec = pytester.path / "spec.circuit.yaml"
    spec.write_text(SPEC.replace("    min: 0.8\n  # a comment", "    min: 0.75\n  # a comment"))
    loaded = load_spec(spec)
    refs = resolve_checkpoints(loaded.spec.model.source, None, loaded.spec.model.checkpoints, loaded.dir)
    rc = ResultCache(DirStore(pytester.path / "cache"))
    run = SpecRun(loaded, refs)
    assert rc.lookup(run, refs[0], 0)[1] is None
    assert rc.lookup(run, refs[0], 1)[1] is not None and (rc.hits, rc.misses) == (1, 1)


def test_cache_needs_a_store(pytester):
    pytester.makefile(".circuit.yaml", spec=SPEC)
    res = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--circuit-cache")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    assert "--circuit-cache needs pytest's cacheprovider" in res.stderr.str()


def test_result_cache_reports_hits_and_misses(workdir):
    from circuit_tests.runner import SpecRun, measure_claim
    from circuit_tests.sources import resolve_checkpoints
    from circuit_tests.spec import load_spec

    loaded = load_spec(workdir / "spec.circuit.yaml")
    m = loaded.spec.model
    ref = resolve_checkpoints(m.source, m.revision, m.checkpoints, loaded.dir)[0]
    run = SpecRun(loaded, [ref])
    rc = ResultCache(DirStore(workdir / "c"))
    key, rec = rc.lookup(run, ref, 1)
    assert rec is None and rc.misses == 1
    rc.store_record(key, measure_claim(run, ref, 1))
    key2, rec2 = rc.lookup(run, ref, 1)
    assert key2 == key and rec2 is not None and rc.hits == 1 and rec2.extra["cache"] == "reused"


def test_duplicate_status_and_unhashable_weights_enter_the_key(workdir):
    """A checkpoint identical to an earlier one is keyed as its duplicate; one whose weights cannot be read is
    not cacheable (its error record comes from the evaluation, never from a cached result)."""
    from circuit_tests.runner import SpecRun
    from circuit_tests.sources import resolve_checkpoints
    from circuit_tests.spec import load_spec

    shutil.copytree(workdir / "models" / "step3000", workdir / "models" / "step3100")
    shutil.copytree(workdir / "models" / "step3000", workdir / "models" / "step3200")
    (workdir / "models" / "step3200" / "model.safetensors").write_bytes(b"not safetensors")
    (workdir / "spec.circuit.yaml").write_text(SPEC.replace("checkpoints: [3000]", "checkpoints: all"))
    loaded = load_spec(workdir / "spec.circuit.yaml")
    m = loaded.spec.model
    refs = resolve_checkpoints(m.source, m.revision, m.checkpoints, loaded.dir)
    run = SpecRun(loaded, refs)
    first, dup, broken = (key_parts(run, r, 0) for r in refs)
    assert first["checkpoint"]["duplicate_of"] is None
    assert dup["checkpoint"]["duplicate_of"] == refs[0].label
    assert dup["checkpoint"]["weights_sha256"] == first["checkpoint"]["weights_sha256"]
    assert broken is None
