"""Shared test helpers: tiny random models of both block types, hand-made task data, random-init models
from the real GPT-2 small / Pythia-160m configs, and a fake HF hub cache."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from circuit_tests.runtime import configure

configure()

import torch  # noqa: E402

from circuit_tests.models import bridge_from_hf  # noqa: E402
from circuit_tests.tasks.base import TaskData  # noqa: E402


def tiny_bridge(kind: str, *, layers: int = 2, heads: int = 4, d_model: int = 32, vocab: int = 50, seed: int = 0,
                mlp: bool = True):
    """A random-init GPT-2 (sequential) or GPT-NeoX (parallel) bridge with non-trivial biases and LN params."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(n_embd=d_model, n_head=heads, n_layer=layers, vocab_size=vocab, n_positions=64,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    else:
        hf = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=d_model, num_attention_heads=heads, num_hidden_layers=layers,
                                              intermediate_size=4 * d_model, vocab_size=vocab, max_position_embeddings=64,
                                              rotary_pct=0.25, use_parallel_residual=True))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # trained-looking parameters: random biases and LN gains, larger weights
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "ln" in name or "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(3.0)
    return bridge_from_hf(hf.eval())


def random_task(vocab: int = 50, n: int = 6, seq: int = 8, seed: int = 0, ragged: bool = False) -> TaskData:
    """Random clean/corrupted prompts with random answer/wrong tokens (logit diff metric)."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, vocab, (n, seq), generator=g)
    corr = torch.randint(1, vocab, (n, seq), generator=g)
    end = torch.full((n,), seq - 1)
    if ragged:
        end = torch.randint(seq // 2, seq, (n,), generator=g)
        for i in range(n):
            clean[i, end[i] + 1:] = 0
            corr[i, end[i] + 1:] = 0
    targets = torch.randint(1, vocab, (n, 2), generator=g)
    signs = torch.tensor([[1.0, -1.0]]).repeat(n, 1)
    return TaskData("random", clean, corr, end, targets, signs, "logit_diff")


def gpt2_small():
    """Random-init GPT-2 small (its real config)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config())


def pythia_160m():
    """Random-init Pythia-160m (the hub's config.json values)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=50304,
        rotary_pct=0.25, rotary_emb_base=10000, max_position_embeddings=2048, use_parallel_residual=True,
        tie_word_embeddings=False, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=0))


def save_hf_model(model, d: Path, tok_dir: Path) -> Path:
    """save_pretrained (before any wrapping, sharp edge #8) plus the tokenizer files next to it (#6)."""
    model.save_pretrained(str(d))
    for f in tok_dir.iterdir():
        shutil.copy(f, d / f.name)
    return d


def put_in_hf_cache(cache: Path, repo_id: str, revision: str, src: Path, *, move: bool = False) -> Path:
    """Install the files of ``src`` as ``repo_id@revision`` in an HF hub cache; returns the snapshot dir."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for f in sorted(src.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(f"{commit}/{f.name}".encode()).hexdigest()
        (shutil.move if move else shutil.copy)(str(f), str(blob))
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs" / revision).write_text(commit)
    return snap


def add_hf_ref(cache: Path, repo_id: str, revision: str, snap: Path) -> None:
    """Point another revision of ``repo_id`` at an installed snapshot (hub revisions may share a commit)."""
    (cache / ("models--" + repo_id.replace("/", "--")) / "refs" / revision).write_text(snap.name)
