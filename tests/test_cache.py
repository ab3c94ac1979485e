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
circuit:  # nodes, not roles: roles with a criterion would add role_check claims to the count
  nodes: [a0.h3, a0.h2, a1.h0, a1.h1, a1.h2, a1.h3]
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
    for edit in (("size: 16", "size: 17"), ("a1.h2, a1.h3]", "a1.h2]"),
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


# ---------------------------------------------------------------------------------------------------------------
# The cache is checked, not trusted (issue 19): a stored entry is re-validated before it is reused
# ---------------------------------------------------------------------------------------------------------------

# faith fails (0.96 < min 0.99), faith_ratio passes (0.96 >= 0.8)
SPEC_FAILING = SPEC.replace("normalization: normalized\n    min: 0.8", "normalization: normalized\n    min: 0.99")


def _entries(cache_dir: Path) -> dict[str, Path]:
    """claim id -> its entry file in a --circuit-cache-dir."""
    out = {}
    for p in sorted(cache_dir.glob("circuit_tests__results__*.json")):
        out[json.loads(p.read_text())["claim"]] = p
    return out


def _cached_run(pytester, cache_dir: Path, name: str):
    res = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--circuit-cache-dir", str(cache_dir), "-q",
                                       "--circuit-json", f"{name}.json")
    out = res.stdout.str() + res.stderr.str()
    assert "INTERNALERROR" not in out and "Traceback" not in out
    records = {r["claim"]: r for r in json.loads((pytester.path / f"{name}.json").read_text())["records"]}
    return res, out, records


@pytest.fixture
def cached(pytester, workdir):
    """A pytester directory with the failing spec, run once with a cache directory: (cache dir, first records)."""
    pytester.chdir()
    shutil.copytree(workdir / "models", pytester.path / "models")
    pytester.makefile(".circuit.yaml", spec=SPEC_FAILING)
    cache_dir = pytester.path / "cache"
    res, _, records = _cached_run(pytester, cache_dir, "first")
    res.assert_outcomes(passed=1, failed=1)
    assert records["faith"]["measured"] == "fail" and records["faith"]["value"] < 0.99
    return cache_dir, records


def test_an_entry_edited_to_pass_is_re_measured_and_fails(pytester, cached):
    cache_dir, first = cached
    entry = _entries(cache_dir)["faith"]
    key = entry.name[len("circuit_tests__results__"):-len(".json")]
    data = json.loads(entry.read_text())
    for edit, reason in (({"verdict": "pass", "outcome": "passed"}, "verdict 'pass'"),
                         ({"measured": "pass", "verdict": "pass", "outcome": "passed"}, "measured 'pass'"),
                         ({"threshold_min": 0.5, "measured": "pass", "verdict": "pass"}, "thresholds")):
        entry.write_text(json.dumps({**data, **edit}))
        res, out, records = _cached_run(pytester, cache_dir, "second")
        res.assert_outcomes(passed=1, failed=1)                                  # the true outcome, not the edit
        assert "cache: 1 of 2 results reused" in out
        assert "CacheWarning" in out and f"circuit_tests/results/{key}" in out and reason in out, edit
        assert records["faith"]["outcome"] == "failed" and "cache" not in records["faith"]["extra"]
        assert records["faith"]["value"] == first["faith"]["value"]
        assert json.loads(entry.read_text())["verdict"] == "fail"                # the entry was overwritten


