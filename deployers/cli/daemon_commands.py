"""The commands on the daemon itself: ``modeld daemon start|stop|status|run``."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from daemon import exceptions as exc
from daemon.client import ensure_daemon
from daemon.paths import Paths
from daemon.settings import format_size
from deployers.cli import connect
from deployers.cli.output import print_json


def cmd_daemon_start(args: argparse.Namespace) -> int:
    paths = Paths(args.home)
    try:
        ensure_daemon(paths)
    except exc.StorageError as error:
        raise exc.DaemonStartError(f"cannot start the daemon: {error.message}") from error
    info = connect.client(args, auto_start=False).daemon_info()
    if args.json:
        print_json({"running": True, **info})
    else:
        print(f"modeld daemon running (pid {info['pid']}) on {info['socket']}")
    return 0


def cmd_daemon_stop(args: argparse.Namespace) -> int:
    client = connect.client(args, auto_start=False)
    if not client.is_running():
        print("modeld daemon is not running")
        return 0
    from daemon.daemon_process import daemon_pid

    pid = client.daemon_info()["pid"]
    client.shutdown(stop_services=args.all)
    deadline = time.monotonic() + args.timeout
    # The socket closes first; the process exits after it has stopped (with --all) the servers.
    while time.monotonic() < deadline and (client.is_running() or daemon_pid(client.paths) == pid):
        time.sleep(0.02)
    if client.is_running() or daemon_pid(client.paths) == pid:
        raise exc.StopError(f"the daemon (pid {pid}) did not stop within {args.timeout:g}s")
    print(f"modeld daemon stopped (pid {pid})" + ("; every model server stopped" if args.all else "; model servers keep running"))
    return 0


def cmd_daemon_status(args: argparse.Namespace) -> int:
    client = connect.client(args, auto_start=False)
    try:
        info = client.daemon_info()
    except exc.DaemonNotRunning:
        if args.json:
            print_json({"running": False, "home": str(client.paths.home)})
        else:
            print(f"modeld daemon is not running (home {client.paths.home})")
        return 3
    if args.json:
        print_json({"running": True, **info})
        return 0
    counts = info["counts"]
    print(f"modeld {info['version']} running, pid {info['pid']}, home {info['home']}")
    note = f" ({info['containment_note']})" if info.get("containment_note") else ""
    print(f"containment: {info.get('containment', 'unknown')}{note}")
    if info.get("gateway_url"):
        pid = f" (pid {info['gateway_pid']})" if info.get("gateway_pid") else " (not running; restarting)"
        print(f"gateway: {info['gateway_url']}{pid}")
    elif info.get("gateway_error"):
        print(f"gateway: none: {info['gateway_error']}")
    else:
        print("gateway: off")
    print(
        "services: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v and k != "total")
        if counts["total"]
        else "services: none"
    )
    print_on_demand(info.get("on_demand"))
    settings, sources = info.get("settings", {}), info.get("settings_sources", {})
    if settings:
        print("settings (daemon.toml, then MODELD_* of the daemon's environment):")
        width = max(map(len, settings))
        for key, value in settings.items():
            shown = json.dumps(value) if not isinstance(value, str) else value if value else '""'
            source = sources.get(key, "default")
            print(f"  {key:<{width}}  {shown}  ({source if source == 'default' else 'from ' + source})")
    for problem in info["problems"]:
        aside = f" (set aside as {problem['set_aside_as']})" if problem.get("set_aside_as") else ""
        print(f"problem: {problem['path']}: {problem['message']}{aside}")
    return 0


def print_on_demand(on_demand: dict[str, Any] | None) -> None:
    """The caps of admission and the on-demand servers loaded, least recently used first."""
    if on_demand is None:  # a daemon from before on-demand services
        return
    budget = on_demand.get("memory_budget")
    caps = [
        f"max_active {on_demand['max_active']}" if on_demand.get("max_active") else "max_active none",
        f"memory_budget {format_size(budget)}" if budget else "memory_budget none",
    ]
    loaded = on_demand.get("loaded") or []
    total = sum(entry["size_bytes"] for entry in loaded)
    print(f"on demand: {', '.join(caps)}; loaded {len(loaded)} ({format_size(total)})" + (":" if loaded else ""))
    now = time.time()
    rows = [
        [
            entry["model_name"] or "-",
            entry["uuid"][:8],
            format_size(entry["size_bytes"]) if entry["size_bytes"] else "not measured yet",
            f"last use {now - entry['last_use']:.1f} s ago" if entry.get("last_use") else "never used",
        ]
        for entry in loaded
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)] if rows else []
    for row in rows:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def cmd_daemon_run(args: argparse.Namespace) -> int:
    from daemon.daemon_process import run

    try:
        return run(Paths(args.home), apply=os.path.abspath(args.apply) if args.apply else None)
    except exc.StorageError as error:
        raise exc.DaemonStartError(f"cannot start the daemon: {error.message}") from error
