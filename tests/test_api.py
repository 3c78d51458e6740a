"""The control API spoken raw: HTTP/1.1 + JSON on the daemon's Unix socket.

Through http.client (with a Unix ``connect``) and through ``curl --unix-socket``,
as a user without the Python client would. Every error must be JSON
``{"error": {"type", "message"}}`` with the right status, and must leave
nothing behind.
"""

from __future__ import annotations

import os
import json
import shutil
import signal
import socket
import subprocess
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

import sys

import pytest

from conftest import iris_config, predict
from daemon import __version__
from daemon.paths import Paths
from daemon.daemon_process import daemon_pid
from daemon.testing import IRIS, UnixHTTP, wait_for

CURL = shutil.which("curl") or "/usr/bin/curl"
SETOSA = [[5.0, 3.4, 1.5, 0.2]]


def call(home: Path, method: str, path: str, body: bytes | str | dict | list | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: (status, headers in lower case, raw body)."""
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    headers = dict(headers or {})
    if body is not None:
        headers.setdefault("content-type", "application/json")
    conn = UnixHTTP(home / "modeld.sock")
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, raw
    finally:
        conn.close()


def call_json(home: Path, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    status, headers, raw = call(home, method, path, body)
    assert headers.get("content-type") == "application/json", (status, headers, raw)
    assert headers.get("x-modeld-version") == __version__
    return status, json.loads(raw)


def curl(home: Path, *args: str) -> tuple[int, str]:
    """Run curl on the daemon's socket; (HTTP status, body)."""
    result = subprocess.run(
        [CURL, "-sS", "--unix-socket", str(home / "modeld.sock"), "-w", "\n%{http_code}", *args],
        capture_output=True, text=True, timeout=90,
    )
    assert result.returncode == 0, result.stderr
    body, _, status = result.stdout.rpartition("\n")
    return int(status), body


def assert_error(status: int, data: Any, expected: int, kind: str | None = None, *mentions: str) -> None:
    assert status == expected, (status, data)
    assert set(data) == {"error"}, data
    assert set(data["error"]) == {"type", "message"}, data
    assert data["error"]["message"], data
    if kind is not None:
        assert data["error"]["type"] == kind, data
    for text in mentions:
        assert text in data["error"]["message"], (text, data)


@pytest.fixture
def daemon(client, home) -> dict[str, Any]:
    """A running daemon (auto-started through the client); its info."""
    return client.daemon_info()


# -------------------------------------------------------------------- tests


def test_curl_find_deploy_predict_delete(daemon, home):
    status, body = curl(home, "http://modeld/v1/services")
    assert status == 200
    assert json.loads(body) == {"services": []}

    # The daemon's cwd is /, so the model is named by an absolute path.
    request = {"config": {"model_name": "iris", "model_uri": IRIS, "model_type": "python", "pipeline_name": "curl"},
               "timeout": 60}
    status, body = curl(home, "-X", "POST", "-H", "content-type: application/json", "--data-binary", json.dumps(request),
                        "http://modeld/v1/services")
    assert status == 200, body
    svc = json.loads(body)
    assert svc["status"]["state"] == "active"
    endpoint = svc["endpoint"]
    url = f"http://{endpoint['host']}:{endpoint['port']}/v1/models/iris:predict"
    assert predict(url, SETOSA) == (200, {"predictions": ["setosa"]})

    status, body = curl(home, "http://modeld/v1/services?pipeline_name=curl&running=true")
    assert status == 200
    assert [s["uuid"] for s in json.loads(body)["services"]] == [svc["uuid"]]
    status, body = curl(home, "http://modeld/v1/services?pipeline_name=other")
    assert json.loads(body) == {"services": []}

    status, body = curl(home, f"http://modeld/v1/services/{svc['uuid']}")
    assert status == 200 and json.loads(body)["uuid"] == svc["uuid"]

    status, body = curl(home, "-X", "DELETE", f"http://modeld/v1/services/{svc['uuid']}?force=true")
    assert status == 200, body
    assert json.loads(body) == {"deleted": svc["uuid"]}
    status, body = curl(home, f"http://modeld/v1/services/{svc['uuid']}")
    assert_error(status, json.loads(body), 404, "ServiceNotFound")


def test_curl_errors_are_json(daemon, home):
    status, body = curl(home, "-X", "POST", "-H", "content-type: application/json", "--data-binary", "{nope",
                        "http://modeld/v1/services")
    assert_error(status, json.loads(body), 400, "InvalidRequest")
    status, body = curl(home, "http://modeld/v1/services?running=maybe")
    assert_error(status, json.loads(body), 400, "InvalidRequest", "running", "maybe")
    status, body = curl(home, "http://modeld/v1/nowhere")
    assert_error(status, json.loads(body), 404)


def test_bad_requests_are_json_errors_and_leave_nothing_behind(daemon, home):
    good = {"model_name": "iris", "model_uri": IRIS}

    # Bodies.
    for raw in (b"{not json", b"[1, 2", b"\xff\xfe", b"", b"   "):
        status, data = call_json(home, "POST", "/v1/services", raw)
        assert_error(status, data, 400, "InvalidRequest")
    for body in ([1, 2], "just a string", 42, None, {}):
        status, data = call_json(home, "POST", "/v1/services", json.dumps(body))
        assert_error(status, data, 400, "InvalidRequest")

    # Wrong types name the field.
    cases = [
        ({"config": {**good, "port": "eighty"}}, "config.port"),
        ({"config": {**good, "port": 70000}}, "config.port"),
        ({"config": {**good, "env": ["A=1"]}}, "config.env"),
        ({"config": {**good, "model_type": "quantum"}}, "config.model_type"),
        ({"config": good, "timeout": "soon"}, "timeout"),
        ({"config": good, "replace": "perhaps"}, "replace"),
        ({"config": good, "uuid": "not-a-uuid"}, "uuid"),
        ({"config": "iris"}, "config"),
        ({"config": {**good, "health_path": "health"}}, "health_path"),
        ({"config": {"model_name": "iris"}}, "model_uri"),
    ]
    for body, field in cases:
        status, data = call_json(home, "POST", "/v1/services", body)
        assert_error(status, data, 400, "InvalidRequest", field)

    # Unknown fields are refused, in the config and around it.
    status, data = call_json(home, "POST", "/v1/services", {"config": {**good, "colour": "red"}})
    assert_error(status, data, 400, "InvalidRequest", "config.colour")
    status, data = call_json(home, "POST", "/v1/services", {"config": good, "colour": "red"})
    assert_error(status, data, 400, "InvalidRequest", "colour")

    # A body over 1 MiB.
    big = json.dumps({"config": {**good, "description": "x" * (1024 * 1024 + 100)}})
    status, data = call_json(home, "POST", "/v1/services", big)
    assert_error(status, data, 413, "PayloadTooLarge")

    # A declared length over the cap is refused at once, before the body is read.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(5)
        raw.connect(str(home / "modeld.sock"))
        raw.sendall(b"POST /v1/services HTTP/1.1\r\nhost: modeld\r\ncontent-length: 99999999\r\n\r\n{}")
        answer = raw.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]

    # Paths that are not service uuids.
    for method, path in [
        *((m, p) for m in ("GET", "DELETE") for p in (
            "/v1/services/not-a-uuid", "/v1/services/12345", "/v1/services/..%2F..%2Fetc%2Fpasswd",
            "/v1/services/../daemon", "/v1/services/%2E%2E", "/v1/services/x%00y")),
        ("POST", "/v1/services/%2E%2E/stop"), ("POST", "/v1/services/..%2F..%2Fdaemon/stop"),
        ("GET", "/v1/services/..%2F/logs"), ("POST", "/v1/services/not-a-uuid/start"),
    ]:
        status, data = call_json(home, method, path)
        assert status in (400, 404), (method, path, status, data)
        assert_error(status, data, status)
    status, data = call_json(home, "GET", "/v1/services/not-a-uuid")
    assert_error(status, data, 400, "InvalidRequest", "not-a-uuid")

    # Unknown uuids, on every route that takes one.
    unknown = str(uuidlib.uuid4())
    for method, path in (("GET", ""), ("DELETE", ""), ("POST", "/start"), ("POST", "/stop"), ("GET", "/logs")):
        status, data = call_json(home, method, f"/v1/services/{unknown}{path}")
        assert_error(status, data, 404, "ServiceNotFound", unknown)

    # Unknown routes and wrong methods.
    for path in ("/", "/v1", "/v2/services", "/v1/nothing", "/v1/services/" + unknown + "/restart"):
        status, data = call_json(home, "GET", path)
        assert_error(status, data, 404)
    for method, path in (("PUT", "/v1/services"), ("DELETE", "/v1/daemon"), ("GET", "/v1/daemon/shutdown"),
                         ("PATCH", f"/v1/services/{unknown}"), ("GET", f"/v1/services/{unknown}/start")):
        status, data = call_json(home, method, path)
        assert_error(status, data, 405, None, method)

    # Query parameters: unknown names and bad values.
    for path, name in (("/v1/services?colour=red", "colour"), ("/v1/daemon?verbose=1", "verbose"),
                       (f"/v1/services/{unknown}?x=1", "x"), ("/v1/services?model=iris", "model")):
        status, data = call_json(home, "GET", path)
        assert_error(status, data, 400, "InvalidRequest", repr(name))
    for path, name in (("/v1/services?running=maybe", "running"), ("/v1/services?service_uuid=nope", "service_uuid"),
                       (f"/v1/services/{unknown}/logs?tail=-3", "tail"), (f"/v1/services/{unknown}/logs?tail=ten", "tail")):
        status, data = call_json(home, "GET", path)
        assert_error(status, data, 400, "InvalidRequest", name)
    status, data = call_json(home, "POST", f"/v1/services/{unknown}/stop?timeout=soon")
    assert_error(status, data, 400, "InvalidRequest", "timeout")
    status, data = call_json(home, "POST", "/v1/services?dry_run=1", {"config": good})
    assert_error(status, data, 400, "InvalidRequest", "dry_run")

    # The daemon still answers, is the same process, and nothing was created.
    status, info = call_json(home, "GET", "/v1/daemon")
    assert status == 200 and info["pid"] == daemon["pid"]
    assert info["counts"]["total"] == 0
    assert call_json(home, "GET", "/v1/services") == (200, {"services": []})
    assert list((home / "services").iterdir()) == []


