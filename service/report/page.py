"""index.html of an evaluation report: one self-contained page (figures as data: URIs, inline CSS, no script,
no external resource) that ranks the methods, names the recommendation, shows the curves, the sanity-check
and example maps and the cost, and says what the numbers do not prove. Every string that comes from the
request or the server (item names, labels, model names) is HTML-escaped.
"""
from __future__ import annotations

import base64
import html
import math
from typing import Sequence

from service._proto import attribution_pb2 as pb
from service.report.summary import (CURVE_METRICS, RANDOMIZATION_METRICS, better, columns, interval, metric_name,
                                    method_name, ordered_methods, ratio_to_floor, recommended_label, verdict)

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:72rem;padding:0 1rem;
color:#222;line-height:1.45}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{font-variant-numeric:tabular-nums;white-space:nowrap}
.pass{color:#1e8449;font-weight:600}.fail{color:#c0392b;font-weight:600}.none{color:#888}
.rec{background:#eafaf1;border:1px solid #a9dfbf;padding:.6rem 1rem;border-radius:4px}
.wide{overflow-x:auto}.figs{display:flex;flex-wrap:wrap;gap:0 1.5rem;align-items:flex-start}
figure{margin:1rem 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.8rem;color:#555}code{background:#f4f4f4;padding:0 .2rem}
"""

# (title, text): the limits of each kind of number, as docs/faithfulness.md states them.
_LIMITS = (
    ("Intervals", "Every mean comes with a bootstrap interval over the items. Two methods whose intervals "
                  "overlap are not shown to differ on these items; the rank order between them is not evidence."),
    ("Deletion and insertion", "A good score says the top-ranked pixels matter to this model under this "
                               "perturbation. It does not say the map is complete, and a method can score well by "
                               "finding what the model reacts to out of distribution (a filled hole is itself an "
                               "unusual input). Compare methods under the same baseline only."),
    ("Against the random order", "Beating a random order means the map's ranking carries information the "
                                 "model uses; an interval that contains 0 means no better than chance here."),
    ("Randomization", "Passing proves only that the map depends on the weights, not that it is faithful: "
                      "noise seeded by the weights passes too. Failing is strong evidence against a method. "
                      "The 0.5 threshold is a convention, not a statistic."),
    ("Localisation", "Agreement with where a person says the evidence is, not with what the model uses: on a "
                     "shortcut model a faithful map points at the shortcut and scores badly against the object."),
    ("Completeness, stability, class discrimination", "A small completeness error says the integral was "
                                                      "computed well, not that the baseline means anything; a map "
                                                      "that moves when the prediction moves is honest; a model can "
                                                      "use the same pixels for two classes."),
)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _mark(passed: bool | None, marks: Sequence[tuple[str, bool]]) -> str:
    if passed is None:
        return '<span class="none">&ndash;</span>'
    items = ", ".join(f"{'&#10003;' if ok else '&#10007;'}&nbsp;{_e(name)}" for name, ok in marks)
    css = "pass" if passed else "fail"
    return f'<span class="{css}">{"pass" if passed else "FAIL"}</span><br><small>{items}</small>'


def _ranking(result: pb.EvaluationResult) -> str:
    ranked_by = set(result.recommendation.metrics)  # the metrics the ranking used come first
    cols = sorted(columns(result), key=lambda c: c.metric not in ranked_by)
    arrows = {c: "" for c in cols}
    for method in result.methods:
        for c in cols:
            value = c.find(method)
            if value is not None:
                arrows[c] = " &darr;" if better(value) == "lower" else " &uarr;"
    head = "".join(f"<th>{_e(c.title)}{arrows[c]}</th>" for c in cols)
    rows = []
    for rank, method in enumerate(ordered_methods(result), start=1):
        cells = "".join(f'<td class="num">{_e(interval(c.find(method)))}</td>' for c in cols)
        rows.append(f"<tr><td>{rank if method.label in result.ranking else '&ndash;'}</td>"
                    f"<td><b>{_e(method.label)}</b><br><small>{_e(method_name(method.method.method))}</small></td>"
                    f"<td>{_mark(*verdict(method, RANDOMIZATION_METRICS))}</td>"
                    f"<td>{_mark(*verdict(method, CURVE_METRICS))}</td>{cells}</tr>")
    return ('<div class="wide"><table id="ranking"><thead><tr><th>rank</th><th>method</th><th>randomization</th>'
            f'<th>beats random order</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'
            '<p><small>mean [interval] per metric, the metrics the ranking used first; &darr; lower is better, '
            '&uarr; higher is better.</small></p>')


def _details(result: pb.EvaluationResult) -> str:
    rows = []
    for method in ordered_methods(result):
        for v in method.metrics:
            reference = f"{v.reference:.3g}" if v.HasField("reference") and math.isfinite(v.reference) else ""
            passed = "" if not v.HasField("passed") else ("pass" if v.passed else "FAIL")
            rows.append(f"<tr><td>{_e(method.label)}</td><td>{_e(metric_name(v.metric))}</td><td>{_e(v.variant)}</td>"
                        f"<td>{_e(v.statistic)}</td><td class=\"num\">{_e(interval(v, 4))}</td>"
                        f"<td class=\"num\">{v.missing}</td><td class=\"num\">{_e(reference)}</td>"
                        f"<td>{passed}</td></tr>")
    return ('<div class="wide"><table id="details"><thead><tr><th>method</th><th>metric</th><th>variant</th>'
            '<th>statistic</th>'
            '<th>mean [interval]</th><th>missing</th><th>reference</th><th>verdict</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _figure(png: bytes, alt: str, caption: str) -> str:
    return (f'<figure><img src="{data_uri(png)}" alt="{_e(alt)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _recommendation(result: pb.EvaluationResult) -> str:
    rec = result.recommendation
    if rec.method == pb.METHOD_UNSPECIFIED:
        return '<p class="rec">No recommendation: no method was ranked.</p>'
    label = recommended_label(result)
    layer = f" at layer <code>{_e(rec.cam_layer)}</code>" if rec.cam_layer else ""
    by = ", ".join(metric_name(m) for m in rec.metrics)
    job = f" (evaluation job <code>{_e(rec.evaluation_job_id)}</code>)" if rec.evaluation_job_id else ""
    return (f'<p class="rec" id="recommendation">Recommended: <b>{_e(label or method_name(rec.method))}</b>'
            f"{layer}, ranked first by {_e(by or 'the ranking metrics')}{job}. "
            "The service's AdoptRecommendation call makes it the model's default.</p>")


def _cost(result: pb.EvaluationResult) -> str:
    ratio = ratio_to_floor(result)
    return ('<table id="cost"><tbody>'
            f'<tr><th>wall time</th><td class="num">{result.seconds:.2f} s</td></tr>'
            f'<tr><th>floor (the same passes, measured on the replica)</th>'
            f'<td class="num">{result.floor_seconds:.2f} s</td></tr>'
            f'<tr><th>ratio to the floor</th><td class="num">{f"{ratio:.2f}&times;" if ratio else "n/a"}</td></tr>'
            f'<tr><th>forward rows</th><td class="num">{result.forward_rows:,}</td></tr>'
            f'<tr><th>backward rows</th><td class="num">{result.backward_rows:,}</td></tr>'
            "</tbody></table>")


def index_html(result: pb.EvaluationResult, figures: dict[str, list[tuple[str, str, bytes]]],
               item_names: Sequence[str] = ()) -> str:
    """The page. figures: section ("curves", "sanity", "examples", "cost") -> [(alt, caption, png)]."""
    def section(name: str) -> str:
        shown = figures.get(name, [])
        pictures = "".join(_figure(png, alt, caption) for alt, caption, png in shown)
        return f'<div class="figs">{pictures}</div>' if pictures else "<p>None in this result.</p>"

    names = ", ".join(_e(n) for n in item_names[:12]) + (" &hellip;" if len(item_names) > 12 else "")
    limits = "".join(f"<li><b>{_e(t)}.</b> {_e(text)}</li>" for t, text in _LIMITS)
    title = f"Faithfulness evaluation: {result.model or 'default model'}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{_e(title)}</h1>
<p>Model <code>{_e(result.model)}</code> (version <code>{_e(result.model_version[:16])}</code>),
{result.num_items} items{f': {names}' if names else ''}.</p>
<h2>Ranking</h2>
{_ranking(result)}
{_recommendation(result)}
<h2>Deletion and insertion curves</h2>
<p>Mean target probability as the most salient units are removed (deletion: should fall fast) or inserted
(insertion: should rise fast), beside the same curve for a random order of the units (dashed).</p>
{section("curves")}
<h2>Sanity checks: maps under randomization</h2>
<p>Each method's maps on the trained model (top row) and after each randomization step, with the mean Spearman
correlation to the trained maps. Maps that stay the same while the weights are destroyed do not explain the
model.</p>
{section("sanity")}
<h2>Example maps</h2>
{section("examples")}
<h2>Cost</h2>
{_cost(result)}
{section("cost")}
<h2>All values</h2>
{_details(result)}
<h2>What these numbers do not prove</h2>
<ul>{limits}</ul>
<p>Each metric's definition, source and limits: <code>docs/faithfulness.md</code>.</p>
</body></html>
"""
