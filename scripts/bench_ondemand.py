"""The on-demand figures (issue 12), run by ``scripts/bench.py`` in homes of their own.

| figure                      | how                                                                        |
|-----------------------------|----------------------------------------------------------------------------|
| wake_ms                     | a request on a new connection to a scaled-to-zero built-in service on its own URL, until its |
|                             | response; before each sample no server process of the service is alive (a /proc scan); |
|                             | alternating with a cold-floor sample (``wake_over_floor`` is the ratio of the p50s) |
| wake_via_gateway_ms         | the same through the gateway, for a built-in (``builtin``) and a command server (``command``) |
| idle_cycle_failed_requests  | a client sending requests at random gaps (0-2.5 x idle_timeout), one new connection each, to a |
|                             | built-in service's own URL and through the gateway to it and to a command service, across |
|                             | >= 20 idle stops and wakes of each; ``idle_cycles`` counts the stops seen |
| admission_failed_requests   | 10 on-demand services in a daemon with ``max_active=3`` getting requests round-robin, one |
| admission_max_alive         | new connection each, while their servers are counted by a /proc scan every 10 ms |
"""

from __future__ import annotations

import os
import random
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon import DaemonClient, ServiceConfig, ServiceState
from daemon.testing import wait_for

COMMAND_SERVER = r'''
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def reply(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.reply(200, {"ok": True})
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.reply(200, {"predictions": body["instances"]})

ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer.request_queue_size = 256
ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
'''
BODY = b'{"instances": [[1, 2]]}'


