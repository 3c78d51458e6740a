"""A few figures of the core, each beside its floor measured in the same run; prints one JSON line.

    python scripts/core_figures.py [--runs 20]

- cold_floor_ms: spawn python running a bare uvicorn raw-ASGI app until GET /health answers 200
- deploy_ms: deploy_model of a trivial python model until the call returns with the server answering
- crash_recover_ms: kill -9 of that server until a new one answers on the same port
- stop_ms: graceful stop until the call returns (the port is closed by then)

A fuller benchmark against peers is scripts/bench.py's job (issue 4); this one only
keeps the core honest. Runs in a temp MODELD_HOME and stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BARE_APP = """
import sys, uvicorn
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", lifespan="off")
"""


def healthy(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
            return s.recv(64).split()[1:2] == [b"200"]
    except (OSError, IndexError):
        return False


def wait(cond, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.005)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cold_floor(folder: Path) -> float:
    script = folder / "bare.py"
    script.write_text(BARE_APP)
    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(script), str(port)], start_new_session=True)
    try:
        wait(lambda: healthy(port))
        return time.perf_counter() - start
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def summary(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    return {"p50": round(statistics.median(ms), 1), "p99": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    runs = parser.parse_args().runs
    folder = Path(tempfile.mkdtemp(prefix="mf", dir="/tmp"))
    os.environ["MODELD_HOME"] = str(folder / "h")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from daemon import DaemonClient, ServiceConfig

    (folder / "m.py").write_text("def model(instances):\n    return instances\n")
    client = DaemonClient(home=folder / "h")
    client.daemon_info()  # start the daemon outside the timings
    figures: dict[str, list[float]] = {"cold_floor_ms": [], "deploy_ms": [], "crash_recover_ms": [], "stop_ms": []}
    try:
        for i in range(runs):  # alternate floor and product, so both see the same noise
            figures["cold_floor_ms"].append(cold_floor(folder))
            start = time.perf_counter()
            svc = client.deploy(ServiceConfig(model_name=f"m{i}", model_uri=f"{folder}/m.py:model"), timeout=60)
            figures["deploy_ms"].append(time.perf_counter() - start)
            port, pid = svc.endpoint.port, svc.status.pid
            start = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            wait(lambda: healthy(port) and client.get(svc.uuid).status.pid not in (None, pid))
            figures["crash_recover_ms"].append(time.perf_counter() - start)
            start = time.perf_counter()
            client.stop(svc.uuid, timeout=10)
            figures["stop_ms"].append(time.perf_counter() - start)
            client.delete(svc.uuid, force=True)
    finally:
        client.shutdown(stop_services=True)
    result = {name: summary(values) for name, values in figures.items()}
    result["deploy_over_floor"] = round(result["deploy_ms"]["p50"] / result["cold_floor_ms"]["p50"], 2)
    result["runs"] = runs
    print(json.dumps(result))


if __name__ == "__main__":
    main()