@pytest.mark.parametrize("name, corrupt, reason", [
    ("value_text", lambda d: {**d, "value": "abc"}, "field value"),
    ("value_script", lambda d: {**d, "value": "<script>alert(1)</script>"}, "field value"),
    ("wrong_types", lambda d: {**d, "step": "3000", "line": 1.5}, "field line"),
    ("truncated", None, "unreadable entry"),
])
def test_malformed_entries_are_misses_with_a_warning_and_a_normal_run(pytester, cached, name, corrupt, reason):
    cache_dir, first = cached
    entry = _entries(cache_dir)["faith_ratio"]
    text = entry.read_text()
    entry.write_text(text[: len(text) // 2] if corrupt is None else json.dumps(corrupt(json.loads(text))))
    res, out, records = _cached_run(pytester, cache_dir, "second")
    res.assert_outcomes(passed=1, failed=1)
    assert "cache: 1 of 2 results reused" in out                               # faith reused, faith_ratio measured
    assert "CacheWarning" in out and reason in out
    assert records["faith_ratio"] == first["faith_ratio"]
    assert json.loads(entry.read_text()) == json.loads(text)                    # overwritten with the true record


def _valid_record(workdir):
    """A SpecRun on the workdir spec, its ref, a cache with claim 1 (faith_ratio) measured and stored, its key."""
    from circuit_tests.runner import SpecRun, measure_claim
    from circuit_tests.sources import resolve_checkpoints
    from circuit_tests.spec import load_spec

    loaded = load_spec(workdir / "spec.circuit.yaml")
    m = loaded.spec.model
    ref = resolve_checkpoints(m.source, m.revision, m.checkpoints, loaded.dir)[0]
    run = SpecRun(loaded, [ref])
    rc = ResultCache(DirStore(workdir / "c"))
    key, _ = rc.lookup(run, ref, 1)
    rc.store_record(key, measure_claim(run, ref, 1))
    return run, ref, rc, key


def _jsonschema_accepts(data) -> bool | None:
    """Whether results.schema.json's Record definition accepts ``data`` (None without jsonschema)."""
    try:
        import jsonschema
    except ImportError:
        return None
    schema = json.loads((Path(cache_mod.__file__).parent / "results.schema.json").read_text())
    return jsonschema.Draft202012Validator({"$ref": "#/$defs/Record", "$defs": schema["$defs"]}).is_valid(data)


def test_every_inconsistent_entry_is_a_miss_naming_key_and_reason(workdir):
    run, ref, rc, key = _valid_record(workdir)
    path = rc.store._path(rc.PREFIX + key)
    good = json.loads(path.read_text())
    hits = rc.hits
    assert rc.lookup(run, ref, 1)[1] is not None and rc.hits == hits + 1
    typed = [  # wrong fields or types: what the JSON Schema rejects too
        ({**good, "value": "abc"}, "field value"),
        ({**good, "value": True}, "field value"),
        ({**good, "verdict": "great"}, "field verdict"),
        ({k: v for k, v in good.items() if k != "measured"}, "field measured"),
        ([good], "not a result record"),
    ]
    inconsistent = [  # well-typed, but not this claim's result or not what its numbers give
        ({**good, "extra": {"per_head": {"a0.h0": "<script>"}}}, "field extra.per_head"),  # schema: any
        ({**good, "unknown": 1}, "unknown field"),
        ({**good, "value": float("nan")}, "non-finite"),
        ({**good, "claim": "faith"}, "claim 'faith'"),
        ({**good, "spec": "other"}, "spec 'other'"),
        ({**good, "checkpoint": "step1"}, "checkpoint 'step1'"),
        ({**good, "step": 1}, "step 1"),
        ({**good, "weights_sha256": "0" * 64}, "weights_sha256"),
        ({**good, "expected": "absent", "verdict": "fail"}, "expected 'absent'"),
        ({**good, "threshold_min": 0.5}, "thresholds"),
        ({**good, "value": 0.5, "measured": "fail", "verdict": "fail"}, "does not follow from m(C)"),
        ({**good, "measured": "fail", "verdict": "fail"}, "measured 'fail'"),
        ({**good, "verdict": "fail"}, "verdict 'fail'"),
        ({**good, "value": None, "measured": "pass"}, "without a value"),
        ({**good, "value": None, "measured": "not_evaluated", "verdict": "not_evaluated"}, "clears the claim's floor"),
        ({**good, "measured": "error", "verdict": "error"}, "measured 'error' with value"),
        ({**good, "duplicate_of": "step0"}, "duplicate_of"),
    ]
    for data, reason in typed + inconsistent:
        rc.store.set(rc.PREFIX + key, data)
        misses = rc.misses
        with pytest.warns(cache_mod.CacheWarning, match=re.escape(key)) as w:
            assert rc.lookup(run, ref, 1) == (key, None), reason
        assert rc.misses == misses + 1 and reason in str(w[0].message), (reason, str(w[0].message))
        if (data, reason) in typed and _jsonschema_accepts(data) is not None:
            assert not _jsonschema_accepts(data), reason
    assert _jsonschema_accepts(good) in (True, None)
    for raw in (b'{"spec": "induc', b"\xff\xfe not json", b"[" * 100000):            # truncated, bytes, too deep
        path.write_bytes(raw)
        with pytest.warns(cache_mod.CacheWarning, match="unreadable entry"):
            assert rc.lookup(run, ref, 1) == (key, None)
    # parses, but too deep to walk: each level costs the checks two frames, the parser one
    path.write_text(json.dumps({**good, "extra": {"deep": "X"}}).replace('"X"', "[" * 600 + "]" * 600))
    with pytest.warns(cache_mod.CacheWarning, match="nested too deeply"):
        assert rc.lookup(run, ref, 1) == (key, None)
    rc.store.set(rc.PREFIX + key, good)
    assert rc.lookup(run, ref, 1)[1] is not None                                   # the true entry still hits


def test_a_store_that_cannot_be_written_warns_and_a_claim_type_without_a_derivation_is_not_cached(workdir, monkeypatch):
    run, ref, rc, key = _valid_record(workdir)
    rec = rc.lookup(run, ref, 1)[1]

    class ReadOnly(DirStore):
        def set(self, key, value):
            raise PermissionError(13, "Permission denied")

    with pytest.warns(cache_mod.CacheWarning, match="cannot be written .*Permission denied"):
        ResultCache(ReadOnly(workdir / "c")).store_record(key, rec)
    without = {k: v for k, v in cache_mod._THRESHOLDS.items() if k != "faithfulness"}
    monkeypatch.setattr(cache_mod, "_THRESHOLDS", without)
    assert rc.lookup(run, ref, 1) == (None, None)                                  # neither reused nor stored


def _rewrite_in_place(w: Path) -> None:
    """Flip one byte of ``w`` in place (same inode, same size) and restore its mtime, as a careless tool might."""
    import os
    import time

    st = w.stat()
    time.sleep(0.02)  # file ctimes come from a coarse clock: step past the tick of the first hash
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    with open(w, "r+b") as f:
        f.write(bytes(data))
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = w.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)


def test_in_place_rewrite_with_restored_mtime_is_hashed_again(workdir, monkeypatch):
    import circuit_tests.sources as sources
    from circuit_tests.models import weights_sha256
    from circuit_tests.sources import resolve_checkpoints

    ck = workdir / "models" / "step3000"
    ref = resolve_checkpoints("./models", None, [3000], workdir)[0]
    store = DirStore(workdir / "c")
    old = ref.weights_sha256(store)
    _rewrite_in_place(ck / "model.safetensors")
    new = resolve_checkpoints("./models", None, [3000], workdir)[0].weights_sha256(store)   # the process memo
    assert new != old and new == weights_sha256(ck)
    monkeypatch.setattr(sources, "_HASHES", {})                                   # a new process: the store only
    assert resolve_checkpoints("./models", None, [3000], workdir)[0].weights_sha256(store) == new


def test_in_place_rewrite_is_re_measured_not_reused(pytester, cached):
    cache_dir, first = cached
    _rewrite_in_place(pytester.path / "models" / "step3000" / "model.safetensors")
    res, out, records = _cached_run(pytester, cache_dir, "second")
    assert "cache: 0 of 2 results reused" in out
    for cid in ("faith", "faith_ratio"):
        assert records[cid]["weights_sha256"] != first[cid]["weights_sha256"]
        assert "cache" not in records[cid]["extra"]
