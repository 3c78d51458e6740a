"""Run the gateway prototype: ``python -m daemon.gateway --listen 127.0.0.1:9277 --route name=iris,addr=127.0.0.1:8000``.

``--route`` (repeatable): comma-separated ``name=``, ``addr=host:port``, optional ``uuid=`` (default:
the name), ``state=`` (default active), ``error=`` (last_error). ``--fd N`` serves an inherited,
listening socket instead of binding ``--listen`` (how the daemon would keep the port for life).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys

from .proxy import Downstream, Gateway
from .routes import Entry, Table


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
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m daemon.gateway")
    p.add_argument("--listen", default="127.0.0.1:9277")
    p.add_argument("--fd", type=int)
    p.add_argument("--route", action="append", default=[], type=parse_route)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--max-body", type=int, default=64 * 1024 * 1024)
    p.add_argument("--no-spare", action="store_true", help="open backend connections only on demand")
    args = p.parse_args(argv)
    gw = Gateway(Table(args.route), timeout=args.timeout, max_body=args.max_body, spare=not args.no_spare)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        if args.fd is not None:
            sock = socket.socket(fileno=args.fd)
        else:
            host, _, port = args.listen.rpartition(":")
            sock = socket.create_server((host, int(port)), backlog=1024, reuse_port=False)
        server = await loop.create_server(lambda: Downstream(gw), sock=sock)
        print(f"gateway listening on {sock.getsockname()[0]}:{sock.getsockname()[1]}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
