"""`attribution explain --model text-demo --text "..."`: each text its own request; prints its tokens with scores.

    $ attribution explain --local --config deploy/config.text-demo.yaml --model text-demo --method integrated_gradients \
          --text "we saw a guitar"
    we saw a guitar: predicted 3 'music' (1.000), integrated_gradients target 3 'music', completeness 0.0000
      we      -0.0892
      saw     -0.1240
      a       -0.1593
      guitar  +9.9648  <- top

With --json, one JSON object per text (tokens, token_ids, scores, prediction, timings).
"""
from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from service.cli import tls_options
from service.client import AsyncAttributionClient, ServiceError, build_request

_TEXT_PARAMS = ("samples", "noise_fraction", "steps", "rule", "baseline")


def run_text(args: argparse.Namespace) -> int:
    from service.cli import CliError
    from service.cli.explain import _check_names

    if not args.server and not args.local:
        raise CliError("give --server HOST:PORT or --local")
    if args.output is not None:
        raise CliError("-o writes image overlays; text results are printed (use --json to keep them)")
    tls_options(args)
    args.method = args.method or "vanilla"  # gradient x embedding, a text model's simplest method
    _check_names(args)
    return asyncio.run(_explain_texts(args))


async def _explain_texts(args: argparse.Namespace) -> int:
    from service.cli import local
    from service.cli.explain import _labels, _named

    params = {k: getattr(args, k) for k in _TEXT_PARAMS if getattr(args, k) is not None}
    failures = 0
    async with local.target(args) as address:
        tls = tls_options(args) if args.server else {}
        async with AsyncAttributionClient(address, token=args.token, timeout=args.timeout, **tls) as client:
            labels = await _labels(client, args.model)
            for text in args.text:
                request = build_request(texts=[text], method=args.method, model=args.model, target=args.target,
                                        top_k=args.top_k, seed=args.seed, **params)
                try:
                    result = await client.explain_request(request, timeout=args.timeout)
                except ServiceError as exc:
                    failures += 1
                    row = {"input": text, "error": exc.code().name, "message": exc.details()}
                    print(json.dumps(row) if args.json else f"{text}: {row['error']}: {row['message']}", flush=True)
                    continue
                row = _row(text, result, labels, _named)
                print(json.dumps(row) if args.json else _lines(row), flush=True)
    return 1 if failures else 0


def _row(text: str, result, labels, named) -> dict[str, Any]:
    item = result.items[0]
    maps = [{"method": a.method, "target": a.target, "target_label": named(a.target, labels),
             "target_score": round(a.target_score, 6), "scores": [round(float(v), 6) for v in a.map.reshape(-1)],
             "completeness_error": a.completeness_error} for a in item.attributions]
    return {"input": text, "request_id": result.request_id, "model": result.model,
            "model_version": result.model_version, "tokens": item.tokens, "token_ids": item.token_ids,
            "predicted": item.predicted_classes[0], "predicted_label": named(item.predicted_classes[0], labels),
            "predicted_score": round(item.predicted_scores[0], 6), "maps": maps,
            "total_ms": round(result.timings["total_ms"], 3), "input_sha256": item.input_sha256}


def _lines(row: dict[str, Any]) -> str:
    tokens = row["tokens"] or [str(i) for i in row["token_ids"]]
    width = max(len(t) for t in tokens)
    out = []
    for m in row["maps"]:
        extra = f", completeness {m['completeness_error']:.4f}" if m["completeness_error"] is not None else ""
        out.append(f"{row['input']}: predicted {row['predicted_label']} ({row['predicted_score']:.3f}), "
                   f"{m['method']} target {m['target_label']}{extra}")
        top = max(range(len(m["scores"])), key=lambda i: m["scores"][i])
        out.extend(f"  {token:<{width}}  {score:+.4f}{'  <- top' if i == top else ''}"
                   for i, (token, score) in enumerate(zip(tokens, m["scores"])))
    return "\n".join(out)
