"""How a re-trained zoo model compares with the shipped one.

Training is bit-reproducible only in the same numerical environment: the same seed and thread count, the same
torch/transformers versions *and* the same CPU kernels. Re-training the shipped zoo on an AVX512 machine
(``torch.backends.cpu.get_cpu_capability()``) with the same torch, transformers and Python versions as
the build gave other weights from the first saved step on (250 or 500), most likely because other SIMD
kernels sum float32 in another order. The task metrics, formation steps and role heads were unchanged.
So a re-train is judged in two ways:

- bit-identical: every checkpoint's sha256 equals the manifest's. Required when the environment matches.
- reproduced: the formation step and the heads holding each role match, and the task metric stays within
  ``METRIC_TOL`` at every checkpoint. This is the check for any other environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ENV_KEYS", "METRIC_TOL", "Reproduction", "compare"]

# Keys of the manifest's ``versions`` that must agree for bit-identical weights. "machine" (x86_64, ...) and
# "cpu_capability" stand for the CPU kernels; manifests written before cpu_capability was recorded lack it.
ENV_KEYS = ("torch", "transformers", "machine", "cpu_capability")

# Largest task-metric difference accepted between two environments, absolute or relative to the shipped value
# (whichever is larger). Measured between the shipped build and an AVX512 machine: induction score equal to
# 1e-4 up to the phase change, then at most 0.029 apart (step 2700: 0.7728 vs 0.8022); IOI logit diff at most
# 0.008 apart; greater-than prob diff equal to 4 decimals.
METRIC_TOL = {"abs": 0.05, "rel": 0.10}


@dataclass
class Reproduction:
    """The verdict of ``compare`` plus the evidence the CLI prints."""

    name: str
    bit_identical: bool
    same_environment: bool | None          # None: the shipped manifest does not record every ENV_KEYS entry
    environment_diffs: dict[str, tuple[Any, Any]]
    unrecorded: dict[str, Any]             # ENV_KEYS missing from the shipped manifest -> value here
    formation: tuple[Any, Any]
    roles: dict[str, tuple[list[str], list[str]]]
    metric_key: str
    rows: list[tuple[int, bool, float | None, float | None]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def reproduced(self) -> bool:
        """Bit-identical, or, in another (or unrecorded) environment, the metrics, formation step and roles agree."""
        return self.bit_identical or not self.problems

    def text(self) -> str:
        lines = [f"{self.name}: " + ("bit-identical to the shipped checkpoints" if self.bit_identical else
                                     "weights differ from the shipped checkpoints")]
        if self.environment_diffs:
            lines.append("  environment differs from the shipped build: " + "; ".join(
                f"{k} {a!r} (shipped) vs {b!r} (here)" for k, (a, b) in self.environment_diffs.items()))
        elif self.same_environment:
            lines.append("  environment matches the shipped build")
        else:
            lines.append("  the shipped manifest does not record " + ", ".join(f"{k} (here {v!r})" for k, v in self.unrecorded.items())
                         + ": bit identity is not expected, the metrics decide")
        lines.append(f"  formation step: shipped {self.formation[0]}, here {self.formation[1]}")
        for role, (a, b) in self.roles.items():
            lines.append(f"  {role}: shipped {', '.join(a) or '-'}; here {', '.join(b) or '-'}")
        lines.append(f"  {'step':>6}  {'sha256':>6}  {self.metric_key + ' (shipped)':>24}  {'here':>10}")
        for step, same, a, b in self.rows:
            fa = "-" if a is None else f"{a:.4f}"
            fb = "-" if b is None else f"{b:.4f}"
            lines.append(f"  {step:>6}  {'same' if same else 'differs':>6}  {fa:>24}  {fb:>10}")
        if self.problems:
            lines.append("  NOT reproduced: " + "; ".join(self.problems))
        elif not self.bit_identical:
            lines.append(f"  reproduced within tolerance (task metric within {METRIC_TOL['abs']} or "
                         f"{METRIC_TOL['rel']:.0%}, same formation step and role heads)")
        return "\n".join(lines)


def _role_heads(manifest: dict[str, Any]) -> dict[str, list[str]]:
    return {role: sorted(h["head"] for h in r.get("heads", []))
            for role, r in manifest.get("analysis", {}).get("roles", {}).items()}


def _within(a: float, b: float) -> bool:
    return abs(a - b) <= max(METRIC_TOL["abs"], METRIC_TOL["rel"] * abs(a))


def compare(shipped: dict[str, Any], new: dict[str, Any]) -> Reproduction:
    """Compare two manifests of the same zoo model (shipped first, re-trained second)."""
    key = shipped["task_metric"]["key"]
    sv, nv = shipped.get("versions", {}), new.get("versions", {})
    diffs = {k: (sv.get(k), nv.get(k)) for k in ENV_KEYS if k in sv and sv.get(k) != nv.get(k)}
    same_env = None if any(k not in sv for k in ENV_KEYS) and not diffs else not diffs
    old = {c["step"]: c for c in shipped["checkpoints"]}
    fresh = {c["step"]: c for c in new["checkpoints"]}
    rows, problems = [], []
    for step in sorted(set(old) | set(fresh)):
        a, b = old.get(step), fresh.get(step)
        va = a["metrics"].get(key) if a else None
        vb = b["metrics"].get(key) if b else None
        rows.append((step, bool(a and b and a["sha256"] == b["sha256"]), va, vb))
        if a is None or b is None:
            problems.append(f"step {step} only in the {'re-trained' if a is None else 'shipped'} model")
        elif va is None or vb is None or not _within(va, vb):
            problems.append(f"{key} at step {step}: {va} shipped vs {vb} here")
    bit = bool(rows) and all(same for _, same, _, _ in rows)
    formation = (shipped.get("formation_step"), new.get("formation_step"))
    if formation[0] != formation[1]:
        problems.append(f"formation step {formation[0]} shipped vs {formation[1]} here")
    if same_env and not bit:
        problems.insert(0, "same environment as the shipped build, yet the weights differ (training is not "
                           "deterministic here: check the thread count)")
    ra, rb = _role_heads(shipped), _role_heads(new)
    roles = {r: (ra.get(r, []), rb.get(r, [])) for r in sorted(set(ra) | set(rb))}
    problems += [f"role {r}: heads {a} shipped vs {b} here" for r, (a, b) in roles.items() if a != b]
    return Reproduction(name=shipped.get("name", "?"), bit_identical=bit, same_environment=same_env,
                        environment_diffs=diffs, unrecorded={k: nv.get(k) for k in ENV_KEYS if k not in sv},
                        formation=formation, roles=roles, metric_key=key, rows=rows,
                        problems=[] if bit else problems)
