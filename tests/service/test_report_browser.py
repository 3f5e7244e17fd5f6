"""The evaluation report's index.html in a real browser: a real evaluation job on the demo model
(`attribution evaluate --local`, in this process) writes the report; Debian's headless Chromium loads its
page; the DOM it builds shows the ranking table, every embedded figure decodes to an image
(naturalWidth > 0), and a screenshot of the page is not blank.

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
from google.protobuf import json_format
from PIL import Image

from service._proto import attribution_pb2 as pb
from service.cli import main

pytestmark = [pytest.mark.process, pytest.mark.slow]

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
def page(demo_cache_dir, demo_model, tmp_path_factory):
    """The report of a real evaluation job: three methods on 6 demo items, every metric they allow."""
    root = tmp_path_factory.mktemp("browser-report")
    config = root / "config.json"
    config.write_text(json.dumps({"models": [{"name": "demo", "source": "demo"}],
                                  "cache_dir": str(demo_cache_dir)}))
    directory = root / "report"
    code = main(["evaluate", "--local", "--config", str(config), "--demo", "6", "--methods",
                 "grad_cam,vanilla_gradient,integrated_gradients", "--steps", "8", "--curve-steps", "8",
                 "--bootstrap", "200", "--randomization-modes", "cascading", "-o", str(directory)])
    assert code == 0
    saved = json.loads((directory / "evaluation.json").read_text())
    return json_format.ParseDict(saved["result"], pb.EvaluationResult()), directory


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
    sanity = sum(len(m.randomization) for m in result.methods)
    assert len(widths) == dom.images == len(result.methods) + sanity + 2  # curves, sanity, examples, cost
    assert sanity == len(result.methods)
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
