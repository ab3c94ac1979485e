"""End-of-run reports from result records: the terminal table (spec × checkpoint × claim)."""

from __future__ import annotations

from collections import defaultdict

from .results import Record, by_spec, checkpoint_order


def table(records: list[Record]) -> str:
    """One block per spec: rows are checkpoints (training order), columns are claims, cells outcome + value."""
    out: list[str] = []
    for (path, name), recs in by_spec(records).items():
        claims = list(dict.fromkeys(r.claim for r in sorted(recs, key=lambda r: r.line)))
        ckpts = checkpoint_order(recs)
        cell = {(r.checkpoint, r.claim): r.cell for r in recs}
        first = recs[0]
        out.append(f"{name}  ({path}; {first.model}; ablation {first.ablation})")
        w0 = max([len("checkpoint")] + [len(c) for c in ckpts])
        widths = [max(len(c), *(len(cell.get((ck, c), "")) for ck in ckpts)) for c in claims]
        out.append("  " + "checkpoint".ljust(w0) + "  " + "  ".join(c.ljust(w) for c, w in zip(claims, widths)))
        for ck in ckpts:
            out.append("  " + ck.ljust(w0) + "  " + "  ".join(cell.get((ck, c), "").ljust(w) for c, w in zip(claims, widths)))
        counts = defaultdict(int)
        for r in recs:
            counts[r.outcome] += 1
        out.append("  " + ", ".join(f"{counts[k]} {k}" for k in ("pass", "fail", "not_evaluated") if counts[k]))
        out.append("")
    out.append("cells: pass/FAIL value = claim measured against its threshold; absent = did not hold before its "
               "declared formation step (as expected); EARLY = held before it; n.e. = not evaluated (see -rs for why)")
    return "\n".join(out)
