"""The floor of any asyncio proxy on this machine: a TCP relay that parses nothing.

    /work/main/.venv/bin/python scripts/gateway_proto/floor.py

One client connection is paired with one backend connection and bytes are copied both ways (no
HTTP, no pool, no routing). Starts the ASGI backend, the relay and the gateway, and alternates
direct, relay and gateway keep-alive requests, as bench.py's latency does. relay - direct is
what any asyncio proxy costs here; gateway - relay is what the gateway's HTTP handling adds.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import REPO, free_port, predict_request, read_response, wait_port  # noqa: E402


class Relay(asyncio.Protocol):
    def __init__(self, backend: tuple[str, int]):
        self.backend = backend
        self.peer: asyncio.Transport | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        other = Back(self)
        self.peer, _ = await loop.create_connection(lambda: other, *self.backend)
        for data in self.early:
            self.peer.write(data)

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.early.append(data)
        else:
            self.peer.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.close()


class Back(asyncio.Protocol):
    def __init__(self, front: Relay):
        self.front = front

    def data_received(self, data: bytes) -> None:
        self.front.transport.write(data)  # type: ignore[attr-defined]


def relay_main(port: int, backend: int) -> None:
    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(lambda: Relay(("127.0.0.1", backend)), "127.0.0.1", port)
        await server.serve_forever()

    asyncio.run(serve())


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "relay":
        relay_main(int(sys.argv[2]), int(sys.argv[3]))
        return 0
    sse, relay, gw = free_port(), free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(REPO / "scripts/gateway_proto"),
                "sse_backend:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(sse),
                "--log-level",
                "warning",
            ],
            cwd=REPO,
            env=env,
        ),
        subprocess.Popen([sys.executable, __file__, "relay", str(relay), str(sse)], cwd=REPO, env=env),
        subprocess.Popen(
            [sys.executable, "-m", "daemon.gateway", "--listen", f"127.0.0.1:{gw}", "--route", f"name=llm,addr=127.0.0.1:{sse}"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
        ),
    ]
    try:
        for p in (sse, relay, gw):
            wait_port(p)
        paths = {
            "direct": (sse, b"/v1/models/x:predict"),
            "relay": (relay, b"/v1/models/x:predict"),
            "gateway": (gw, b"/v1/models/llm:predict"),
        }
        socks = {k: socket.create_connection(("127.0.0.1", p)) for k, (p, _) in paths.items()}
        bufs = {k: bytearray() for k in paths}
        times: dict[str, list[float]] = {k: [] for k in paths}
        for i in range(3200):
            for k in paths:
                t = time.perf_counter()
                socks[k].sendall(predict_request(paths[k][1]))
                status, _ = read_response(socks[k], bufs[k])
                assert status == 200
                if i >= 200:
                    times[k].append((time.perf_counter() - t) * 1e6)
        p50 = {k: statistics.median(v) for k, v in times.items()}
        print(
            {f"{k}_p50_us": round(v) for k, v in p50.items()}
            | {
                "relay_over_direct_us": round(p50["relay"] - p50["direct"]),
                "gateway_over_relay_us": round(p50["gateway"] - p50["relay"]),
            }
        )
    finally:
        for p in procs:
            p.terminate()
            p.wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
