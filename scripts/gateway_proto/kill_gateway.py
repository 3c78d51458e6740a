"""kill -9 of the gateway while its port is held by a parent (as the daemon would hold it).

    /work/main/.venv/bin/python scripts/gateway_proto/kill_gateway.py

The parent binds the port, starts ``python -m daemon.gateway --fd N``, and keeps its copy of the
socket. A client makes one request per new connection (GET /v1/models, answered by the gateway)
for 4 s; at 1 s and at 2.5 s the gateway is killed with SIGKILL and started again on the same fd.
Prints the requests made, the failures, and the slowest request (the restart shows as latency).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def spawn(sock: socket.socket) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "daemon.gateway", "--fd", str(sock.fileno()), "--route", "name=x,addr=127.0.0.1:1"],
        cwd=REPO,
        pass_fds=[sock.fileno()],
        stdout=subprocess.DEVNULL,
    )


def main() -> int:
    sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
    port = sock.getsockname()[1]
    proc = spawn(sock)
    stop = time.monotonic() + 4.0
    ok, failed, slowest = 0, [], 0.0

    def client() -> None:
        nonlocal ok, slowest
        while time.monotonic() < stop:
            t = time.perf_counter()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                    c.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                    data = b""
                    while chunk := c.recv(65536):
                        data += chunk
                if not data.startswith(b"HTTP/1.1 200"):
                    raise ConnectionError(data[:40])
                ok += 1
            except OSError as exc:
                failed.append(repr(exc))
            slowest = max(slowest, time.perf_counter() - t)

    threads = [threading.Thread(target=client) for _ in range(2)]
    time.sleep(0.6)  # the first gateway's start
    for t in threads:
        t.start()
    for wait in (1.0, 1.5):
        time.sleep(wait)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc = spawn(sock)  # the supervisor's restart: same fd, same port
    for t in threads:
        t.join()
    proc.terminate()
    proc.wait()
    print({"port": port, "requests_ok": ok, "failed": len(failed), "failures": failed[:3], "slowest_ms": round(slowest * 1e3, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