def test_daemon_info(daemon, home):
    status, info = call_json(home, "GET", "/v1/daemon")
    assert status == 200
    assert info["version"] == __version__
    assert info["pid"] == daemon_pid(Paths(home))
    assert info["home"] == str(home)
    assert info["socket"] == str(home / "modeld.sock")
    assert info["started_at"] <= time.time()
    counts = info["counts"]
    assert set(counts) == {"inactive", "pending_startup", "active", "pending_shutdown", "error", "scaled_to_zero", "total"}
    assert all(v == 0 for v in counts.values())
    assert info["problems"] == []
    assert info["on_demand"] == {"max_active": None, "memory_budget": None, "loaded": []}  # no caps by default


def test_logs_tail_and_follow(client, home):
    svc = client.deploy(iris_config(), timeout=60)
    uuid = str(svc.uuid)
    log_path = home / "services" / uuid / "service.log"
    with open(log_path, "a") as f:
        f.write("".join(f"line {i}\n" for i in range(20)))

    status, headers, raw = call(home, "GET", f"/v1/services/{uuid}/logs")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    text = raw.decode()
    assert "--- modeld: starting" in text and "line 19" in text

    status, _, raw = call(home, "GET", f"/v1/services/{uuid}/logs?tail=5")
    assert status == 200
    assert raw.decode().splitlines() == [f"line {i}" for i in range(15, 20)]
    status, _, raw = call(home, "GET", f"/v1/services/{uuid}/logs?tail=0")
    assert (status, raw) == (200, b"")

    status, body = curl(home, f"http://modeld/v1/services/{uuid}/logs?tail=2")
    assert status == 200 and body.splitlines() == ["line 18", "line 19"]

    # follow: the existing lines first, then what is appended, until the client goes away.
    conn = UnixHTTP(home / "modeld.sock", timeout=10)
    try:
        conn.request("GET", f"/v1/services/{uuid}/logs?tail=1&follow=true")
        response = conn.getresponse()
        assert response.status == 200
        first = response.read1(65536).decode()
        assert first == "line 19\n"
        with open(log_path, "a") as f:
            f.write("appended while following\n")
        seen = ""
        deadline = time.monotonic() + 10
        while "appended while following" not in seen and time.monotonic() < deadline:
            seen += response.read1(65536).decode()
        assert "appended while following" in seen
    finally:
        conn.close()

    # The daemon is not stuck on the closed stream.
    assert client.get(uuid).is_running
    status, info = call_json(home, "GET", "/v1/daemon")
    assert status == 200


