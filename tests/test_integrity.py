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


# --------------------------------------------------------------------------------------------------------------
# Memory bounded (issue 19): a config is checked against the weight files' headers before any model is built
# --------------------------------------------------------------------------------------------------------------

_TINY_NEOX = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64, vocab_size=30,
                  max_position_embeddings=64, rotary_pct=0.25, bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module")
def tiny_neox_dir(tmp_path_factory):
    """A complete tiny GPT-NeoX directory (config, safetensors, tokenizer) that loads."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from circuit_tests.zoo.tokenizer import build_word_tokenizer

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("neox") / "tiny"
    GPTNeoXForCausalLM(GPTNeoXConfig(**_TINY_NEOX)).save_pretrained(d)
    build_word_tokenizer([f"tok{c}" for c in "abcdefghijklmnopqrstuvwxyz"]).save_pretrained(d)
    return d


def _with_config(src, dst, config: dict):
    import json
    import shutil

    shutil.copytree(src, dst)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


_LOAD_BARE = """
import resource, sys, time
from circuit_tests.errors import ModelLoadError
from circuit_tests.sources import CheckpointRef
t = time.perf_counter()
try:
    CheckpointRef(label="bare", step=None, kind="local", location=sys.argv[1]).load()
    print("LOADED")
except ModelLoadError as e:
    print("REFUSED", e)
# VmHWM is this process's own peak: ru_maxrss would carry over the forking parent's (Linux keeps it across exec)
peak = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
print("PEAK_KB", peak, "SECONDS", time.perf_counter() - t)
"""


def test_bare_config_beside_small_weights_is_refused_before_building_anything(tiny_neox_dir, tmp_path):
    """``{"model_type": "gpt_neox"}`` means the library's default 20B model: the old load built it (killed at 8 GB;
    here under a 3 GB address-space cap, so the old code cannot take the machine down). Now: a located refusal,
    quickly, at the interpreter's own peak."""
    import resource
    import subprocess
    import sys

    d = _with_config(tiny_neox_dir, tmp_path / "bare", {"model_type": "gpt_neox"})

    def capped() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 * 10**9, 3 * 10**9))

    out = subprocess.run([sys.executable, "-c", _LOAD_BARE, str(d)], capture_output=True, text=True,
                         preexec_fn=capped, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "REFUSED" in text and "LOADED" not in text
    assert f"{d / 'config.json'} does not describe the weights" in text
    assert "tensor gpt_neox.embed_in.weight: the config implies shape (50432, 6144), model.safetensors holds (30, 32)" in text
    assert "20,554,567,680 parameters" in text and "refused before building the model" in text
    peak_kb, seconds = int(text.split("PEAK_KB")[1].split()[0]), float(text.split("SECONDS")[1].split()[0])
    assert peak_kb < 1.5 * 2**20  # < 1.5 GB (measured ~0.4 GB: the imports)
    assert seconds < 60  # measured ~4 s, most of it importing transformers' model code


@pytest.fixture
def no_build(monkeypatch):
    """Fail the test if any model is built for real (TransformerBridge.boot_transformers / from_pretrained)."""
    from transformer_lens.model_bridge import TransformerBridge

    def refuse(*a, **k):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(TransformerBridge, "boot_transformers", refuse)


@pytest.mark.parametrize("kind", ["local", "zoo", "gguf", "hub"])
def test_every_load_route_refuses_a_config_whose_hidden_size_disagrees(kind, tiny_neox_dir, tmp_path, monkeypatch,
                                                                      no_build):
    """hidden_size 64 over weights of width 32: refused naming config.json, the tensor and both shapes, on every
    route that loads from a directory (a local dir, a zoo step, a converted GGUF, a cached hub snapshot)."""
    from circuit_tests import gguf_convert

    d = _with_config(tiny_neox_dir, tmp_path / "wide", {**_TINY_NEOX, "model_type": "gpt_neox", "hidden_size": 64})
    if kind in ("local", "zoo"):
        ref = CheckpointRef(label="wide", step=None, kind=kind, location=str(d))
    elif kind == "gguf":  # the converted directory of a GGUF file (the conversion itself is not under test)
        gguf = tmp_path / "wide.gguf"
        gguf.write_bytes(b"GGUF")
        monkeypatch.setattr(gguf_convert, "cached_dir", lambda sha: d)
        monkeypatch.setattr(gguf_convert, "convert", lambda path, sha256=None: d)
        ref = CheckpointRef(label="wide", step=None, kind="gguf", location=str(gguf), gguf_sha256="0" * 64)
    else:
        from .helpers import put_in_hf_cache

        cache = tmp_path / "hub"
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        put_in_hf_cache(cache, "org/wide", "main", d)
        ref = CheckpointRef(label="wide", step=None, kind="hub", location="org/wide", revision="main")
    with pytest.raises(ModelLoadError) as err:
        ref.load()
    msg = str(err.value)
    assert "config.json does not describe the weights" in msg
    assert "tensor gpt_neox.embed_in.weight: the config implies shape (30, 64), model.safetensors holds (30, 32)" in msg
    assert "parameters" not in msg  # the count is plausible: only the shapes are wrong


def test_an_absurd_parameter_count_is_refused_even_when_no_tensor_name_matches(tiny_neox_dir, tmp_path, no_build):
    """Weights under names the config's model does not use: no shape to compare, but 20B parameters cannot live in
    a few kB of weight files."""
    from safetensors.torch import load_file, save_file

    from circuit_tests.models import load_bridge

    d = _with_config(tiny_neox_dir, tmp_path / "renamed", {"model_type": "gpt_neox"})
    state = load_file(str(d / "model.safetensors"))
    save_file({f"other.{k}": v for k, v in state.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"it implies 20,554,567,680 parameters \(82\.2 GB as float32\) but the "
                                             r"weight files hold .* kB of tensors in all"):
        load_bridge(d)


def test_a_fitting_config_loads_and_a_garbage_header_is_named(tiny_neox_dir, tmp_path):
    from circuit_tests.integrity import check_config_fits_weights, safetensors_headers

    check_config_fits_weights(tiny_neox_dir)  # the real config fits: no error
    heads = safetensors_headers(tiny_neox_dir)
    assert heads["gpt_neox.embed_in.weight"].shape == (30, 32) and heads["gpt_neox.embed_in.weight"].dtype == "F32"
    d = _with_config(tiny_neox_dir, tmp_path / "garbled", {**_TINY_NEOX, "model_type": "gpt_neox"})
    (d / "model.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(ModelLoadError, match="model.safetensors: unreadable safetensors file"):
        check_config_fits_weights(d)
