"""modeld beside the physical floor, measured side by side in one run; prints one JSON object.

    python scripts/bench.py [--quick] [--runs N] [--live N] [--registered N] [--idle S]

A readable table goes to stderr; the JSON object (medians and p99s) to stdout.
These machines are small and shared, so every product figure is measured in the
same run as its floor, alternating, and the ratios are taken against that floor.

| figure                    | how                                                                     |
|---------------------------|-------------------------------------------------------------------------|
| cold_floor_ms             | spawn python running a bare uvicorn raw-ASGI app until GET /health is 200 (polled every 5 ms) |
| deploy_ms                 | deploy of a trivial built-in python model until the call returns with the server answering |
| uds_floor_us              | GET on a bare uvicorn raw-ASGI app over a Unix socket (keep-alive, body read)  |
| find_one_us               | filtered find (one match) over the daemon's socket, N services registered (same client code) |
| list_all_ms               | GET /v1/services with N services registered, until the whole body is read |
| stop_ms                   | graceful stop of a built-in server until the call returns and the port is closed |
| crash_recover_ms          | kill -9 of a server until its port answers again, from a new pid         |
| readopt_ms                | restart the daemon with the live servers until all are reported active again (each after a fresh probe) |
| daemon_rss_mb / daemon_idle_cpu_pct | the daemon with the live servers, idle but for a client scraping /metrics every second |
| metrics_scrape_ms         | GET /metrics over the daemon's socket with the live servers, until the whole body is read (keep-alive) |
|                           | back to back: most are answered with memory/CPU readings younger than 5 s (procstat.MAX_AGE) |
| metrics_scrape_1hz_ms     | the same, of the scrapes every second of the idle windows (every fifth or so reads them anew) |
| replace_*                 | replace of a built-in server while a client sends requests as fast as it can, one connection each, |
|                           | from 0.3 s before to 0.3 s after; failures count them all, latency those overlapping the replace call |
| list_live_ms              | GET /v1/services with the live servers, until the whole body is read     |
| list_*_floor_ms           | GET of a body of the list's size from the bare uvicorn app (the transport's floor), alternating |
| fds_per_live_service      | the daemon's open fds, less those it has with no service, per live server |
| logd_rss_mb, logd_kib_per_live_service | the log writer (one per home) with the live servers    |
| log_flood_api_p99_ms      | GET /v1/daemon while a server writes its log as fast as it can, beside the same calls with it stopped |
| gateway_overhead_us       | p50 latency through the gateway minus direct, alternating, keep-alive, small POST, to an ASGI |
|                           | server deployed as a command service (scripts/gateway_proto/sse_backend.py, answers on its loop) |
| gateway_rps_ratio         | requests/s through the gateway / direct, 8 keep-alive clients, alternating windows |
| stream_first_byte_over_direct_ms | first SSE event (events 500 ms apart) through the gateway minus direct, kept-alive connections |
| gateway_rss_mb, gateway_idle_cpu_pct | the gateway process, with the live servers, idle (beside the daemon's idle figures) |
| wake_ms, wake_via_gateway_ms, idle_cycle_*, admission_* | on demand: see scripts/bench_ondemand.py |
| event_latency_ms          | kill -9 of a live server until a client streaming GET /v1/events reads its exited event; one |
|                           | client streams events from before the idle figures on (see scripts/bench_events.py) |
| apply_noop_ms             | apply of an unchanged file describing the live servers: see scripts/bench_apply.py (alone: run it) |

The daemons here run with a gateway (``MODELD_GATEWAY=:0``), so the daemon's RSS and idle CPU
are measured with it running.

``--live 1000`` is the scale run (not in CI): its targets are the scale ones (daemon RSS
<= 60 MiB, idle CPU <= 2 % of a core, re-adoption of all <= 3 s); up to 100 live servers
the targets are the everyday ones (40 MiB, 1 %, 1 s).

The registered services for find/list are written to disk as stopped services
(no process) before their daemon starts; the live servers are real processes.
Everything runs in temp homes under /tmp and every process started is killed at
the end by pid / process group (also on Ctrl-C or an error), never by name.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import bench_events
import bench_apply
import bench_ondemand
from daemon import DaemonClient, DesiredState, LocalModelService, ServiceConfig, ServiceState
from daemon.linux import ProcessIdentity
from daemon.testing import UnixHTTP, free_port, read_pid, reap, reap_home, wait_for

BARE_APP = """
import sys, uvicorn
BODIES = {}
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    path = scope["path"]  # /bytes/N: N bytes (the floor of a list answer of that size), else "ok"
    body = BODIES.get(path) or BODIES.setdefault(path, b"x" * int(path[7:]) if path.startswith("/bytes/") else b"ok")
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
where = sys.argv[1]
if where.isdigit():
    uvicorn.run(app, host="127.0.0.1", port=int(where), log_level="warning", lifespan="off")
