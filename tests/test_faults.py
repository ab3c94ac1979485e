"""Faults stay with their checkpoint: a checkpoint that cannot be read, hashed or trusted fails its own items (a
broken checkpoint turns CI red, naming the file and the reason: no skip, no traceback), and the other checkpoints of
the same spec are still evaluated. Covers every fault class of issue 14: truncated and bit-flipped safetensors, NaN
weights, garbage config.json / tokenizer files, a pickle disguised as weights, a config declaring more layers than
the weights hold, and a zoo checkpoint whose weights no longer match its manifest's sha256."""

from __future__ import annotations

import json
import shutil

import pytest

import circuit_tests.collect  # noqa: F401  (imported before pytester snapshots sys.modules)
import circuit_tests.engine  # noqa: F401
import circuit_tests.sources  # noqa: F401
import circuit_tests.tasks  # noqa: F401
import transformer_lens.model_bridge  # noqa: F401
from circuit_tests import sources


class _Harmless:
    """Pickles to a call of os.getpid: what a malicious weights file would do, minus the harm."""

    def __reduce__(self):
        import os

        return (os.getpid, ())


def _flip_header_byte(f):
    data = bytearray(f.read_bytes())
    data[12] ^= 0x5B  # inside the JSON header (the first 8 bytes are its length)
    f.write_bytes(bytes(data))


