"""Duplicate-checkpoint detection: identical weights under two names (Pythia #83 step0 == step1, #205)."""

from __future__ import annotations

import pytest

from circuit_tests import sources
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


def test_manifest_hints_take_part(tmp_path):
    refs = [CheckpointRef(label="step0", step=0, kind="zoo", location=str(tmp_path / "a"), sha256_hint="c" * 64),
            CheckpointRef(label="step1", step=1, kind="zoo", location=str(tmp_path / "b"), sha256_hint="c" * 64)]
    assert weights_hashes(refs) == {"step0": "c" * 64, "step1": "c" * 64}
    assert find_duplicates(refs, weights_hashes(refs)) == {"step1": "step0"}


@pytest.fixture(autouse=True)
def _clean():
    yield
    sources.release_all()
