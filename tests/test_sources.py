"""Model sources: spec model block -> CheckpointRefs that load, hash and explain why they cannot.

Hub checkpoints are served from a fake HF cache built in tmp (the real on-disk layout: refs/<rev> -> commit,
snapshots/<commit>/<file> -> ../../blobs/<id>), so nothing here needs the network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import circuit_tests
from circuit_tests import sources
from circuit_tests.errors import ModelLoadError
from circuit_tests.sources import CheckpointRef, format_steps, resolve_checkpoints, select_steps

from .helpers import put_in_hf_cache, save_hf_model

REPO_ROOT = Path(circuit_tests.__file__).resolve().parent.parent
PYTHIA = "EleutherAI/pythia-160m"


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------

def word_tokenizer_dir(d: Path) -> Path:
    """A saved word-level tokenizer with bos/eos/pad/unk (sharp edge #5: load it from a dir, not in memory)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the cat dog sat on mat a ran to big small red blue".split()
    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>"] + words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                  pad_token="<pad>", unk_token="<unk>")
    tok.save_pretrained(str(d))
    return d


def tiny_neox(seed: int = 0, vocab_size: int = 17):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=256,
                        vocab_size=vocab_size, max_position_embeddings=32, rotary_pct=0.25,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)  # Pythia-shaped
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(cfg).eval()


def fake_model_dir(d: Path, *, config: bool = True, weights: bool = True, tokenizer: bool = True) -> Path:
    """A directory that *looks* like an HF model (resolution and availability only read file names)."""
    d.mkdir(parents=True, exist_ok=True)
    if config:
        (d / "config.json").write_text("{}")
    if weights:
        (d / "model.safetensors").write_bytes(b"")
    if tokenizer:
        (d / "tokenizer.json").write_text("{}")
    return d


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty HF cache under tmp, offline; both the env and huggingface_hub's live constants point at it."""
    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HOME", str(home))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return word_tokenizer_dir(tmp_path_factory.mktemp("wordtok"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok_dir):
    """A real, loadable tiny Pythia-shaped model directory (built once per module)."""
    return save_hf_model(tiny_neox(), tmp_path_factory.mktemp("tiny") / "tiny-neox", tok_dir)


@pytest.fixture(autouse=True)
def _release_models():
    yield
    sources.release_all()


# ---------------------------------------------------------------------------------------------------------
# checkpoint selection grammar
# ---------------------------------------------------------------------------------------------------------

AVAIL = [0, 1, 2, 4, 512, 1000, 2000, 3000, 4000, 5000]


@pytest.mark.parametrize("value, expected", [
    (None, AVAIL),
    ("all", AVAIL),
    ([0, 512, 1000], [0, 512, 1000]),
    (["step2000", "checkpoint-3000", 4000], [2000, 3000, 4000]),
    ("1000-3000", [1000, 2000, 3000]),
    (" 1000 - 5000 : 2000 ", [1000, 3000, 5000]),
    ([1, "1000-5000:2000"], [1, 1000, 3000, 5000]),
    ("0-4", [0, 1, 2, 4]),
    (5000, [5000]),
])
def test_select_steps(value, expected):
    assert select_steps(value, AVAIL, what="m") == (expected, False)


@pytest.mark.parametrize("value, message", [
    ([1000, 1000], "step 1000 requested twice"),
    ([2000, "1000-3000:1000"], "step 2000 requested twice"),
    ([3500], "step 3500 not available for m (nearest: 3000, 4000); available steps: 0-2, 4, 512, 1000-5000:1000"),
    ("1000-5000:500", "steps 1500, 2500, 3500, 4500 not available"),
    ("3000-1000", "runs backwards"),
    ("1000-2000:0", "stride 0"),
    ("6000-7000", "matches no checkpoint"),
    ([-1], "negative"),
    ([True], "not a step"),
    ("latest", "cannot read 'latest'"),
    ([0, "all"], "'all' must be the whole value"),
    ([], "empty list"),
    (["main"], "'main' is a hub revision"),
])
def test_select_steps_errors(value, message):
    with pytest.raises(ModelLoadError) as ei:
        select_steps(value, AVAIL, what="m")
    assert message in str(ei.value)