# label -> (how the checkpoint is broken, what the failure must say)
FAULTS = {
    "step10": ("truncated safetensors", "model.safetensors: unreadable safetensors file"),
    "step20": ("bit-flipped safetensors header", "model.safetensors: unreadable safetensors file"),
    "step30": ("NaN weights", "non-finite weights: gpt_neox.embed_in.weight (NaN)"),
    "step40": ("garbage config.json", "could not load the model"),
    "step50": ("garbage tokenizer.json", "could not load the model"),
    "step60": ("pickle disguised as weights", "pytorch_model.bin: not loadable as weights (torch.load weights_only=True): a pickle that is "
               "not plain tensors, refused unexecuted"),
    "step70": ("config declares 3 layers, weights hold 2", "the weights do not cover"),
}


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    """step0 good, step10..step70 broken one way each (FAULTS), step80 a copy of step0 (a duplicate)."""
    import pickle

    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from circuit_tests.zoo.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer([f"tok{c}" for c in "abcdefghijklmnopqrstuvwxyz"])
    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                                          intermediate_size=64, vocab_size=len(tok), max_position_embeddings=64,
                                          rotary_pct=0.25, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    root = tmp_path_factory.mktemp("faulty") / "run"
    for label in ["step0", *FAULTS, "step80"]:
        hf.save_pretrained(root / label)
        tok.save_pretrained(root / label)
        with torch.no_grad():  # every checkpoint differs from the others (step80 is restored below)
            next(hf.parameters()).add_(0.01)
    shutil.rmtree(root / "step80")
    shutil.copytree(root / "step0", root / "step80")
    w = root / "step10" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    _flip_header_byte(root / "step20" / "model.safetensors")
    from safetensors.torch import load_file, save_file

    state = load_file(str(root / "step30" / "model.safetensors"))
    state["gpt_neox.embed_in.weight"][3, 4] = float("nan")
    save_file(state, str(root / "step30" / "model.safetensors"), metadata={"format": "pt"})
    (root / "step40" / "config.json").write_text("{ this is not json")
    (root / "step50" / "tokenizer.json").write_bytes(b"\x00\xffgarbage")
    (root / "step60" / "model.safetensors").unlink()
    (root / "step60" / "pytorch_model.bin").write_bytes(pickle.dumps(_Harmless()))
    cfg = json.loads((root / "step70" / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (root / "step70" / "config.json").write_text(json.dumps(cfg))
    return root


SPEC = """\
name: faulty
model:
  source: {src}
task:
  name: induction
  size: 8
  seq_len: 6
  prepend_bos: true
circuit:
  roles:  # a role name without a criterion (docs/roles.md): one item per checkpoint, no role_check item
    ind: [a1.h0]
claims:
  - type: role_score
    role: ind
    score: induction
    min: 0.5
"""


def run(pytester, root, *args):
    pytester.makefile(".circuit.yaml", faulty=SPEC.format(src=root))
    return pytester.runpytest_inprocess("-W", "ignore::pytest.PytestAssertRewriteWarning", *args)


def test_each_broken_checkpoint_fails_its_own_items_with_file_and_reason(pytester, faulty_run, tmp_path):
    out = tmp_path / "res.json"
    r = run(pytester, faulty_run, f"--circuit-json={out}", "-p", "no:cacheprovider")
    text = r.stdout.str()
    assert "Traceback" not in text and "site-packages" not in text, text
    recs = {x["checkpoint"]: x for x in json.loads(out.read_text())["records"]}
    assert set(recs) == {"step0", *FAULTS, "step80"}
    for label, (fault, says) in FAULTS.items():
        rec = recs[label]
        assert rec["outcome"] == "failed" and rec["measured"] == "error", (fault, rec)
        assert says in rec["reason"] and str(faulty_run / label) in rec["reason"], (fault, rec["reason"])
        assert f"claim 'role_score' could not be evaluated at {label}" in text, fault
    # the good checkpoint is evaluated (a random model's induction score, measured against the threshold), its copy
    # is a duplicate: neither is affected by the broken checkpoints between them
    assert recs["step0"]["measured"] in ("pass", "fail") and recs["step0"]["value"] is not None
    assert recs["step80"]["measured"] == "not_evaluated" and recs["step80"]["duplicate_of"] == "step0"
    assert r.parseoutcomes()["failed"] == len(FAULTS) + (recs["step0"]["measured"] == "fail")


def test_workers_hash_only_the_checkpoints_they_run_and_reuse_hashes_across_runs(pytester, faulty_run, monkeypatch):
    """-k step0 hashes step0 alone (it needs no earlier candidate); the second run takes the hash from pytest's
    cache (keyed by path, size and mtime) and hashes nothing."""
    import circuit_tests.models as models

    real, hashed = models.weights_sha256, []

    def spy(d):
        hashed.append(d.name)
        return real(d)

    monkeypatch.setattr(models, "weights_sha256", spy)
    monkeypatch.setattr(sources, "_HASHES", {})
    r = run(pytester, faulty_run, "-k", "step0")
    assert r.parseoutcomes().get("failed", 0) + r.parseoutcomes().get("passed", 0) == 1
    assert hashed == ["step0"]
    monkeypatch.setattr(sources, "_HASHES", {})  # a new process: only pytest's cache remembers
    r = run(pytester, faulty_run, "-k", "step0")
    assert hashed == ["step0"]


def test_tampered_zoo_checkpoint_fails_with_sha256_mismatch(tmp_path):
    """A copy of the shipped zoo with one weight changed in step3000: its claims fail naming the manifest check;
    step2400 (untouched) is evaluated as usual."""
    from safetensors.torch import load_file, save_file

    from circuit_tests.runner import SpecRun, measure_claim
    from circuit_tests.sources import resolve_checkpoints
    from circuit_tests.spec import load_spec
    from circuit_tests.zoo import ZOO_DIR

    zoo = tmp_path / "zoo"
    (zoo / "induction").mkdir(parents=True)
    shutil.copy(ZOO_DIR / "induction" / "manifest.json", zoo / "induction")
    for step in (2400, 3000):
        shutil.copytree(ZOO_DIR / "induction" / f"step{step}", zoo / "induction" / f"step{step}")
    w = zoo / "induction" / "step3000" / "model.safetensors"
    state = load_file(str(w))
    state["gpt_neox.embed_in.weight"][5, 0] += 1e-3
    save_file(state, str(w), metadata={"format": "pt"})
    spec = tmp_path / "s.circuit.yaml"
    spec.write_text(SPEC.format(src="zoo:induction").replace("size: 8", "size: 8\n  seed: 0").replace(
        "  seq_len: 6\n", "  seq_len: 20\n"))
    loaded = load_spec(spec)
    refs = resolve_checkpoints("zoo:induction", None, [2400, 3000], tmp_path, zoo_root=zoo)
    run_ = SpecRun(loaded, refs)
    good, bad = (measure_claim(run_, ref, 0) for ref in refs)
    assert bad.outcome == "failed" and bad.measured == "error"
    assert f"{w}: sha256 mismatch with manifest" in bad.reason
    assert good.measured in ("pass", "fail") and good.value is not None and good.weights_sha256 == refs[0].sha256_hint


@pytest.fixture(autouse=True)
def _clean():
    yield
    sources.release_all()


def test_a_claim_that_cannot_be_measured_fails_alone(tmp_path, monkeypatch):
    """A claim whose measurement raises (here: the role-score measure, replaced in the claim registry) gets a failed
    record with the reason; the checkpoint's other claims are measured as usual."""
    from circuit_tests import claims
    from circuit_tests.runner import SpecRun, measure_claim
    from circuit_tests.sources import resolve_checkpoints
    from circuit_tests.spec import load_spec

    def boom(run, res, claim, rec):
        raise RuntimeError("scores exploded")

    entry = claims.CLAIM_TYPES["role_score"]
    monkeypatch.setitem(claims.CLAIM_TYPES, "role_score", claims.ClaimType("role_score", boom, entry.details))
    spec = tmp_path / "s.circuit.yaml"
    spec.write_text(SPEC.format(src="zoo:induction").replace("  seq_len: 6\n", "  seq_len: 20\n") +
                    "  - type: path_ratio\n    senders: ind\n    receivers: logits\n    min: 0.5\n")
    loaded = load_spec(spec)
    (ref,) = resolve_checkpoints("zoo:induction", None, [3000], tmp_path)
    run_ = SpecRun(loaded, [ref])
    broken, other = measure_claim(run_, ref, 0), measure_claim(run_, ref, 1)
    assert (broken.outcome, broken.measured) == ("failed", "error")
    assert broken.reason == "claim error: RuntimeError: scores exploded"
    assert other.measured in ("pass", "fail") and other.value is not None


def test_missing_tensor_check_runs_once_per_layout_and_each_key_invalidates(faulty_run, tmp_path, monkeypatch):
    """The meta-device load behind ``missing_tensors`` runs once per layout (config.json + safetensors headers):
    other weights of the same layout reuse its answer; a changed config, a weight file missing a tensor, or a
    ``.bin`` checkpoint (not memoised) are asked again, and each answer is the right one."""
    from safetensors.torch import load_file, save_file

    from circuit_tests import integrity

    monkeypatch.setattr(integrity, "_MISSING_MEMO", {})
    asked: list[str] = []
    real = integrity._missing_tensors
    monkeypatch.setattr(integrity, "_missing_tensors", lambda d: asked.append(d.name) or real(d))

    a, b, c = (tmp_path / n for n in "abc")
    shutil.copytree(faulty_run / "step0", a)
    shutil.copytree(faulty_run / "step30", b)  # other values (NaN included), same layout
    assert integrity.missing_tensors(a) == [] and integrity.missing_tensors(b) == []
    assert asked == ["a"]
    got = integrity.missing_tensors(b)
    got.append("mutated by a caller")
    assert integrity.missing_tensors(b) == [] and asked == ["a"]  # the memo hands out copies

    cfg = json.loads((b / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (b / "config.json").write_text(json.dumps(cfg))
    assert any(k.startswith("gpt_neox.layers.2.") for k in integrity.missing_tensors(b)) and asked == ["a", "b"]

    shutil.copytree(a, c)
    state = load_file(str(c / "model.safetensors"))
    del state["gpt_neox.final_layer_norm.weight"]
    save_file(state, str(c / "model.safetensors"), metadata={"format": "pt"})
    assert integrity.missing_tensors(c) == ["gpt_neox.final_layer_norm.weight"] and asked == ["a", "b", "c"]

    import torch

    d = tmp_path / "d"
    shutil.copytree(a, d)
    torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    assert integrity.missing_tensors(d) == [] and integrity.missing_tensors(d) == []
    assert asked == ["a", "b", "c", "d", "d"]


def test_release_collects_garbage_once_enough_weights_wait(monkeypatch):
    """A released bridge's memory waits for a full garbage collection (bridges hold reference cycles); one runs
    once ``_GC_BYTES`` of weights were released, not at every release (a full collection costs more than a zoo
    checkpoint's evaluation). With the threshold at 0 a release frees the weights at once."""
    import gc
    import weakref

    from circuit_tests.sources import resolve_checkpoints

    collected: list[int] = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collected.append(1) or real_collect(*a))
    monkeypatch.setattr(sources, "_released_bytes", 0)
    ref, ref2 = resolve_checkpoints("zoo:induction", None, [2400, 3000], ".")

    bridge = ref.load()
    size = sum(p.numel() * p.element_size() for p in bridge.original_model.parameters())
    alive = weakref.ref(bridge.original_model)
    del bridge
    monkeypatch.setattr(sources, "_GC_BYTES", 2 * size - 1)
    ref.release()
    assert collected == [] and sources._released_bytes == size and alive() is not None  # a cycle keeps it
    ref2.load()
    ref2.release()  # 2 * size >= threshold: one collection, the counter starts again
    assert collected == [1] and sources._released_bytes == 0 and alive() is None

    monkeypatch.setattr(sources, "_GC_BYTES", 0)
    bridge = ref.load()
    alive = weakref.ref(bridge.original_model)
    del bridge
    ref.release()
    assert collected == [1, 1] and alive() is None
