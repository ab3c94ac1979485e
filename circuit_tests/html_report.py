"""Self-contained HTML report (and the GitHub step-summary markdown) from result records.

Why one file: a CI artifact must open by double-click, without a server or network — styles are inline and
plots are embedded as base64 PNG (when matplotlib is installed). Per spec: the checkpoint × claim table
(outcome colours, cache and comparison markers), the plot, the details of every failing or uncertain claim
(measured value, interval, baseline, other ablations), and the spec text; then provenance (environment,
weights sha256 per checkpoint). No timestamps: the same records give the same page (shards merged = one run).

Every value from records, files or the environment reaches the page through ``text`` (HTML) or ``md`` (markdown)
and nowhere else: a results file is data from elsewhere (a CI shard, a colleague), and a spec name, reason or
baseline entry must never become markup. Counts use ``results.count_line``: pytest's words, as the terminal does.
"""

from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path
from typing import Any

from .cache import reused
from .compare import Change, item_key, summary
from .results import Record, by_spec, checkpoint_order, count_line

def verdict(r: Record) -> str:
    """pass | fail | uncertain | not_evaluated | error, after the expectation (absent before holds_from)."""
    return r.verdict or r.measured


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#212121}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left;white-space:nowrap}
th{background:#f5f5f5}
td.pass{background:#e8f5e9}td.fail{background:#ffcdd2;font-weight:bold}td.uncertain{background:#fff3cd}
td.not_evaluated{background:#eeeeee;color:#757575}td.absent{background:#e3f2fd}
td.flipped{outline:3px solid #d50000}td.moved{outline:2px dashed #ef6c00}
pre{background:#fafafa;border:1px solid #e0e0e0;padding:.6em;overflow-x:auto;font-size:.8em}
img{max-width:100%;border:1px solid #eee}.muted{color:#757575;font-size:.85em}
"""


def _f(x: Any) -> str:
    """A value as plain text (not yet escaped): None as —, floats to 4 significant digits."""
    return "—" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))


def text(x: Any) -> str:
    """The one way a value enters the page, as element text or attribute value: formatted (``_f``) and
    HTML-escaped, quotes included."""
    return html.escape(_f(x), quote=True)


def _td(x: Any, cls: str | None = None, title: Any = None) -> str:
    attrs = (f' class="{text(cls)}"' if cls else "") + (f' title="{text(title)}"' if title is not None else "")
    return f"<td{attrs}>{text(x)}</td>"


def _th(x: Any) -> str:
    return f"<th>{text(x)}</th>"


def md(x: Any) -> str:
    """The one way a value enters the markdown summary (a table cell or a line): ``&``, ``<``, ``>`` as entities
    (GitHub renders inline HTML), ``|`` as ``&#124;`` (it would end the cell), newlines as spaces (they would end the
    row)."""
    s = _f(x).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "&#124;")
    return " ".join(s.splitlines())


def _plot_png(recs: list[Record]) -> bytes | None:
    """The spec's plot as PNG bytes, or None without matplotlib (or with nothing measured)."""
    try:
        from .plot import plot_results, require_matplotlib

        require_matplotlib()
    except Exception:
        return None
    with tempfile.TemporaryDirectory(prefix="circuit-report-") as d:
        paths = plot_results(recs, d)
        return paths[0].read_bytes() if paths else None


def _cell_text(r: Record, ch: Change | None) -> str:
    """A table cell as the terminal shows it, ``*`` when reused from the cache, plus the change marker."""
    return r.cell + ("*" if reused(r) else "") + (ch.marker() if ch else "")


def _cell_class(r: Record, ch: Change | None) -> str:
    v = verdict(r)
    cls = ["absent" if (r.expected == "absent" and v == "pass") else ("fail" if v == "error" else v)]
    if ch is not None and ch.flipped:
        cls.append("flipped")
    elif ch is not None and ch.moved:
        cls.append("moved")
    return " ".join(cls)


def _detail(r: Record, ch: Change | None) -> str:
    """Failure / uncertainty details (the same facts as the pytest failure message)."""
    x = r.extra
    rows = [("where", f"{r.spec_file}:{r.line}"), ("verdict", f"{verdict(r)} (measured {r.measured}; expected {r.expected}; pytest: {r.outcome})"),
            ("reason", r.reason), ("value", _f(r.value)),
            ("threshold", f">= {_f(r.threshold_min)}" + (f", <= {_f(r.threshold_max)}" if r.threshold_max is not None else ""))]
    if r.ci_low is not None:
        rows.append(("interval", f"[{_f(r.ci_low)}, {_f(r.ci_high)}] ({x.get('ci_method')}, level {x.get('ci_level')}, "
                                 f"{x.get('ci_resamples')} resamples, seed {x.get('ci_seed')}; gate {x.get('gate', 'point')})"))
    if r.m_M is not None:
        rows.append(("m(M), m(M'), m(C)", f"{_f(r.m_M)}, {_f(r.m_Mprime)}, {_f(r.m_C)} ({r.metric}, {r.normalization}, ablation {r.ablation})"))
    if "baseline" in x:
        b = x["baseline"]
        rows.append(("random baseline", f"k={b.get('k')} ({b.get('match')}), p50 {_f(b.get('p50'))}, p95 {_f(b.get('p95'))}, "
                                        f"quantile {_f(b.get('quantile'))}, margin over {b.get('require')} {_f(b.get('margin'))}"))
    for ab, o in (x.get("ablations") or {}).items():
        rows.append((f"under {ab} ablation", f"{_f(o.get('value'))} [{_f(o.get('ci_low'))}, {_f(o.get('ci_high'))}] "
                                             f"({o.get('outcome')}; recorded, not gated)"))
    if ch is not None and ch.describe():
        rows.append(("since compared run", ch.describe()))
    body = "".join(f"<tr>{_th(k)}{_td(v)}</tr>" for k, v in rows)
    return f"<h4>{text(r.claim)} @ {text(r.checkpoint)}</h4><table>{body}</table>"


def _sensitivity(recs: list[Record]) -> str:
    """Ablation-sensitivity table: claims with ``ablations:``, value per ablation and checkpoint."""
    rows = [r for r in recs if r.extra.get("ablations")]
    if not rows:
        return ""
    abls = list(dict.fromkeys(a for r in rows for a in r.extra["ablations"]))
    head = "".join(map(_th, abls))
    body = ""
    for r in sorted(rows, key=lambda r: (r.claim, r.step if r.step is not None else -1)):
        cells = "".join(_td(r.extra["ablations"].get(a, {}).get("value")) for a in abls)
        body += f"<tr>{_td(r.claim)}{_td(r.checkpoint)}{_td(f'{_f(r.value)} ({_f(r.ablation)}, gated)')}{cells}</tr>"
    return (f"<h3>Ablation sensitivity</h3><table><tr><th>claim</th><th>checkpoint</th><th>gated value</th>{head}</tr>"
            f"{body}</table>")


def _baselines(recs: list[Record]) -> str:
    rows = [r for r in recs if r.extra.get("baseline")]
    if not rows:
        return ""
    body = ""
    for r in sorted(rows, key=lambda r: (r.claim, r.step if r.step is not None else -1)):
        b = r.extra["baseline"]
        cells = (r.claim, r.checkpoint, r.value, b.get("p50"), b.get("p95"), b.get("quantile"), b.get("margin"), b.get("beats"))
        body += "<tr>" + "".join(map(_td, cells)) + "</tr>"
    return ("<h3>Random-circuit baselines</h3><table><tr><th>claim</th><th>checkpoint</th><th>value</th><th>baseline p50</th>"
            f"<th>baseline p95</th><th>quantile</th><th>margin</th><th>beats</th></tr>{body}</table>")


def _spec_section(key: tuple[str, str], recs: list[Record], changes: dict, plots: bool) -> str:
    spec_file, name = key
    claims = list(dict.fromkeys(r.claim for r in sorted(recs, key=lambda r: r.line)))
    ckpts = checkpoint_order(recs)
    at = {(r.checkpoint, r.claim): r for r in recs}
    first = recs[0]
    out = [f'<h2 id="{text(name)}">{text(name)}</h2>',
           f'<p class="muted">{text(spec_file)} · model {text(first.model)} · ablation {text(first.ablation)}</p>',
           f"<p>{text(count_line(recs))}</p>"]
    body = []
    for ck in ckpts:
        tds = []
        for c in claims:
            r = at.get((ck, c))
            if r is None:
                tds.append("<td></td>")
                continue
            ch = changes.get(item_key(r))
            tds.append(_td(_cell_text(r, ch), cls=_cell_class(r, ch), title=r.reason or verdict(r)))
        body.append(f"<tr>{_th(ck)}{''.join(tds)}</tr>")
    out.append(f"<table><tr>{_th('checkpoint')}{''.join(map(_th, claims))}</tr>{''.join(body)}</table>")
    png = _plot_png(recs) if plots else None
    if png:
        out.append(f'<img alt="{text(f"{name} claims across checkpoints")}" src="data:image/png;base64,'
                   f'{base64.b64encode(png).decode()}">')
    out.append(_sensitivity(recs))
    out.append(_baselines(recs))
    bad = [r for r in recs if verdict(r) in ("fail", "uncertain", "error")]
    if bad:
        out.append("<h3>Failures and uncertain claims</h3>")
        out += [_detail(r, changes.get(item_key(r))) for r in sorted(bad, key=lambda r: (r.step or -1, r.line))]
    try:
        spec_text = Path(spec_file).read_text(encoding="utf-8")
        out.append(f"<details><summary>spec file</summary><pre>{text(spec_text)}</pre></details>")
    except (OSError, UnicodeDecodeError, ValueError):  # moved, unreadable, or a path with a NUL byte
        out.append(f'<p class="muted">spec file not found at {text(spec_file)} (report written elsewhere)</p>')
    return "\n".join(out)


def _provenance(records: list[Record], environment: dict[str, Any] | None) -> str:
    rows = sorted({(r.model, r.checkpoint, r.step if r.step is not None else -1, r.weights_sha256 or "—",
                    r.duplicate_of or "") for r in records}, key=lambda t: (t[0], t[2], t[1]))
    body = "".join(f"<tr>{_td(m)}{_td(ck)}<td><code>{text(sha)}</code></td>{_td(dup)}</tr>" for m, ck, _, sha, dup in rows)
    env = "".join(f"<tr>{_th(k)}{_td(v)}</tr>" for k, v in sorted((environment or {}).items()))
    return (f"<h2>Provenance</h2><table>{env}</table><table><tr><th>model</th><th>checkpoint</th><th>weights sha256</th>"
            f"<th>duplicate of</th></tr>{body}</table>")


def render_html(records: list[Record], changes: dict | None = None, environment: dict[str, Any] | None = None,
                plots: bool = True, title: str = "circuit_tests report") -> str:
    """The whole page as one string."""
    changes = changes or {}
    groups = by_spec(records)
    toc = "".join(f'<li><a href="#{text(name)}">{text(name)}</a></li>' for _, name in groups)
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{text(title)}</title>"
             f"<style>{_CSS}</style></head><body>", f"<h1>{text(title)}</h1>",
             f"<p>{text(count_line(records))} ({len(records)} results)</p>", f"<ul>{toc}</ul>"]
    lines = summary(changes)
    if lines:
        parts.append("<h2>Changes since the compared run</h2><pre>" + text("\n".join(lines)) + "</pre>")
    parts += [_spec_section(k, v, changes, plots) for k, v in groups.items()]
    parts.append(_provenance(records, environment))
    parts.append('<p class="muted">counts: pytest outcomes, as in the terminal and the JSON counts; cells: pass/FAIL '
                 "value; absent = not yet formed, as declared (pytest: xfailed); EARLY = held before its declared step; "
                 "unc. = uncertain (interval straddles the threshold); n.e. = not evaluated; ERROR = could not be "
                 "evaluated; * = reused from the cache; ! = verdict flipped, ~ = value moved, + = new since the "
                 "compared run</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(records: list[Record], out_dir: str | Path, changes: dict | None = None,
                 environment: dict[str, Any] | None = None, plots: bool = True, threads: int | None = None) -> Path:
    """Write ``out_dir/index.html`` and return its path. ``environment``: the provenance to show (a results file's
    ``environment``); by default this process's ``results.run_environment(threads)``, the one a results file
    written by the same run records, so both routes to a page show the same rows."""
    if environment is None:
        from .results import run_environment

        environment = run_environment(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "index.html"
    path.write_text(render_html(records, changes, environment, plots), encoding="utf-8")
    return path


def markdown_summary(records: list[Record], changes: dict | None = None) -> str:
    """A GitHub step summary: one markdown table per spec (checkpoints × claims) plus the changed items."""
    changes = changes or {}
    out = ["## circuit_tests", ""]
    for (spec_file, name), recs in by_spec(records).items():
        claims = list(dict.fromkeys(r.claim for r in sorted(recs, key=lambda r: r.line)))
        at = {(r.checkpoint, r.claim): r for r in recs}
        out += [f"### {md(name)}", "", f"{md(spec_file)} · {md(recs[0].model)} · {md(count_line(recs))}", "",
                "| checkpoint | " + " | ".join(map(md, claims)) + " |", "|---" * (len(claims) + 1) + "|"]
        for ck in checkpoint_order(recs):
            cells = []
            for c in claims:
                r = at.get((ck, c))
                if r is None:
                    cells.append("")
                    continue
                ch = changes.get(item_key(r))
                t = md(_cell_text(r, ch))
                cells.append(f"**{t}**" if verdict(r) in ("fail", "error") or (ch and ch.flipped) else t)
            out.append(f"| {md(ck)} | " + " | ".join(cells) + " |")
        out.append("")
    lines = summary(changes)
    if lines:
        out += ["### Changes since the compared run", ""] + [f"- {md(line)}" for line in lines] + [""]
    return "\n".join(out) + "\n"


def environment_of(path: str | Path) -> dict[str, Any]:
    """The ``environment`` block of a results file (for reports drawn from a file, not this process), validated
    like the rest of the file (CircuitTestsError naming the file and the field otherwise)."""
    from .results import read_results

    return read_results(path).environment