def test_select_steps_unknown_grid():
    assert select_steps([5, "10-30:10"], None, what="m") == ([5, 10, 20, 30], False)
    for value in ("all", None, "10-30"):
        with pytest.raises(ModelLoadError, match="grid"):
            select_steps(value, None, what="m")


def test_format_steps_is_compact_and_retypable():
    assert format_steps(sources.PYTHIA_STEPS) == "0-2, 4, 8, 16, 32, 64, 128, 256, 512, 1000-143000:1000"
    assert format_steps([3, 1, 2, 10]) == "1-3, 10"
    # every printed piece parses back to the same steps
    text = format_steps(sources.PYTHIA_STEPS)
    items = [int(t) if t.isdigit() else t for t in text.split(", ")]
    assert select_steps(items, sources.PYTHIA_STEPS, what="p")[0] == list(sources.PYTHIA_STEPS)


# ---------------------------------------------------------------------------------------------------------
# hub ids: schedule, revisions, labels
# ---------------------------------------------------------------------------------------------------------

def test_pythia_schedule():
    assert len(sources.PYTHIA_STEPS) == 154
    assert sources.PYTHIA_STEPS[:12] == (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)
    assert sources.PYTHIA_STEPS[-1] == 143000
    refs = resolve_checkpoints(PYTHIA, None, "all", Path("."))
    assert [r.revision for r in refs[:3]] == ["step0", "step1", "step2"] and len(refs) == 154


def test_hub_checkpoints_resolve_to_step_revisions(tmp_path):
    refs = resolve_checkpoints(PYTHIA, None, [143000, 0, "1000-3000:1000", "main"], tmp_path)
    assert [(r.label, r.step, r.revision, r.kind, r.location) for r in refs] == [
        ("step0", 0, "step0", "hub", PYTHIA), ("step1000", 1000, "step1000", "hub", PYTHIA),
        ("step2000", 2000, "step2000", "hub", PYTHIA), ("step3000", 3000, "step3000", "hub", PYTHIA),
        ("step143000", 143000, "step143000", "hub", PYTHIA), ("main", None, "main", "hub", PYTHIA)]
    assert [r.label for r in resolve_checkpoints(PYTHIA, "step3000", None, tmp_path)] == ["step3000"]
    assert [(r.label, r.step) for r in resolve_checkpoints(PYTHIA, None, None, tmp_path)] == [("main", None)]
    v0 = resolve_checkpoints("EleutherAI/pythia-160m-v0", None, "all", tmp_path)
    assert v0[0].step == 1000 and len(v0) == 143
    crfm = resolve_checkpoints("stanford-crfm/alias-gpt2-small-x21", None, [10], tmp_path)
    assert (crfm[0].label, crfm[0].revision) == ("step10", "checkpoint-10")
    assert resolve_checkpoints("hf:gpt2", None, None, tmp_path)[0].display == "gpt2@main"


@pytest.mark.parametrize("revision, checkpoints, message", [
    ("step3500", None, "step 3500 not available (nearest: 3000, 4000)"),
    ("v1.0", None, "revision 'v1.0' is not a checkpoint"),
    ("step3000", [3000], "either revision"),
    (None, [3500], "available steps: 0-2, 4, 8, 16, 32, 64, 128, 256, 512, 1000-143000:1000"),
])
def test_hub_errors(tmp_path, revision, checkpoints, message):
    with pytest.raises(ModelLoadError) as ei:
        resolve_checkpoints(PYTHIA, revision, checkpoints, tmp_path)
    assert message in str(ei.value)


