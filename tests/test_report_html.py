"""HTML report, comparison markers, GitHub step summary and JUnit output (parsed, not eyeballed)."""

from __future__ import annotations

import base64
import json
import shutil
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

# Heavy modules are imported before pytester's in-process runs snapshot sys.modules (see test_plugin.py).
import circuit_tests.collect  # noqa: F401,E402
import circuit_tests.engine  # noqa: F401,E402
import circuit_tests.sources  # noqa: F401,E402
import circuit_tests.tasks  # noqa: F401,E402
import transformer_lens.model_bridge  # noqa: F401,E402
from circuit_tests.compare import compare  # noqa: E402
from circuit_tests.html_report import markdown_summary, render_html  # noqa: E402
from circuit_tests.results import Record  # noqa: E402

ZOO = Path(circuit_tests.sources.__file__).resolve().parent / "zoo" / "models" / "induction"


class Page(HTMLParser):
    """Collects what the tests check: headings, table cells (class, text), images, external references."""

    def __init__(self) -> None:
        super().__init__()
        self.h2: list[str] = []
        self.cells: list[tuple[str, str]] = []
        self.imgs: list[str] = []
        self.external: list[str] = []
        self.tables = 0
        self._tag: list[str] = []
        self._cls = ""
        self._text = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ("src", "href"):
            v = a.get(k) or ""
            if v and not v.startswith(("data:", "#")):
                self.external.append(v)
        if tag in ("script", "link", "iframe"):
            self.external.append(tag)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "table":
            self.tables += 1
        self._tag.append(tag)
        self._cls, self._text = a.get("class", "") or "", ""

    def handle_endtag(self, tag):
        if tag == "h2":
            self.h2.append(self._text.strip())
        if tag == "td" and self._cls:
            self.cells.append((self._cls, self._text.strip()))
        if self._tag:
            self._tag.pop()

    def handle_data(self, data):
        self._text += data


def _rec(spec: str, ck: int, claim: str, verdict: str, value: float | None, **kw) -> Record:
    outcome = {"pass": "passed", "fail": "failed", "uncertain": "skipped", "not_evaluated": "skipped"}[verdict]
    r = Record(spec=spec, spec_file=kw.pop("spec_file", f"/nowhere/{spec}.circuit.yaml"), line=5, model="zoo:m",
               checkpoint=f"step{ck}", step=ck, claim=claim, claim_type="faithfulness", outcome=outcome,
               measured=verdict, verdict=verdict, value=value, threshold_min=0.8, ci_low=None if value is None else value - 0.05,
               ci_high=None if value is None else value + 0.05, reason="" if verdict == "pass" else f"{verdict} here")
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def _records(tmp_path: Path) -> list[Record]:
    spec_file = tmp_path / "alpha.circuit.yaml"
    spec_file.write_text("name: alpha\n# the spec text <b>escaped</b>\n")
    return [
        _rec("alpha", 0, "faith", "pass", 0.95, spec_file=str(spec_file),
             extra={"ablations": {"mean": {"value": 0.7, "outcome": "fail"}, "zero": {"value": 0.4, "outcome": "fail"}},
                    "baseline": {"k": 20, "match": "nodes", "p50": 0.2, "p95": 0.6, "quantile": 1.0, "margin": 0.35,
                                 "require": "p95", "beats": "pass", "values": [0.1] * 20}}),
        _rec("alpha", 100, "faith", "fail", 0.5, spec_file=str(spec_file)),
        _rec("alpha", 100, "other", "uncertain", 0.81, spec_file=str(spec_file), extra={"cache": "reused"}),
        _rec("beta", 0, "faith", "not_evaluated", None),
    ]


def test_every_spec_its_table_failures_and_spec_text_appear_self_contained(tmp_path):
    recs = _records(tmp_path)
    text = render_html(recs, environment={"torch": "2.x", "code_sha256": "abc"})
    page = Page()
    page.feed(text)
    assert {"alpha", "beta"} <= set(page.h2) and "Provenance" in page.h2
    assert page.external == []                                   # opens without a server or network
    classes = dict((t, c) for c, t in page.cells)
    assert classes["pass 0.95"] == "pass" and classes["FAIL 0.5"] == "fail" and classes["unc. 0.81*"] == "uncertain"
    assert classes["n.e."] == "not_evaluated"
    assert "fail here" in text and "uncertain here" in text       # failure details
    assert "&lt;b&gt;escaped&lt;/b&gt;" in text                   # spec text, escaped
    assert "Ablation sensitivity" in text and "Random-circuit baselines" in text
    assert "spec file not found at /nowhere/beta.circuit.yaml" in text


