"""The report of a faithfulness evaluation, written from its EvaluationResult into one directory:

    evaluation.json        the result (google.protobuf.json_format) and a summary: ranking, recommendation,
                           per method per metric mean and interval, pass / fail marks, cost
    curves-NN-LABEL.png    per method: deletion / insertion curves beside the random order's
    sanity-NN-LABEL-MODE.png  per method and randomization mode: maps before / after each step
    examples.png           the example inputs and every method's example maps
    cost.png               seconds per method, rows, ratio to the floor
    index.html             one self-contained page with all of it (figures embedded as data: URIs)

Modules: summary (numbers and the text table), figures (matplotlib, Agg), page (the HTML).
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Sequence

from google.protobuf import json_format

from service._proto import attribution_pb2 as pb
from service.report import figures
from service.report.page import index_html
from service.report.summary import ordered_methods, ranking_table, summary

__all__ = ["write_report", "ranking_table", "summary", "file_stem"]


def file_stem(index: int, label: str) -> str:
    """A file-name-safe stem for a method label, numbered so two labels that clean up alike stay apart."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("._")[:60]
    return f"{index:02d}-{clean or 'method'}"


def result_json(result: pb.EvaluationResult, item_names: Sequence[str] = ()) -> dict:
    """evaluation.json's content: {"summary": ..., "result": the EvaluationResult as proto JSON}."""
    return {"summary": summary(result, item_names),
            "result": json_format.MessageToDict(result, preserving_proto_field_name=True)}


def write_report(result: pb.EvaluationResult, directory: pathlib.Path | str,
                 item_names: Sequence[str] = ()) -> list[pathlib.Path]:
    """Writes the report files into `directory` (created if missing); returns their paths, index.html last.

    item_names: one per evaluated item (they title the figures' columns and are listed on the page), or none.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = list(item_names)
    written: list[pathlib.Path] = []

    def save(name: str, data: bytes | str) -> None:
        path = directory / name
        if isinstance(data, str):
            path.write_text(data, encoding="utf-8")
        else:
            path.write_bytes(data)
        written.append(path)

    save("evaluation.json", json.dumps(result_json(result, names), indent=1, allow_nan=False) + "\n")
    shown: dict[str, list[tuple[str, str, bytes]]] = {"curves": [], "sanity": [], "examples": [], "cost": []}
    for index, method in enumerate(ordered_methods(result), start=1):
        stem = file_stem(index, method.label)
        png = figures.curves(method)
        if png is not None:
            save(f"curves-{stem}.png", png)
            shown["curves"].append((f"deletion and insertion curves of {method.label}",
                                    f"{method.label}: the method (solid) and a random order (dashed)", png))
        for run in method.randomization:
            png = figures.sanity(method, run, names)
            if png is not None:
                mode = re.sub(r"[^A-Za-z0-9_-]+", "_", run.mode) or "run"
                save(f"sanity-{stem}-{mode}.png", png)
                shown["sanity"].append((f"{run.mode} randomization maps of {method.label}",
                                        f"{method.label}: {run.mode} randomization, rows = steps, "
                                        f"columns = items", png))
    png = figures.examples(result, names)
    if png is not None:
        save("examples.png", png)
        shown["examples"].append(("example maps", "inputs (top row) and each method's maps over them", png))
    png = figures.cost(result)
    save("cost.png", png)
    shown["cost"].append(("cost per method", "seconds spent on each method's maps and metrics", png))
    save("index.html", index_html(result, shown, names))
    return written
