"""Statistics behind CI-grade gates: paired bootstrap intervals over prompts and the tri-state interval gate.

Why paired: faithfulness is a ratio of dataset means (``mean m(C) / mean m(M)`` or the normalized form); its
numerator and denominator come from the same prompts, so each resample draws one set of prompt indices and
takes every mean over it. Resampling them independently would ignore their (strong, positive) correlation and
inflate the interval.

Why a tri-state gate: with ``gate: ci`` a claim passes only when the whole interval clears its threshold, fails
only when the whole interval misses it, and is ``uncertain`` in between — so a rerun with another resampling
seed can move a claim between pass/fail and uncertain, but (unless the data change) not between pass and fail.

Methods: ``percentile`` (the resampled statistic's quantiles) and ``bca`` (bias-corrected and accelerated,
Efron 1987; acceleration from the leave-one-prompt-out jackknife), both deterministic given ``seed``.

Why chunked: drawing every resample's indices at once takes ``resamples × size`` int64s (100,000 × 6,000 is 4.8 GB,
plus as much again per gathered sample), so resamples are drawn and averaged ``CHUNK_ELEMENTS`` indices at a
time. Peak memory is O(``CHUNK_ELEMENTS``) (about 35 MB) plus 8 bytes per resample and sample, whatever
``resamples × size``; the generator's stream and each row's mean are the same as in one draw, so intervals are
identical bit for bit to the unchunked computation for the same seed. Time stays linear in ``resamples × size``
(size 6,000 × 100,000 resamples, the documented maximum: about 7 s, 70 MB peak; one draw needed over 9 GB).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any, Callable, Sequence

import numpy as np

METHODS = ("bca", "percentile")
GATES = ("point", "ci")
UNCERTAIN = "uncertain"
CHUNK_ELEMENTS = 1 << 21  # resampled indices drawn at a time: 16 MiB of int64 (and as much per gathered sample)


@dataclass(frozen=True)
class BootstrapSettings:
    """How an interval is computed; recorded next to every interval so it can be reproduced."""

    method: str = "bca"
    resamples: int = 2000
    seed: int = 0
    level: float = 0.95

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"bootstrap method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.resamples < 10:
            raise ValueError(f"bootstrap resamples {self.resamples}: need at least 10")
        if not 0 < self.level < 1:
            raise ValueError(f"bootstrap level {self.level}: must lie strictly between 0 and 1")


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    method: str
    resamples: int  # resamples used (finite statistic); fewer than asked when some had a zero denominator
    seed: int
    level: float

    def record(self) -> dict[str, Any]:
        """The keys stored in a result record (``ci_method`` etc.)."""
        return {"ci_method": self.method, "ci_resamples": self.resamples, "ci_seed": self.seed, "ci_level": self.level}


StatOfMeans = Callable[..., np.ndarray]


def paired_bootstrap(stat: StatOfMeans, samples: Sequence[np.ndarray], settings: BootstrapSettings = BootstrapSettings()
                     ) -> Interval:
    """Interval for ``stat(mean(a), mean(b), ...)`` with one shared index draw per resample (paired over prompts).

    ``stat`` takes arrays of means (one per sample, same shape) and returns the statistic elementwise, e.g.
    ``lambda c, f: c / f`` for the ratio of means. Resamples whose statistic is not finite (a zero denominator)
    are dropped; an interval from no finite resample is (nan, nan). Memory is bounded whatever
    ``resamples × len(sample)`` (chunked draws, see the module docstring); the result is that of one draw.
    """
    arrs = [np.asarray(s, dtype=np.float64) for s in samples]
    n = len(arrs[0])
    if n == 0 or any(len(a) != n for a in arrs):
        raise ValueError(f"paired bootstrap needs equally long, non-empty samples; got lengths {[len(a) for a in arrs]}")
    means = _resampled_means(arrs, settings.resamples, settings.seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        theta_b = np.asarray(stat(*means), dtype=np.float64)
        theta_hat = float(stat(*(np.asarray(a.mean()) for a in arrs)))
    theta_b = theta_b[np.isfinite(theta_b)]
    nan = Interval(float("nan"), float("nan"), settings.method, int(len(theta_b)), settings.seed, settings.level)
    if len(theta_b) == 0 or not np.isfinite(theta_hat):
        return nan
    alpha = (1 - settings.level) / 2
    if settings.method == "percentile":
        lo, hi = np.percentile(theta_b, [100 * alpha, 100 * (1 - alpha)])
    else:
        lo_q, hi_q = _bca_quantiles(stat, arrs, theta_b, theta_hat, alpha)
        if not (np.isfinite(lo_q) and np.isfinite(hi_q)):
            return nan
        lo, hi = np.percentile(theta_b, [100 * lo_q, 100 * hi_q])
    return Interval(float(lo), float(hi), settings.method, int(len(theta_b)), settings.seed, settings.level)


def _resampled_means(arrs: Sequence[np.ndarray], resamples: int, seed: int,
                     chunk_elements: int | None = None) -> list[np.ndarray]:
    """Each sample's mean over ``resamples`` shared index draws (row r of ``default_rng(seed).integers(0, n,
    (resamples, n))``), drawn ``chunk_elements`` indices at a time (at least one row) so that memory stays bounded."""
    n = len(arrs[0])
    rows = max(1, (CHUNK_ELEMENTS if chunk_elements is None else chunk_elements) // n)
    rng = np.random.default_rng(seed)
    means = [np.empty(resamples, dtype=np.float64) for _ in arrs]
    for start in range(0, resamples, rows):
        stop = min(resamples, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))  # the same stream as one (resamples, n) draw
        for out, a in zip(means, arrs):
            out[start:stop] = a[idx].mean(1)
    return means


def _bca_quantiles(stat: StatOfMeans, arrs: list[np.ndarray], theta_b: np.ndarray, theta_hat: float, alpha: float
                   ) -> tuple[float, float]:
    """BCa-adjusted quantile levels (Efron & Tibshirani 1993, §14.3): bias z0 from the share of resamples below
    the estimate (ties count half), acceleration from the leave-one-out jackknife of the same statistic."""
    nd = NormalDist()
    below = (np.count_nonzero(theta_b < theta_hat) + np.count_nonzero(theta_b <= theta_hat)) / (2 * len(theta_b))
    if below <= 0 or below >= 1:  # every resample on one side: the bias correction is unbounded
        return float("nan"), float("nan")
    z0 = nd.inv_cdf(below)
    n = len(arrs[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        loo = np.asarray(stat(*((a.sum() - a) / (n - 1) for a in arrs)), dtype=np.float64) if n > 1 else np.full(1, theta_hat)
    loo = loo[np.isfinite(loo)]
    d = loo.mean() - loo
    den = 6.0 * float((d ** 2).sum()) ** 1.5
    acc = float((d ** 3).sum()) / den if den > 0 else 0.0
    out = []
    for q in (alpha, 1 - alpha):
        z = nd.inv_cdf(q)
        out.append(nd.cdf(z0 + (z0 + z) / (1 - acc * (z0 + z))))
    return out[0], out[1]


def ratio_of_means(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Tigges' ratio ``m(C)/m(M)`` from means."""
    return num / den


