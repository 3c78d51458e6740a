"""On-demand services (issue 12, the daemon's side): a built-in server that gets no request for its
idle_timeout is scaled to zero, and the next request on its own URL (TCP or bind_unix) wakes it
with no failed request. Real daemons, real servers, real sockets."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from conftest import iris_config, modeld
from daemon import Conflict, DaemonClient, InvalidRequest, ServiceState
from daemon.models import BaseService
from daemon.testing import pid_alive, wait_for

S0 = ServiceState.SCALED_TO_ZERO
INSTANCE = [[5.1, 3.5, 1.4, 0.2]]


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def ask(svc: BaseService, timeout: float = 30, probe: bool = False) -> tuple[int, object]:
    """One prediction on a new connection to the service's own URL: (status, parsed JSON)."""
    e = svc.endpoint
    conn = UnixConnection(e.unix_socket, timeout) if e.unix_socket else http.client.HTTPConnection(e.host, e.port, timeout=timeout)
    try:
        headers = {"content-type": "application/json", **({"x-modeld-probe": "1"} if probe else {})}
        path = f"/v1/models/{e.model_name}:predict"
        conn.request("POST", path, body=json.dumps({"instances": INSTANCE}), headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def scaled(client: DaemonClient, svc: BaseService, timeout: float = 15) -> BaseService:
    return wait_for(lambda: (s := client.get(svc.uuid)).status.state == S0 and s, timeout, what="scaled to zero")


def write_model(folder: Path, body: str) -> str:
    path = folder / "ondemand_model.py"
    path.write_text(body)
    return f"{path}:model"


@pytest.mark.slow
def test_idle_stop_then_wake_on_its_own_url(client, home):
    svc = client.deploy(iris_config(idle_timeout=0.5), timeout=60)
    for _ in range(2):
        pid = client.get(svc.uuid).status.pid
        stopped = scaled(client, svc)
        assert stopped.status.pid is None and stopped.desired_state == "running"
        wait_for(lambda: not pid_alive(pid), 5, what="its server gone")
        assert ask(svc) == (200, {"predictions": ["setosa"]})
        woken = client.get(svc.uuid)
        assert woken.is_running and woken.status.pid not in (None, pid)
    assert client.get(svc.uuid).status.restarts == 0  # idle stops and wakes are no restarts
    assert (home / "run" / "activity" / str(svc.uuid)).stat().st_size == 16


def test_bind_unix_service_wakes_on_its_socket(client):
    svc = client.deploy(iris_config(idle_timeout=0.5, bind_unix=True), timeout=60)
    assert svc.endpoint.unix_socket
    scaled(client, svc)
    assert ask(svc) == (200, {"predictions": ["setosa"]})
    assert client.get(svc.uuid).is_running


@pytest.mark.slow
@pytest.mark.long
def test_requests_racing_idle_stops_never_fail(client, tmp_path):
    """New connections sent at gaps just past the idle timeout, across many idle stops: some land
    between the daemon's idle decision and its stop signal (a few ms of each stop), are accepted by
    the server and still running (the model takes 50 ms) when the signal comes. None fails: the
    server drains what it accepted, and what it did not waits in the backlog for the wake."""
    slow = write_model(tmp_path, "import time\ndef model(instances):\n    time.sleep(0.05)\n    return instances\n")
    svc = client.deploy(iris_config(model_uri=slow, idle_timeout=0.3), timeout=60)
    outcomes: list[object] = []
    pids: set[int] = set()
    rng = random.Random(12)
    deadline = time.monotonic() + 60
    while len(pids) < 25:
        try:
            outcomes.append(ask(svc, timeout=30)[0])
        except OSError as exc:
            outcomes.append(exc)
        pid = client.get(svc.uuid).status.pid
        if pid:
            pids.add(pid)
        time.sleep(rng.uniform(0.28, 0.42))  # (the traffic's pattern, around the idle stop: not a wait)
        assert time.monotonic() < deadline, f"too few idle stops: {len(pids)} servers"
    assert [o for o in outcomes if o != 200] == []


@pytest.mark.slow
def test_an_idle_keep_alive_connection_and_the_probes_do_not_keep_it_loaded(client, monkeypatch):
    monkeypatch.setenv("MODELD_HEALTH_INTERVAL", "0.1")  # probes ten times a second
    svc = client.deploy(iris_config(idle_timeout=1), timeout=60)
    assert client.daemon_info()["settings"]["health_interval"] == 0.1
    with socket.create_connection((svc.endpoint.host, svc.endpoint.port)) as idle:
        status = ask(svc, probe=True)  # a request that says it is a probe is not counted either
        assert status[0] == 200
        scaled(client, svc)
        idle.settimeout(5)
        assert idle.recv(1) == b""  # the server closed it as it stopped


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_a_served_request_keeps_it_loaded(client):
    """The counterpart: requests more often than the idle timeout keep the same server."""
    svc = client.deploy(iris_config(idle_timeout=1.5), timeout=60)
    pid = svc.status.pid
    until = time.monotonic() + 4
    while time.monotonic() < until:
        assert ask(svc)[0] == 200
        time.sleep(0.3)  # (the traffic's pattern)
    assert client.get(svc.uuid).status.pid == pid


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_kill_9_of_the_daemon_while_scaled_to_zero(client, home):
    svc = client.deploy(iris_config(idle_timeout=0.5), timeout=60)
    scaled(client, svc)
    daemon_pid = client.daemon_info()["pid"]
    client.close()
    os.kill(daemon_pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(daemon_pid), 10, what="daemon gone")
    again = client.get(svc.uuid)  # a new daemon
    assert again.status.state == S0 and client.daemon_info()["pid"] != daemon_pid
    assert ask(svc) == (200, {"predictions": ["setosa"]})
    assert client.get(svc.uuid).is_running
    scaled(client, svc)  # and idles out again


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_kill_9_of_the_daemon_while_waking(client, home, monkeypatch):
    """The daemon dies once the woken server is spawned: the next daemon adopts it (or wakes it again)."""
    svc = client.deploy(iris_config(idle_timeout=0.5), timeout=60)
    scaled(client, svc)
    daemon_pid = client.daemon_info()["pid"]
    client.shutdown()  # a plain stop: the next daemon carries the kill point
    wait_for(lambda: not pid_alive(daemon_pid), 10, what="daemon gone")
    monkeypatch.setenv("MODELD_DIE_AT", "start.after-spawn")
    assert client.get(svc.uuid).status.state == S0
    dying = client.daemon_info()["pid"]
    try:
        ask(svc, timeout=10)  # served by the woken server, or cut when the daemon dies
    except OSError:
        pass
    wait_for(lambda: not pid_alive(dying), 10, what="the daemon killed at its kill point")
    monkeypatch.delenv("MODELD_DIE_AT")
    after = client.get(svc.uuid)
    assert after.status.state in (S0, ServiceState.ACTIVE, ServiceState.PENDING_STARTUP)
    assert ask(svc) == (200, {"predictions": ["setosa"]})
    scaled(client, svc)


def test_a_wake_of_a_model_that_no_longer_loads_answers_503_then_error(client, tmp_path):
    uri = write_model(tmp_path, "def model(instances):\n    return ['ok' for _ in instances]\n")
    svc = client.deploy(iris_config(model_uri=uri, idle_timeout=0.5), timeout=60)
    scaled(client, svc)
    Path(uri.rsplit(":", 1)[0]).write_text("raise RuntimeError('the weights are gone')\n")
    status, body = ask(svc)
    assert status == 503
    assert body["error"]["type"] == "ServiceUnavailable" and "could not wake" in body["error"]["message"]
    failed = client.get(svc.uuid)
    assert failed.status.state == ServiceState.ERROR and "the weights are gone" in failed.status.last_error
    assert failed.desired_state.value == "running"  # a failed wake is no one asking it to stop
    with pytest.raises(Conflict, match="is in error"):  # an error stays until a start, replace or delete
        client.unload(svc.uuid)
    assert client.get(svc.uuid).status.state == ServiceState.ERROR


@pytest.mark.slow
def test_a_server_killed_while_it_wakes_leaves_the_service_in_error_still_wanted_running(client, tmp_path):
    """Chaos's seeds 101 and 202: a wake (here on the service's URL; the gateway's start call of a
    command service is the same load) whose server is killed before it answers: the waiting request
    gets a 503, and the service is in error with its desired state still running (it was, as a
    scaled-to-zero service; nobody asked it to stop), until it is started again."""
    slow = tmp_path / "slow"
    uri = write_model(
        tmp_path,
        f"import os, time\nif os.path.exists({str(slow)!r}):\n    time.sleep(60)\n"
        "def model(instances):\n    return ['ok' for _ in instances]\n",
    )
    svc = client.deploy(iris_config(model_uri=uri, idle_timeout=0.5), timeout=60)
    scaled(client, svc)
    slow.touch()
    answers: list[tuple[int, object]] = []
    waking = threading.Thread(target=lambda: answers.append(ask(svc)))
    waking.start()
    try:
        loading = wait_for(lambda: (s := client.get(svc.uuid)).status.pid and s, 15, what="the woken server spawned")
        os.kill(loading.status.pid, signal.SIGKILL)
    finally:
        waking.join(30)
    assert answers and answers[0][0] == 503, answers
    failed = client.get(svc.uuid)
    assert failed.status.state == ServiceState.ERROR
    assert failed.desired_state.value == "running", (failed.desired_state, failed.desired_reason)
    slow.unlink()
    assert client.start(svc.uuid, timeout=60).status.state == ServiceState.ACTIVE
    assert ask(svc) == (200, {"predictions": ["ok"]})


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_a_wake_past_wake_timeout_answers_504(client, tmp_path, monkeypatch):
    monkeypatch.setenv("MODELD_WAKE_TIMEOUT", "1")
    slow = tmp_path / "slow"
    uri = write_model(
        tmp_path,
        f"import os, time\nif os.path.exists({str(slow)!r}):\n    time.sleep(4)\n"
        "def model(instances):\n    return ['ok' for _ in instances]\n",
    )
    svc = client.deploy(iris_config(model_uri=uri, idle_timeout=0.5), timeout=60)
    scaled(client, svc)
    slow.touch()
    started = time.monotonic()
    status, body = ask(svc)
    assert status == 504 and body["error"]["type"] == "GatewayTimeout", body
    assert 0.9 < time.monotonic() - started < 4
    # The server keeps loading (its startup_timeout is longer) and serves the next request.
    wait_for(lambda: client.get(svc.uuid).is_running, 20, what="loaded at last")
    assert ask(svc) == (200, {"predictions": ["ok"]})


def test_a_request_to_a_deleted_service_is_refused(client):
    svc = client.deploy(iris_config(idle_timeout=0.5), timeout=60)
    scaled(client, svc)
    client.delete(svc.uuid)
    with pytest.raises(ConnectionRefusedError):
        ask(svc, timeout=5)
    assert not (Path(client.daemon_info()["home"]) / "run" / "activity" / str(svc.uuid)).exists()


@pytest.mark.slow
@pytest.mark.long
def test_unload_start_stop_and_the_state_filter_from_the_cli(client, home):
    svc = client.deploy(iris_config(name="od", idle_timeout=3600), timeout=60)
    out = modeld("unload", "od", home=home)
    assert out.returncode == 0 and "scaled_to_zero" in out.stdout, out.stderr
    assert client.find(running=True) == []
    assert [s.uuid for s in client.find(state=S0)] == [svc.uuid]
    ls = modeld("ls", "--state", "scaled_to_zero", home=home)
    assert ls.returncode == 0 and "scaled_to_zero" in ls.stdout and str(svc.uuid)[:8] in ls.stdout
    assert "no services match" in modeld("ls", "--state", "active", home=home).stderr
    assert modeld("start", str(svc.uuid)[:8], home=home).returncode == 0
    assert client.get(svc.uuid).is_running
    assert modeld("unload", "od", home=home).returncode == 0
    assert modeld("stop", "od", home=home).returncode == 0
    stopped = client.get(svc.uuid)
    assert stopped.status.state == ServiceState.INACTIVE
    with pytest.raises(ConnectionRefusedError):  # a stop: nothing wakes it
        ask(svc, timeout=5)
    assert client.get(svc.uuid).status.state == ServiceState.INACTIVE


def test_a_deploy_replace_loads_a_scaled_to_zero_service(client):
    svc = client.deploy(iris_config(idle_timeout=3600), timeout=60)
    client.unload(svc.uuid)
    new = client.deploy(iris_config(idle_timeout=3600, description="v2"), replace=True, timeout=60)
    assert new.uuid == svc.uuid and new.is_running and new.version == 2
    assert ask(svc)[0] == 200


def test_idle_timeout_on_a_command_service_needs_the_gateway(client):
    config = iris_config(model_type="command", command=["python3", "-m", "http.server", "{port}"], idle_timeout=5)
    with pytest.raises(InvalidRequest, match="gateway"):
        client.deploy(config, timeout=30)
    assert client.find() == []


def test_deploy_help_offers_idle_timeout(home):
    out = modeld("deploy", "--help", home=home)
    assert "--idle-timeout" in out.stdout
