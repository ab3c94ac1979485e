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
    assert "| checkpoint | faith | other |" in md and "**FAIL 0.5!**" in md and "pass -> fail" in md


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
circuit:
  roles:
    previous_token: [a0.h3, a0.h2]
    induction: [a1.h0, a1.h1, a1.h2, a1.h3]
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
