"""The report in a real browser (headless Chromium, network offline): sections, charts, no requests, no errors.

Skipped when no Chromium is installed (``.ci/run`` installs Debian's ``chromium`` when missing).
"""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageStat

from bitnet_coreml.report.browser import DESKTOP, PHONE, Chromium, find_browser
from tests.report.conftest import Built

pytestmark = pytest.mark.skipif(find_browser() is None,
                                reason="no Chromium on PATH (apt-get install chromium; .ci/run does it)")

SECTIONS = ("summary", "units", "fp16", "parity", "size", "timing")

# Per section: how many <svg> charts and how many drawn shapes (paths, uses) each holds.
_DOM = """JSON.stringify(Array.from(document.querySelectorAll('[data-section]')).map(s => ({
  id: s.dataset.section,
  explain: (s.querySelector('p.explain') || {}).textContent || '',
  charts: Array.from(s.querySelectorAll('svg')).map(g => ({
     shapes: g.querySelectorAll('path, use, rect').length,
     w: g.getBoundingClientRect().width, h: g.getBoundingClientRect().height })),
  unavailable: s.querySelectorAll('p.unavailable').length })))"""


def _not_blank(png: bytes) -> None:
    im = Image.open(io.BytesIO(png)).convert("RGB")
    colors = im.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50, "screenshot has almost no distinct colours"
    assert max(ImageStat.Stat(im).stddev) > 20, "screenshot is (nearly) one flat colour"


@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["phone", "desktop"])
def test_report_in_headless_chromium(built: Built, viewport: tuple[int, int, bool]) -> None:
    import json

    width, height, mobile = viewport
    with Chromium() as b:
        b.viewport(width, height, mobile)
        b.open(built.html)
        sections = json.loads(b.evaluate(_DOM))
        overflow = b.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        png = b.screenshot()
        full = b.screenshot(full_page=True)
        # nothing may leave the page: the only request is the file itself
        assert b.record.requests == [built.html.resolve().as_uri()]
        assert b.record.errors == [], b.record.errors
        assert not [c for c in b.record.console if c.startswith(("error", "warning"))]
    assert [s["id"] for s in sections] == list(SECTIONS)
    for s in sections:
        assert s["explain"].strip(), f"section {s['id']} has no explanation"
        assert s["unavailable"] == 0, f"section {s['id']} says it has no data"
        assert s["charts"], f"section {s['id']} has no chart"
        for c in s["charts"]:
            assert c["shapes"] >= 3 and c["w"] > 100 and c["h"] > 30, f"empty chart in {s['id']}: {c}"
    assert overflow <= 0, f"the page is {overflow}px wider than a {width}px screen"
    _not_blank(png)
    _not_blank(full)
    assert Image.open(io.BytesIO(png)).size == (width, height)


def test_print_layout_keeps_every_section(built: Built) -> None:
    """Printing (print media) shows every section and chart, unclipped."""
    import base64

    with Chromium() as b:
        b.viewport(*DESKTOP)
        b.open(built.html)
        b.call("Emulation.setEmulatedMedia", {"media": "print"})
        n = b.evaluate("document.querySelectorAll('section svg').length")
        pdf = base64.b64decode(b.call("Page.printToPDF", {})["data"])
    assert n >= 6 and pdf.startswith(b"%PDF") and len(pdf) > 20_000


def test_units_chart_gives_each_ops_reason_on_hover(built: Built) -> None:
    """Every compute-unit cell carries its op and reason (an SVG <title>, the browser's tooltip; no script), in
    the order of the JSON's ops; hovering a cell with the mouse outlines that cell."""
    expected = [f"{row['layer']}: {op['node']} ({op['op_type']}) on {op['unit']}: {op['reason']}"
                for row in built.data["units"]["layers"] for op in row["ops"] if op["unit"] in ("ANE", "GPU", "CPU")]
    k = len(expected) // 2
    with Chromium() as b:
        b.viewport(*DESKTOP)
        b.open(built.html)
        titles = b.evaluate("Array.from(document.querySelectorAll('#unit-grid > path > title')).map(t => t.textContent)")
        x, y = b.evaluate(f"(() => {{ const p = document.querySelectorAll('#unit-grid > path')[{k}]; "
                          "p.scrollIntoView({block: 'center'}); const r = p.getBoundingClientRect(); "
                          "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        b.call("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        hovered = b.evaluate("Array.from(document.querySelectorAll('#unit-grid > path:hover'))"
                             ".map(p => [p.querySelector('title').textContent, getComputedStyle(p).strokeWidth])")
        assert b.record.errors == [] and b.record.requests == [built.html.resolve().as_uri()]
    assert len(expected) > 100 and titles == expected
    assert [h[0] for h in hovered] == [expected[k]]
    assert hovered[0][1].startswith("1.5")  # the outline of the hovered cell (the page's CSS)


def test_chunked_folder_report_in_headless_chromium(chunked: Built) -> None:
    """A chunked model folder's page: the pieces table before the usual sections, each of those with its chart."""
    import json

    with Chromium() as b:
        b.viewport(*DESKTOP)
        b.open(chunked.html)
        sections = json.loads(b.evaluate(_DOM))
        rows = b.evaluate("document.querySelectorAll('[data-table=pieces] tr[data-piece]').length")
        assert b.record.requests == [chunked.html.resolve().as_uri()]
        assert b.record.errors == [], b.record.errors
        _not_blank(b.screenshot())
    assert [s["id"] for s in sections] == ["summary", "pieces", *SECTIONS[1:]]
    assert rows == 2
    for s in sections:
        assert s["explain"].strip() and s["unavailable"] == 0, s["id"]
        assert s["id"] == "pieces" or s["charts"], f"section {s['id']} has no chart"
