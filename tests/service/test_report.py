"""The evaluation report (service/report/): written from an EvaluationResult that the metric library produced
on the demo model, it holds the result and its summary as JSON, one decodable figure per section, and one
self-contained, escaped page."""
from __future__ import annotations

import html
import html.parser
import io
import json
import math
import re

import numpy as np
import pytest
import torch
from google.protobuf import json_format
from PIL import Image

from service._proto import attribution_pb2 as pb
from service.report import file_stem, ranking_table, write_report
from service.report.summary import summary
from tests.service.report_support import library_result

ITEMS = 6
HOSTILE = '<img src=x onerror="alert(1)">&'


@pytest.fixture(scope="module")
def evaluated(demo_model, demo_heldout):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = library_result(demo_model, demo_heldout.images[:ITEMS], demo_heldout.boxes[:ITEMS])
    finally:
        torch.set_num_threads(threads)
    return result


@pytest.fixture(scope="module")
def report(evaluated, tmp_path_factory):
    directory = tmp_path_factory.mktemp("report")
    names = [f"held-out/{i:03d}.png" for i in range(ITEMS)]
    return directory, write_report(evaluated, directory, names), names


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_evaluation_json_holds_the_result_and_its_summary(evaluated, report):
    directory, _, names = report
    saved = json.loads((directory / "evaluation.json").read_text())
    assert json_format.ParseDict(saved["result"], pb.EvaluationResult()) == evaluated
    brief = saved["summary"]
    assert brief["ranking"] == list(evaluated.ranking) and brief["item_names"] == names
    assert [m["label"] for m in brief["methods"]] == list(evaluated.ranking)
    assert brief["recommendation"]["label"] == evaluated.ranking[0]
    for entry in brief["methods"]:
        method = next(m for m in evaluated.methods if m.label == entry["label"])
        assert len(entry["metrics"]) == len(method.metrics)
        for value, shown in zip(method.metrics, entry["metrics"]):
            assert shown["mean"] == pytest.approx(value.mean) and shown["ci_low"] <= shown["mean"] <= shown["ci_high"]
        judged = [v.passed for v in method.metrics if v.metric == pb.MODEL_RANDOMIZATION and v.HasField("passed")]
        assert entry["randomization_passed"] == all(judged)
    cost = brief["cost"]
    assert cost["ratio_to_floor"] == pytest.approx(evaluated.seconds / evaluated.floor_seconds)


def test_every_figure_is_a_png_with_something_drawn(evaluated, report):
    directory, written, _ = report
    stems = [file_stem(i, label) for i, label in enumerate(evaluated.ranking, start=1)]
    expected = ({f"curves-{s}.png" for s in stems} | {f"sanity-{s}-cascading.png" for s in stems}
                | {"examples.png", "cost.png", "evaluation.json", "index.html"})
    assert {p.name for p in written} == expected and written[-1].name == "index.html"
    for path in written:
        if path.suffix == ".png":
            pixels = _pixels(path.read_bytes())
            assert pixels.shape[0] > 100 and pixels.shape[1] > 100
            assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 8, f"{path.name} looks blank"


def test_the_sanity_figure_has_a_row_per_step_and_a_column_per_item(evaluated, report):
    directory, _, _ = report
    run = evaluated.methods[0].randomization[0]
    steps, items = list(run.maps.shape[:2])
    assert steps == len(run.steps) >= 2 and items == 4
    label = evaluated.methods[0].label
    stem = file_stem(list(evaluated.ranking).index(label) + 1, label)
    pixels = _pixels((directory / f"sanity-{stem}-cascading.png").read_bytes())
    height, width, _ = pixels.shape
    assert height > width  # more steps (6) than items (4): a tall grid


class _Page(html.parser.HTMLParser):
    """What the page loads and shows: img sources, any script or external reference, the ranking's rows."""

    def __init__(self):
        super().__init__()
        self.images, self.external, self.scripts, self.rows, self._in_ranking = [], [], 0, [], False
        self._row: list[str] | None = None
        self._cell = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self.scripts += 1
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("src", "href"):
            if key in attrs and tag != "img" and not str(attrs[key]).startswith("#"):
                self.external.append(attrs[key])
        if tag == "link":
            self.external.append(attrs.get("href"))
        if tag == "table" and attrs.get("id") == "ranking":
            self._in_ranking = True
        if self._in_ranking and tag == "tr":
            self._row = []
        if self._in_ranking and tag in ("td", "th"):
            self._cell = True
            self._row.append("")

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_ranking = False
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        if tag in ("td", "th"):
            self._cell = False

    def handle_data(self, data):
        if self._cell and self._row is not None:
            self._row[-1] += data


def test_the_page_is_self_contained_and_ranks_the_methods(evaluated, report):
    directory, _, _ = report
    text = (directory / "index.html").read_text()
    page = _Page()
    page.feed(text)
    assert page.scripts == 0 and page.external == [] and "url(" not in text and "@import" not in text
    assert page.images and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert len(page.images) == 2 * len(evaluated.methods) + 2  # curves + sanity per method, examples, cost
    header, *rows = page.rows
    assert header[:4] == ["rank", "method", "randomization", "beats random order"]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    methods = {m.label: pb.Method.Name(m.method.method).lower() for m in evaluated.methods}
    assert [r[1] for r in rows] == [label + methods[label] for label in evaluated.ranking]
    deletion = header.index("deletion/zero auc \u2193")
    first = next(m for m in evaluated.methods if m.label == evaluated.ranking[0])
    auc = next(v for v in first.metrics if v.metric == pb.DELETION and v.statistic == "auc")
    assert rows[0][deletion] == f"{auc.mean:.3f} [{auc.ci_low:.3f}, {auc.ci_high:.3f}]"
    assert "Recommended:" in text and "What these numbers do not prove" in text


def test_user_strings_are_escaped(demo_model, demo_heldout, tmp_path):
    result = library_result(demo_model, demo_heldout.images[:2], demo_heldout.boxes[:2], steps=4,
                            labels=(HOSTILE, "vanilla</td><script>x()</script>", "ig\"'"))
    result.model = "<b>model</b>"
    write_report(result, tmp_path, [f"{HOSTILE}.png", "two.png"])
    text = (tmp_path / "index.html").read_text()
    page = _Page()
    page.feed(text)
    assert page.scripts == 0 and all(src.startswith("data:image/png;base64,") for src in page.images)
    for raw in ("<img src=x", "<script>", "</td><script>", "<b>model</b>"):
        assert raw not in text
    unescaped = html.unescape(text)
    assert HOSTILE in unescaped and "vanilla</td><script>x()</script>" in unescaped and "<b>model</b>" in unescaped
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+", p.name) for p in tmp_path.iterdir())


def test_the_text_table_ranks_and_names_the_recommendation(evaluated):
    table = ranking_table(evaluated).splitlines()
    assert table[0].split()[:2] == ["#", "method"]
    assert [line.split()[1] for line in table[1:4]] == list(evaluated.ranking)
    assert table[-2] == f"recommended: {evaluated.ranking[0]}" and table[-1].startswith("cost: ")


def test_nan_means_are_null_in_the_summary_and_na_in_the_table(evaluated):
    result = pb.EvaluationResult()
    result.CopyFrom(evaluated)
    value = result.methods[0].metrics[0]
    value.mean = value.ci_low = value.ci_high = math.nan
    brief = summary(result)
    shown = next(m for m in brief["methods"] if m["label"] == result.methods[0].label)["metrics"][0]
    assert shown["mean"] is None and shown["ci_low"] is None
    json.dumps(brief, allow_nan=False)
    assert "n/a" in ranking_table(result)
