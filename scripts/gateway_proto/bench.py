"""Measure the gateway prototype against direct requests, in one run (issue 11's figures).

    /work/main/.venv/bin/python scripts/gateway_proto/bench.py [--seconds 2] [--requests 2000]

Starts the built-in model server (iris, uvicorn), the SSE backend (sse_backend.py, uvicorn) and
the gateway (python -m daemon.gateway), each a process of its own, then measures:

* gateway_overhead_us: p50 (and p99) latency of POST /v1/models/iris:predict, keep-alive, small
  body, through the gateway minus direct; requests alternate direct/gateway so both see the same
  noise. The client is a raw blocking socket (its own cost is the same on both paths).
* gateway_rps_ratio: requests/s through the gateway / direct, 8 concurrent keep-alive clients
  (one asyncio process), alternating direct/gateway windows.
* stream_first_byte_over_direct_ms: time to the first SSE event (events 500 ms apart) through
  the gateway minus direct; also checks the second event arrives ~500 ms later (no buffering).
* retry: a backend that closes a kept-alive connection on its second request without answering;
  the gateway must answer every request (retried once on a new connection).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
BODY = b'{"instances": [[5.1, 3.5, 1.4, 0.2]]}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port}")


def predict_request(path: bytes) -> bytes:
    return b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        path,
        len(BODY),
        BODY,
    )


def read_response(sock: socket.socket, buf: bytearray) -> tuple[int, bytes]:
    while (end := buf.find(b"\r\n\r\n")) < 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    head = bytes(buf[:end]).lower()
    status = int(head[9:12])
    length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
    while len(buf) < end + 4 + length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    body = bytes(buf[end + 4 : end + 4 + length])
    del buf[: end + 4 + length]
    return status, body


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def latency(direct_port: int, gw_port: int, n: int, gw_path: bytes = b"/v1/models/iris:predict") -> dict[str, float]:
    socks = {k: socket.create_connection(("127.0.0.1", p)) for k, p in (("direct", direct_port), ("gateway", gw_port))}
    for s in socks.values():
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reqs = {"direct": predict_request(b"/v1/models/iris:predict"), "gateway": predict_request(gw_path)}
    bufs = {k: bytearray() for k in socks}
    times: dict[str, list[float]] = {"direct": [], "gateway": []}
    for i in range(n + 200):
        for k in ("direct", "gateway") if i % 2 else ("gateway", "direct"):
            t = time.perf_counter()
            socks[k].sendall(reqs[k])
            status, body = read_response(socks[k], bufs[k])
            dt = time.perf_counter() - t
            assert status == 200 and b"predictions" in body, (status, body)
            if i >= 200:
                times[k].append(dt * 1e6)
    for s in socks.values():
        s.close()
    d50, g50 = statistics.median(times["direct"]), statistics.median(times["gateway"])
    return {
        "direct_p50_us": round(d50),
        "gateway_p50_us": round(g50),
        "direct_p99_us": round(pct(times["direct"], 0.99)),
        "gateway_p99_us": round(pct(times["gateway"], 0.99)),
        "gateway_overhead_us": round(g50 - d50),
        "n": n,
    }


async def rps_window(port: int, seconds: float, path: bytes, clients: int = 8) -> float:
    req = predict_request(path)
    count = 0
    stop = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal count
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < stop:
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            count += 1
        writer.close()

    t = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(clients)))
    return count / (time.perf_counter() - t)


def rps(direct_port: int, gw_port: int, seconds: float, gw_path: bytes = b"/v1/models/iris:predict") -> dict[str, float]:
    d, g = [], []
    for _ in range(2):
        d.append(asyncio.run(rps_window(direct_port, seconds / 2, b"/v1/models/iris:predict")))
        g.append(asyncio.run(rps_window(gw_port, seconds / 2, gw_path)))
    direct, gateway = statistics.mean(d), statistics.mean(g)
    return {"direct_rps": round(direct), "gateway_rps": round(gateway), "gateway_rps_ratio": round(gateway / direct, 2)}


def first_event(port: int, path: bytes, sock: socket.socket | None = None) -> tuple[float, float]:
    """Seconds to the first SSE event and from it to the second (500 ms later unless something buffers); then hangs up (or, on a kept
    ``sock``, reads the stream to its end so the connection is reused)."""
    with socket.create_connection(("127.0.0.1", port)) if sock is None else _kept(sock) as s:
        t = time.perf_counter()
        s.sendall(b"GET %s HTTP/1.1\r\nhost: x\r\n\r\n" % path)
        buf, first, gap = b"", 0.0, 0.0
        until = b"data: 1" if sock is None else b"0\r\n\r\n"
        while until not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
            if not first and b"data: 0" in buf:
                first = time.perf_counter()
            if first and not gap and b"data: 1" in buf:
                gap = time.perf_counter() - first
        return first - t, gap


class _kept:
    def __init__(self, sock: socket.socket):
        self.sock = sock

    def __enter__(self) -> socket.socket:
        return self.sock

    def __exit__(self, *exc: object) -> None:
        pass


def streaming(direct_port: int, gw_port: int, runs: int, kept: bool) -> dict[str, float]:
    """First SSE event, direct vs gateway: ``kept``: both on kept-alive connections (the gateway's
    backend connection pooled), else a new connection per stream, hung up after two events."""
    d, g, gaps = [], [], []
    ds = socket.create_connection(("127.0.0.1", direct_port)) if kept else None
    gs = socket.create_connection(("127.0.0.1", gw_port)) if kept else None
    for i in range(runs + (1 if kept else 0)):
        a, _gap = first_event(direct_port, b"/stream?n=2" if kept else b"/disconnect", ds)
        b, gap = first_event(gw_port, b"/v1/services/llm/stream?n=2" if kept else b"/v1/services/llm/disconnect", gs)
        if kept and i == 0:
            continue  # the first opens the pooled connection
        d.append(a * 1e3)
        g.append(b * 1e3)
        gaps.append(gap * 1e3)
    return {
        "direct_first_ms": round(statistics.median(d), 2),
        "gateway_first_ms": round(statistics.median(g), 2),
        "stream_first_byte_over_direct_ms": round(statistics.median(g) - statistics.median(d), 2),
        "gateway_second_event_gap_ms": round(statistics.median(gaps), 1),
        "runs": runs,
    }


def closing_backend() -> tuple[int, list[int]]:
    """A backend that answers the first request of a connection, then closes on the second without a byte."""
    srv = socket.create_server(("127.0.0.1", 0))
    accepted = [0]

    def conn(c: socket.socket) -> None:
        with c:
            buf = bytearray()
            served = 0
            while True:
                data = c.recv(65536)
                if not data:
                    return
                buf += data
                while (end := buf.find(b"\r\n\r\n")) >= 0:
                    length = (
                        int(bytes(buf[:end]).lower().split(b"content-length:")[1].split(b"\r\n")[0])
                        if b"content-length" in bytes(buf[:end]).lower()
                        else 0
                    )
                    if len(buf) < end + 4 + length:
                        break
                    del buf[: end + 4 + length]
                    if served:
                        return  # the keep-alive race: gone before answering
                    served += 1
                    c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    def loop() -> None:
        while True:
            c, _ = srv.accept()
            accepted[0] += 1
            threading.Thread(target=conn, args=(c,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return srv.getsockname()[1], accepted


def retry_check(gw_port: int, accepted: list[int], n: int = 50) -> dict[str, int]:
    ok = 0
    with socket.create_connection(("127.0.0.1", gw_port)) as s:
        buf = bytearray()
        for _ in range(n):
            s.sendall(predict_request(b"/v1/services/closer/x"))
            status, _body = read_response(s, buf)
            ok += status == 200
    return {"requests": n, "answered_200": ok, "backend_connections": accepted[0]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0, help="rps: seconds per path")
    ap.add_argument("--requests", type=int, default=3000, help="latency: requests per path")
    ap.add_argument("--stream-runs", type=int, default=16)
    ap.add_argument("--gateway-arg", action="append", default=[], help="passed to the gateway (e.g. --no-spare)")
    args = ap.parse_args()
    iris, sse, gw = free_port(), free_port(), free_port()
    closer, accepted = closing_backend()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen(
            [
                PY,
                "-m",
                "daemon.runtime.serve",
                "--model-uri",
                "examples/iris.py:model",
                "--model-type",
                "python",
                "--model-name",
                "iris",
                "--host",
                "127.0.0.1",
                "--port",
                str(iris),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [
                PY,
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
        subprocess.Popen(
            [
                PY,
                "-m",
                "daemon.gateway",
                "--listen",
                f"127.0.0.1:{gw}",
                "--route",
                f"name=iris,addr=127.0.0.1:{iris}",
                "--route",
                f"name=llm,addr=127.0.0.1:{sse}",
                "--route",
                f"name=closer,addr=127.0.0.1:{closer}",
                *args.gateway_arg,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
        ),
    ]
    try:
        for p in (iris, sse, gw):
            wait_port(p)
        result = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
        # the fast backend: an ASGI app that answers on its loop (uvicorn, h11: httptools is absent)
        result["latency_asgi"] = latency(sse, gw, args.requests, b"/v1/models/llm:predict")
        result["rps_asgi"] = rps(sse, gw, args.seconds * 2, b"/v1/models/llm:predict")
        # the built-in model server (iris; predict runs in a thread, asyncio.to_thread)
        result["latency_iris"] = latency(iris, gw, args.requests // 4)
        result["rps_iris"] = rps(iris, gw, args.seconds * 2)
        result["stream_kept_alive"] = streaming(sse, gw, args.stream_runs, kept=True)
        result["stream_new_connection"] = streaming(sse, gw, args.stream_runs, kept=False)
        result["retry"] = retry_check(gw, accepted)
        result["gateway_rss_mb"] = round(
            int(Path(f"/proc/{procs[2].pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024, 1
        )
        print(json.dumps(result, indent=1))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
