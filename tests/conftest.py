"""Fixtures shared by the test suite (models are built once per session: they cost seconds each)."""

from __future__ import annotations

import pytest

from circuit_tests.runtime import configure

configure()


@pytest.fixture(scope="session")
def real_config_bridges():
    """Random-init GPT-2 small and Pythia-160m from their real configs (no weights are downloaded)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    from circuit_tests.models import bridge_from_hf

    torch.manual_seed(0)
    gpt2 = bridge_from_hf(GPT2LMHeadModel(GPT2Config()))
    pythia = bridge_from_hf(GPTNeoXForCausalLM(GPTNeoXConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=50304,
        rotary_pct=0.25, rotary_emb_base=10000, max_position_embeddings=2048, use_parallel_residual=True,
        tie_word_embeddings=False)))
    return gpt2, pythia
