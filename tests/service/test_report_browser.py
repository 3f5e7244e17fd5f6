"""The evaluation report's index.html in a real browser: Debian's headless Chromium loads the page written
from a metric-library result on the demo model; the DOM it builds shows the ranking table, every embedded
figure decodes to an image (naturalWidth > 0), and a screenshot of the page is not blank.

Skipped where Chromium is not installed (apt-get install chromium), unless ATTRIBUTION_REQUIRE_SYSTEM=1
(as in CI, where a missing browser fails the test instead).
"""
from __future__ import annotations

import html.parser
import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from service.report import write_report
from tests.service.report_support import library_result

pytestmark = pytest.mark.process

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None and os.environ.get("ATTRIBUTION_REQUIRE_SYSTEM") != "1",
                                    reason="chromium is not installed (apt-get install chromium)")

# Appended to a copy of the page (the report itself carries no script): once everything has loaded, lists
# each image's decoded width (0 = not decoded) in a <pre> that --dump-dom prints.
_DECODE_CHECK = """<script>window.addEventListener("load", function () {
  var widths = Array.from(document.images, function (i) { return i.complete ? i.naturalWidth : 0; });
  var out = document.createElement("pre"); out.id = "decoded"; out.textContent = JSON.stringify(widths);
  document.body.appendChild(out);
});</script>"""


def _chromium(profile, *args: str) -> subprocess.CompletedProcess:
    assert CHROMIUM is not None, "chromium is not installed (apt-get install chromium)"
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={profile}", "--virtual-time-budget=10000", *args],
                          capture_output=True, text=True, timeout=120)


class _Dom(html.parser.HTMLParser):
    """The ranking table's body rows (cell texts) and the number of <img> elements in the dumped DOM."""

    def __init__(self):
        super().__init__()
        self.rows: list[list[str]] = []
        self.images = 0
        self._table = self._body = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.images += tag == "img"
        if tag == "table" and dict(attrs).get("id") == "ranking":
            self._table = True
        self._body = self._body or (self._table and tag == "tbody")
        if self._body and tag == "tr":
            self.rows.append([])
        if self._body and tag == "td":
            self.rows[-1].append("")

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = self._body = False

    def handle_data(self, data):
        if self._body and self.rows and self.rows[-1]:
            self.rows[-1][-1] += data


@pytest.fixture(scope="module")
def page(demo_model, demo_heldout, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = library_result(demo_model, demo_heldout.images[:6], demo_heldout.boxes[:6])
    finally:
        torch.set_num_threads(threads)
    directory = tmp_path_factory.mktemp("browser-report")
    write_report(result, directory, [f"item-{i}.png" for i in range(6)])
    return result, directory


@needs_chromium
def test_chromium_shows_the_ranking_and_decodes_every_figure(page, tmp_path):
    result, directory = page
    checked = directory / "check.html"
    checked.write_text((directory / "index.html").read_text().replace("</body>", _DECODE_CHECK + "</body>"))
    done = _chromium(tmp_path / "profile", "--dump-dom", checked.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    dom = _Dom()
    dom.feed(done.stdout)
    assert [row[0] for row in dom.rows] == ["1", "2", "3"]
    assert [row[1].startswith(label) for row, label in zip(dom.rows, result.ranking)] == [True] * 3
    decoded = re.search(r'<pre id="decoded">(\[.*?\])</pre>', done.stdout)
    assert decoded, "the page's load event never ran"
    widths = json.loads(decoded.group(1))
    assert len(widths) == dom.images == 2 * len(result.methods) + 2
    assert all(w > 0 for w in widths), widths


@needs_chromium
def test_a_screenshot_of_the_page_is_not_blank(page, tmp_path):
    _, directory = page
    shot = tmp_path / "page.png"
    done = _chromium(tmp_path / "profile", "--window-size=1280,1600", f"--screenshot={shot}",
                     (directory / "index.html").as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    with Image.open(io.BytesIO(shot.read_bytes())) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[:2] == (1600, 1280)
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    not_white = float((pixels.min(axis=2) < 240).mean())
    assert colours > 50 and not_white > 0.05, (colours, not_white)