def test_hub_without_grid(tmp_path):
    with pytest.raises(ModelLoadError, match="'all' needs a known checkpoint grid and gpt2 has none"):
        resolve_checkpoints("gpt2", None, "all", tmp_path)
    # a user's own repo with step<N> branches: explicit steps are taken at their word
    refs = resolve_checkpoints("me/my-model", None, [100, 200], tmp_path)
    assert [(r.label, r.revision) for r in refs] == [("step100", "step100"), ("step200", "step200")]
    assert resolve_checkpoints("me/my-model", "v1.0", None, tmp_path)[0].label == "v1.0"


def test_hub_id_that_looks_like_a_missing_local_path(tmp_path):
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelLoadError, match=r"write \./models/tiny for a local path or hf:models/tiny"):
        resolve_checkpoints("models/tiny", None, None, tmp_path)


def test_checkpoint_ref_labels_are_id_safe():
    with pytest.raises(ValueError, match="label"):
        CheckpointRef(label="step 1", step=1, kind="local", location="/x")
    ref = resolve_checkpoints("me/m", "feature/x y", None, Path("."))[0]
    assert ref.label == "feature_x_y" and ref.revision == "feature/x y"


# ---------------------------------------------------------------------------------------------------------
# hub availability (offline, cache layout) and loading from the cache
# ---------------------------------------------------------------------------------------------------------

def test_offline_uncached_hub_reason_is_fast(hf_cache):
    ref = resolve_checkpoints(PYTHIA, None, [3000], Path("."))[0]
    t0 = time.perf_counter()
    reason = ref.unavailable_reason()
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0  # the requirement; it is a handful of stat() calls (~0.1 ms)
    repo_dir = hf_cache / "models--EleutherAI--pythia-160m"
    assert reason == (f"EleutherAI/pythia-160m@step3000 is not in the local HF cache (looked in {repo_dir}); "
                      "offline mode: to fetch it run `hf download EleutherAI/pythia-160m --revision step3000` "
                      "(older huggingface_hub: `huggingface-cli download ...`) or set CIRCUIT_TESTS_ONLINE=1")
    assert ref.local_dir() is None
    with pytest.raises(ModelLoadError, match="is not in the local HF cache"):
        ref.load()
    with pytest.raises(ModelLoadError, match="is not in the local HF cache"):
        ref.weights_sha256()


def test_unavailable_reason_imports_neither_torch_nor_transformers(tmp_path):
    """In a fresh interpreter: resolving + asking every kind of ref stays stdlib-only and fast."""
    fake_model_dir(tmp_path / "local")
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "t0 = time.perf_counter()\n"
        "from circuit_tests.sources import resolve_checkpoints\n"
        f"refs = resolve_checkpoints('{PYTHIA}', None, 'all', Path('.'))\n"
        f"refs += resolve_checkpoints('local', None, None, Path({str(tmp_path)!r}))\n"
        "reasons = [r.unavailable_reason() for r in refs]\n"
        "dt = time.perf_counter() - t0\n"
        "heavy = [m for m in ('torch', 'transformers', 'transformer_lens', 'huggingface_hub') if m in sys.modules]\n"
        "print(dt, sum(r is not None for r in reasons), heavy)\n"
    )
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    dt, n_unavailable, heavy = out.stdout.split(" ", 2)
    assert float(dt) < 2.0
    assert int(n_unavailable) == 154  # every Pythia step; the local dir is complete
    assert heavy.strip() == "[]"