def request(port: int, path: str, timeout: float = 60.0) -> int:
    """One POST on a new connection; its status (0 if it failed: refused, reset, closed, timed out)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(
                f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
                f"content-length: {len(BODY)}\r\nconnection: close\r\n\r\n".encode() + BODY
            )
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    return 0
                data += chunk
            while s.recv(65536):
                pass
            return int(data.split(b" ", 2)[1])
    except (OSError, ValueError, IndexError):
        return 0


def servers_of(uuids: list[str]) -> dict[str, list[int]]:
    """The live server processes of each service: a built-in one by its name in ``ps``
    (``modeld-serve <name> <uuid8>``), any other by the tag in its environment."""
    found: dict[str, list[int]] = {u: [] for u in uuids}
    short = {u[:8].encode(): u for u in uuids}
    tags = {b"MODELD_SERVICE_UUID=" + u.encode(): u for u in uuids}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
            if cmdline.startswith(b"modeld-serve"):
                parts = cmdline.replace(b"\0", b" ").split()
                if len(parts) >= 3 and parts[2][:8] in short:
                    found[short[parts[2][:8]]].append(int(entry.name))
                continue
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        for tag, uuid in tags.items():
            if tag + b"\0" in environ + b"\0":
                found[uuid].append(int(entry.name))
    return found


def to_zero(client: DaemonClient, uuid: str) -> None:
    """Unload the service and wait until no process of it is alive."""
    client.unload(uuid)
    wait_for(
        lambda: client.get(uuid).status.state == ServiceState.SCALED_TO_ZERO and not servers_of([uuid])[uuid],
        30, interval=0.005, what=f"{uuid} scaled to zero with no server alive",
    )


def deploy(client: DaemonClient, folder: Path, name: str, idle: float, command: bool = False) -> Any:
    if command:
        script = folder / "od_server.py"
        script.write_text(COMMAND_SERVER)
        config = ServiceConfig(model_name=name, model_type="command", idle_timeout=idle, health_path="/health",
                               command=[sys.executable, str(script), "{host}", "{port}"])
    else:
        config = ServiceConfig(model_name=name, model_uri=f"{folder}/m.py:model", idle_timeout=idle)
    return client.deploy(config, timeout=120)


def wake_runs(client: DaemonClient, folder: Path, runs: int, cold_floor: Callable[[], float]) -> dict[str, list[float]]:
    gw = int(client.daemon_info()["gateway_url"].rsplit(":", 1)[1])
    builtin = deploy(client, folder, "odb", 3600)
    command = deploy(client, folder, "odc", 3600, command=True)
    out: dict[str, list[float]] = {"cold_floor": [], "wake": [], "gateway_builtin": [], "gateway_command": []}
    for _ in range(runs):
        out["cold_floor"].append(cold_floor())
        for key, svc, port, path in (
            ("wake", builtin, builtin.endpoint.port, "/v1/models/odb:predict"),
            ("gateway_builtin", builtin, gw, "/v1/models/odb:predict"),
            ("gateway_command", command, gw, "/v1/models/odc:predict"),
        ):
            to_zero(client, str(svc.uuid))
            start = time.perf_counter()
            status = request(port, path)
            out[key].append(time.perf_counter() - start)
            assert status == 200, f"{key}: a wake answered {status}"
    for svc in (builtin, command):
        client.delete(svc.uuid, force=True, timeout=30)
    return out


def idle_cycles(client: DaemonClient, folder: Path, idle: float, cycles: int, cap_s: float) -> dict[str, Any]:
    gw = int(client.daemon_info()["gateway_url"].rsplit(":", 1)[1])
    builtin = deploy(client, folder, "icb", idle)
    command = deploy(client, folder, "icc", idle, command=True)
    targets = [
        ("direct", str(builtin.uuid), builtin.endpoint.port, "/v1/models/icb:predict"),
        ("gateway_builtin", str(builtin.uuid), gw, "/v1/models/icb:predict"),
        ("gateway_command", str(command.uuid), gw, "/v1/models/icc:predict"),
    ]
    rng = random.Random(12)
    stops = {str(builtin.uuid): 0, str(command.uuid): 0}
    sent, failed, failures = 0, 0, []
    deadline = time.monotonic() + cap_s
    while min(stops.values()) < cycles and time.monotonic() < deadline:
        time.sleep(rng.uniform(0, 2.5 * idle))  # the gap is the measurement's input, not a wait for a condition
        name, uuid, port, path = rng.choice(targets)
        if client.get(uuid).status.state == ServiceState.SCALED_TO_ZERO:
            stops[uuid] += 1
        status = request(port, path)
        sent += 1
        if status != 200:
            failed += 1
            failures.append(f"{name}: {status}")
    for svc in (builtin, command):
        client.delete(svc.uuid, force=True, timeout=30)
    return {"requests": sent, "failed": failed, "cycles": min(stops.values()), "failures_sample": failures[:5]}


def admission(home: Path, folder: Path, rounds: int) -> dict[str, Any]:
    os.environ["MODELD_MAX_ACTIVE"] = "3"  # the daemon this client starts inherits it
    try:
        client = DaemonClient(home=home)
        client.daemon_info()
    finally:
        del os.environ["MODELD_MAX_ACTIVE"]
    services = [deploy(client, folder, f"adm{i}", 3600) for i in range(10)]
    uuids = [str(s.uuid) for s in services]
    most, done = 0, threading.Event()

    def scan() -> None:
        nonlocal most
        while not done.is_set():
            most = max(most, sum(1 for pids in servers_of(uuids).values() if pids))
            done.wait(0.01)

    scanner = threading.Thread(target=scan, daemon=True)
    scanner.start()
    sent = failed = 0
    try:
        for _ in range(rounds):
            for svc in services:
                sent += 1
                failed += request(svc.endpoint.port, f"/v1/models/{svc.config.model_name}:predict") != 200
    finally:
        done.set()
        scanner.join()
    client.shutdown(stop_services=True)
    return {"requests": sent, "failed": failed, "max_alive": most}


def ondemand_runs(
    home: Path, admission_home: Path, folder: Path, quick: bool,
    cold_floor: Callable[[], float], summary: Callable[[list[float], float], dict[str, float]],
) -> dict[str, Any]:
    """Every on-demand figure; ``cold_floor()`` measures one cold-floor sample (seconds), and
    ``summary`` is bench.py's (p50 and p99 of seconds, in a unit)."""
    client = DaemonClient(home=home)
    wakes = wake_runs(client, folder, 3 if quick else 10, cold_floor)
    cycles = idle_cycles(client, folder, 0.3, 5 if quick else 20, 60 if quick else 240)
    client.shutdown(stop_services=True)
    adm = admission(admission_home, folder, 2 if quick else 5)
    result: dict[str, Any] = {
        "wake_ms": summary(wakes["wake"], 1000),
        "wake_cold_floor_ms": summary(wakes["cold_floor"], 1000),
        "wake_via_gateway_ms": {
            "builtin": summary(wakes["gateway_builtin"], 1000),
            "command": summary(wakes["gateway_command"], 1000),
        },
        "idle_cycle_failed_requests": cycles["failed"],
        "idle_cycles": cycles["cycles"],
        "idle_cycle_requests": cycles["requests"],
        "admission_failed_requests": adm["failed"],
        "admission_max_alive": adm["max_alive"],
        "admission_requests": adm["requests"],
    }
    result["wake_over_floor"] = round(statistics.median(wakes["wake"]) / statistics.median(wakes["cold_floor"]), 2)
    if cycles["failures_sample"]:
        result["idle_cycle_failures_sample"] = cycles["failures_sample"]
    return result