else:
    uvicorn.run(app, uds=where, log_level="warning", lifespan="off")
"""
MODEL = "def model(instances):\n    return instances\n"
FLOOD = """
import http.server, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
threading.Thread(target=server.serve_forever, daemon=True).start()
line = b"flood " + b"x" * 120 + b"\\n"
out = sys.stdout.buffer
while True:
    out.write(line * 64)
"""
# The figures poll every 5 ms: the interval bounds how precisely a wait is timed.
poll = functools.partial(wait_for, timeout=30, interval=0.005)
SCALE = 1000  # live servers from which the scale targets apply

TARGETS = {  # figure -> (description, check on the result)
    "deploy_ms": ("p50 <= 1.25 x cold_floor_ms", lambda r: r["deploy_ms"]["p50"] <= 1.25 * r["cold_floor_ms"]["p50"]),
    "find_one_us": ("p50 <= 2 x uds_floor_us", lambda r: r["find_one_us"]["p50"] <= 2 * r["uds_floor_us"]["p50"]),
    "list_all_ms": ("p50 <= 5 ms", lambda r: r["list_all_ms"]["p50"] <= 5),
    "stop_ms": ("p50 <= 150 ms", lambda r: r["stop_ms"]["p50"] <= 150),
    "crash_recover_ms": ("p50 <= cold_floor_ms + 50", lambda r: r["crash_recover_ms"]["p50"] <= r["cold_floor_ms"]["p50"] + 50),
    "readopt_ms": ("<= 1000 ms (3000 at scale), 0 restarted",
                   lambda r: r["readopt_ms"]["max"] <= (3000 if _scale(r) else 1000) and r["readopt_restarted"] == 0),
    "daemon_rss_mb": ("<= 40 MiB (60 at scale)", lambda r: r["daemon_rss_mb"] <= (60 if _scale(r) else 40)),
    "daemon_idle_cpu_pct": ("<= 1 % of a core (2 at scale)", lambda r: r["daemon_idle_cpu_pct"] <= (2 if _scale(r) else 1)),
    "replace_failed_requests": ("0 failed", lambda r: r["replace_failed_requests"] == 0),
    "list_live_ms": ("p50 <= 5 ms", lambda r: r["list_live_ms"]["p50"] <= 5),
    "apply_noop_ms": ("p50 <= 50 ms (100 services)", lambda r: r["apply_noop_ms"]["p50"] <= 50),
    "metrics_scrape_ms": ("p50 <= 20 ms", lambda r: r["metrics_scrape_ms"]["p50"] <= 20),
    "log_flood_api_p99_ms": ("p99 <= 50 ms", lambda r: r["log_flood_api_p99_ms"] <= 50),
    "gateway_overhead_us": ("<= 300 us", lambda r: r["gateway_overhead_us"] <= 300),
    "gateway_rps_ratio": (">= 0.5", lambda r: r["gateway_rps_ratio"] >= 0.5),
    "stream_first_byte_over_direct_ms": ("<= 1 ms", lambda r: r["stream_first_byte_over_direct_ms"] <= 1),
    "event_latency_ms": ("p50 <= 20 ms", lambda r: r["event_latency_ms"]["p50"] <= 20),
    "wake_ms": ("p50 <= 0.5 x the cold floor (wake_over_floor)", lambda r: r["wake_over_floor"] <= 0.5),
    "idle_cycle_failed_requests": ("0 failed, >= 20 idle cycles", lambda r: r["idle_cycle_failed_requests"] == 0
                                   and (r["idle_cycles"] >= 20 or r["setup"]["quick"])),
    "admission_max_alive": ("0 failed, never more than 3 alive", lambda r: r["admission_failed_requests"] == 0
                            and r["admission_max_alive"] <= 3),
}


def _scale(result: dict[str, Any]) -> bool:
    return bool(result["setup"]["live"] >= SCALE)


# ------------------------------------------------------------------ helpers


def summary(values: list[float], scale: float) -> dict[str, float]:
    """p50 and p99 (nearest rank) of ``values`` (seconds) in the unit of ``scale``."""
    xs = sorted(v * scale for v in values)
    p99 = xs[min(len(xs) - 1, max(0, int(round(len(xs) * 0.99)) - 1))]
    return {"p50": round(statistics.median(xs), 1), "p99": round(p99, 1), "n": len(xs)}


def healthy(port: int, path: str = "/health") -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            return s.recv(64).split()[1:2] == [b"200"]
    except (OSError, IndexError):
        return False


def port_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# ------------------------------------------------------------ process reaper


class Reaper:
    """Every process the benchmark started or saw, and its homes: killed at the end by pid checked
    with its start time, or by the group it leads (``daemon.testing.reap``)."""

    def __init__(self) -> None:
        self.idents: set[ProcessIdentity] = set()
        self.homes: list[Path] = []

    def note(self, pid: int | None) -> None:
        if pid:
            ident = ProcessIdentity.of(pid)
            if ident is not None:
                self.idents.add(ident)

    def wait_daemons(self, timeout: float) -> None:
        """Give daemons asked to shut down time to stop their servers themselves."""
        daemons = [i for home in self.homes for i in read_pid(home / "daemon.pid") if i.is_alive()]
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not any(d.is_alive() for d in daemons), timeout, interval=0.02, what="the daemons to exit")

    def kill_all(self) -> int:
        return reap(self.idents) + sum(reap_home(home) for home in self.homes)


# ------------------------------------------------------------------ figures


@contextlib.contextmanager
def bare_server(folder: Path, where: str, reaper: Reaper) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, str(folder / "bare.py"), where], start_new_session=True)
    reaper.note(proc.pid)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def cold_floor(folder: Path, reaper: Reaper) -> float:
    port = free_port()
    start = time.perf_counter()
    with bare_server(folder, str(port), reaper):
        poll(lambda: healthy(port), what="the bare uvicorn server")
        return time.perf_counter() - start


def lifecycle_runs(client: DaemonClient, folder: Path, runs: int, reaper: Reaper) -> dict[str, list[float]]:
    """cold floor, deploy, crash recovery and stop, alternating so that all see the same noise."""
    figures: dict[str, list[float]] = {"cold_floor_ms": [], "deploy_ms": [], "crash_recover_ms": [], "stop_ms": []}
    for i in range(runs):
        figures["cold_floor_ms"].append(cold_floor(folder, reaper))
        start = time.perf_counter()
        svc = client.deploy(ServiceConfig(model_name=f"life{i}", model_uri=f"{folder}/m.py:model"), timeout=60)
        figures["deploy_ms"].append(time.perf_counter() - start)
        reaper.note(svc.status.pid)
        port, pid = svc.endpoint.port, svc.status.pid
        assert pid and healthy(port), "deploy returned before the server answered"
        start = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        poll(lambda: healthy(port) and client.get(svc.uuid).status.pid not in (None, pid), what="crash recovery")
        figures["crash_recover_ms"].append(time.perf_counter() - start)
        reaper.note(client.get(svc.uuid).status.pid)
        start = time.perf_counter()
        client.stop(svc.uuid, timeout=10)
        closed = port_closed(port)
        figures["stop_ms"].append(time.perf_counter() - start)
        assert closed, "the port still answers after stop returned"
        client.delete(svc.uuid, force=True)
    return figures


def register_stopped(home: Path, folder: Path, count: int) -> None:
    """Write ``count`` stopped services to disk, as a daemon would have left them."""
    for i in range(count):
        config = ServiceConfig(
            model_name=f"reg{i}", model_uri=f"{folder}/m.py:model", pipeline_name=f"pipe{i % 10}",
            pipeline_step_name="deploy", pipeline_run_id=f"run{i}", python=sys.executable, working_dir=str(folder),
        )
        svc = LocalModelService(config=config, desired_state=DesiredState.STOPPED)
        directory = home / "services" / str(svc.uuid)
        directory.mkdir(parents=True, mode=0o700)
        svc.service_path = str(directory)
        (directory / "service.json").write_text(svc.model_dump_json(indent=2))


def socket_runs(socket_path: str, folder: Path, registered: int, runs: int, reaper: Reaper) -> dict[str, list[float]]:
    """find (one match) and list (all) on the daemon beside a bare uvicorn GET on a Unix socket."""
    floor_path = str(folder / "bare.sock")
    figures: dict[str, list[float]] = {"uds_floor_us": [], "find_one_us": [], "list_all_ms": []}
    with bare_server(folder, floor_path, reaper):
        poll(lambda: os.path.exists(floor_path), what="the bare uvicorn Unix socket")
        floor, daemon = UnixHTTP(floor_path), UnixHTTP(socket_path)
        poll(lambda: _tries(floor, "/health"), what="the bare uvicorn Unix socket to answer")
        wanted = f"/v1/services?model_name=reg{registered // 2}"
        assert len(json.loads(daemon.get(wanted))["services"]) == 1
        for _ in range(20):  # warm both
            floor.get("/health")
            daemon.get(wanted)
        for _ in range(runs * 10):
            start = time.perf_counter()
            floor.get("/health")
            figures["uds_floor_us"].append(time.perf_counter() - start)
            start = time.perf_counter()
            daemon.get(wanted)
            figures["find_one_us"].append(time.perf_counter() - start)
        size = len(body := daemon.get("/v1/services"))
        assert len(json.loads(body)["services"]) == registered
        figures["list_all_floor_ms"] = []
        for _ in range(max(10, runs * 2)):
            start = time.perf_counter()
            floor.get(f"/bytes/{size}")  # the same number of bytes from the bare app
            figures["list_all_floor_ms"].append(time.perf_counter() - start)
            start = time.perf_counter()
            daemon.get("/v1/services")
            figures["list_all_ms"].append(time.perf_counter() - start)
        floor.close()
        daemon.close()
    return figures


def _tries(conn: UnixHTTP, url: str) -> bool:
    """One GET on ``conn``; on failure (not listening yet) the connection is closed, so the next try starts afresh."""
    try:
        conn.get(url)
    except (OSError, http.client.HTTPException):
        conn.close()
        return False
    return True


def deploy_live(home: Path, folder: Path, count: int, reaper: Reaper) -> list[Any]:
    """Deploy ``count`` real built-in servers, a few at a time."""

    def one(i: int) -> Any:
        with DaemonClient(home=home) as c:
            svc = c.deploy(bench_apply.live_config(folder, i), timeout=120)  # what apply_noop's file describes
        reaper.note(svc.status.pid)
        return svc

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(count)))


def idle_daemon(
    client: DaemonClient, seconds: float, scrapes: list[float] | None = None, settle: float = 0.0
) -> tuple[float, float]:
    """RSS (MiB) and CPU (% of a core) of the daemon over ``seconds`` of idling, but for a client
    scraping ``/metrics`` every second, as Prometheus would (issue 14: the targets hold with it).
    ``settle``: seconds left to the daemon (scraped) before the window, for the end of a start-up's work."""
    pid = client.daemon_info()["pid"]
    client.close()
    stop = threading.Event()
    scraper = threading.Thread(target=scrape_every_second, args=(str(client.paths.socket), stop, scrapes), daemon=True)
    scraper.start()
    time.sleep(settle)
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)  # the measurement itself: the daemon must be left alone but for the scrapes
    cpu1, t1 = cpu_seconds(pid), time.monotonic()
    stop.set()
    scraper.join(10)
    return rss_mb(pid), 100 * (cpu1 - cpu0) / (t1 - t0)


