"""A slow call's progress on a terminal: the time, the service's state and its server's latest log line.

While a deploy, start, replace or stop waits (one blocking HTTP call over the daemon's socket),
a thread of this module asks the daemon on a second connection, every quarter second, for the
service (``GET /v1/services/<uuid>``) and its last log line (``logs?tail=1``), and draws one
line on stderr, in place: ``\\r``, the text cut to the terminal's width, then clear-to-end of
line. The line is erased when the call returns. Only on a terminal: with stderr piped, or
``--json``, nothing is drawn and the output is what it was.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from daemon import exceptions as exc
from daemon.client import DaemonClient
from daemon.models import BaseService
from deployers.cli import connect
from deployers.cli.output import cells, printable

INTERVAL = 0.25  # seconds between two looks at the service
CLEAR = "\x1b[K"  # erase from the cursor to the end of the line


def shown(args: argparse.Namespace, stream: TextIO | None = None) -> bool:
    """Whether a progress line is drawn: on a terminal, and not with --json."""
    stream = stream or sys.stderr
    return not args.json and stream.isatty()


def progress(
    args: argparse.Namespace, label: str, call: Callable[[], BaseService], find: Callable[[DaemonClient], BaseService | None]
) -> BaseService:
    """Run a slow call; on a terminal, show the time, the service's state and its latest log line meanwhile.

    ``find`` looks the service up on the watcher's own client (None: not there yet). Piped output
    and --json stay quiet.
    """
    if not shown(args):
        return call()
    # No auto-start: the call itself starts the daemon if it must; until it answers, say so.
    watcher = connect.client(args, auto_start=False, timeout=5)
    try:
        return draw(label, call, lambda: look(watcher, find), "interrupted; the daemon goes on with it (see `modeld ls`)")
    finally:
        watcher.close()


def draw(label: str, call: Callable[[], BaseService], peek: Callable[[], tuple[str, str]], interrupted: str) -> BaseService:
    """Run ``call`` in a thread; meanwhile draw ``label``, the time and what ``peek()`` says (the
    service's state, its last log line) on stderr. ``interrupted``: the error on Ctrl-C."""
    out = sys.stderr
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
    try:
        while worker.is_alive():
            worker.join(INTERVAL)
            if not worker.is_alive():
                break
            state, last = peek()
            line = f"{label}: {time.monotonic() - started:5.1f}s {state}" + (f"  | {last}" if last else "")
            out.write("\r" + fit(line, width(out)) + CLEAR)
            out.flush()
    except KeyboardInterrupt:
        out.write("\r" + CLEAR)
        raise exc.ModeldError(interrupted) from None
    out.write("\r" + CLEAR)
    out.flush()
    if error:
        raise error[0]
    return value[0]


def look(watcher: DaemonClient, find: Callable[[DaemonClient], BaseService | None]) -> tuple[str, str]:
    """(the service's state, its server's last log line) as the daemon says now."""
    try:
        svc = find(watcher)
        if svc is None:
            return "waiting for the daemon", ""
        last = "".join(watcher.logs(svc.uuid, tail=1)).strip()
        return str(svc.status.state), printable(last)
    except exc.ServiceNotFound:
        return "waiting for the daemon", ""
    except exc.ModeldError:  # not running yet (the call is starting it), or a look that timed out
        return "starting the daemon", ""


def width(stream: TextIO) -> int:
    """Columns the line may take: the terminal's, less one (a character in the last column would
    leave the cursor waiting to wrap, and some terminals wrap at once)."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns or 80  # (0: a pty nobody sized)
    except (OSError, ValueError):
        columns = 80
    return max(columns - 1, 10)


def fit(text: str, columns: int) -> str:
    """``text`` cut to ``columns`` cells of a terminal (east Asian wide characters take two, combining marks none)."""
    used = 0
    for i, c in enumerate(text):
        used += cells(c)
        if used > columns:
            return text[:i]
    return text
