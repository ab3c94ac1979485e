"""Emergence plots from result records: one PNG per spec, one panel per claim, the measured value against
the training step.

Why: the terminal table gives pass/fail per checkpoint. A plot shows how a claim's number moves across
training: the phase change, the margin to the threshold, a late decay. matplotlib is optional (extra
``plots``). It is imported only when a plot is drawn, and only its object API is used (no pyplot, no global
backend), so a user's interactive session is left alone.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CircuitTestsError
from .results import Record, by_spec, checkpoint_order, short_path

__all__ = ["ClaimSeries", "claim_series", "plot_results", "require_matplotlib"]

MISSING = "plots need matplotlib: pip install 'circuit-tests[plots]' (or pip install matplotlib)"


def require_matplotlib() -> None:
    """Fail fast (before any model runs) when plots are asked for and matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        raise CircuitTestsError(MISSING)


@dataclass
class ClaimSeries:
    """One claim of one spec across checkpoints, in training order."""

    spec: str
    spec_file: str
    model: str
    claim: str
    claim_type: str
    x: list[float] = field(default_factory=list)        # steps, or 0..n-1 when some checkpoint has no step
    labels: list[str] = field(default_factory=list)     # checkpoint labels
    values: list[float | None] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)   # verdicts: pass | fail | not_evaluated | uncertain | error
    expected: list[str] = field(default_factory=list)   # present | absent
    threshold_min: float | None = None
    threshold_max: float | None = None
    by_step: bool = True

    @property
    def formation_x(self) -> float | None:
        """Where the expectation switches from absent to present (midway between the two checkpoints)."""
        for i in range(1, len(self.x)):
            if self.expected[i - 1] == "absent" and self.expected[i] == "present":
                return (self.x[i - 1] + self.x[i]) / 2
        return None


def claim_series(records: list[Record]) -> dict[tuple[str, str], list[ClaimSeries]]:
    """Group records into series: ``{(spec_file, spec): [ClaimSeries in spec order]}``."""
    out: dict[tuple[str, str], list[ClaimSeries]] = {}
    for key, recs in by_spec(records).items():
        by_step = all(r.step is not None for r in recs)
        step = {r.checkpoint: r.step for r in recs}
        xpos = {ck: float(step[ck]) if by_step else float(i) for i, ck in enumerate(checkpoint_order(recs))}
        series: dict[str, ClaimSeries] = {}
        for r in sorted(recs, key=lambda r: (r.line, xpos[r.checkpoint])):
            s = series.setdefault(r.claim, ClaimSeries(spec=r.spec, spec_file=r.spec_file, model=r.model, claim=r.claim,
                                                       claim_type=r.claim_type, by_step=by_step))
            s.x.append(xpos[r.checkpoint])
            s.labels.append(r.checkpoint)
            s.values.append(r.value)
            s.outcomes.append(r.verdict or r.measured)
            s.expected.append(r.expected)
            s.threshold_min = r.threshold_min if r.threshold_min is not None else s.threshold_min
            s.threshold_max = r.threshold_max if r.threshold_max is not None else s.threshold_max
        out[key] = list(series.values())
    return out


# marker per (expected, outcome): filled green = holds as claimed, hollow blue = absent as declared,
# red cross = fails (or held before its declared formation step), grey triangle = not evaluated
_STYLE = {
    ("present", "pass"): dict(marker="o", color="#2e7d32", label="pass"),
    ("absent", "pass"): dict(marker="o", color="#1565c0", facecolors="none", label="absent (as declared)"),
    ("present", "fail"): dict(marker="X", color="#c62828", label="FAIL"),
    ("absent", "fail"): dict(marker="X", color="#c62828", label="EARLY (held before its formation step)"),
    ("present", "not_evaluated"): dict(marker="v", color="#9e9e9e", label="not evaluated"),
    ("absent", "not_evaluated"): dict(marker="v", color="#9e9e9e", label="not evaluated"),
    ("present", "uncertain"): dict(marker="D", color="#f9a825", label="uncertain (interval straddles)"),
    ("absent", "uncertain"): dict(marker="D", color="#f9a825", label="uncertain (interval straddles)"),
    ("present", "error"): dict(marker="s", color="#6a1b9a", label="ERROR (checkpoint or claim could not be evaluated)"),
    ("absent", "error"): dict(marker="s", color="#6a1b9a", label="ERROR (checkpoint or claim could not be evaluated)"),
}