def test_plots_are_inline_png(tmp_path):
    pytest.importorskip("matplotlib")
    page = Page()
    page.feed(render_html(_records(tmp_path), environment={}))
    assert page.imgs, "no plot embedded"
    for src in page.imgs:
        head, data = src.split(",", 1)
        assert head == "data:image/png;base64" and base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_marks_flips_and_moves_in_page_table_and_markdown(tmp_path):
    new = _records(tmp_path)
    old = [_rec("alpha", 0, "faith", "pass", 0.90), _rec("alpha", 100, "faith", "pass", 0.85)]  # 100 flipped; 0 moved
    changes = compare(old, new, tolerance=0.02)
    assert changes[("alpha", "step100", "faith")].flipped and changes[("alpha", "step0", "faith")].moved
    assert not changes[("alpha", "step0", "faith")].flipped and changes[("alpha", "step100", "other")].marker() == "+"
    assert compare(old, new, tolerance=0.1)[("alpha", "step0", "faith")].marker() == ""   # within tolerance
    page = Page()
    page.feed(render_html(new, changes, environment={}))
    cells = dict((t, c) for c, t in page.cells)
    assert cells["FAIL 0.5!"] == "fail flipped" and cells["pass 0.95~"] == "pass moved"
    from circuit_tests.report import table

    t = table(new, changes)
    assert "FAIL 0.5!" in t and "pass 0.95~" in t and "unc. 0.81*+" in t
    md = markdown_summary(new, changes)
    assert "| checkpoint | faith | other |" in md and "**FAIL 0.5!**" in md and "pass -&gt; fail" in md  # > as an entity


SPEC = """\
name: induction-report
model:
  source: ./models
task:
  name: induction
  size: 16
  seed: 0
  seq_len: 12
  prepend_bos: true
circuit:  # nodes, not roles: roles with a criterion would add role_check items (docs/roles.md)
  nodes: [a0.h3, a0.h2, a1.h0, a1.h1, a1.h2, a1.h3]
claims:
  - type: faithfulness
    id: faith
    normalization: normalized
    min: 0.8
  - type: faithfulness
    id: impossible
    normalization: normalized
    min: 0.5
    max: 0.6
"""


def test_plugin_writes_report_summary_compare_and_valid_junit(pytester, monkeypatch):
    shutil.copytree(ZOO / "step3000", pytester.path / "models" / "step3000")
    pytester.makefile(".circuit.yaml", spec=SPEC)
    summary = pytester.path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    first = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--circuit-json", "old.json")
    first.assert_outcomes(passed=1, failed=1)
    old = json.loads((pytester.path / "old.json").read_text())
    for r in old["records"]:  # pretend the last green run had `impossible` passing and `faith` 0.1 lower
        if r["claim"] == "impossible":
            r.update(verdict="pass", measured="pass", outcome="passed")
        else:
            r["value"] -= 0.1
    (pytester.path / "old.json").write_text(json.dumps(old))
    res = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--circuit-report", "rep", "--circuit-compare", "old.json",
                                       "--junitxml", "junit.xml", "-o", "junit_family=xunit2")
    out = res.stdout.str()
    assert "changed: induction-report @ step3000: impossible: pass -> fail" in out
    assert "FAIL" in out and "!" in out and "~" in out
    html = (pytester.path / "rep" / "index.html").read_text()
    page = Page()
    page.feed(html)
    assert "induction-report" in page.h2 and any("flipped" in c for c, _ in page.cells)
    md = summary.read_text()
    assert md.count("### induction-report") == 2 and "| checkpoint | faith | impossible |" in md
    # JUnit xunit2 (pytest's default): a testcase holds only skipped/error/failure/system-out/system-err
    root = ET.parse(pytester.path / "junit.xml").getroot()
    cases = root.findall(".//testcase")
    assert len(cases) == 2
    for tc in cases:
        assert {child.tag for child in tc} <= {"skipped", "error", "failure", "system-out", "system-err"}
    assert "circuit_tests_record" not in (pytester.path / "junit.xml").read_text()


