"""Run the gateway: ``python -m daemon.gateway --home H --fd N --control H/run/gateway.sock``.

As the daemon starts it (``daemon/gatewayd.py``): ``--fd`` is the listening socket the daemon
binds and keeps for life, ``--home`` the home whose ``services/*/service.json`` make the routing
table (``home.py``), ``--control`` its private control socket.

The control socket (0600 in the home's private ``run/``; a peer of another uid is refused): a
client that connects gets one message and the listening fd with it (SCM_RIGHTS), then EOF. The
message is JSON: ``{"pid", "host", "port", "timeout", "max_body", "wake_timeout", "routes", "watch"}``. A daemon
restarted after a kill -9 takes the port back this way and checks what the gateway was started
with; anyone may use it as a health check.

Without ``--home`` (the prototype's bench): ``--listen host:port`` and a static table from
``--route name=iris,addr=127.0.0.1:8000[,uuid=…,state=…,error=…,type=command,idle=S,startup=S]``
(repeatable; ``--daemon-socket`` says where to ask for wakes, which ``--home`` implies).
``--wake-timeout S``: how long a request waits for its service to wake (0: the service's
startup_timeout; see ``wake.py``). SIGTERM or SIGINT: stop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .home import HomeTable
from .pool import Gateway
from .proxy import Downstream
from .routes import Entry, Table

DRAIN = 30.0  # seconds a stopping gateway gives the responses in flight (the daemon's stop: 5, then SIGKILL)


def parse_route(spec: str) -> Entry:
    fields = dict(part.split("=", 1) for part in spec.split(","))
    host, _, port = fields["addr"].rpartition(":")
    name = fields["name"]
    return Entry(
        uuid=fields.get("uuid", name),
        name=name,
        host=host,
        port=int(port),
        state=fields.get("state", "active"),
        last_error=fields.get("error", ""),
        model_type=fields.get("type", "command"),
        idle_timeout=float(fields["idle"]) if "idle" in fields else None,
        startup_timeout=float(fields.get("startup", 300.0)),
    )


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} gateway[{os.getpid()}]: {message}", flush=True)


class DaemonWatch:
    """Whether the home's daemon lives (daemon.pid checked against its start ticks; a zombie is dead),
    for the 502's message and for requests waiting on a wake the daemon was making (wake.py)."""

    def __init__(self, home: Path):
        self.record = home / "daemon.pid"

    def __call__(self) -> bool:
        try:
            pid, ticks = self.record.read_text().split()[:2]
            with open(f"/proc/{int(pid)}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
            return fields[0] not in (b"Z", b"X") and fields[19] == ticks.encode()
        except (OSError, ValueError, IndexError):
            return False


class Control:
    """The control socket: hands the listener and a status line to a same-uid peer."""

    def __init__(self, path: str, listener: socket.socket, status: dict[str, object], table: HomeTable | None):
        self.path = path
        self.listener = listener
        self.status = status
        self.table = table
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        self.ino = os.stat(path).st_ino
        self.sock.listen(16)
        self.sock.setblocking(False)

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            try:
                size = struct.calcsize("3i")
                _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, size))
                if uid != os.getuid():
                    return
                conn.settimeout(1.0)
                status = dict(self.status)
                if self.table is not None:
                    status.update(routes=len(self.table.entries), watch=self.table.mode)
                socket.send_fds(conn, [json.dumps(status).encode()], [self.listener.fileno()])
            except OSError as exc:
                log(f"control: {exc}")

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self.ino:  # (not the file of a gateway started since)
                os.unlink(self.path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m daemon.gateway")
    p.add_argument("--home", type=Path, help="route to the services of this modeld home")
    p.add_argument("--control", help="the control socket's path (with --home)")
    p.add_argument("--listen", default="127.0.0.1:9277")
    p.add_argument("--fd", type=int)
    p.add_argument("--route", action="append", default=[], type=parse_route)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--max-body", type=int, default=64 * 1024 * 1024)
    p.add_argument("--no-spare", action="store_true", help="open backend connections only on demand")
    p.add_argument("--watch", choices=("auto", "poll"), default="auto", help="how to follow the home's records (auto: inotify)")
    p.add_argument("--wake-timeout", type=float, default=0.0, help="seconds a request waits for a wake (0: startup_timeout)")
    p.add_argument("--daemon-socket", type=Path, help="the daemon's control socket, for wakes (default: HOME/modeld.sock)")
    args = p.parse_args(argv)
    if args.timeout <= 0 or args.max_body <= 0:
        p.error("--timeout and --max-body must be more than 0")
    if not 0 <= args.wake_timeout < float("inf"):
        p.error("--wake-timeout must be 0 or more, and finite")
    if args.daemon_socket is None and args.home is not None:
        args.daemon_socket = args.home / "modeld.sock"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # two fds per request in flight (client and backend), and the pooled ones
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    gw = Gateway(
        Table(args.route),
        timeout=args.timeout,
        max_body=args.max_body,
        spare=not args.no_spare,
        wake_timeout=args.wake_timeout,
        daemon_socket=args.daemon_socket,
        activity_folder=args.home / "run" / "activity" if args.home is not None else None,
        requests_folder=args.home / "run" / "requests" if args.home is not None else None,
    )

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        if args.fd is not None:
            sock = socket.socket(fileno=args.fd)
            sock.set_inheritable(False)
        else:
            host, _, port = args.listen.rpartition(":")
            sock = socket.create_server((host, int(port)), backlog=1024, reuse_port=False)
        table: HomeTable | None = None
        if args.home is not None:
            gw.daemon_alive = DaemonWatch(args.home)
            table = HomeTable(args.home, gw.set_table, watch=args.watch)
            table.start()
            gw.refresh = table.refresh
        server = await loop.create_server(lambda: Downstream(gw), sock=sock)
        host, port = sock.getsockname()[:2]
        status = {
            "pid": os.getpid(),
            "host": host,
            "port": port,
            "timeout": args.timeout,
            "max_body": args.max_body,
            "wake_timeout": args.wake_timeout,
        }
        control = Control(args.control, sock, status, table) if args.control else None
        if control is not None:
            control.start()
        log(f"listening on {host}:{port}" + (f", {len(table.entries)} services, watching by {table.mode}" if table else ""))
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()  # no new connection here (the next gateway accepts on the same port)
        await gw.drain(min(args.timeout, DRAIN))
        gw.activities.close()
        gw.counted.close()
        if control is not None:
            control.close()
        log("stopped")

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve())
    return 0


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (a dependency on Linux: it costs less per request than
    asyncio's, about 80 us of the gateway's overhead here), else asyncio's; MODELD_GATEWAY_LOOP=asyncio
    forces asyncio's."""
    if os.environ.get("MODELD_GATEWAY_LOOP") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    sys.exit(main())
