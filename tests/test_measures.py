"""Faithfulness arithmetic, floors, KL, the expectation logic and the failure text — against hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from circuit_tests.engine import Evaluation
from circuit_tests.measures import faithfulness
from circuit_tests.metrics import accuracy, kl, logit_diff, prob_diff
from circuit_tests.results import Record
from circuit_tests.runner import _apply_expectation
from circuit_tests.spec import FaithfulnessClaim
from circuit_tests.collect import failure_text

from .helpers import random_task


def _logits_with_ld(lds: list[float], V: int = 10) -> torch.Tensor:
    """Logits whose logit diff (token 1 minus token 2) per row is ``lds``."""
    x = torch.zeros(len(lds), V)
    x[:, 1] = torch.tensor(lds)
    return x


def _task(n: int):
    t = random_task(n=n)
    t = type(t)(t.name, t.clean, t.corrupted, t.end, torch.tensor([[1, 2]] * n), torch.tensor([[1.0, -1.0]] * n), "logit_diff")
    return t


def claim(**kw):
    return FaithfulnessClaim(type="faithfulness", **{"normalization": "normalized", "min": 0.8, **kw})


def test_metrics_match_hand_computation():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [1.0, 0.0, 3.0, 0.0]])
    targets, signs = torch.tensor([[1, 2], [1, 2]]), torch.tensor([[1.0, -1.0], [1.0, -1.0]])
    assert logit_diff(logits, targets, signs).tolist() == [1.0, -3.0]
    p = logits.double().softmax(-1)
    assert torch.allclose(prob_diff(logits, targets, signs), p[:, 1] - p[:, 2])
    assert accuracy(logits, targets, signs).tolist() == [1.0, 0.0]
    groups = torch.tensor([[1, 2, 3]]), torch.tensor([[1.0, -1.0, -1.0]])
    assert logit_diff(logits[:1], *groups).item() == pytest.approx(2.0 - 0.0)  # 2 - mean(1, -1)
    ref = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    q = logits[:1].double().log_softmax(-1)
    assert kl(logits[:1], *groups, reference=ref).item() == pytest.approx(float((0.25 * (math.log(0.25) - q)).sum()))


def test_ratio_and_normalized_are_ratios_of_means():
    t = _task(4)
    ev = Evaluation(clean=_logits_with_ld([4, 2, 3, 3]), corrupted=_logits_with_ld([-1, -1, 0, -2]),
                    circuit=_logits_with_ld([3, 1, 3, 2]), baseline=_logits_with_ld([-1, -1, 0, -2]), ablation="corrupted")
    r = faithfulness(ev, t, claim(normalization="ratio", min=0.5))
    assert r.value == pytest.approx(9 / 12) and r.outcome == "pass"
    n = faithfulness(ev, t, claim(min=0.9))
    assert n.value == pytest.approx((9 / 4 + 1) / (12 / 4 + 1)) and n.outcome == "fail"
    assert n.numbers["m_M"] == 3 and n.numbers["m_Mprime"] == -1 and n.numbers["m_C"] == 2.25
    assert n.numbers["ci_low"] <= n.value <= n.numbers["ci_high"]
    assert "normalized faithfulness 0.8125 < min 0.9" in n.reason
    assert faithfulness(ev, t, claim(min=0.5, max=0.7)).outcome == "fail"  # over the max


def test_small_or_negative_denominator_is_not_evaluated_never_passed():
    t = _task(3)
    ev = Evaluation(clean=_logits_with_ld([0.1, 0.2, 0.0]), corrupted=_logits_with_ld([0, 0, 0]),
                    circuit=_logits_with_ld([5, 5, 5]), baseline=_logits_with_ld([0, 0, 0]), ablation="corrupted")
    for c in (claim(), claim(normalization="ratio", min=0.0)):
        r = faithfulness(ev, t, c)
        assert r.outcome == "not_evaluated" and r.reason_kind == "cannot_do_task" and r.value is None
    assert faithfulness(ev, t, claim(min_effect=0.05)).outcome == "pass"  # an explicit, lower floor
    backwards = Evaluation(clean=_logits_with_ld([-3, -3, -3]), corrupted=_logits_with_ld([0, 0, 0]),
                           circuit=_logits_with_ld([-3, -3, -3]), baseline=_logits_with_ld([0, 0, 0]), ablation="corrupted")
    assert faithfulness(backwards, t, claim(normalization="ratio", min=0.5)).outcome == "not_evaluated"


def test_max_kl_gates_too():
    t = _task(2)
    clean = _logits_with_ld([4, 4])
    ev = Evaluation(clean=clean, corrupted=_logits_with_ld([0, 0]), circuit=clean.clone(), baseline=_logits_with_ld([0, 0]), ablation="corrupted")
    assert faithfulness(ev, t, claim(max_kl=0.01)).outcome == "pass"
    ev.circuit[:, 5] = 8.0  # same logit diff, very different distribution
    r = faithfulness(ev, t, claim(max_kl=0.01))
    assert r.value == pytest.approx(1.0) and r.outcome == "fail" and "KL(full || circuit)" in r.reason


@pytest.mark.parametrize("expected,measured,kind,final", [
    ("present", "pass", "", "pass"), ("present", "fail", "", "fail"), ("present", "not_evaluated", "cannot_do_task", "not_evaluated"),
    ("absent", "pass", "", "fail"), ("absent", "fail", "", "pass"), ("absent", "not_evaluated", "cannot_do_task", "pass"),
    ("absent", "not_evaluated", "", "not_evaluated"),
])
def test_expectation_before_formation(expected, measured, kind, final):
    r = Record(spec="s", spec_file="f", line=1, model="m", checkpoint="step5", step=5, claim="c", claim_type="faithfulness",
               outcome="", measured=measured, expected=expected)
    assert _apply_expectation(r, kind, 10) == final
    if expected == "absent" and measured == "pass":
        assert "appeared early" in r.reason


def test_failure_text_has_every_number():
    r = Record(spec="s", spec_file="specs/x.circuit.yaml", line=12, model="zoo:ioi", checkpoint="step900", step=900,
               claim="faithfulness", claim_type="faithfulness", outcome="fail", measured="fail", value=0.41,
               threshold_min=0.8, metric="logit_diff", normalization="normalized", ablation="corrupted", m_M=3.2,
               m_Mprime=-2.9, m_C=-0.4, ci_low=0.35, ci_high=0.47, n_examples=64, weights_sha256="ab" * 32,
               reason="normalized faithfulness 0.41 < min 0.8")
    text = failure_text(r)
    for piece in ("specs/x.circuit.yaml:12", "step900", "0.41", ">= 0.8", "normalized", "m(M) = 3.2", "m(M') = -2.9",
                  "m(C) = -0.4", "[0.35, 0.47]", "64 examples", "zoo:ioi", "abababab"):
        assert piece in text, piece
    assert r.cell == "FAIL 0.41"


def test_role_score_quantifiers():
    from circuit_tests.measures import role_score
    from circuit_tests.scores import HeadScores
    from circuit_tests.spec import RoleScoreClaim

    hs = HeadScores(torch.tensor([[0.9, 0.2], [0.6, 0.4]], dtype=torch.float64), "induction", "attention fraction")
    roles = {"induction": ["a0.h0", "a1.h0", "a1.h1"]}
    mk = lambda **kw: RoleScoreClaim(type="role_score", role="induction", min=0.5, **kw)  # noqa: E731
    assert role_score(hs, mk(), roles).value == pytest.approx(0.4) and role_score(hs, mk(), roles).outcome == "fail"
    assert role_score(hs, mk(quantifier="any"), roles).value == pytest.approx(0.9)
    r = role_score(hs, mk(quantifier="at_least", k=2), roles)
    assert r.value == pytest.approx(0.6) and r.outcome == "pass" and r.numbers["per_head"]["a1.h1"] == pytest.approx(0.4)
    assert role_score(hs, mk(heads=["a1.h1"]), roles).outcome == "fail"
    ne = HeadScores(torch.full((2, 2), float("nan"), dtype=torch.float64), "successor", "fraction", "no ordinal tokens")
    assert role_score(ne, mk(score="successor"), roles).outcome == "not_evaluated"


def test_path_ratio_from_effects():
    from types import SimpleNamespace

    from circuit_tests.measures import path_ratio
    from circuit_tests.spec import PathRatioClaim

    effects = torch.tensor([[-0.6, 0.1], [-0.2, -0.1]], dtype=torch.float64)
    res = SimpleNamespace(effects=effects, ld_clean=4.0, ld_corrupt=-4.0, receivers="logits")
    roles = {"s": ["a0.h0", "a1.h0"], "c": ["a0.h1"]}
    claim = PathRatioClaim(type="path_ratio", senders="s", receivers="logits", min=0.7)
    m = path_ratio(res, claim, roles, ["a0.h0", "a0.h1", "a1.h0"], "logit_diff")
    assert m.value == pytest.approx(0.8 / 1.0) and m.numbers["signed"] == pytest.approx(-0.8 / -0.8) and m.outcome == "pass"
    circ = PathRatioClaim(type="path_ratio", senders="s", receivers="logits", min=0.7, denominator="circuit")
    assert path_ratio(res, circ, roles, ["a0.h0", "a0.h1", "a1.h0"], "logit_diff").value == pytest.approx(0.8 / 0.9)
    flat = SimpleNamespace(effects=effects, ld_clean=0.1, ld_corrupt=0.0, receivers="logits")
    assert path_ratio(flat, claim, roles, [], "logit_diff").outcome == "not_evaluated"