def _draw(ax, s: ClaimSeries) -> None:
    vals = [v for v in s.values if v is not None and math.isfinite(v)]
    refs = [t for t in (s.threshold_min, s.threshold_max) if t is not None]
    lo, hi = min(vals + refs, default=0.0), max(vals + refs, default=1.0)
    pad = 0.08 * (hi - lo or 1.0)
    floor = lo - pad                                     # not-evaluated markers sit on the floor
    ax.set_ylim(floor - pad, hi + pad)
    pts = [(x, v) for x, v in zip(s.x, s.values) if v is not None and math.isfinite(v)]
    if pts:
        ax.plot(*zip(*pts), color="#616161", lw=1, zorder=1)
    fx = s.formation_x
    if fx is not None:
        ax.axvspan(min(s.x), fx, color="#e3f2fd", zorder=0, label="declared absent")
    for t, name in ((s.threshold_min, "min"), (s.threshold_max, "max")):
        if t is not None:
            ax.axhline(t, ls="--", lw=1, color="#ef6c00", label=f"threshold ({name})")
    groups: dict[tuple[str, str, bool], list[tuple[float, float]]] = defaultdict(list)
    for x, v, o, e in zip(s.x, s.values, s.outcomes, s.expected):
        has = v is not None and math.isfinite(v) and o != "not_evaluated"
        groups[(e, o, has)].append((x, v if has else floor))
    for (e, o, has), xy in groups.items():
        st = dict(_STYLE[(e, o)])
        face = st.pop("facecolors", st["color"])
        label = st["label"] if has or o in ("not_evaluated", "error") else f"{st['label']}, no value (task not doable yet)"
        ax.scatter(*zip(*xy), marker=st["marker"] if has else "v", edgecolors=st["color"], facecolors=face, s=36,
                   zorder=3, label=label)
    if s.by_step and len(s.x) > 1 and min(s.x) >= 0:
        pos = [x for x in s.x if x > 0]
        if pos and max(pos) / min(pos) > 100:            # Pythia-like schedules (0, 1, 2, 4, ..., 143000)
            ax.set_xscale("symlog", linthresh=min(pos))
    if not s.by_step:
        ax.set_xticks(s.x, s.labels, rotation=45, ha="right", fontsize=7, parse_math=False)
    ax.set_xlabel("training step" if s.by_step else "checkpoint")
    ax.set_title(f"{s.claim} ({s.claim_type})", fontsize=9, parse_math=False)
    ax.grid(alpha=0.3)


def _filename(spec: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", spec) or "spec"
    name, i = f"{base}.png", 2
    while name in taken:                                 # two spec files with the same spec name
        name, i = f"{base}-{i}.png", i + 1
    taken.add(name)
    return name


def plot_results(records: list[Record], out_dir: str | Path) -> list[Path]:
    """Write one PNG per spec into ``out_dir`` (created); return the paths in spec order. A spec with no
    measured value at all (every claim not evaluated, e.g. an uncached hub model) gets no plot."""
    require_matplotlib()
    from matplotlib.figure import Figure

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where the directory should be, a read-only parent
        raise CircuitTestsError(f"cannot create plot directory {out}: {e.strerror or e}") from None
    paths, taken = [], set()
    for (spec_file, spec), series in claim_series(records).items():
        if all(v is None for c in series for v in c.values):
            continue                                     # nothing measured (e.g. an uncached hub model)
        n = len(series)
        cols = min(3, n)
        rows = math.ceil(n / cols)
        fig = Figure(figsize=(max(4.6 * cols, 7.5), 3.3 * rows + 0.8), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax, s in zip(axes.flat, series):
            _draw(ax, s)
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        handles: dict[str, object] = {}
        for ax in axes.flat[:n]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center", ncols=min(2 * cols, len(handles)),
                   fontsize=8, frameon=False)
        fig.suptitle(f"{spec}  ({short_path(spec_file)}; {series[0].model})", fontsize=10, parse_math=False)
        path = out / _filename(spec, taken)
        try:
            fig.savefig(path, dpi=110, metadata={"Software": None})
        except OSError as e:
            raise CircuitTestsError(f"cannot write plot {path}: {e.strerror or e}") from None
        paths.append(path)
    return paths