def scrape_every_second(socket_path: str, stop: threading.Event, times: list[float] | None = None) -> None:
    """GET /metrics every second until ``stop``; the time of each into ``times``."""
    conn = UnixHTTP(socket_path)
    try:
        while not stop.is_set():
            start = time.perf_counter()
            conn.get("/metrics")
            if times is not None:
                times.append(time.perf_counter() - start)
            stop.wait(1.0)
    finally:
        conn.close()


def metrics_runs(socket_path: str, runs: int) -> list[float]:
    """GET /metrics on a kept-alive connection until the whole body is read (a Prometheus scrape)."""
    conn = UnixHTTP(socket_path)
    try:
        for _ in range(3):
            conn.get("/metrics")
        times: list[float] = []
        for _ in range(runs):
            start = time.perf_counter()
            conn.get("/metrics")
            times.append(time.perf_counter() - start)
    finally:
        conn.close()
    return times


def readopt(home: Path, before: dict[str, tuple[int, int]], reaper: Reaper) -> tuple[float, int]:
    """Stop the daemon (servers keep running), start a new one; time until every server is reported active."""
    client = DaemonClient(home=home)
    old = client.daemon_info()["pid"]
    old_ident = ProcessIdentity.of(old)
    client.shutdown(stop_services=False)
    poll(lambda: old_ident is None or not old_ident.is_alive(), timeout=30, what="the daemon to exit")
    start = time.perf_counter()
    services = client.find(running=True)  # starts the daemon, answered once every service is rebuilt
    deadline = time.monotonic() + 60
    while len(services) < len(before):
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(services)} of {len(before)} servers active 60 s after the daemon restart")
        time.sleep(0.005)
        services = client.find(running=True)
    elapsed = time.perf_counter() - start
    reaper.note(client.daemon_info()["pid"])
    client.close()
    now = {str(s.uuid): (s.status.pid, s.status.restarts) for s in services}
    restarted = sum(1 for uuid, (pid, restarts) in before.items() if now.get(uuid) != (pid, restarts))
    return elapsed, restarted