def test_online_uncached_hub_is_not_reported_unavailable(hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    ref = resolve_checkpoints(PYTHIA, "step3000", None, Path("."))[0]
    assert ref.unavailable_reason() is None  # load() would download it
    assert ref.local_dir() is None


def test_partly_cached_snapshot_names_what_is_missing(hf_cache, tmp_path):
    src = fake_model_dir(tmp_path / "src", tokenizer=False)
    snap = put_in_hf_cache(hf_cache, PYTHIA, "step3000", src)
    ref = resolve_checkpoints(PYTHIA, "step3000", None, tmp_path)[0]
    reason = ref.unavailable_reason()
    assert reason is not None and f"{snap} lacks tokenizer files" in reason
    assert ref.local_dir() is None


def test_cache_dir_resolution(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert sources.hf_hub_cache_dir() == Path.home() / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert sources.hf_hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert sources.hf_hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert sources.hf_hub_cache_dir() == tmp_path / "cache"


def test_hub_checkpoint_loads_from_fake_cache(hf_cache, tiny_dir, tmp_path):
    from circuit_tests.models import weights_sha256

    snap = put_in_hf_cache(hf_cache, PYTHIA, "step3000", tiny_dir)
    assert (snap / "model.safetensors").is_symlink()
    refs = resolve_checkpoints(PYTHIA, "step3000", None, tmp_path)
    assert len(refs) == 1
    ref = refs[0]
    assert (ref.label, ref.step, ref.kind, ref.revision) == ("step3000", 3000, "hub", "step3000")
    assert ref.unavailable_reason() is None
    assert ref.local_dir() == snap
    bridge = ref.load()
    assert bridge is ref.load()  # memoised per process
    assert ref.is_loaded() and "step3000" in sources.loaded_labels()
    assert not bridge.training
    assert bridge.cfg.architecture == "GPTNeoXForCausalLM" and bridge.cfg.d_model == 64
    assert bridge.cfg.checkpoint_value == 3000
    assert bridge.to_str_tokens("the cat", prepend_bos=False) == ["the", "cat"]  # the real tokenizer (#6)
    ref.release()
    assert not ref.is_loaded()
    assert ref.weights_sha256() == weights_sha256(tiny_dir)
    # the same checkpoint selected by step; a neighbouring step that is not cached is reported, not raised
    got = resolve_checkpoints(PYTHIA, None, [3000, 4000], tmp_path)
    assert got[0].unavailable_reason() is None
    assert "pythia-160m@step4000 is not in the local HF cache" in got[1].unavailable_reason()
    assert "; cached revisions: step3000)" in got[1].unavailable_reason()


# ---------------------------------------------------------------------------------------------------------
# local sources
# ---------------------------------------------------------------------------------------------------------

def test_local_single_model_dir(tmp_path, tiny_dir):
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    shutil.copytree(tiny_dir, tmp_path / "models" / "tiny-neox")
    refs = resolve_checkpoints("../models/tiny-neox", None, None, spec_dir)  # relative to the spec's directory
    assert [(r.label, r.step, r.kind) for r in refs] == [("tiny-neox", None, "local")]
    assert refs[0].location == str((tmp_path / "models" / "tiny-neox").resolve())
    assert refs[0].unavailable_reason() is None
    bridge = refs[0].load()
    assert bridge.cfg.n_layers == 2 and not bridge.training
    with pytest.raises(ModelLoadError, match="single model directory without a step"):
        resolve_checkpoints(str(tmp_path / "models" / "tiny-neox"), None, [1000], spec_dir)
    with pytest.raises(ModelLoadError, match="revision .* only applies to hub models"):
        resolve_checkpoints("../models/tiny-neox", "step1", None, spec_dir)


def test_local_single_dir_named_like_a_step(tmp_path):
    d = fake_model_dir(tmp_path / "step2000")
    refs = resolve_checkpoints(str(d), None, None, tmp_path)
    assert [(r.label, r.step) for r in refs] == [("step2000", 2000)]
    assert resolve_checkpoints(str(d), None, [2000], tmp_path)[0].label == "step2000"
    with pytest.raises(ModelLoadError, match="step 1000 not available"):
        resolve_checkpoints(str(d), None, [1000], tmp_path)


def test_local_dir_of_steps(tmp_path):
    root = tmp_path / "run"
    for name in ("step0", "step1000", "checkpoint-2000", "step3000"):
        fake_model_dir(root / name)
    (root / "logs").mkdir()
    refs = resolve_checkpoints("run", None, None, tmp_path)
    assert [(r.label, r.step) for r in refs] == [("step0", 0), ("step1000", 1000), ("step2000", 2000),
                                                  ("step3000", 3000)]
    assert refs[2].location == str(root.resolve() / "checkpoint-2000")
    assert all(r.kind == "local" and r.unavailable_reason() is None for r in refs)
    assert [r.step for r in resolve_checkpoints("./run", None, "1000-2000", tmp_path)] == [1000, 2000]
    assert [r.step for r in resolve_checkpoints("run", None, [3000, 0], tmp_path)] == [0, 3000]
    with pytest.raises(ModelLoadError) as ei:
        resolve_checkpoints("run", None, [500], tmp_path)
    assert str(ei.value) == (f"checkpoints: step 500 not available for {root.resolve()} (nearest: 0, 1000); "
                             "available steps: 0-3000:1000")


def test_local_errors(tmp_path):
    with pytest.raises(ModelLoadError) as ei:
        resolve_checkpoints("./nope", None, None, tmp_path)
    assert str(tmp_path / "nope") in str(ei.value) and "does not exist" in str(ei.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="neither an HF model directory"):
        resolve_checkpoints("./empty", None, None, tmp_path)
    fake_model_dir(tmp_path / "clash" / "step5")
    fake_model_dir(tmp_path / "clash" / "checkpoint-5")
    with pytest.raises(ModelLoadError, match="two directories for the same step: checkpoint-5 and step5"):
        resolve_checkpoints("./clash", None, None, tmp_path)
    (tmp_path / "file.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file"):
        resolve_checkpoints("./file.bin", None, None, tmp_path)


def test_local_missing_files_are_reasons_not_errors(tmp_path):
    root = tmp_path / "run"
    fake_model_dir(root / "step0")
    fake_model_dir(root / "step1", config=False)
    fake_model_dir(root / "step2", weights=False)
    fake_model_dir(root / "step3", tokenizer=False)
    d4 = fake_model_dir(root / "step4", weights=False)
    (d4 / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (d4 / "model-00001-of-00002.safetensors").write_bytes(b"")
    reasons = {r.label: r.unavailable_reason() for r in resolve_checkpoints("run", None, None, tmp_path)}
    assert reasons["step0"] is None
    assert reasons["step1"] == f"local checkpoint step1: {root.resolve() / 'step1'} lacks config.json"
    assert "lacks weights (model.safetensors or pytorch_model.bin)" in reasons["step2"]
    assert "lacks tokenizer files (tokenizer.json / vocab.json / tokenizer.model)" in reasons["step3"]
    assert "weight shard(s) model-00002-of-00002.safetensors listed in model.safetensors.index.json" in reasons["step4"]
    ref1 = resolve_checkpoints("run", None, [1], tmp_path)[0]
    with pytest.raises(ModelLoadError, match="lacks config.json"):
        ref1.load()


# ---------------------------------------------------------------------------------------------------------
# zoo sources (a fake zoo root; the shipped zoo is another module's job)
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def fake_zoo(tmp_path):
    root = tmp_path / "zoo"
    for step in (0, 100, 200, 400):
        fake_model_dir(root / "induction-2l" / f"step{step}")
    fake_model_dir(root / "ioi-4l" / "step0")
    (root / "ioi-4l" / "manifest.json").write_text(json.dumps(
        {"steps": {"0": {"weights_sha256": "ab" * 32}}}))
    (root / "not-a-model").mkdir()
    return root


def test_zoo_resolution(fake_zoo, tmp_path):
    refs = resolve_checkpoints("zoo:induction-2l", None, None, tmp_path, zoo_root=fake_zoo)
    assert [(r.label, r.step, r.kind) for r in refs] == [("step0", 0, "zoo"), ("step100", 100, "zoo"),
                                                          ("step200", 200, "zoo"), ("step400", 400, "zoo")]
    assert refs[1].location == str(fake_zoo.resolve() / "induction-2l" / "step100")
    assert all(r.unavailable_reason() is None for r in refs)
    sel = resolve_checkpoints("zoo:induction-2l", None, "100-400", tmp_path, zoo_root=fake_zoo)
    assert [r.step for r in sel] == [100, 200, 400]
    with pytest.raises(ModelLoadError, match=r"step 300 not available for zoo:induction-2l \(nearest: 200, 400\)"):
        resolve_checkpoints("zoo:induction-2l", None, [300], tmp_path, zoo_root=fake_zoo)
    with pytest.raises(ModelLoadError) as ei:
        resolve_checkpoints("zoo:nope", None, None, tmp_path, zoo_root=fake_zoo)
    assert str(ei.value) == "zoo:nope: no such zoo model; known: induction-2l, ioi-4l"
    with pytest.raises(ModelLoadError, match="revision"):
        resolve_checkpoints("zoo:induction-2l", "main", None, tmp_path, zoo_root=fake_zoo)


def test_zoo_manifest_hash_is_read_and_verified(fake_zoo, tmp_path):
    ref = resolve_checkpoints("zoo:ioi-4l", None, None, tmp_path, zoo_root=fake_zoo)[0]
    assert ref.sha256_hint == "ab" * 32
    with pytest.raises(ModelLoadError, match="unreadable safetensors file"):  # verified: the weights are read
        ref.weights_sha256()                                                 # (the fake file is empty)
    assert sources._manifest_hashes({"steps": [{"step": "step5", "sha256": "cd" * 32}, {"step": 6}]}) == {5: "cd" * 32}
    assert sources._manifest_hashes({"steps": [0, 5], "checkpoints": [{"step": 5, "sha256": "cd" * 32}]}) == {5: "cd" * 32}


def test_zoo_manifest_hashes_are_all_or_nothing(fake_zoo, tmp_path):
    (fake_zoo / "induction-2l" / "manifest.json").write_text(json.dumps({"steps": {"step0": "ef" * 32}}))
    refs = resolve_checkpoints("zoo:induction-2l", None, None, tmp_path, zoo_root=fake_zoo)
    assert [r.sha256_hint for r in refs] == [None] * 4  # step100.. have none: hash them all the same way
    (ref,) = resolve_checkpoints("zoo:induction-2l", None, [0], tmp_path, zoo_root=fake_zoo)
    assert ref.sha256_hint == "ef" * 32


def test_shipped_zoo_unknown_name_lists_known(tmp_path):
    with pytest.raises(ModelLoadError, match="zoo:definitely-not-a-model: no such zoo model; known: "):
        resolve_checkpoints("zoo:definitely-not-a-model", None, None, tmp_path)


# ---------------------------------------------------------------------------------------------------------
# random-init models from the REAL configs (GPT-2 small, Pythia-160m), served from a fake HF cache
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source, revision, label, parallel, d_vocab", [
    ("gpt2", None, "main", False, 50257),
    (PYTHIA, "step3000", "step3000", True, 50304),
])
def test_real_configs_load_through_checkpoint_ref(real_config_hf_home, monkeypatch, tmp_path,
                                                  source, revision, label, parallel, d_vocab):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HOME", str(real_config_hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(real_config_hf_home / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    (ref,) = resolve_checkpoints(source, revision, None, tmp_path)
    assert ref.label == label and ref.unavailable_reason() is None
    bridge = ref.load()
    try:
        cfg = bridge.cfg
        assert (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_vocab) == (12, 12, 768, d_vocab)
        assert bool(cfg.parallel_attn_mlp) is parallel
        assert not bridge.training
    finally:
        del bridge
        ref.release()
    assert not ref.is_loaded()
