"""Fixtures shared by the test suite (models are built once per session: they cost seconds each).

Hypothesis profiles: ``ci`` (loaded when the environment has ``CI`` set, or with ``--hypothesis-profile=ci``) is
derandomized (the same examples on every run: a red build is reproducible, never a flake) and prints the
failing example's reproduction blob; locally the default profile keeps exploring new examples.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from circuit_tests.runtime import configure

configure()  # this test process owns its runtime: one torch thread, offline hub (the plugin itself changes nothing)

settings.register_profile("ci", derandomize=True, database=None, print_blob=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def real_config_bridges():
    """Random-init GPT-2 small and Pythia-160m from their real configs (no weights are downloaded)."""
    import torch

    from circuit_tests.models import bridge_from_hf

    from .helpers import gpt2_small, pythia_160m

    torch.manual_seed(0)
    gpt2 = bridge_from_hf(gpt2_small())
    pythia = bridge_from_hf(pythia_160m())
    return gpt2, pythia


@pytest.fixture(scope="session")
def real_config_hf_home(tmp_path_factory):
    """An $HF_HOME whose hub cache serves random-init models from the real configs: gpt2@main and
    EleutherAI/pythia-160m@step3000 (= @step143000, same snapshot), each built and written once per session,
    with the zoo IOI word-level tokenizer (every IOI word is one token)."""
    import gc

    import torch

    from circuit_tests.models import load_tokenizer
    from circuit_tests.zoo import checkpoint_dirs

    from .helpers import add_hf_ref, gpt2_small, put_in_hf_cache, pythia_160m, save_hf_model

    base = tmp_path_factory.mktemp("real_cfg")
    tok_dir = base / "tokenizer"
    load_tokenizer(checkpoint_dirs("ioi")[-1][1]).save_pretrained(str(tok_dir))
    hub = base / "hf_home" / "hub"
    for repo_id, revision, build in (("gpt2", "main", gpt2_small), ("EleutherAI/pythia-160m", "step3000", pythia_160m)):
        torch.manual_seed(0)
        model = build().eval()
        staging = save_hf_model(model, base / "staging" / repo_id.replace("/", "--"), tok_dir)
        del model
        gc.collect()
        snap = put_in_hf_cache(hub, repo_id, revision, staging, move=True)
    add_hf_ref(hub, "EleutherAI/pythia-160m", "step143000", snap)
    return base / "hf_home"
