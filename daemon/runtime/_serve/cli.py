"""The built-in server's entry: its command line, then sockets, model, app and server, in that order.

Run through ``serve.py`` (see there for the command line, exit codes and why the
launcher is a separate file), cold or in a child of the fork server. The
listening socket is taken before the model is loaded, so a bad ``--fd`` is a
usage error even for a model that fails; the model's code runs before the
Unix sockets exist, so nothing is left behind when it fails.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import TYPE_CHECKING

import uvicorn

from .activity import ActivityWriter
from .app import App
from .counters import MeasureRequests, RequestCounters
from .identity import EXIT_LOAD, EXIT_USAGE, SERVER_NAME, log, set_title
from .loading import load_model
from .server import FdHandoff, Server, bind_unix, listening_socket, unlink_if_ours

if TYPE_CHECKING:
    from collections.abc import Sequence


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="serve.py", description="modeld built-in model server (KServe V1)")
    p.add_argument("--model-uri", required=True, help="module:attr, path/file.py:attr, or a .pkl/.pickle/.joblib file")
    p.add_argument("--model-type", required=True, choices=["python", "pickle"])
    p.add_argument("--model-name", default="model")
    p.add_argument("--fd", type=int, help="inherited, bound and listening TCP socket fd")
    p.add_argument("--host", help="bind this host instead of using --fd")
    p.add_argument("--port", type=int, help="bind this port instead of using --fd")
    p.add_argument("--unix", help="also serve on a private Unix socket at this path")
    p.add_argument("--fd-socket", help="Unix socket path handing the TCP listening fd to same-uid peers")
    p.add_argument("--activity", help="count requests in this activity file (an on-demand service's, see activity.py)")
    p.add_argument("--counters", help="count requests by status and duration in this file (see counters.py)")
    p.add_argument(
        "--drain",
        type=float,
        default=0.3,
        help="at most this many seconds between stop-accepting and shutdown (less once no connection is open)",
    )
    args = p.parse_args(argv)
    if args.fd is None and (args.host is None or args.port is None):
        p.error("either --fd or both --host and --port are required")
    if args.fd is not None and (args.host is not None or args.port is not None):
        p.error("--fd cannot be combined with --host/--port")
    if args.drain < 0:
        p.error("--drain must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    service = os.environ.get("MODELD_SERVICE_UUID", "")
    set_title(f"{SERVER_NAME} {args.model_name} {service[:8]}".strip())
    try:
        tcp = listening_socket(args.fd, args.host, args.port)
    except OSError as exc:
        where = f"--fd {args.fd}" if args.fd is not None else f"{args.host}:{args.port}"
        log(f"cannot use {where}: {exc}")
        return EXIT_USAGE

    try:
        predict = load_model(args.model_uri, args.model_type)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # noqa: BLE001  (whatever the model's code raises is reported, as EXIT_LOAD)
        import traceback

        traceback.print_exc()
        message = str(exc).replace("\n", " ")
        log(f"cannot load model '{args.model_uri}': {type(exc).__name__}: {message}")
        return EXIT_LOAD

    sockets = [tcp]
    unix_ino: int | None = None
    handoff: FdHandoff | None = None
    try:
        if args.unix:
            unix = bind_unix(args.unix)
            unix_ino = os.stat(args.unix).st_ino
            sockets.append(unix)
        if args.fd_socket:
            handoff = FdHandoff(args.fd_socket, tcp)
    except OSError as exc:
        log(f"cannot create unix socket: {exc}")
        return EXIT_USAGE

    app = App(args.model_name, predict)
    asgi: App | MeasureRequests = app
    if args.activity or args.counters:
        try:
            activity = ActivityWriter(args.activity) if args.activity else None
        except OSError as exc:
            log(f"cannot open the activity file {args.activity}: {exc}")
            return EXIT_USAGE
        try:
            counters = RequestCounters(args.counters) if args.counters else None
        except (OSError, ValueError) as exc:  # (the metrics lose this server's counts; it serves all the same)
            log(f"cannot open the request counters {args.counters}: {exc}")
            counters = None
        asgi = MeasureRequests(app, counters, activity)
    config = uvicorn.Config(
        asgi,
        http="h11",
        ws="none",
        lifespan="off",
        interface="asgi3",
        proxy_headers=False,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )

    def started() -> None:
        log(f"serving model '{args.model_name}' ({args.model_uri}) pid {os.getpid()}")

    server = Server(config, app, args.drain, on_started=started)

    async def run() -> None:
        if handoff is not None:
            handoff.start(asyncio.get_running_loop())
        try:
            await server.serve(sockets=sockets)
        finally:
            if handoff is not None:
                handoff.close()
            if unix_ino is not None:
                unlink_if_ours(args.unix, unix_ino)

    asyncio.run(run())
    return 0
