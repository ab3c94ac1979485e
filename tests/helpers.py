"""Shared test helpers: tiny random models of both block types and hand-made task data."""

from __future__ import annotations

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
