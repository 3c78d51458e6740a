"""A slow call's progress on a terminal: the service's state, the time and its latest log line."""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from collections.abc import Callable

from daemon import exceptions as exc
from daemon.client import DaemonClient
from daemon.models import BaseService
from deployers.cli import connect


def progress(
    args: argparse.Namespace, label: str, call: Callable[[], BaseService], find: Callable[[DaemonClient], BaseService | None]
) -> BaseService:
    """Run a slow call; on a terminal, show the service's state, the time and its latest log line meanwhile.

    Piped output and --json stay quiet.
    """
    if args.json or not sys.stderr.isatty():
        return call()
    value: list[BaseService] = []
    error: list[BaseException] = []

    def work() -> None:
        try:
            value.append(call())
        except BaseException as exc:  # noqa: BLE001  (handed to the main thread, which raises it)
            error.append(exc)

    worker = threading.Thread(target=work, daemon=True)
    started = time.monotonic()
    worker.start()
    watcher = connect.client(args, auto_start=False, timeout=5)
    width = shutil.get_terminal_size((100, 20)).columns - 1
    try:
        while worker.is_alive():
            worker.join(0.25)
            try:
                svc = find(watcher)
                state = str(svc.status.state) if svc else "starting"
                last = "".join(watcher.logs(svc.uuid, tail=1)).strip() if svc else ""
            except exc.ModeldError:
                state, last = "starting the daemon", ""
            line = f"{label}: {state} {time.monotonic() - started:5.1f}s" + (f"  | {last}" if last else "")
            sys.stderr.write("\r" + line[:width].ljust(width))
            sys.stderr.flush()
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        raise exc.ModeldError("interrupted; the daemon goes on with it (see `modeld ls`)") from None
    finally:
        watcher.close()
    sys.stderr.write("\r" + " " * width + "\r")
    if error:
        raise error[0]
    return value[0]
