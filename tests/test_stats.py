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


# --------------------------------------------------------------------------------------------------------------
# Memory bounded (issue 19): resamples are drawn in chunks, with results identical to one draw
# --------------------------------------------------------------------------------------------------------------

def _unchunked_means(arrs, resamples: int, seed: int) -> list[np.ndarray]:
    """The computation before chunking: every resample's indices in one (resamples, n) draw."""
    idx = np.random.default_rng(seed).integers(0, len(arrs[0]), size=(resamples, len(arrs[0])))
    return [a[idx].mean(1) for a in arrs]


@pytest.mark.parametrize("n", [1, 7, 61])
@pytest.mark.parametrize("chunk", [1, 5, 7 * 61 + 3, 10**9])  # one row per chunk, a few rows, uneven, one chunk
def test_chunked_resampling_is_bit_identical_to_one_draw(n, chunk):
    from circuit_tests.stats import _resampled_means

    circ, full, base = _data(n=n, seed=4)
    got = _resampled_means((circ, full, base), 1001, 9, chunk_elements=chunk)
    want = _unchunked_means((circ, full, base), 1001, 9)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("method", ["bca", "percentile"])
def test_chunked_interval_equals_the_unchunked_interval(method, monkeypatch):
    import circuit_tests.stats as stats_mod

    circ, full, base = _data(n=53, seed=2)
    settings_ = BootstrapSettings(method=method, resamples=3001, seed=5)
    monkeypatch.setattr(stats_mod, "CHUNK_ELEMENTS", 10**12)  # one chunk: the unchunked computation
    whole = paired_bootstrap(normalized, (circ, full, base), settings_)
    monkeypatch.setattr(stats_mod, "CHUNK_ELEMENTS", 3 * 53 + 1)  # three resamples per chunk
    chunked = paired_bootstrap(normalized, (circ, full, base), settings_)
    assert chunked == whole  # exact float equality, not approximate


_BIG_BOOTSTRAP = """
import sys, numpy as np
from circuit_tests.stats import BootstrapSettings, normalized, paired_bootstrap
rng = np.random.default_rng(1)
full = rng.normal(3, 1, 6000); circ = 0.8 * full + rng.normal(0, 0.5, 6000); base = rng.normal(0.2, 0.3, 6000)
iv = paired_bootstrap(normalized, (circ, full, base), BootstrapSettings(resamples=int(sys.argv[1])))
assert iv.resamples == int(sys.argv[1]) and iv.low < iv.high
# VmHWM: this process's own peak (ru_maxrss would carry over the forking parent's: Linux keeps it across exec)
print(next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:")))
"""


def test_bootstrap_memory_does_not_grow_with_resamples_times_size():
    """size 6000 × 20,000 resamples under a 1 GB address-space cap: one draw needed 2.3 GB (0.96 GB of indices and as
    much per gathered sample); chunked, the peak stays near the interpreter's. 6000 × 100,000 (the documented
    maximum) runs the same way in ~7 s at ~70 MB peak (measured; too slow for the suite)."""
    import resource
    import subprocess
    import sys

    def capped() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))

    def peak_kb(resamples: int) -> int:
        out = subprocess.run([sys.executable, "-c", _BIG_BOOTSTRAP, str(resamples)], capture_output=True, text=True,
                             preexec_fn=capped, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])

    small, big = peak_kb(200), peak_kb(20_000)
    assert big - small < 100 * 1024  # 100× the resamples: < 100 MB more peak RSS (one draw: +1.9 GB)
