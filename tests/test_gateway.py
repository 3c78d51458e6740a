"""The gateway (issue 11): one port for every model, run by a real daemon, reached by real clients.

Each test runs a daemon in a temp home with ``MODELD_GATEWAY=:0`` (a free port, picked once), and
deploys ``LLM`` below as a ``command`` server: a standard-library OpenAI-compatible server whose
stream sends its chunks 500 ms apart, so a buffering gateway is caught. The clients are curl, the
official ``openai`` package and raw sockets. Every process is the home's and is reaped with it.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from conftest import modeld
from daemon import DaemonClient, ServiceConfig, ServiceState
from daemon.testing import pid_alive, wait_for

LLM = r'''
import json, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

name, events = sys.argv[3], sys.argv[4]
time.sleep(float(os.environ.get("LOAD_SECS") or 0))  # a model that takes this long to load


def note(line):
    with open(events, "a") as f:
        f.write(line + "\n")


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
        if self.path == "/health":
            return self.reply(200, {"ok": True})
        if self.path == "/slow":
            time.sleep(8)
            return self.reply(200, {"slow": True})
        if self.path == "/whoami":
            return self.reply(200, {"name": name})
        if self.path == "/pid":
            return self.reply(200, {"pid": os.getpid()})
        if self.path.startswith("/v1/models"):
            return self.reply(200, {"name": name, "ready": True})
        self.reply(404, {"error": "no " + self.path})

    def do_POST(self):
        if self.path == "/upload":
            n, total = int(self.headers.get("content-length") or 0), 0
            while total < n:
                total += len(self.rfile.read(min(n - total, 1 << 20)))
            return self.reply(200, {"bytes": total, "name": name})
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if self.path.endswith(":predict"):
            return self.reply(200, {"predictions": [name] * len(body["instances"])})
        if self.path == "/v1/embeddings":
            return self.reply(200, {"object": "list", "model": name, "usage": {"prompt_tokens": 1, "total_tokens": 1},
                                    "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}]})
        if self.path == "/v1/completions":
            return self.reply(200, {"id": "c1", "object": "text_completion", "created": 1, "model": name,
                                    "choices": [{"index": 0, "text": "from " + name, "finish_reason": "stop", "logprobs": None}]})
        if not body.get("stream"):
            return self.reply(200, {"id": "x1", "object": "chat.completion", "created": 1, "model": name,
                                    "choices": [{"index": 0, "finish_reason": "stop",
                                                 "message": {"role": "assistant", "content": "from " + name}}]})
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        try:
            for i in range(int(body.get("chunks", 4))):
                chunk = {"id": "x1", "object": "chat.completion.chunk", "created": 1, "model": name,
                         "choices": [{"index": 0, "delta": {"content": f"{i} "}, "finish_reason": None}]}
                data = b"data: " + json.dumps(chunk).encode() + b"\n\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                time.sleep(0.5)
            data = b"data: [DONE]\n\n"
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
            note("stream done")
        except (BrokenPipeError, ConnectionResetError):
            note("disconnect")


ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer.request_queue_size = 256  # (5 by default: 50 clients at once would see SYNs dropped)
ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
'''

pytestmark = pytest.mark.usefixtures("gateway_env")


@pytest.fixture
def gateway_env(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELD_GATEWAY", ":0")
    monkeypatch.setenv("MODELD_GATEWAY_TIMEOUT", "5")
    monkeypatch.setenv("MODELD_GATEWAY_MAX_BODY", str(300 * 1024 * 1024))


def deploy_llm(client: DaemonClient, home: Path, name: str, **overrides: Any) -> Any:
    script = home / "llm.py"
    script.write_text(LLM)
    config = ServiceConfig(
        model_name=name,
        model_type="command",
        command=[sys.executable, str(script), "{host}", "{port}", name, str(home / f"events-{name}")],
        health_path="/health",
        **overrides,
    )
    return client.deploy(config, replace=False, timeout=60)


def gateway(client: DaemonClient) -> tuple[str, int, dict[str, Any]]:
    info = client.daemon_info()
    assert info["gateway_url"], info
    url = urlsplit(info["gateway_url"])
    assert url.hostname and url.port
    return url.hostname, url.port, info


def request(port: int, method: str, path: str, body: object = None, timeout: float = 10) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=payload, headers={"content-type": "application/json"} if payload else {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data else None
    finally:
        conn.close()


def curl(*args: str) -> tuple[int, Any]:
    done = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=30)
    body, _, code = done.stdout.rpartition("\n")
    return int(code), json.loads(body) if body.strip() else None


# ------------------------------------------------------------------ routing


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_routes_by_model_name_and_uuid_with_curl_and_the_openai_client(client, home):
    alpha = deploy_llm(client, home, "alpha")
    beta = deploy_llm(client, home, "beta")
    _host, port, _info = gateway(client)
    base = f"http://127.0.0.1:{port}"

    # KServe V1 by name, with curl.
    assert curl(f"{base}/v1/models/alpha:predict", "-d", '{"instances": [1, 2]}') == (200, {"predictions": ["alpha", "alpha"]})
    assert curl(f"{base}/v1/models/beta:predict", "-d", '{"instances": [1]}') == (200, {"predictions": ["beta"]})
    status, model = curl(f"{base}/v1/models/alpha")
    assert status == 200 and (model["id"], model["object"], model["name"], model["ready"]) == ("alpha", "model", "alpha", True)
    # Any path by uuid, and the OpenAI list of every model.
    assert curl(f"{base}/v1/services/{beta.uuid}/whoami") == (200, {"name": "beta"})
    status, listed = curl(f"{base}/v1/models")
    assert status == 200 and listed["object"] == "list"
    assert sorted((m["id"], m["object"], m["owned_by"]) for m in listed["data"]) == [
        ("alpha", "model", "modeld"),
        ("beta", "model", "modeld"),
    ]

    # The official openai client: chat, completions, embeddings, routed by the body's model.
    openai = pytest.importorskip("openai")
    oa = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=10)
    assert oa.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}]).choices[0].message.content == "from beta"
    assert oa.completions.create(model="alpha", prompt="hi").choices[0].text == "from alpha"
    assert oa.embeddings.create(model="alpha", input="hi").data[0].embedding == [0.5, 0.25]
    assert sorted(m.id for m in oa.models.list()) == ["alpha", "beta"]

    # stream=True: each chunk arrives as it is sent, 500 ms apart (a buffering gateway would bunch them).
    arrived = []
    for chunk in oa.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], stream=True):
        arrived.append((time.monotonic(), chunk.choices[0].delta.content))
    assert [text for _t, text in arrived] == ["0 ", "1 ", "2 ", "3 "]
    gaps = [b[0] - a[0] for a, b in zip(arrived, arrived[1:], strict=False)]
    assert all(gap > 0.35 for gap in gaps), gaps
    assert alpha.uuid != beta.uuid


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_every_error_is_json(client, home):
    alpha = deploy_llm(client, home, "alpha")
    twin1 = deploy_llm(client, home, "twin")
    twin2 = deploy_llm(client, home, "twin")
    _host, port, _info = gateway(client)

    status, body = request(port, "GET", "/v1/models/nope")
    assert status == 404 and body["error"]["type"] == "ModelNotFound" and body["error"]["models"] == ["alpha", "twin"]
    status, body = request(port, "POST", "/v1/chat/completions", {"model": "nope", "messages": []})
    assert status == 404 and body["error"]["models"] == ["alpha", "twin"]

    status, body = request(port, "POST", "/v1/models/twin:predict", {"instances": [1]})
    assert status == 409 and body["error"]["type"] == "AmbiguousModel"
    assert body["error"]["uuids"] == sorted([str(twin1.uuid), str(twin2.uuid)])

    # 504: no response head within gateway_timeout (5 s here); the server takes 8.
    began = time.monotonic()
    status, body = request(port, "GET", f"/v1/services/{alpha.uuid}/slow", timeout=20)
    took = time.monotonic() - began
    assert status == 504 and body["error"]["type"] == "GatewayTimeout" and 4.5 < took < 8, (status, body, took)

    # 413: the body is over gateway_max_body (300 MiB here), refused from its Content-Length.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/models/alpha:predict HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % (400 * 1024 * 1024))
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413 ") and b'"ContentTooLarge"' in answer

    # 503 with the state, once stopped; and with last_error, once in error.
    client.stop(alpha.uuid, timeout=30)
    wait_for(lambda: request(port, "GET", "/v1/models/alpha:x")[0] == 503, 5, what="the gateway to see the stop")
    status, body = request(port, "POST", "/v1/models/alpha:predict", {"instances": [1]})
    assert status == 503 and body["error"]["type"] == "ServiceUnavailable" and body["error"]["state"] == "inactive"
    broken = ServiceConfig(
        model_name="broken",
        model_type="command",
        command=[sys.executable, "-c", "import sys; print('no weights here'); sys.exit(3)"],
        restart={"max_restarts": 0},
    )
    with pytest.raises(Exception):  # noqa: B017 (the deploy's own error is not what this test is about)
        client.deploy(broken, timeout=30)
    wait_for(lambda: request(port, "GET", "/v1/models/broken:x")[0] == 503, 5, what="the gateway to see the error")
    status, body = request(port, "POST", "/v1/models/broken:predict", {"instances": [1]})
    assert status == 503 and body["error"]["state"] == "error" and "no weights here" in body["error"]["last_error"], body


@pytest.mark.slow
def test_a_client_that_disconnects_mid_stream_is_seen_by_the_server(client, home):
    deploy_llm(client, home, "alpha")
    _host, port, _info = gateway(client)
    body = json.dumps({"model": "alpha", "stream": True, "messages": []}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n")
        sock.sendall(b"content-length: %d\r\n\r\n%s" % (len(body), body))
        got = b""
        while b"data: " not in got:
            got += sock.recv(65536)
    events = home / "events-alpha"
    wait_for(lambda: events.exists() and "disconnect" in events.read_text(), 10, what=f"the server to see the disconnect ({got!r})")
    assert "stream done" not in events.read_text()


@pytest.mark.slow
def test_a_large_upload_streams_through_without_being_held(client, home):
    alpha = deploy_llm(client, home, "alpha")
    _host, port, info = gateway(client)
    size, block = 200 * 1024 * 1024, b"x" * (1 << 20)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.putrequest("POST", f"/v1/services/{alpha.uuid}/upload")
    conn.putheader("content-length", str(size))
    conn.endheaders()
    for _ in range(size // len(block)):
        conn.send(block)
    resp = conn.getresponse()
    assert (resp.status, json.loads(resp.read())) == (200, {"bytes": size, "name": "alpha"})
    conn.close()
    with open(f"/proc/{info['gateway_pid']}/status") as f:
        peak_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    assert peak_kib < 60 * 1024, f"the gateway's peak RSS was {peak_kib} KiB for a {size} byte upload"


@pytest.mark.slow
def test_fifty_concurrent_clients(client, home):
    deploy_llm(client, home, "alpha")
    _host, port, _info = gateway(client)
    results: list[int] = []

    def one_client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(10):
            conn.request("POST", "/v1/models/alpha:predict", body=b'{"instances": [1]}')
            resp = conn.getresponse()
            resp.read()
            results.append(resp.status)
        conn.close()

    threads = [threading.Thread(target=one_client) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [200] * 500


# ------------------------------------------------------------------ the process


def load(port: int, stop: threading.Event, outcomes: list[str]) -> None:
    """Requests as fast as one client makes them, a new connection each time (as curl would)."""
    while not stop.is_set():
        try:
            status, _ = request(port, "POST", "/v1/models/alpha:predict", {"instances": [1]}, timeout=10)
            outcomes.append(str(status))
        except (OSError, http.client.HTTPException) as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")


@pytest.mark.slow
def test_a_kill_9_of_the_daemon_drops_no_request(client, home):
    deploy_llm(client, home, "alpha")
    _host, port, info = gateway(client)
    stop, outcomes = threading.Event(), []
    threads = [threading.Thread(target=load, args=(port, stop, outcomes)) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(outcomes) > 20, 10, what="requests to flow")
        os.kill(info["pid"], signal.SIGKILL)
        wait_for(lambda: not pid_alive(info["pid"]), 10, what="the daemon to die")
        during = len(outcomes)
        wait_for(lambda: len(outcomes) > during + 20, 10, what="requests to flow with no daemon")
        again = client.daemon_info()  # a new daemon, which re-adopts the gateway
        after = len(outcomes)
        wait_for(lambda: len(outcomes) > after + 20, 10, what="requests to flow after the restart")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert again["pid"] != info["pid"]
    assert (again["gateway_pid"], again["gateway_url"]) == (info["gateway_pid"], info["gateway_url"])
    assert set(outcomes) == {"200"}, [o for o in outcomes if o != "200"][:5]


@pytest.mark.slow
def test_a_kill_9_of_the_gateway_restarts_it_on_the_same_port(client, home):
    deploy_llm(client, home, "alpha")
    _host, port, info = gateway(client)
    assert (home / "run" / "gateway.pid").read_text().split()[0] == str(info["gateway_pid"])
    stop, outcomes = threading.Event(), []
    threads = [threading.Thread(target=load, args=(port, stop, outcomes)) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(outcomes) > 10, 10, what="requests to flow")
        os.kill(info["gateway_pid"], signal.SIGKILL)
        again = wait_for(
            lambda: (i := client.daemon_info())["gateway_pid"] not in (None, info["gateway_pid"]) and i, 10, what="a new gateway"
        )
        after = len(outcomes)
        wait_for(lambda: len(outcomes) > after + 10, 10, what="requests to flow through the new gateway")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert again["gateway_url"] == info["gateway_url"]
    refused = [o for o in outcomes if "Refused" in o]
    assert refused == [], refused  # the daemon held the port: clients waited in the backlog
    failed = [o for o in outcomes if o != "200"]
    assert len(failed) <= 4, failed  # only connections the killed process had accepted are reset


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_stop_leaves_the_gateway_serving_and_stop_all_stops_it_and_the_port_is_kept(client, home):
    deploy_llm(client, home, "alpha")
    _host, port, info = gateway(client)
    assert modeld("daemon", "stop", home=home).returncode == 0
    assert request(port, "POST", "/v1/models/alpha:predict", {"instances": [1]}) == (200, {"predictions": ["alpha"]})
    client.daemon_info()  # a new daemon
    status = modeld("daemon", "status", home=home)
    assert f"gateway: http://127.0.0.1:{port} (pid {info['gateway_pid']})" in status.stdout, status.stdout  # re-adopted
    assert modeld("daemon", "stop", "--all", home=home).returncode == 0
    assert not pid_alive(info["gateway_pid"])
    with pytest.raises(ConnectionRefusedError):
        request(port, "GET", "/v1/models")
    # :0 picked the port once: the next daemon's gateway is on it again.
    assert gateway(client)[1] == port


def test_a_taken_port_means_no_gateway_and_a_daemon_that_runs(home, monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        monkeypatch.setenv("MODELD_GATEWAY", f"127.0.0.1:{taken.getsockname()[1]}")
        with DaemonClient(home) as client:
            info = client.daemon_info()
        assert info["gateway_url"] is None and info["gateway_pid"] is None
        assert f"port {taken.getsockname()[1]} on 127.0.0.1 is already in use" in info["gateway_error"]
        status = modeld("daemon", "status", home=home)
        assert "gateway: none: no gateway: port" in status.stdout, status.stdout


def test_gateway_off(home, monkeypatch):
    monkeypatch.setenv("MODELD_GATEWAY", "off")
    with DaemonClient(home) as client:
        info = client.daemon_info()
    assert (info["gateway_url"], info["gateway_pid"], info["gateway_error"]) == (None, None, None)
    assert "gateway: off" in modeld("daemon", "status", home=home).stdout


def test_a_service_on_a_unix_socket_is_not_reached_through_the_gateway(client, home):
    from conftest import iris_config

    svc = client.deploy(iris_config(model_name="private", bind_unix=True), timeout=60)
    _host, port, _info = gateway(client)
    status, body = request(port, "POST", "/v1/models/private:predict", {"instances": [[5.1, 3.5, 1.4, 0.2]]})
    assert status == 403 and "Unix socket only" in body["error"]["message"], body
    assert request(port, "GET", f"/v1/services/{svc.uuid}/health")[0] == 403


# ------------------------------------------------------------------ on demand (issue 12)


def state_of(client: DaemonClient, uuid: Any) -> str:
    return str(client.get(uuid).status.state)


def activity(home: Path, uuid: Any) -> tuple[float, int, int]:
    data = (home / "run" / "activity" / str(uuid)).read_bytes()
    assert len(data) == 16, data
    return struct.unpack("<dII", data)


@pytest.mark.slow
def test_a_scaled_to_zero_command_service_is_woken_through_the_gateway_with_no_failed_request(client, home):
    svc = deploy_llm(client, home, "sleepy", idle_timeout=1.0)
    first_pid = svc.status.pid
    host, port, _ = gateway(client)
    base = f"http://{host}:{port}"
    assert curl(f"{base}/v1/models/sleepy:predict", "-d", '{"instances": [1]}') == (200, {"predictions": ["sleepy"]})
    wait_for(lambda: activity(home, svc.uuid)[1:] == (0, 1), 5, what="the request counted: none in flight, one so far")
    wait_for(lambda: state_of(client, svc.uuid) == "scaled_to_zero", 20, what="the idle stop")
    wait_for(lambda: not pid_alive(first_pid), 10, what="the server to be gone")
    # The model lists show it, not ready, and do not wake it.
    status, model = curl(f"{base}/v1/models/sleepy")
    assert status == 200 and model["ready"] is False and model["state"] == "scaled_to_zero", model
    status, listed = curl(f"{base}/v1/models")
    assert [(m["ready"], m["state"]) for m in listed["data"] if m["id"] == "sleepy"] == [(False, "scaled_to_zero")]
    assert state_of(client, svc.uuid) == "scaled_to_zero"

    # Many requests at once, from the openai client and curl: one wake, none fails.
    openai = pytest.importorskip("openai")
    oa = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
    failed: list[str] = []

    def chat() -> None:
        try:
            reply = oa.chat.completions.create(model="sleepy", messages=[{"role": "user", "content": "hi"}])
            if reply.choices[0].message.content != "from sleepy":
                failed.append(repr(reply))
        except Exception as exc:  # (counted: the test is that there are none)
            failed.append(repr(exc))

    def predict() -> None:
        try:
            got = curl(f"{base}/v1/models/sleepy:predict", "-d", '{"instances": [1]}')
            if got != (200, {"predictions": ["sleepy"]}):
                failed.append(repr(got))
        except Exception as exc:
            failed.append(repr(exc))

    threads = [threading.Thread(target=chat) for _ in range(4)] + [threading.Thread(target=predict) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert failed == []
    status, served_by = curl(f"{base}/v1/services/{svc.uuid}/pid")  # (a new server, whether or not it idled again)
    assert status == 200 and served_by["pid"] != first_pid, served_by
    wait_for(lambda: activity(home, svc.uuid)[1:] == (0, 10), 5, what="ten requests counted, none left in flight")
    assert activity(home, svc.uuid)[0] > time.time() - 60


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_requests_racing_idle_stops_through_the_gateway_never_fail(client, home):
    """A client sending requests at random gaps around the idle timeout, a new connection each
    (curl's way): some arrive as the server is being stopped, some after; none fails."""
    svc = deploy_llm(client, home, "racy", idle_timeout=0.5)
    host, port, _ = gateway(client)
    rng = random.Random(12)
    pids: set[int] = set()
    failed: list[Any] = []
    deadline = time.monotonic() + 60
    while len(pids) < 4 and time.monotonic() < deadline:
        try:
            got = request(port, "POST", "/v1/models/racy:predict", {"instances": [1]}, timeout=30)
        except (OSError, http.client.HTTPException) as exc:
            got = (0, repr(exc))
        if got != (200, {"predictions": ["racy"]}):
            failed.append(got)
        pid = client.get(svc.uuid).status.pid
        if pid is not None:
            pids.add(pid)
        time.sleep(rng.uniform(0.2, 1.6))
    assert failed == []
    assert len(pids) >= 4, f"only {len(pids)} servers in 60 s: the idle stops did not happen"


def test_an_unloaded_service_without_idle_timeout_is_woken_by_the_gateway_with_no_failed_request(client, home):
    """Unload applies to any service: while its wake is under way (pending_startup from zero), the
    requests that come meanwhile wait for it too, not only those of on-demand services."""
    svc = deploy_llm(client, home, "plain")
    host, port, _ = gateway(client)
    client.unload(svc.uuid)
    wait_for(lambda: state_of(client, svc.uuid) == "scaled_to_zero", 20, what="the unload")
    answers: list[object] = []

    def predict() -> None:
        try:
            answers.append(curl(f"http://{host}:{port}/v1/models/plain:predict", "-d", '{"instances": [1]}'))
        except Exception as exc:  # (counted: the test is that there are none)
            answers.append(repr(exc))

    threads = []
    for _ in range(4):
        threads.append(threading.Thread(target=predict))
        threads[-1].start()
        time.sleep(0.05)  # (the traffic's pattern: requests that arrive while the wake starts it)
    for t in threads:
        t.join(60)
    assert answers == [(200, {"predictions": ["plain"]})] * 4


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_a_daemon_killed_during_a_command_wake_leaves_no_request_hanging(client, home):
    """The gateway's start call dies with the daemon; the server goes on loading with nobody to
    record it healthy, so the waiting requests try it themselves and are answered once it loads."""
    svc = deploy_llm(client, home, "slowwake", idle_timeout=3600, env={"LOAD_SECS": "2"})
    host, port, info = gateway(client)
    client.unload(svc.uuid)
    wait_for(lambda: state_of(client, svc.uuid) == "scaled_to_zero", 20, what="the unload")
    answers: list[object] = []
    waiting = threading.Thread(
        target=lambda: answers.append(request(port, "POST", "/v1/models/slowwake:predict", {"instances": [1]}, timeout=30))
    )
    waiting.start()
    wait_for(lambda: state_of(client, svc.uuid) == "pending_startup", 10, what="the wake under way")
    os.kill(info["pid"], signal.SIGKILL)
    wait_for(lambda: not pid_alive(info["pid"]), 10, what="the daemon gone")
    waiting.join(30)
    assert answers == [(200, {"predictions": ["slowwake"]})]
    assert request(port, "POST", "/v1/models/slowwake:predict", {"instances": [1]}) == (200, {"predictions": ["slowwake"]})


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_a_command_wake_refused_by_admission_is_a_503_naming_the_cap(client, home, monkeypatch, tmp_path):
    monkeypatch.setenv("MODELD_MAX_ACTIVE", "1")
    monkeypatch.setenv("MODELD_WAKE_TIMEOUT", "1")
    slow = tmp_path / "slow.py"
    slow.write_text("import time\ndef model(instances):\n    time.sleep(4)\n    return instances\n")
    busy = client.deploy(ServiceConfig(model_name="busy", model_uri=f"{slow}:model", idle_timeout=3600), timeout=60)
    cc = deploy_llm(client, home, "cc", idle_timeout=3600)  # busy made room: scaled to zero
    assert state_of(client, busy.uuid) == "scaled_to_zero"
    client.unload(cc.uuid)
    host, port, _ = gateway(client)
    held: list[object] = []
    holder = threading.Thread(
        target=lambda: held.append(request(busy.endpoint.port, "POST", "/v1/models/busy:predict", {"instances": [1]}, timeout=30))
    )
    holder.start()  # busy wakes and holds the one slot with a 4 s request
    try:
        wait_for(lambda: client.daemon_info()["on_demand"]["loaded"], 15, what="busy loaded")
        status, body = request(port, "POST", "/v1/models/cc:predict", {"instances": [1]}, timeout=30)
        assert status == 503, body
        assert "max_active=1" in body["error"]["message"] and "busy" in body["error"]["message"], body
    finally:
        holder.join(30)
    assert held and held[0][0] == 200


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_a_gateway_replaced_for_new_settings_finishes_the_responses_in_flight(client, home, monkeypatch):
    deploy_llm(client, home, "steady")
    _host, port, info = gateway(client)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps({"model": "steady", "stream": True, "chunks": 12, "messages": [{"role": "user", "content": "hi"}]})
    conn.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json"})
    stream = conn.getresponse()
    assert stream.status == 200 and stream.readline().startswith(b"data: ")  # in flight: 11 more chunks, 500 ms apart
    assert modeld("daemon", "stop", home=home).returncode == 0
    monkeypatch.setenv("MODELD_GATEWAY_TIMEOUT", "6")  # the next daemon's gateway differs: it replaces this one
    new = client.daemon_info()
    assert new["gateway_pid"] != info["gateway_pid"] and gateway(client)[1] == port
    rest = stream.read()  # the old gateway drains: the stream ends whole
    conn.close()
    assert rest.count(b"data: ") == 12 and rest.rstrip().endswith(b"data: [DONE]"), rest
    assert request(port, "POST", "/v1/models/steady:predict", {"instances": [1]}) == (200, {"predictions": ["steady"]})
    wait_for(lambda: not pid_alive(info["gateway_pid"]), 10, what="the old gateway to exit once drained")


@pytest.mark.parametrize("loop", ["default", "asyncio"])
def test_the_gateway_runs_on_uvloop_where_installed_and_on_asyncio_when_asked(home, monkeypatch, loop):
    """uvloop is a dependency on Linux (pyproject.toml): the gateway runs on it; MODELD_GATEWAY_LOOP=asyncio
    in the daemon's environment puts it on asyncio's loop. Either way it routes a request."""
    uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed (it is a dependency on Linux)")
    if loop == "asyncio":
        monkeypatch.setenv("MODELD_GATEWAY_LOOP", "asyncio")
    client = DaemonClient(home)
    try:
        deploy_llm(client, home, "alpha")
        host, port, info = gateway(client)
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request("GET", "/v1/models")
        resp = conn.getresponse()
        assert resp.status == 200 and "alpha" in resp.read().decode()
        conn.close()
        with open(f"/proc/{info['gateway_pid']}/maps") as f:  # (after it answered: it has started its loop)
            mapped = f.read()
        assert (os.path.dirname(os.path.realpath(uvloop.__file__)) in mapped) == (loop == "default"), loop
    finally:
        client.close()


def test_a_built_in_service_with_no_model_name_is_reached_by_the_name_it_serves_and_created_stays(client, home):
    """Deployed without a model name, a built-in server serves "model" (its prediction URL says so):
    the gateway routes that name to it. OpenAI's ``created`` is the service's, across a gateway restart."""
    from conftest import iris_config

    svc = client.deploy(iris_config(model_name=""), replace=False, timeout=60)
    assert svc.prediction_url.endswith("/v1/models/model:predict")
    _host, port, info = gateway(client)
    status, body = request(port, "POST", "/v1/models/model:predict", {"instances": [[5.0, 3.4, 1.5, 0.2]]})
    assert (status, body) == (200, {"predictions": ["setosa"]})
    status, listed = request(port, "GET", "/v1/models")
    assert status == 200 and [(m["id"], m["created"]) for m in listed["data"]] == [("model", int(svc.created_at))]
    os.kill(info["gateway_pid"], signal.SIGKILL)
    wait_for(lambda: client.daemon_info()["gateway_pid"] not in (None, info["gateway_pid"]), 10, what="a new gateway")
    status, again = wait_for(lambda: (r := request(port, "GET", "/v1/models/model"))[0] == 200 and r, 10, what="the route back")
    assert again["created"] == int(svc.created_at) and again["ready"] is True