def test_follow_ends_when_the_service_is_deleted(client, home):
    svc = client.deploy(iris_config(), timeout=60)
    conn = UnixHTTP(home / "modeld.sock", timeout=20)
    try:
        conn.request("GET", f"/v1/services/{svc.uuid}/logs?follow=true")
        response = conn.getresponse()
        assert response.status == 200
        assert response.read1(65536)
        client.delete(svc.uuid, force=True)
        started = time.monotonic()
        rest = response.read()  # returns once the daemon ends the stream
        assert time.monotonic() - started < 10
        assert isinstance(rest, bytes)
    finally:
        conn.close()
    wait_for(lambda: not (home / "services" / str(svc.uuid)).exists(), 5, what="the service folder to go")


def test_cached_answers_follow_every_edit_of_a_service():
    """find and list answer from cached JSON; an edit in place of a service, its status or its
    endpoint (the objects the manager edits) shows in the next answer, and a service replaced
    by a new object with the same uuid too."""
    import json as _json
    import sys as _sys
    from types import SimpleNamespace

    from daemon.views import ServiceViews
    from daemon.config import ServiceConfig
    from daemon.models import LocalModelService, ServiceState

    services = {}
    for i in range(5):
        svc = LocalModelService(config=ServiceConfig(model_name=f"m{i}", model_uri="/tmp/m.py:model",
                                                     python=_sys.executable, working_dir="/tmp"))
        services[svc.uuid] = SimpleNamespace(svc=svc, uuid=svc.uuid)
    views = ServiceViews(SimpleNamespace(services=services))

    def listed() -> list[dict]:
        return _json.loads(views.list_json(views.find()))["services"]

    first = listed()
    assert views.list_json(views.find()) is views.list_json(views.find())  # nothing edited: reused
    one = next(iter(services.values()))
    one.svc.endpoint.unix_socket = "/tmp/x.sock"
    assert listed()[0]["endpoint"]["unix_socket"] == "/tmp/x.sock"
    one.svc.status.moved_to(ServiceState.ACTIVE)
    assert listed()[0]["status"]["state"] == "active"
    one.svc.desired_state = one.svc.desired_state.__class__("stopped")
    assert listed()[0]["desired_state"] == "stopped"
    one.svc = one.svc.model_copy(update={"version": 7})  # a new object, no edit anywhere
    assert listed()[0]["version"] == 7
    assert [s["uuid"] for s in listed()] == [s["uuid"] for s in first]
    assert _json.loads(views.json(one.svc))["version"] == 7


