"""Every task can be named in a spec and runs through the faithfulness claims (engine, metric, normalization)
on a random-init model whose word-level tokenizer covers all the word lists."""

from __future__ import annotations

import json
import math

import pytest

from circuit_tests.runner import SpecRun, measure_claim
from circuit_tests.sources import resolve_checkpoints
from circuit_tests.spec import load_spec
from circuit_tests.tasks import task_names

from .test_tasks import make_wordlevel

SPEC = """\
name: every-task
model:
  source: ./model
task:
  name: {task}
  size: 8
{extra}
circuit:
  nodes: [a0.h1, a1.h0, m0]
claims:
  - type: faithfulness
    normalization: normalized
    min: 0.5
    min_effect: 0.000001
  - type: faithfulness
    id: ratio_kl
    metric: {metric}
    normalization: ratio
    min: 0.5
    max_kl: 10
    min_effect: 0.000001
"""


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    d = tmp_path_factory.mktemp("every_task")
    tok = make_wordlevel()
    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
                                          vocab_size=len(tok), max_position_embeddings=128, rotary_pct=0.25))
    hf.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    rows = [{"clean": "Then , Mary and John went to the store . John gave a ring to",
             "corrupted": "Then , Mary and John went to the store . Mary gave a ring to", "answer": "Mary", "wrong": "John"}] * 8
    (d / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


@pytest.mark.parametrize("task", task_names())
def test_task_runs_through_faithfulness_claims(spec_dir, task):
    extra = "  path: data.jsonl\n  join: ' '" if task == "custom" else ""
    metric = "prob_diff" if task in ("greater_than", "sva") else "logit_diff"
    p = spec_dir / f"{task}.circuit.yaml"
    p.write_text(SPEC.format(task=task, extra=extra, metric=metric))
    loaded = load_spec(p)
    m = loaded.spec.model
    run = SpecRun(loaded, resolve_checkpoints(m.source, m.revision, m.checkpoints, loaded.dir))
    ref = run.refs[0]
    for i in range(len(loaded.spec.claims)):
        rec = measure_claim(run, ref, i)
        # the engine ran: every number behind the claim is there and finite, and the outcome is decided
        assert rec.m_M is not None and rec.m_C is not None and rec.m_Mprime is not None, rec
        assert rec.n_examples == 8, rec
        if rec.measured == "not_evaluated":  # a random model may prefer the wrong answer: never a pass then
            assert "cannot do the task" in rec.reason and rec.value is None and rec.outcome == "skipped"
        else:
            assert rec.measured in ("pass", "fail") and math.isfinite(rec.value), rec
            assert rec.outcome == {"pass": "passed", "fail": "failed"}[rec.measured]
            if loaded.spec.claims[i].max_kl is not None:
                assert rec.kl is not None and rec.kl >= 0