_BROWSER_HARNESS = """<!DOCTYPE html><html><head><meta charset="utf-8"></head><body><pre id="out">not loaded</pre>
<iframe id="f" src="index.html" width="1200" height="900"></iframe>
<script>
document.getElementById('f').addEventListener('load', function () {
  var d = this.contentDocument, r = {};
  r.title = d.title;
  r.h2 = Array.from(d.querySelectorAll('h2')).map(function (h) { return h.textContent; });
  r.rows = Array.from(d.querySelectorAll('table')).map(function (t) { return t.rows.length; });
  r.imgs = Array.from(d.images).map(function (i) { return [i.complete, i.naturalWidth, i.naturalHeight]; });
  r.failCells = d.querySelectorAll('td.fail').length;
  r.height = d.body.scrollHeight;
  r.resources = performance.getEntriesByType('resource').length
    + this.contentWindow.performance.getEntriesByType('resource').length;
  document.getElementById('out').textContent = JSON.stringify(r);
});
</script></body></html>
"""


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no chromium on PATH (Debian: apt-get install chromium); .ci/run installs it")
def test_report_renders_in_headless_chromium(tmp_path):
    """The page as a browser sees it: every spec, its table rows, and each inline plot decoded to a real image.

    A harness page next to the report loads it in an iframe (file:// access allowed by a flag) and writes what the
    DOM holds into its own <pre>, which ``--dump-dom`` prints after the page's load event.
    """
    import re
    import subprocess

    from circuit_tests.html_report import write_report

    plots = True
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plots = False
    report = write_report(_records(tmp_path), tmp_path / "report", environment={"torch": "2.x"}, plots=plots)
    harness = report.parent / "harness.html"
    harness.write_text(_BROWSER_HARNESS, encoding="utf-8")
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--allow-file-access-from-files",
           "--virtual-time-budget=10000", "--dump-dom", harness.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="out">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"chromium printed no DOM (rc {proc.returncode}): {proc.stderr[-2000:]}"
    seen = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert seen["title"] == "circuit_tests report"
    assert {"alpha", "beta", "Provenance"} <= set(seen["h2"])
    assert seen["failCells"] == 1                                  # the one failing cell, styled as a failure
    assert seen["rows"] and min(seen["rows"]) >= 1 and seen["height"] > 500
    if plots:
        assert len(seen["imgs"]) == 1                              # alpha's plot; beta has no value to draw
    assert all(ok and w > 100 and h > 100 for ok, w, h in seen["imgs"]), seen["imgs"]
    assert seen["resources"] == 0                                  # nothing fetched: opens without a network


# --- issue 19: every value from a results file is escaped in one place; the reports count alike ---------------

PAYLOADS = ["<script>alert(1)</script>", '"><script>alert(1)</script>', "' onmouseover='alert(1)' x='",
            "a & b </td></tr></table><script>alert(1)</script>", "$\\frac{<script>$|pipe\nnewline"]
LITERALS = {"outcome", "measured", "expected", "verdict"}        # checked words: a file with others is rejected
MAPS = {"ablations", "per_head", "effects", "environment"}        # their keys are names from elsewhere too
ALLOWED_ATTRS = {"lang", "charset", "id", "href", "class", "title", "alt", "src"}


def _hostile(obj, n, key=None):
    """Every string in ``obj`` (values, and the keys of name→entry maps) replaced by a payload, round robin."""
    if isinstance(obj, str):
        n[0] += 1
        return PAYLOADS[n[0] % len(PAYLOADS)]
    if isinstance(obj, list):
        return [_hostile(v, n) for v in obj]
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k in LITERALS:
                out[k] = v
                continue
            new_key = _hostile(k, n) if key in MAPS else k
            out[new_key] = _hostile(v, n, k)
        return out
    return obj


class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.starts: list[tuple[str, dict]] = []
        self.data = ""

    def handle_starttag(self, tag, attrs):
        self.starts.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.data += data


def _hostile_file(tmp_path: Path) -> Path:
    from circuit_tests.results import write_json

    recs = _records(tmp_path)
    recs[0].extra.update({"per_head": {"a1.h0": {"earned": False, "why": "w"}, "a1.h1": 0.5}, "effects": {"a0.h3": 0.1},
                          "warnings": ["dangling: m0"], "gate": "ci", "ci_method": "bca"})
    recs[0].extra["ablations"]["mean"]["reason"] = "r"
    for r in recs:
        r.metric, r.normalization, r.ablation, r.weights_sha256, r.duplicate_of = "m", "n", "a", "sha", "dup"
    p = tmp_path / "plain.json"
    write_json(recs, p, environment={"torch": "2.x", "code_sha256": "abc", "nested": {"list": ["x"]}})
    doc = _hostile(json.loads(p.read_text()), [0])
    out = tmp_path / "hostile.json"
    out.write_text(json.dumps(doc))
    return out