def test_daemon_counts_follow_every_change_of_state(client):
    """GET /v1/daemon's counts (counted again only when something changed) follow a deploy, a
    stop, a crash and a delete, with a real server."""
    def counts() -> dict[str, int]:
        return client.daemon_info()["counts"]

    assert counts()["total"] == 0
    svc = client.deploy(iris_config(), timeout=60)
    assert (counts()["active"], counts()["total"]) == (1, 1)
    client.stop(svc.uuid, timeout=30)
    assert (counts()["active"], counts()["inactive"]) == (0, 1)
    client.start(svc.uuid, timeout=60)
    pid = client.get(svc.uuid).status.pid
    assert counts()["active"] == 1
    os.kill(pid, signal.SIGKILL)  # a crash: restarted, the counts move through pending_startup
    wait_for(lambda: client.get(svc.uuid).status.pid not in (None, pid) and counts()["active"] == 1,
             timeout=30, what="the crashed server restarted and counted active")
    client.delete(svc.uuid, force=True)
    assert counts()["total"] == 0


def test_every_error_travels_as_its_class_through_the_app_in_memory(tmp_path):
    """The daemon's ASGI app, over a manager-like object, driven without a socket: each error the
    client receives is the class the daemon raised, the log excerpt in its own field."""
    from types import SimpleNamespace

    from daemon import (
        DaemonClient, DeployError, InternalError, InvalidRequest, MethodNotAllowed, NotFound, ServiceConfig,
        ServiceNotFound, StillStarting,
    )
    from daemon.api import Api
    from daemon.client import AsgiHandler, InMemoryTransport
    from daemon.settings import load_settings

    raised: list[Exception] = []

    def get(uuid):
        raise ServiceNotFound(f"no service with uuid {uuid}")

    async def deploy(config, replace, timeout, uuid):
        raise raised.pop()

    def describe():
        raise KeyError("counts")

    paths = Paths(tmp_path / "home")
    manager = SimpleNamespace(services={}, get=get, deploy=deploy, describe=describe, started_at=0.0,
                              paths=paths, settings=load_settings(paths, environ={}))
    handler = AsgiHandler(Api(manager, lambda stop_services: None))  # type: ignore[arg-type]
    client = DaemonClient(transport=InMemoryTransport(handler))
    try:
        assert client.find() == []
        unknown = str(uuidlib.uuid4())
        with pytest.raises(ServiceNotFound, match=unknown):
            client.get(unknown)
        with pytest.raises(NotFound, match="no route '/v1/nowhere'"):
            client._call("GET", "/v1/nowhere")
        with pytest.raises(MethodNotAllowed, match="PUT is not allowed on /v1/daemon"):
            client._call("PUT", "/v1/daemon")
        with pytest.raises(InvalidRequest, match="running"):
            client._call("GET", "/v1/services", query={"running": "maybe"})
        with pytest.raises(InternalError, match="KeyError: 'counts'"):
            client.daemon_info()
        config = ServiceConfig(model_name="m", model_uri="/tmp/m.py:model", python=sys.executable, working_dir="/tmp")
        raised.append(DeployError("service x: the server exited with code 1; last log lines:\nloading\nkaboom"))
        with pytest.raises(DeployError) as info:
            client.deploy(config)
        assert info.value.message == "service x: the server exited with code 1; last log lines:\nloading\nkaboom"
        assert (info.value.headline, info.value.log_excerpt) == ("service x: the server exited with code 1", "loading\nkaboom")
        raised.append(StillStarting("not healthy after 1s"))
        with pytest.raises(StillStarting):
            client.deploy(config)
    finally:
        handler.close()
