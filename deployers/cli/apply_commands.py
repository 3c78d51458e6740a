"""``modeld apply -f FILE`` and ``modeld export``: the set of services as a file (see daemon/client/apply.py)."""

from __future__ import annotations

import argparse
import os
import sys

from daemon.client.apply import describe
from deployers.cli import connect
from deployers.cli.errors import one_line
from deployers.cli.output import print_json


def cmd_apply(args: argparse.Namespace) -> int:
    client = connect.client(args)
    report = client.apply(args.file, prune=args.prune, dry_run=args.dry_run, timeout=args.timeout)
    if args.json:
        print_json({**report.model_dump(mode="json"), "ok": report.ok})
    else:
        for step in report.steps:
            if step.error:
                step.error = one_line(step.error)
        print("\n".join(describe(report)))
    return 0 if report.ok else 1


def cmd_export(args: argparse.Namespace) -> int:
    text = connect.client(args).export(project=args.project)
    if args.output in (None, "-"):
        sys.stdout.write(text)
        return 0
    temp = f"{args.output}.tmp-{os.getpid()}"
    with open(temp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temp, args.output)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0