def _assert_inert(page_text: str) -> None:
    t = Tags()
    t.feed(page_text)
    assert [tag for tag, _ in t.starts if tag in ("script", "iframe", "object", "embed", "svg")] == []
    for tag, attrs in t.starts:
        assert set(attrs) <= ALLOWED_ATTRS, (tag, attrs)           # no attribute broke out of its quotes
    assert "<script>alert(1)</script>" in t.data                   # shown, as text


def test_every_string_of_a_hostile_results_file_is_text_in_page_and_summary(tmp_path, capsys):
    from circuit_tests.cli import main

    bad = _hostile_file(tmp_path)
    plots = True
    try:
        import matplotlib  # noqa: F401  (plots: alt text, and $...$ in names is not mathtext)
    except ImportError:
        plots = False
    args = ["report", str(bad), "--html", str(tmp_path / "html"), "--markdown", str(tmp_path / "s.md")]
    assert main(args + ([] if plots else ["--no-plots"])) == 0, capsys.readouterr().err
    page = (tmp_path / "html" / "index.html").read_text()
    _assert_inert(page)
    if plots:
        assert "<img alt=" in page                                   # alt text escaped, plot drawn
    assert page.count("Random-circuit baselines") == 1 and "Ablation sensitivity" in page and "Provenance" in page
    md = (tmp_path / "s.md").read_text()
    assert "<" not in md and ">" not in md, md                     # tags and quote breaks only as entities
    header = ""
    for line in md.splitlines():
        header = line if line.startswith("| checkpoint") else header
        if line.startswith("| "):
            assert line.count("|") == header.count("|"), line   # no | inside a cell, no newline in a row


def test_literal_fields_set_by_hand_are_escaped_too(tmp_path):
    """Records built in code skip the reader: the words that become class names and counts are escaped as well."""
    recs = _records(tmp_path)
    for r in recs:
        r.verdict = r.measured = r.outcome = '"><script>alert(1)</script>'
    _assert_inert(render_html(recs, environment={}, plots=False))


def test_page_terminal_and_json_count_the_same_outcomes(tmp_path):
    from circuit_tests.report import table
    from circuit_tests.results import count_line, counts, write_json

    recs = _records(tmp_path)
    recs.append(_rec("alpha", 200, "faith", "pass", 0.3, spec_file=recs[0].spec_file, expected="absent",
                     outcome="xfailed"))
    line = count_line(recs)
    assert line == "1 passed, 1 failed, 1 xfailed, 2 skipped, 1 reused"
    write_json(recs, tmp_path / "r.json", environment={})
    from_json = json.loads((tmp_path / "r.json").read_text())["counts"]
    words = {w: int(n) for n, w in (part.split(" ") for part in line.split(", "))}
    assert from_json == counts(recs) == {k: words.get(k, 0) for k in from_json} and words["reused"] == 1
    page = render_html(recs, environment={}, plots=False)
    assert f"<p>{line} (5 results)</p>" in page
    for spec_recs in ([r for r in recs if r.spec == "alpha"], [r for r in recs if r.spec == "beta"]):
        part = count_line(spec_recs)
        assert f"<p>{part}</p>" in page and f"  {part}\n" in table(recs) + "\n" and part in markdown_summary(recs)
    assert not any(f" {w}," in page or f" {w}<" in page for w in ("pass", "uncertain", "not_evaluated"))


def _provenance_rows(html_text: str) -> list[tuple[str, str]]:
    part = html_text[html_text.index("<h2>Provenance</h2>"):]
    part = part[:part.index("</table>")]
    return [(th.split("</th>")[0], th.split("<td>")[1].split("</td>")[0]) for th in part.split("<th>")[1:]]


def test_pytest_report_and_cli_report_show_the_same_provenance(pytester):
    from circuit_tests.cli import main

    shutil.copytree(ZOO / "step3000", pytester.path / "models" / "step3000")
    pytester.makefile(".circuit.yaml", spec=SPEC)
    pytester.runpytest_inprocess("-p", "no:cacheprovider", "--circuit-json", "r.json", "--circuit-report", "run")
    assert main(["report", str(pytester.path / "r.json"), "--html", str(pytester.path / "cli"), "--no-plots"]) == 0
    run = _provenance_rows((pytester.path / "run" / "index.html").read_text())
    cli = _provenance_rows((pytester.path / "cli" / "index.html").read_text())
    assert run == cli and {"code_sha256", "circuit_tests", "threads", "torch"} <= {k for k, _ in run}