def normalized(circ: np.ndarray, full: np.ndarray, base: np.ndarray) -> np.ndarray:
    """MIB / Have-Faith ``(m(C) - m(M')) / (m(M) - m(M'))`` from means."""
    return (circ - base) / (full - base)


def gate(value: float, low: float | None, high: float | None, lower: float | None, upper: float | None = None,
         mode: str = "point") -> str:
    """``pass`` / ``fail`` / ``uncertain`` for ``lower <= value <= upper`` under ``mode``.

    ``point`` compares the point value. ``ci`` needs the whole interval ``[low, high]`` inside the bounds to pass
    and the whole interval outside one bound to fail; otherwise (straddling, or no finite interval) uncertain.
    """
    if mode not in GATES:
        raise ValueError(f"gate {mode!r}: expected one of {', '.join(GATES)}")
    if mode == "point":
        ok = (lower is None or value >= lower) and (upper is None or value <= upper)
        return "pass" if ok else "fail"
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return UNCERTAIN
    if (lower is not None and high < lower) or (upper is not None and low > upper):
        return "fail"
    if (lower is None or low >= lower) and (upper is None or high <= upper):
        return "pass"
    return UNCERTAIN


def settings_from(spec_like: Any) -> BootstrapSettings:
    """Bootstrap settings from a spec's ``bootstrap:`` mapping (a pydantic model, a dict or None)."""
    if spec_like is None:
        return BootstrapSettings()
    d = spec_like if isinstance(spec_like, dict) else (spec_like.model_dump() if hasattr(spec_like, "model_dump") else asdict(spec_like))
    return BootstrapSettings(**{k: v for k, v in d.items() if v is not None})


def quantile_rank(value: float, dist: Sequence[float]) -> float:
    """Share of ``dist`` strictly below ``value`` (ties count half): where a claim sits in its baseline."""
    a = np.asarray(dist, dtype=np.float64)
    a = a[np.isfinite(a)]
    if len(a) == 0:
        return float("nan")
    return float((np.count_nonzero(a < value) + 0.5 * np.count_nonzero(a == value)) / len(a))
