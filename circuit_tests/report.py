"""End-of-run reports from result records: the terminal table (spec × checkpoint × claim)."""

from __future__ import annotations

from .results import Record, by_spec, checkpoint_order, count_line, short_path


def table(records: list[Record], changes: dict | None = None) -> str:
    """One block per spec: rows are checkpoints (training order), columns are claims, cells outcome + value.

    Suffixes: ``*`` result reused from the cache (--circuit-cache); with ``changes`` (compare.compare against
    --circuit-compare OLD.json) ``!`` outcome flipped, ``~`` value moved beyond the tolerance, ``+`` new item."""
    from .cache import reused
    from .compare import item_key

    changes = changes or {}

    def mark(r: Record) -> str:
        ch = changes.get(item_key(r))
        return r.cell + ("*" if reused(r) else "") + (ch.marker() if ch else "")

    out: list[str] = []
    for (path, name), recs in by_spec(records).items():
        claims = list(dict.fromkeys(r.claim for r in sorted(recs, key=lambda r: r.line)))
        ckpts = checkpoint_order(recs)
        cell = {(r.checkpoint, r.claim): mark(r) for r in recs}
        first = recs[0]
        out.append(f"{name}  ({short_path(path)}; {first.model}; ablation {first.ablation})")
        w0 = max([len("checkpoint")] + [len(c) for c in ckpts])
        widths = [max(len(c), *(len(cell.get((ck, c), "")) for ck in ckpts)) for c in claims]
        out.append("  " + "checkpoint".ljust(w0) + "  " + "  ".join(c.ljust(w) for c, w in zip(claims, widths)))
        for ck in ckpts:
            out.append("  " + ck.ljust(w0) + "  " + "  ".join(cell.get((ck, c), "").ljust(w) for c, w in zip(claims, widths)))
        out.append("  " + count_line(recs))  # pytest's words: they add up to pytest's own summary line
        out.append("")
    out.append("cells: pass/FAIL value = claim measured against its threshold; absent = did not hold before its "
               "declared formation step (as expected, pytest: xfailed); EARLY = held before it; n.e. = not evaluated (see -rs "
               "for why); ERROR = the checkpoint or claim could not be evaluated (see the failure)"
               + "; unc. = uncertain (gate: ci, the interval straddles the threshold)"
               + ("; * = reused from the cache" if any(map(reused, records)) else "")
               + ("; ! = outcome flipped, ~ = value moved, + = new, since the compared run" if changes else ""))
    return "\n".join(out)
