"""``modeld events``: the daemon's events (daemon/events.py), one line each, as they happen with ``-f``."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from deployers.cli import connect
from deployers.cli.values import count


def event_line(event: dict[str, Any]) -> str:
    """One event for people: time, seq, service (name and short uuid), type, detail, exit code or signal."""
    when = event.get("time")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) + f".{int(when * 1000) % 1000:03d}" if when else "-"
    if event.get("type") == "gap":
        return f"{stamp} --- gap: {event.get('detail', '')} ---"
    uuid = str(event.get("uuid") or "")[:8]
    who = f"{event.get('model_name') or '-'} ({uuid})" if uuid else "-"
    status = f" [{how_it_ended(event)}]" if how_it_ended(event) else ""
    detail = f"  {event['detail']}" if event.get("detail") else ""
    return f"{stamp} #{event.get('seq')} {who} {event.get('type')}{status}{detail}"


def how_it_ended(event: dict[str, Any]) -> str:
    """``signal N`` or ``exit code N`` of an ``exited`` event, else ""."""
    if event.get("signal") is not None:
        return f"signal {event['signal']}"
    if event.get("exit_code") is not None:
        return f"exit code {event['exit_code']}"
    return ""


def cmd_events(args: argparse.Namespace) -> int:
    client = connect.client(args)
    try:
        for event in client.events(since=args.since, follow=args.follow):
            print(json.dumps(event) if args.json else event_line(event), flush=True)
    except KeyboardInterrupt:
        pass
    return 0


def add_events_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--follow", action="store_true", help="keep printing events as they happen (across daemon restarts)")
    p.add_argument(
        "--since", type=count, default=0, help="only the events after this seq (default 0: every event the daemon holds)"
    )
