"""Bootstrap intervals against scipy.stats.bootstrap (an independent reference) and the tri-state CI gate."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from circuit_tests.stats import (UNCERTAIN, BootstrapSettings, gate, normalized, paired_bootstrap, quantile_rank,
                                 ratio_of_means)

scipy_stats = pytest.importorskip("scipy.stats")


def _data(n: int = 60, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    full = rng.normal(3.0, 1.0, n)
    circ = 0.8 * full + rng.normal(0, 0.5, n)  # correlated with full: pairing matters
    base = rng.normal(0.2, 0.3, n)
    return circ, full, base


@pytest.mark.parametrize("method,scipy_method", [("bca", "BCa"), ("percentile", "percentile")])
@pytest.mark.parametrize("which", ["ratio", "normalized"])
def test_interval_matches_scipy(method, scipy_method, which):
    circ, full, base = _data()
    if which == "ratio":
        samples, fn = (circ, full), ratio_of_means
    else:
        samples, fn = (circ, full, base), normalized
    ours = paired_bootstrap(fn, samples, BootstrapSettings(method=method, resamples=20000, seed=0, level=0.95))
    ref = scipy_stats.bootstrap(samples, lambda *a, axis=-1: fn(*(x.mean(axis) for x in a)), paired=True,
                                vectorized=True, n_resamples=20000, method=scipy_method, confidence_level=0.95,
                                random_state=np.random.default_rng(123)).confidence_interval
    width = ref.high - ref.low
    # different resampling streams: agreement to a few percent of the width (Monte-Carlo error at 20k resamples)
    assert abs(ours.low - ref.low) < 0.05 * width
    assert abs(ours.high - ref.high) < 0.05 * width
    assert ours.method == method and ours.resamples == 20000 and ours.seed == 0 and ours.level == 0.95


def test_pairing_narrows_the_ratio_interval():
    circ, full, _ = _data()
    paired = paired_bootstrap(ratio_of_means, (circ, full), BootstrapSettings(method="percentile", resamples=4000))
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, len(circ), (2, 4000, len(circ)))
    unpaired = np.percentile(circ[i].mean(1) / full[j].mean(1), [2.5, 97.5])
    assert paired.high - paired.low < 0.7 * (unpaired[1] - unpaired[0])


def test_zero_denominator_resamples_are_dropped_and_counted():
    num = np.array([1.0, 1.0, 1.0, 1.0])
    den = np.array([0.0, 0.0, 0.0, 4.0])  # a resample of only the first three prompts has mean 0
    iv = paired_bootstrap(ratio_of_means, (num, den), BootstrapSettings(method="percentile", resamples=500, seed=3))
    assert 0 < iv.resamples < 500 and np.isfinite(iv.low)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="method 'studentized'"):
        BootstrapSettings(method="studentized")
    with pytest.raises(ValueError, match="level 1.5"):
        BootstrapSettings(level=1.5)
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap(ratio_of_means, (np.ones(3), np.ones(4)))


@pytest.mark.parametrize("lo,hi,expect", [(0.85, 0.9, "pass"), (0.7, 0.79, "fail"), (0.75, 0.85, UNCERTAIN),
                                          (float("nan"), float("nan"), UNCERTAIN)])
def test_ci_gate_three_ways(lo, hi, expect):
    assert gate(0.82, lo, hi, 0.8, None, "ci") == expect


def test_ci_gate_upper_bound_and_point_gate():
    assert gate(1.0, 0.9, 1.1, 0.5, 1.2, "ci") == "pass"
    assert gate(1.0, 1.25, 1.3, 0.5, 1.2, "ci") == "fail"
    assert gate(1.0, 1.1, 1.3, 0.5, 1.2, "ci") == UNCERTAIN
    assert gate(0.79, 0.9, 1.0, 0.8, None, "point") == "fail"  # point ignores the interval


@settings(max_examples=40, deadline=None)
@given(data_seed=st.integers(0, 10_000), seeds=st.lists(st.integers(0, 2**31 - 1), min_size=2, max_size=6, unique=True),
       method=st.sampled_from(["bca", "percentile"]))
def test_straddling_claim_is_uncertain_and_never_flips(data_seed, seeds, method):
    """Threshold at the point estimate: whatever the resampling seed, the claim is uncertain (never pass/fail)."""
    circ, full, base = _data(n=40, seed=data_seed)
    value = float(normalized(circ.mean(), full.mean(), base.mean()))
    outcomes = set()
    for s in seeds:
        iv = paired_bootstrap(normalized, (circ, full, base), BootstrapSettings(method=method, resamples=400, seed=s))
        outcomes.add(gate(value, iv.low, iv.high, value, None, "ci"))
    assert outcomes == {UNCERTAIN}


@settings(max_examples=25, deadline=None)
@given(data_seed=st.integers(0, 10_000), shift=st.floats(-0.3, 0.3), seeds=st.lists(st.integers(0, 2**31 - 1), min_size=2,
                                                                                     max_size=5, unique=True))
def test_ci_gate_never_flips_between_pass_and_fail_across_seeds(data_seed, shift, seeds):
    circ, full, _ = _data(n=50, seed=data_seed)
    value = float(ratio_of_means(circ.mean(), full.mean()))
    outcomes = {gate(value, iv.low, iv.high, value + shift, None, "ci")
                for iv in (paired_bootstrap(ratio_of_means, (circ, full), BootstrapSettings(resamples=400, seed=s)) for s in seeds)}
    assert not {"pass", "fail"} <= outcomes


def test_quantile_rank():
    assert quantile_rank(5.0, [1, 2, 3, 4]) == 1.0
    assert quantile_rank(0.0, [1, 2, 3, 4]) == 0.0
    assert quantile_rank(2.0, [1, 2, 3, 4]) == 0.375
