"""Duplicate-checkpoint detection: identical weights under two names (Pythia #83 step0 == step1, #205)."""

from __future__ import annotations

import pytest

from circuit_tests import sources
from circuit_tests.errors import ModelLoadError
from circuit_tests.integrity import duplicate_reason, find_duplicates, weights_hashes
from circuit_tests.sources import CheckpointRef, resolve_checkpoints


def write_checkpoint(d, tensors):
    """A step dir with the given weights (plus the files that make it count as available)."""
    from safetensors.torch import save_file

    d.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text("{}")
    (d / "tokenizer.json").write_text("{}")
    return d


@pytest.fixture
def run_dir(tmp_path):
    """step0 == step1 (identical weights), step2 differs from them in one element, step3 == step0 again."""
    import torch

    g = torch.Generator().manual_seed(0)
    base = {"emb.weight": torch.randn(32, 16, generator=g), "ln.bias": torch.zeros(16)}
    changed = {k: v.clone() for k, v in base.items()}
    changed["emb.weight"][3, 5] += 1e-3
    root = tmp_path / "run"
    write_checkpoint(root / "step0", base)
    write_checkpoint(root / "step1", {k: v.clone() for k, v in base.items()})
    write_checkpoint(root / "step2", changed)
    write_checkpoint(root / "step3", base)
    return root


def test_identical_weights_are_duplicates_of_the_earliest(run_dir, tmp_path):
    refs = resolve_checkpoints("run", None, None, tmp_path)
    hashes = weights_hashes(refs)
    assert set(hashes) == {"step0", "step1", "step2", "step3"}
    assert hashes["step0"] == hashes["step1"] == hashes["step3"] != hashes["step2"]
    assert find_duplicates(refs, hashes) == {"step1": "step0", "step3": "step0"}
    sha = hashes["step0"][:12]
    assert duplicate_reason("step1", "step0", hashes) == f"duplicate of step0 (identical weights, sha256 {sha})"
    assert duplicate_reason("step1", "step0") == "duplicate of step0 (identical weights)"


def test_one_changed_weight_is_not_a_duplicate(run_dir, tmp_path):
    refs = resolve_checkpoints("run", None, [0, 2], tmp_path)
    assert find_duplicates(refs, weights_hashes(refs)) == {}


def test_dtype_or_name_changes_the_hash(tmp_path):
    import torch

    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    write_checkpoint(tmp_path / "r" / "step0", {"w": t})
    write_checkpoint(tmp_path / "r" / "step1", {"w": t.double()})
    write_checkpoint(tmp_path / "r" / "step2", {"v": t})
    write_checkpoint(tmp_path / "r" / "step3", {"w": t.reshape(3, 2)})
    refs = resolve_checkpoints("r", None, None, tmp_path)
    assert len(set(weights_hashes(refs).values())) == 4


def test_unavailable_checkpoints_are_skipped(run_dir, tmp_path):
    (run_dir / "step1" / "config.json").unlink()
    refs = resolve_checkpoints("run", None, None, tmp_path)
    hashes = weights_hashes(refs)
    assert "step1" not in hashes
    assert find_duplicates(refs, hashes) == {"step3": "step0"}


def test_hashes_are_memoised_per_process(run_dir, tmp_path, monkeypatch):
    refs = resolve_checkpoints("run", None, [0], tmp_path)
    first = refs[0].weights_sha256()
    import circuit_tests.models as models

    monkeypatch.setattr(models, "weights_sha256", lambda d: pytest.fail("hashed twice"))
    assert refs[0].weights_sha256() == first


def test_order_of_refs_decides_the_original():
    refs = [CheckpointRef(label=f"step{s}", step=s, kind="local", location=f"/x/{s}") for s in (0, 1, 2)]
    hashes = {"step0": "b", "step1": "a", "step2": "a"}
    assert find_duplicates(refs, hashes) == {"step2": "step1"}
    assert find_duplicates(list(reversed(refs)), hashes) == {"step1": "step2"}
    assert find_duplicates(refs, {}) == {}


def test_manifest_hash_is_verified_not_trusted(run_dir, tmp_path):
    """A zoo manifest's sha256 is what the weights must hash to: a match passes, anything else is an error that
    names the file (never a silently different model), and an unreadable file is an error too."""
    d = run_dir / "step0"
    real = CheckpointRef(label="step0", step=0, kind="local", location=str(d)).weights_sha256()
    ok = CheckpointRef(label="step0", step=0, kind="zoo", location=str(d), sha256_hint=real)
    assert ok.weights_sha256() == real
    bad = CheckpointRef(label="step1", step=1, kind="zoo", location=str(run_dir / "step2"), sha256_hint=real)
    with pytest.raises(ModelLoadError, match=r"step2/model.safetensors: sha256 mismatch with manifest"):
        bad.weights_sha256()
    assert weights_hashes([ok, bad]) == {"step0": real}  # the tampered one is no original


def test_hashes_persist_in_a_store_keyed_by_file_identity(run_dir, tmp_path, monkeypatch):
    """With a store (pytest's config.cache in the plugin) a later process reuses the hash; touching the file
    (size or mtime change) makes it hash again."""
    import os

    import circuit_tests.models as models

    store: dict = {}
    kv = type("KV", (), {"get": lambda self, k, d: store.get(k, d), "set": lambda self, k, v: store.__setitem__(k, v)})()
    ref = resolve_checkpoints("run", None, [2], tmp_path)[0]
    first = ref.weights_sha256(kv)
    assert list(store.values()) == [first]
    monkeypatch.setattr(sources, "_HASHES", {})  # a new process: only the store remembers
    monkeypatch.setattr(models, "weights_sha256", lambda d: pytest.fail("hashed although the store has it"))
    assert ref.weights_sha256(kv) == first
    f = run_dir / "step2" / "model.safetensors"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    monkeypatch.setattr(models, "weights_sha256", lambda d: "e" * 64)
    assert ref.weights_sha256(kv) == "e" * 64 and len(store) == 2


def test_duplicate_finder_is_lazy_and_isolates_unreadable_checkpoints(run_dir, tmp_path):
    """Only the checkpoints asked about (and earlier candidates, until a match) are hashed; an unreadable earlier
    checkpoint neither breaks the others nor counts as an original."""
    from circuit_tests.integrity import DuplicateFinder

    (run_dir / "step1" / "model.safetensors").write_bytes(b"\x00" * 7)  # truncated
    refs = resolve_checkpoints("run", None, None, tmp_path)
    hashed: list[str] = []

    def spy(ref):
        hashed.append(ref.label)
        return ref.weights_sha256()

    finder = DuplicateFinder(refs, hash_fn=spy)
    assert finder.original_of(refs[2]) is None and hashed == ["step2", "step0", "step1"]
    with pytest.raises(ModelLoadError, match=r"step1/model.safetensors: unreadable safetensors file"):
        finder.sha256(refs[1])
    assert finder.original_of(refs[3]) == "step0" and hashed == ["step2", "step0", "step1", "step3"]
    finder2 = DuplicateFinder(refs, hash_fn=spy)
    hashed.clear()
    assert finder2.original_of(refs[0]) is None and hashed == ["step0"]  # the first checkpoint needs only itself


@pytest.fixture(autouse=True)
def _clean():
    yield
    sources.release_all()