def replace_under_load(client: DaemonClient, svc: Any, folder: Path, seconds_after: float) -> dict[str, Any]:
    """Replace while a client sends requests as fast as it can, one connection per request."""
    port = svc.endpoint.port
    name = svc.config.model_name
    body = b'{"instances": [[1, 2, 3]]}'
    request = (
        f"POST /v1/models/{name}:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    stop = threading.Event()
    latencies: list[float] = []
    failures: list[str] = []  # the first few; failed counts them all
    failed = [0]

    def fail(what: str) -> None:
        failed[0] += 1
        if len(failures) < 5:
            failures.append(what)

    def hammer() -> None:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    s.sendall(request)
                    data = b""
                    while chunk := s.recv(65536):
                        data += chunk
                if data.split(b" ", 2)[1:2] != [b"200"]:
                    fail(data[:80].decode(errors="replace"))
            except OSError as exc:
                fail(f"{type(exc).__name__}: {exc}")
            latencies.append((start, time.perf_counter()))

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    try:
        time.sleep(seconds_after)  # the load runs before, during and after the replace
        begin = time.perf_counter()
        config = svc.config.model_copy(update={"python": "", "working_dir": ""})
        new = client.deploy(config, replace=True, timeout=60)
        end = time.perf_counter()
        time.sleep(seconds_after)  # the measurement window: load after the replace too
    finally:
        stop.set()
        thread.join(15)
    assert new.uuid == svc.uuid and new.version == svc.version + 1, "replace did not update in place"
    during = [e - b for b, e in latencies if e >= begin and b <= end]  # requests that overlap the replace
    return {"latencies": during, "requests": len(latencies), "failed": failed[0], "failures": failures, "took": end - begin, "svc": new}


def list_runs(socket_path: str, folder: Path, runs: int, reaper: Reaper) -> tuple[list[float], list[float]]:
    """GET /v1/services (every service), until the body is read, beside its floor: a bare uvicorn
    app sending a body of the same size over a Unix socket, alternating (the same client code)."""
    floor_path = str(folder / "bare-list.sock")
    with bare_server(folder, floor_path, reaper):
        poll(lambda: os.path.exists(floor_path), what="the bare uvicorn Unix socket")
        floor, daemon = UnixHTTP(floor_path), UnixHTTP(socket_path)
        poll(lambda: _tries(floor, "/health"), what="the bare uvicorn Unix socket to answer")
        size = len(daemon.get("/v1/services"))
        for _ in range(5):
            daemon.get("/v1/services")
            floor.get(f"/bytes/{size}")
        times: list[float] = []
        floors: list[float] = []
        for _ in range(max(10, runs * 2)):
            start = time.perf_counter()
            floor.get(f"/bytes/{size}")
            floors.append(time.perf_counter() - start)
            start = time.perf_counter()
            daemon.get("/v1/services")
            times.append(time.perf_counter() - start)
        floor.close()
        daemon.close()
    return times, floors


def log_flood(client: DaemonClient, folder: Path, reaper: Reaper, seconds: float = 3.0) -> dict[str, Any]:
    """GET /v1/daemon as fast as one client can, while a server writes its log as fast as it can
    (and log rotation runs), beside the same calls with that server stopped, alternating."""
    (folder / "flood.py").write_text(FLOOD)
    svc = client.deploy(ServiceConfig(model_name="flood", model_type="command", health_path="/", working_dir=str(folder),
                                      command=[sys.executable, "flood.py", "{port}"], stop_timeout=2), timeout=60)
    reaper.note(svc.status.pid)
    log_dir = Path(svc.service_path)

    def written() -> int:
        total = 0
        for p in log_dir.glob("service.log*"):
            with contextlib.suppress(FileNotFoundError):  # rotated away between the listing and the stat
                total += p.stat().st_size
        return total

    conn = UnixHTTP(str(client.paths.socket))
    figures: dict[str, list[float]] = {"flooding": [], "quiet": []}
    rates = []
    for _round in range(2):
        for state in ("flooding", "quiet"):
            if state == "quiet":
                client.stop(svc.uuid, timeout=10)
            else:
                if client.get(svc.uuid).status.state != ServiceState.ACTIVE:
                    client.start(svc.uuid, timeout=60)
                    reaper.note(client.get(svc.uuid).status.pid)
                size0, t0 = written(), time.monotonic()
            deadline = time.monotonic() + seconds / 2
            while time.monotonic() < deadline:
                start = time.perf_counter()
                conn.get("/v1/daemon")
                figures[state].append(time.perf_counter() - start)
            if state == "flooding":
                rates.append((written() - size0) / (time.monotonic() - t0))  # (rotation makes this a lower bound)
    conn.close()
    client.delete(svc.uuid, force=True)
    return {state: summary(values, 1000) for state, values in figures.items()} | {
        "bytes_per_s": int(max(rates)) if rates else 0}


# --------------------------------------------------------------------- main


def run(args: argparse.Namespace, reaper: Reaper, folder: Path) -> dict[str, Any]:
    (folder / "bare.py").write_text(BARE_APP)
    (folder / "m.py").write_text(MODEL)
    home_a, home_b = folder / "a", folder / "b"
    reaper.homes += [home_a, home_b]
    result: dict[str, Any] = {}

    # Home A: N stopped services on disk, then deploy / crash / stop runs and find / list.
    register_stopped(home_a, folder, args.registered)
    client = DaemonClient(home=home_a)
    reaper.note(client.daemon_info()["pid"])  # starts the daemon outside the timings
    progress(f"home A: {args.registered} registered services; {args.runs} lifecycle runs")
    life = lifecycle_runs(client, folder, args.runs, reaper)
    progress("find / list")
    sock = socket_runs(str(client.paths.socket), folder, args.registered, args.runs, reaper)
    for name, values in life.items():
        result[name] = summary(values, 1000)
    result["uds_floor_us"] = summary(sock["uds_floor_us"], 1e6)
    result["find_one_us"] = summary(sock["find_one_us"], 1e6)
    result["list_all_ms"] = summary(sock["list_all_ms"], 1000)
    result["list_all_floor_ms"] = summary(sock["list_all_floor_ms"], 1000)
    client.shutdown(stop_services=True)

    # Home B: live servers, idle daemon, re-adoption, replace under load.
    progress(f"home B: deploying {args.live} live servers")
    client = DaemonClient(home=home_b)
    info = client.daemon_info()
    reaper.note(info["pid"])
    base_fds = len(os.listdir(f"/proc/{info['pid']}/fd"))
    logd_base = rss_mb(info["log_writer"]) if info.get("log_writer") else 0.0
    started = time.perf_counter()
    live = deploy_live(home_b, folder, args.live, reaper)
    result["deploy_live_s"] = round(time.perf_counter() - started, 2)
    before = {str(s.uuid): (s.status.pid, s.status.restarts) for s in client.find(running=True)}
    assert len(before) == args.live, f"{len(before)} of {args.live} live servers active"
    times, floors = list_runs(str(client.paths.socket), folder, args.runs, reaper)
    result["list_live_ms"], result["list_live_floor_ms"] = summary(times, 1000), summary(floors, 1000)
    progress(f"apply of an unchanged file of {args.live} services")
    result.update(bench_apply.apply_noop_runs(client, folder, args.live, args.runs, summary))
    progress(f"GET /metrics with {args.live} live servers")
    result["metrics_scrape_ms"] = summary(metrics_runs(str(client.paths.socket), max(20, args.runs * 3)), 1000)
    info = client.daemon_info()
    result["fds_per_live_service"] = round((len(os.listdir(f"/proc/{info['pid']}/fd")) - base_fds) / args.live, 2)
    if info.get("log_writer"):
        logd_rss = rss_mb(info["log_writer"])
        result["logd_rss_mb"] = round(logd_rss, 1)
        result["logd_kib_per_live_service"] = round((logd_rss - logd_base) * 1024 / args.live, 1)
    watch = bench_events.EventWatch(home_b)  # one client streams events from here on (idle, re-adoptions, latency)
    progress(f"idle daemon for {args.idle:g}s")
    gateway_pid = client.daemon_info()["gateway_pid"]
    gateway_cpu0, t0 = cpu_seconds(gateway_pid), time.monotonic()
    scrapes: list[float] = []
    rss, cpu = idle_daemon(client, args.idle, scrapes)
    result["gateway_idle_cpu_pct"] = round(100 * (cpu_seconds(gateway_pid) - gateway_cpu0) / (time.monotonic() - t0), 2)
    result["gateway_rss_mb"] = round(rss_mb(gateway_pid), 1)
    times, restarted = [], 0
    for i in range(args.readopts):
        progress(f"re-adoption {i + 1}/{args.readopts}")
        elapsed, n = readopt(home_b, before, reaper)
        times.append(elapsed)
        restarted += n
    # A daemon just started finishes its rebuild's work (listening sockets fetched back, each server's
    # counter file mapped at the first scrape) in its first seconds: not idle yet. 3 s, as bench_metrics_ab.py.
    rss_after, cpu_after = idle_daemon(client, args.idle, scrapes, settle=3.0)
    result["metrics_scrape_1hz_ms"] = summary(scrapes, 1000)
    result["readopt_ms"] = {**summary(times, 1000), "max": round(max(times) * 1000, 1)}
    result["readopt_restarted"] = restarted
    result["daemon_rss_mb"] = round(max(rss, rss_after), 1)
    result["daemon_idle_cpu_pct"] = round(max(cpu, cpu_after), 2)
    result["daemon_idle"] = {  # the figures above are the worse of the two
        "after_deploys": {"rss_mb": round(rss, 1), "cpu_pct": round(cpu, 2)},
        "after_readopt": {"rss_mb": round(rss_after, 1), "cpu_pct": round(cpu_after, 2)},
    }
    progress("event latency: kill -9 of a server until its exited event is read")
    samples = bench_events.event_latency(home_b, watch, [str(s.uuid) for s in live], args.runs, reaper.note)
    result["event_latency_ms"] = summary(samples, 1000)
    result["event_stream"] = {"events": watch.count, "gaps": watch.gaps, "error": repr(watch.error) if watch.error else None,
                              "exited_with_signal_9": f"{watch.signals.count(9)} of {len(watch.signals)}"}
    latencies: list[float] = []
    requests = 0
    failures: list[str] = []
    failed = 0
    took: list[float] = []
    svc = live[0]
    for i in range(args.replaces):
        progress(f"replace under load {i + 1}/{args.replaces}")
        out = replace_under_load(client, client.get(svc.uuid), folder, 0.3)
        latencies += out["latencies"]
        requests += out["requests"]
        failures += out["failures"]
        failed += out["failed"]
        took.append(out["took"])
        reaper.note(out["svc"].status.pid)
    result["replace_requests"] = requests
    result["replace_failed_requests"] = failed
    result["replace_latency_ms"] = summary(latencies, 1000)  # of the requests that overlap a replace call
    result["replace_ms"] = summary(took, 1000)
    if failures:
        result["replace_failures_sample"] = failures[:5]
    progress("gateway beside direct")
    result.update(gateway_runs(client, folder, args, reaper))
    progress("on demand: wakes, idle cycles, admission")
    reaper.homes += [folder / "c", folder / "d"]
    result.update(
        bench_ondemand.ondemand_runs(folder / "c", folder / "d", folder, args.quick, lambda: cold_floor(folder, reaper), summary)
    )
    progress("API latency while a server floods its log")
    flood = log_flood(client, folder, reaper)
    result["log_flood_api_ms"] = flood["flooding"]
    result["log_flood_api_quiet_ms"] = flood["quiet"]
    result["log_flood_api_p99_ms"] = flood["flooding"]["p99"]
    result["log_flood_bytes_per_s"] = flood["bytes_per_s"]
    client.shutdown(stop_services=True)

    result["deploy_over_floor"] = round(result["deploy_ms"]["p50"] / result["cold_floor_ms"]["p50"], 2)
    result["find_over_uds_floor"] = round(result["find_one_us"]["p50"] / result["uds_floor_us"]["p50"], 2)
    result["list_all_over_floor"] = round(result["list_all_ms"]["p50"] / result["list_all_floor_ms"]["p50"], 2)
    result["list_live_over_floor"] = round(result["list_live_ms"]["p50"] / result["list_live_floor_ms"]["p50"], 2)
    result["crash_over_floor_ms"] = round(result["crash_recover_ms"]["p50"] - result["cold_floor_ms"]["p50"], 1)
    result["setup"] = {
        "runs": args.runs, "registered": args.registered, "live": args.live, "idle_s": args.idle,
        "readopts": args.readopts, "replaces": args.replaces, "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
    }
    result["targets"] = {name: {"target": text, "met": bool(check(result))} for name, (text, check) in TARGETS.items()}
    return result


def _proto() -> Any:
    """The prototype's measuring clients (scripts/gateway_proto/bench.py), loaded by path."""
    spec = importlib.util.spec_from_file_location("gateway_proto_bench", Path(__file__).with_name("gateway_proto") / "bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gateway_runs(client: DaemonClient, folder: Path, args: argparse.Namespace, reaper: Reaper) -> dict[str, Any]:
    """The gateway's figures, each beside direct requests to the same server in the same loop."""
    proto = _proto()
    backend = Path(__file__).with_name("gateway_proto")
    svc = client.deploy(
        ServiceConfig(
            model_name="llm",
            model_type="command",
            command=[sys.executable, "-m", "uvicorn", "--app-dir", str(backend), "sse_backend:app",
                     "--host", "{host}", "--port", "{port}", "--log-level", "warning"],
            health_path="/health",
        ),
        timeout=60,
    )
    reaper.note(svc.status.pid)
    info = client.daemon_info()
    gw_port, direct = int(info["gateway_url"].rsplit(":", 1)[1]), svc.endpoint.port
    # (streams: 16 pairs, ~1 s each; each first event is one cold wake-up of every process on its
    # path, whose cost on a VM varies by a few hundred µs: 8 pairs left the median at the mercy of two)
    n, seconds, runs = (300, 1.0, 5) if args.quick else (2000, 4.0, 16)
    lat = proto.latency(direct, gw_port, n, b"/v1/models/llm:predict")
    rps = proto.rps(direct, gw_port, seconds, b"/v1/models/llm:predict")
    first, gaps, kept_d, kept_g = [], [], socket.create_connection(("127.0.0.1", direct)), socket.create_connection(("127.0.0.1", gw_port))
    d_first: list[float] = []
    for i in range(runs + 1):  # the first opens the pooled backend connection; the order alternates
        if i % 2:
            b, gap = proto.first_event(gw_port, b"/v1/services/%s/stream?n=2" % str(svc.uuid).encode(), kept_g)
            a, _ = proto.first_event(direct, b"/stream?n=2", kept_d)
        else:
            a, _ = proto.first_event(direct, b"/stream?n=2", kept_d)
            b, gap = proto.first_event(gw_port, b"/v1/services/%s/stream?n=2" % str(svc.uuid).encode(), kept_g)
        if i:
            d_first.append(a * 1e3)
            first.append(b * 1e3)
            gaps.append(gap * 1e3)
    kept_d.close()
    kept_g.close()
    client.delete(svc.uuid, timeout=30, force=True)
    return {
        "gateway_overhead_us": lat["gateway_overhead_us"],
        "gateway_latency_us": {"direct_p50": lat["direct_p50_us"], "gateway_p50": lat["gateway_p50_us"],
                               "direct_p99": lat["direct_p99_us"], "gateway_p99": lat["gateway_p99_us"]},
        "gateway_rps_ratio": rps["gateway_rps_ratio"],
        "gateway_rps": {"direct": rps["direct_rps"], "gateway": rps["gateway_rps"]},
        "stream_first_byte_over_direct_ms": round(statistics.median(first) - statistics.median(d_first), 2),
        "stream_second_event_gap_ms": round(statistics.median(gaps), 1),
    }


def progress(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def table(result: dict[str, Any]) -> str:
    rows = []
    for key, value in result.items():
        if key in ("targets", "setup", "replace_failures_sample", "daemon_idle", "gateway_latency_us", "gateway_rps", "event_stream",
                   "wake_via_gateway_ms", "idle_cycle_failures_sample"):
            continue
        shown = f"{value['p50']:>10} {value['p99']:>10}" if isinstance(value, dict) else f"{value:>10}"
        target = result["targets"].get(key)
        mark = "" if target is None else f"  {'ok  ' if target['met'] else 'MISS'} {target['target']}"
        rows.append(f"{key:<26} {shown:<21}{mark}")
    head = f"{'figure':<26} {'p50':>10} {'p99':>10}"
    return "\n".join([head, *rows, f"setup: {json.dumps(result['setup'])}"])


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer runs and live servers: under a minute")
    parser.add_argument("--runs", type=int, help="lifecycle runs (default 20, quick 5)")
    parser.add_argument("--live", type=int, help="live servers (default 100, quick 20)")
    parser.add_argument("--registered", type=int, default=1000, help="stopped services for find/list (default 1000)")
    parser.add_argument("--idle", type=float, help="seconds the idle daemon is watched, twice (default 10, quick 3)")
    args = parser.parse_args()
    args.runs = args.runs or (5 if args.quick else 20)
    args.live = args.live or (20 if args.quick else 100)
    args.idle = args.idle or (3.0 if args.quick else 10.0)
    args.readopts = 1 if args.quick else 3
    args.replaces = 1 if args.quick else 3
    if min(args.runs, args.live, args.registered) < 1:
        parser.error("--runs, --live and --registered must be at least 1")

    reaper = Reaper()
    folder = Path(tempfile.mkdtemp(prefix="mb", dir="/tmp"))
    os.environ["MODELD_HOME"] = str(folder / "a")  # a stray client call never reaches the user's daemon
    os.environ["MODELD_GATEWAY"] = ":0"  # the daemons run a gateway (on a free port): its figures, and theirs with it
    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        result = run(args, reaper, folder)
    except KeyboardInterrupt:
        progress("interrupted; cleaning up")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        for home in reaper.homes:
            with contextlib.suppress(Exception):
                DaemonClient(home=home, auto_start=False, timeout=30).shutdown(stop_services=True)
        reaper.wait_daemons(timeout=20)  # they stop their servers; then the safety net
        killed = reaper.kill_all()
        if killed:
            progress(f"killed {killed} leftover process groups")
        shutil.rmtree(folder, ignore_errors=True)
    print(table(result), file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
