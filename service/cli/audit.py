"""`attribution audit verify | export`: re-run logged explanations and compare their maps
(service/audit/verify.py); write an audit table out as JSON Lines."""
from __future__ import annotations

import argparse
import json
import pathlib
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`attribution audit verify ...` under the `audit` command's parser."""
    sub = parser.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    v = sub.add_parser("verify", help="re-run logged explanations and compare their maps",
                       description="Re-runs logged explanations from their recorded parameters, the way each "
                                   "was computed (online or as a job), and checks each map against its record: "
                                   "the same sha256, or a summary within the record's stated tolerance. Records "
                                   "whose input is not at hand are skipped, with the reason. Exit code 0: PASS "
                                   "(something was checked and all of it passed); 1: FAIL or nothing checked; "
                                   "2: a usage error (no such log, a bad config).")
    v.add_argument("logs", nargs="*", metavar="LOG", help="log files, audit directories or postgresql:// URLs of "
                                                          "audit tables (default: the configured audit.store, "
                                                          "else the audit directory)")
    v.add_argument("--sample", type=int, metavar="N", help="check N randomly chosen records (default: all)")
    v.add_argument("--seed", type=int, default=0, help="seed of the sample")
    v.add_argument("--inputs", metavar="DIR", help="the inputs as the client sent them (.npy arrays or PNG/JPEG "
                                                    "files, searched recursively and matched by hash); needed "
                                                    "unless the server stored inputs (audit.store_inputs)")
    v.add_argument("--config", metavar="FILE", help="the server's YAML/JSON config file (models, audit)")
    v.add_argument("--data-dir", metavar="DIR", help="the server's data directory (audit log and stored inputs)")
    v.add_argument("--device", help="cpu | cuda | cuda:N (default: the config's); use the server's hardware")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    e = sub.add_parser("export", help="write an audit table (audit.store) out as JSON Lines",
                       description="Writes every record of a PostgreSQL audit table, oldest first, as the JSON "
                                   "lines a file log would hold: `audit verify` reads the result like any log.")
    e.add_argument("url", metavar="URL", help="the table's database, postgresql://user@host/db")
    e.add_argument("-o", "--output", metavar="FILE", help="the JSONL file to write (default: standard output)")


def run(args: argparse.Namespace) -> int:
    if args.audit_command == "export":
        return _export(args)
    from service.audit.records import INPUTS_DIR
    from service.pgschema import is_url
    from service.audit.verify import verify
    from service.jobs.store import default_data_dir
    from service.settings import ServiceConfig
    from workers.errors import AttributionError
    from workers.models import ModelRegistry, select_device

    try:
        config = ServiceConfig.load(args.config)
        app = config.app
        audit_dir = config.audit.directory_for(args.data_dir or default_data_dir())
        if args.sample is not None and args.sample < 1:
            raise ValueError("--sample must be at least 1")
        logs = args.logs or ([config.audit.store] if config.audit.store else [])
        for log in logs:
            if not is_url(log) and not pathlib.Path(log).exists():
                raise ValueError(f"no such log file or directory: {log}")
        if not logs and not audit_dir.is_dir():
            raise ValueError(f"no audit log at {audit_dir} (the default; has a server run with this data "
                             "directory? give the log's path, or --data-dir)")
        if args.inputs and not pathlib.Path(args.inputs).is_dir():
            raise ValueError(f"--inputs {args.inputs}: not a directory")
        registry = ModelRegistry(list(app.models), app.default, device=select_device(args.device or app.device),
                                 cache_dir=pathlib.Path(app.cache_dir) if app.cache_dir else None)
    except (AttributionError, OSError, ValueError) as exc:
        print(f"attribution audit verify: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    try:
        report = verify(logs or [audit_dir], registry, inputs_dir=args.inputs, sample=args.sample,
                        seed=args.seed, store_dirs=[audit_dir / INPUTS_DIR])
    except AttributionError as exc:  # an audit table that cannot be read
        print(f"attribution audit verify: {exc.message}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 0 if report.ok else 1


def _export(args: argparse.Namespace) -> int:
    from service.audit.sinks import read_table
    from service.pgschema import is_url
    from workers.errors import AttributionError

    if not is_url(args.url):
        print(f"attribution audit export: {args.url} is not a postgresql:// URL (a file log is JSON Lines already)",
              file=sys.stderr)
        return 2
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    count = 0
    try:
        for _, line in read_table(args.url):
            out.write(line + "\n")
            count += 1
    except AttributionError as exc:
        print(f"attribution audit export: {exc.message}", file=sys.stderr)
        return 2
    finally:
        if args.output:
            out.close()
    if args.output:
        print(f"attribution audit export: {count} records -> {args.output}", file=sys.stderr)
    return 0
