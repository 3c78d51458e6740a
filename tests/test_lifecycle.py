"""Lifecycle of model servers, end to end: real daemon, real servers, real sockets, no mocks.

Every wait has a deadline (``wait_for``); every process is killed by the
``home`` fixture (by recorded pid and by its MODELD_HOME environment tag).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import sys
import textwrap
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from conftest import http_get, port_open, predict
from daemon import Conflict, DaemonClient, DeployError, InvalidRequest, RestartPolicy, ServiceConfig, ServiceNotFound, ServiceState
from daemon.store import PidRecord
from daemon.testing import IRIS, REPO, pid_alive, read_pid, server_script, wait_for

SETOSA = [5.0, 3.4, 1.5, 0.2]


# ----------------------------------------------------------------- helpers


def write_model(folder: Path, name: str, body: str) -> str:
    """Write ``folder/name.py`` holding ``body`` (dedented); its ``file.py:model`` uri."""
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return f"{path}:model"


def constant_model(folder: Path, name: str, answer: str) -> str:
    """A model answering ``answer`` for every instance."""
    return write_model(folder, name, f"def model(instances):\n    return [{answer!r} for _ in instances]\n")


def model_config(model_uri: str, **overrides: object) -> ServiceConfig:
    fields: dict[str, object] = dict(
        model_name="m", model_uri=model_uri, model_type="python",
        pipeline_name="pipe", pipeline_step_name="step", pipeline_run_id="run-1",
    )
    fields.update(overrides)
    return ServiceConfig(**fields)  # type: ignore[arg-type]


def uuids(services) -> set:
    return {s.uuid for s in services}


# ----------------------------------------------- 1. the Python API, as a user


def test_deployer_api_deploy_predict_stop_start_delete(home, monkeypatch):
    from daemon import ServiceConfig as Config, ServiceState as State
    from deployers import LocalDaemonModelDeployer, LocalDaemonModelDeployerConfig

    monkeypatch.chdir(REPO)  # the relative model_uri resolves against the deploying client's cwd
    dep = LocalDaemonModelDeployer(config=LocalDaemonModelDeployerConfig())
    try:
        svc = dep.deploy_model(
            Config(
                model_name="iris", model_uri="examples/iris.py:model", model_type="python",
                pipeline_name="train", pipeline_step_name="deploy", pipeline_run_id="r1",
            ),
            replace=True,
            timeout=60,
        )
        assert svc.status.state == State.ACTIVE
        info = dep.get_model_server_info(svc)
        for key in ("PREDICTION_URL", "HEALTH_CHECK_URL", "MODEL_URI", "MODEL_NAME", "SERVICE_PATH", "PID", "STATE", "LOG_PATH"):
            assert info.get(key), f"{key} missing from {info}"
        port = svc.endpoint.port
        assert info["PREDICTION_URL"] == f"http://127.0.0.1:{port}/v1/models/iris:predict"
        assert info["HEALTH_CHECK_URL"] == f"http://127.0.0.1:{port}/health"
        assert info["MODEL_URI"] == "examples/iris.py:model"
        assert info["MODEL_NAME"] == "iris"
        assert info["STATE"] == "active"
        assert Path(info["SERVICE_PATH"]) == home / "services" / str(svc.uuid)
        assert Path(info["SERVICE_PATH"]).is_dir()
        assert Path(info["LOG_PATH"]).is_file()
        assert pid_alive(int(info["PID"]))

        assert predict(info["PREDICTION_URL"], [SETOSA]) == (200, {"predictions": ["setosa"]})
        assert http_get(port, "/health") == 200

        assert uuids(dep.find_model_server(running=True, pipeline_name="train")) == {svc.uuid}
        assert dep.find_model_server(running=True, pipeline_name="no-such-pipeline") == []

        dep.stop_model_server(svc.uuid, timeout=30)
        assert not port_open(port)
        assert dep.find_model_server(running=True, pipeline_name="train") == []
        stopped = dep.find_model_server(pipeline_name="train")
        assert [s.status.state for s in stopped] == [State.INACTIVE]

        dep.start_model_server(svc.uuid)
        (again,) = dep.find_model_server(running=True, pipeline_name="train")
        assert again.uuid == svc.uuid and again.endpoint.port == port
        assert predict(info["PREDICTION_URL"], [SETOSA]) == (200, {"predictions": ["setosa"]})

        pid = again.status.pid
        dep.delete_model_server(svc.uuid, force=True)
        assert dep.find_model_server() == []
        assert not pid_alive(pid)
        assert not port_open(port)
    finally:
        dep.client.close()


# ------------------------------------------------------------- 2. find filters


def test_find_every_filter(client, tmp_path):
    uri_a = constant_model(tmp_path, "fa", "a")
    uri_b = constant_model(tmp_path, "fb", "b")
    a = client.deploy(model_config(uri_a, model_name="a", pipeline_name="p1", pipeline_run_id="r1", pipeline_step_name="s1"), timeout=60)
    b = client.deploy(model_config(uri_b, model_name="b", pipeline_name="p1", pipeline_run_id="r2", pipeline_step_name="s2"), timeout=60)
    c = client.deploy(
        ServiceConfig(
            model_name="c", model_uri="file:///models/c", model_type="command",
            command=[sys.executable, "-m", "http.server", "{port}", "--bind", "{host}"], health_path="/",
            working_dir=str(tmp_path), pipeline_name="p2", pipeline_run_id="r1", pipeline_step_name="s1",
        ),
        timeout=60,
    )
    client.stop(b.uuid, timeout=30)

    def found(**filters) -> set:
        return uuids(client.find(**filters))

    assert found() == {a.uuid, b.uuid, c.uuid}
    assert found(running=True) == {a.uuid, c.uuid}  # only ACTIVE
    assert found(service_uuid=b.uuid) == {b.uuid}
    assert found(service_uuid=str(a.uuid)) == {a.uuid}
    assert found(service_uuid=b.uuid, running=True) == set()
    assert found(service_uuid=uuidlib.uuid4()) == set()
    assert found(pipeline_name="p1") == {a.uuid, b.uuid}
    assert found(pipeline_name="p2") == {c.uuid}
    assert found(pipeline_name="p1", running=True) == {a.uuid}
    assert found(pipeline_run_id="r1") == {a.uuid, c.uuid}
    assert found(pipeline_run_id="r2") == {b.uuid}
    assert found(pipeline_step_name="s1") == {a.uuid, c.uuid}
    assert found(pipeline_step_name="s2") == {b.uuid}
    assert found(model_name="a") == {a.uuid}
    assert found(model_name="b") == {b.uuid}
    assert found(model_name="c") == {c.uuid}
    assert found(model_uri=uri_a) == {a.uuid}
    assert found(model_uri=uri_b) == {b.uuid}
    assert found(model_uri="file:///models/c") == {c.uuid}
    assert found(model_type="python") == {a.uuid, b.uuid}
    assert found(model_type="command") == {c.uuid}
    assert found(model_type="pickle") == set()
    assert found(pipeline_name="p1", pipeline_run_id="r1", pipeline_step_name="s1", model_name="a") == {a.uuid}
    assert found(pipeline_name="p2", model_type="python") == set()
    assert found(model_name="nope") == set()
    # Services come back oldest first.
    assert [s.uuid for s in client.find()] == [a.uuid, b.uuid, c.uuid]


# ---------------------------------------------------------------- 3. replace


def test_replace_in_place_and_replace_false(client, tmp_path):
    v1 = model_config(constant_model(tmp_path, "rv1", "v1"))
    v2 = model_config(constant_model(tmp_path, "rv2", "v2"))
    first = client.deploy(v1, timeout=60)
    url, port, old_pid = first.prediction_url, first.endpoint.port, first.status.pid
    assert first.version == 1
    assert predict(url, [1]) == (200, {"predictions": ["v1"]})

    second = client.deploy(v2, replace=True, timeout=60)
    assert second.uuid == first.uuid
    assert second.prediction_url == url and second.endpoint.port == port
    assert second.version == 2
    assert second.status.state == ServiceState.ACTIVE
    assert second.config.model_uri == v2.model_uri
    assert not pid_alive(old_pid), "the old version must be gone when replace returns"
    assert second.status.pid != old_pid and pid_alive(second.status.pid)
    assert predict(url, [1, 2]) == (200, {"predictions": ["v2", "v2"]})
    assert uuids(client.find()) == {first.uuid}

    # replace=False always makes a new service, even with the same pipeline/step/model name.
    other = client.deploy(v1, replace=False, timeout=60)
    assert other.uuid != first.uuid
    assert other.endpoint.port != port
    assert other.version == 1
    assert predict(other.prediction_url, [1]) == (200, {"predictions": ["v1"]})
    assert predict(url, [1]) == (200, {"predictions": ["v2"]})
    assert uuids(client.find()) == {first.uuid, other.uuid}

    # A replace never takes a service of another name or project for its own, even where the pipeline,
    # step and model names (all empty here, as a plain `modeld deploy --name` has them) are the same.
    named = [client.deploy(v1.model_copy(update={"model_name": "", "name": n, "project": p}), replace=True, timeout=60)
             for n, p in (("alpha", ""), ("beta", ""), ("alpha", "lab"))]
    assert len({s.uuid for s in named}) == 3 and {s.config.name for s in named} == {"alpha", "beta"}
    again = client.deploy(v2.model_copy(update={"model_name": "", "name": "beta"}), replace=True, timeout=60)
    assert again.uuid == named[1].uuid and again.version == 2


def test_failed_replace_keeps_old_version_serving(client, tmp_path):
    good = model_config(constant_model(tmp_path, "good", "good"))
    bad = model_config(write_model(tmp_path, "bad", """
        raise RuntimeError("new weights are corrupt")

        def model(instances):
            return instances
    """))
    svc = client.deploy(good, timeout=60)
    pid = svc.status.pid

    started = time.monotonic()
    with pytest.raises(DeployError) as excinfo:
        client.deploy(bad, replace=True, timeout=60)
    assert time.monotonic() - started < 10
    assert "new weights are corrupt" in str(excinfo.value)

    assert predict(svc.prediction_url, [1]) == (200, {"predictions": ["good"]})
    now = client.get(svc.uuid)
    assert now.status.pid == pid and pid_alive(pid)
    assert now.status.state == ServiceState.ACTIVE
    assert now.version == 1
    assert now.config.model_uri == good.model_uri
    assert now.endpoint.port == svc.endpoint.port
    # Still supervised: the old version comes back if it dies.
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: (s := client.get(svc.uuid)).status.pid not in (None, pid) and s.is_running, 20, what="restart after failed replace")
    assert predict(svc.prediction_url, [1]) == (200, {"predictions": ["good"]})


# ------------------------------------------------------- 4. replace under load


@dataclass
class Outcome:
    start: float
    end: float
    value: object  # the single prediction, or None when the request failed
    error: str = ""


class Load(threading.Thread):
    """Sends predictions as fast as it can, one new TCP connection per request."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.halt = threading.Event()
        self.outcomes: list[Outcome] = []

    def run(self) -> None:
        while not self.halt.is_set():
            start = time.monotonic()
            try:
                status, body = predict(self.url, ["x"], timeout=10)
            except Exception as exc:  # any failure counts, whatever it is
                self.outcomes.append(Outcome(start, time.monotonic(), None, f"{type(exc).__name__}: {exc}"))
                continue
            if status == 200 and isinstance(body, dict):
                self.outcomes.append(Outcome(start, time.monotonic(), body["predictions"][0]))
            else:
                self.outcomes.append(Outcome(start, time.monotonic(), None, f"HTTP {status}: {body}"))

    def successes_after(self, t: float) -> int:
        return sum(1 for o in list(self.outcomes) if o.start > t and o.value is not None)


def test_zero_failed_requests_during_replaces_under_load(client, tmp_path):
    configs = [model_config(constant_model(tmp_path, f"load{n}", f"v{n}")) for n in range(1, 5)]
    svc = client.deploy(configs[0], timeout=60)
    load = Load(svc.prediction_url)
    load.start()
    # (version served, when its deploy returned, when the next deploy began)
    windows: list[list[object]] = []
    try:
        returned = time.monotonic()
        wait_for(lambda: load.successes_after(returned) >= 5, 10, what="load on v1")
        windows.append(["v1", returned, None])
        for n in (2, 3, 4):
            windows[-1][2] = time.monotonic()
            new = client.deploy(configs[n - 1], replace=True, timeout=60)
            returned = time.monotonic()
            assert new.uuid == svc.uuid and new.endpoint.port == svc.endpoint.port and new.version == n
            # Right after the deploy returns, new connections reach the new version only.
            for _ in range(3):
                assert predict(svc.prediction_url, ["x"]) == (200, {"predictions": [f"v{n}"]})
            wait_for(lambda: load.successes_after(returned) >= 5, 10, what=f"load on v{n}")
            windows.append([f"v{n}", returned, None])
    finally:
        load.halt.set()
        load.join(15)
    windows[-1][2] = time.monotonic()
    assert not load.is_alive()

    failures = [o for o in load.outcomes if o.value is None]
    assert not failures, f"{len(failures)} of {len(load.outcomes)} requests failed, e.g. {failures[:3]}"
    assert len(load.outcomes) > 0
    for version, begin, end in windows:
        seen = {o.value for o in load.outcomes if o.start > begin and o.end < end}  # type: ignore[operator]
        assert seen == {version}, f"requests between deploy of {version} and the next saw {seen}"


# ------------------------------------------------------------ 5. stop / start


def test_stop_closes_port_start_reopens_same_port(client, tmp_path):
    svc = client.deploy(model_config(constant_model(tmp_path, "ss", "up")), timeout=60)
    port, pid = svc.endpoint.port, svc.status.pid
    assert port_open(port)

    stopped = client.stop(svc.uuid, timeout=30)
    assert not port_open(port), "the port must be closed when stop returns"
    assert not pid_alive(pid)
    assert stopped.status.state == ServiceState.INACTIVE
    assert stopped.status.pid is None
    assert client.get(svc.uuid).status.state == ServiceState.INACTIVE
    assert client.find(running=True) == []

    started = client.start(svc.uuid, timeout=60)
    assert started.status.state == ServiceState.ACTIVE
    assert started.endpoint.port == port, "a service keeps its port for life"
    assert started.prediction_url == svc.prediction_url
    assert started.status.pid != pid and pid_alive(started.status.pid)
    assert predict(svc.prediction_url, [1]) == (200, {"predictions": ["up"]})
    assert client.get(svc.uuid).status.state == ServiceState.ACTIVE


# ------------------------------------------------------------------ 6. delete


def test_delete_removes_process_folder_and_service(client, home, tmp_path):
    svc = client.deploy(model_config(constant_model(tmp_path, "dl", "x")), timeout=60)
    folder = home / "services" / str(svc.uuid)
    assert folder.is_dir()
    pid, port = svc.status.pid, svc.endpoint.port

    client.delete(svc.uuid, timeout=30)
    assert not pid_alive(pid)
    assert not folder.exists()
    assert not port_open(port)
    assert svc.uuid not in uuids(client.find())
    with pytest.raises(ServiceNotFound):
        client.get(svc.uuid)
    with pytest.raises(ServiceNotFound):
        client.delete(svc.uuid)


# ------------------------------------------------- 7 + 13. crash and restart


def test_kill_9_is_restarted_on_the_same_port(client, tmp_path):
    svc = client.deploy(model_config(constant_model(tmp_path, "k9", "alive")), timeout=60)
    port, old = svc.endpoint.port, svc.status.pid
    assert svc.status.restarts == 0

    os.kill(old, signal.SIGKILL)
    back = wait_for(
        lambda: (s := client.get(svc.uuid)).status.pid not in (None, old) and s.is_running and s,
        20, what="the daemon restarting the killed server",
    )
    assert back.status.restarts >= 1
    assert back.endpoint.port == port, "a service keeps its port across a crash restart"
    assert back.prediction_url == svc.prediction_url
    assert not pid_alive(old) and pid_alive(back.status.pid)
    assert predict(svc.prediction_url, [1]) == (200, {"predictions": ["alive"]})


CRASHING_SERVER = """
import http.server, os, sys, threading

answered = threading.Event()

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
        answered.set()

    def log_message(self, *args):
        pass

server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
print("crasher up on", sys.argv[1], flush=True)
answered.wait()
answered.clear()
threading.Event().wait(0.3)
print("crasher: giving up, exit 7", flush=True)
os._exit(7)
"""


@pytest.mark.slow
def test_crash_loop_ends_in_error(client, tmp_path):
    script = tmp_path / "crasher.py"
    script.write_text(CRASHING_SERVER)
    svc = client.deploy(
        ServiceConfig(
            model_name="crasher", model_type="command", command=[sys.executable, str(script), "{port}"],
            restart=RestartPolicy(max_restarts=2, backoff_initial=0.05),
        ),
        timeout=60,
    )
    assert svc.status.state == ServiceState.ACTIVE
    port = svc.endpoint.port

    failed = wait_for(lambda: (s := client.get(svc.uuid)).is_failed and s, 30, what="the crash loop to end in error")
    assert failed.status.state == ServiceState.ERROR
    assert failed.status.exit_code == 7
    assert failed.status.restarts == 2
    assert failed.status.pid is None
    assert "7" in failed.status.last_error
    assert "exited with code 7" in failed.status.last_error
    assert "crasher: giving up, exit 7" in failed.status.last_error  # the last log lines
    assert failed.endpoint.port == port
    assert not port_open(port)
    assert client.find(running=True) == []

    # A daemon restart is no reason to run the crash loop again: the error stays until acted upon.
    client.shutdown()
    again = client.get(svc.uuid)  # auto-starts a new daemon, which rebuilds from disk
    assert again.status.state == ServiceState.ERROR and again.status.pid is None
    assert again.status.restarts == 2 and not port_open(port)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["on-failure", "never"])
def test_a_server_that_finishes_with_exit_0_stays_stopped_across_a_daemon_restart(client, tmp_path, mode):
    """Not restarted by its policy, an exit 0 is a stop (the README: "an exit 0 that is not restarted"):
    the desired state follows, so a daemon restart (or a reboot) does not run it again; start does."""
    script = tmp_path / "finisher.py"
    script.write_text(CRASHING_SERVER.replace("os._exit(7)", "os._exit(0)").replace("exit 7", "done, exit 0"))
    svc = client.deploy(
        ServiceConfig(model_name="finisher", model_type="command", command=[sys.executable, str(script), "{port}"],
                      restart=RestartPolicy(mode=mode)),
        timeout=60,
    )
    pid = svc.status.pid
    done = wait_for(lambda: (s := client.get(svc.uuid)).status.state == ServiceState.INACTIVE and s, 30, what="the exit 0")
    assert done.desired_state == "stopped" and done.status.exit_code == 0 and not pid_alive(pid)
    client.shutdown()
    again = client.get(svc.uuid)  # auto-starts a new daemon, which rebuilds from disk
    assert again.status.state == ServiceState.INACTIVE and again.status.pid is None and again.status.restarts == 0
    started = client.start(svc.uuid, timeout=60)  # a start runs it again, as it does any stopped service
    assert started.status.state == ServiceState.ACTIVE and started.desired_state == "running"


def test_start_refuses_a_port_held_by_a_stranger(client, tmp_path):
    """A command server binds its own port: if another program took it meanwhile, start fails
    clearly instead of reporting the stranger's answers as the service's health."""
    svc = client.deploy(ServiceConfig(model_name="web", health_path="/",
                                      command=[sys.executable, "-m", "http.server", "{port}", "--bind", "{host}"]),
                        timeout=60)
    client.stop(svc.uuid)
    with socket.socket() as stranger:
        stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        stranger.bind(("127.0.0.1", svc.endpoint.port))
        stranger.listen()
        with pytest.raises(DeployError) as excinfo:
            client.start(svc.uuid, timeout=30)
        assert "already in use" in str(excinfo.value)
        assert client.get(svc.uuid).status.state == ServiceState.ERROR
    assert client.start(svc.uuid, timeout=30).is_running  # once the port is free again


# -------------------------------------------------------- 9. load failure


def test_model_raising_on_load_fails_deploy_fast(client, tmp_path):
    uri = write_model(tmp_path, "corrupt", """
        raise RuntimeError("weights are corrupt")

        def model(instances):
            return instances
    """)
    started = time.monotonic()
    with pytest.raises(DeployError) as excinfo:
        client.deploy(model_config(uri), timeout=60)
    assert time.monotonic() - started < 10
    assert "weights are corrupt" in str(excinfo.value)
    (svc,) = client.find()
    assert svc.status.state == ServiceState.ERROR
    assert "weights are corrupt" in svc.status.last_error
    assert svc.status.pid is None


# ------------------------------------------------------ 10. command servers


def test_command_server_deploy_and_stop(client, tmp_path):
    (tmp_path / "hello.txt").write_text("hi")
    svc = client.deploy(
        ServiceConfig(
            model_name="files", model_type="command", health_path="/",
            command=[sys.executable, "-m", "http.server", "{port}", "--bind", "{host}"],
            working_dir=str(tmp_path), prediction_path="/hello.txt",
        ),
        timeout=60,
    )
    port = svc.endpoint.port
    assert svc.status.state == ServiceState.ACTIVE and port > 0
    assert port_open(port)
    assert http_get(port, "/hello.txt") == 200
    assert svc.endpoint.prediction_url == f"http://127.0.0.1:{port}/hello.txt"

    client.stop(svc.uuid, timeout=30)
    assert not port_open(port)
    assert client.get(svc.uuid).status.state == ServiceState.INACTIVE


@pytest.mark.parametrize("command", ["/nonexistent/modeld-no-such-server", "modeld-no-such-server-on-path"])
def test_command_that_does_not_exist(client, command):
    """A config that cannot run is refused before anything is created: a 400 naming the command, no record."""
    with pytest.raises(InvalidRequest) as excinfo:
        client.deploy(ServiceConfig(model_name="ghost", model_type="command", command=[command, "{port}"]), timeout=30)
    assert command in str(excinfo.value)
    assert client.find() == []


def test_unrunnable_configs_are_refused_without_a_record(client, tmp_path):
    cases = [
        (ServiceConfig(model_name="a", model_uri=str(tmp_path / "missing.py") + ":model"), "does not exist"),
        (ServiceConfig(model_name="b", model_uri="m.pkl", working_dir=str(tmp_path)), "does not exist"),
        (ServiceConfig(model_name="c", model_uri=IRIS, working_dir=str(tmp_path / "nowhere")), "working_dir"),
        (ServiceConfig(model_name="d", model_uri=IRIS, python=str(tmp_path / "no-python")), "python"),
    ]
    for config, words in cases:
        with pytest.raises(InvalidRequest) as excinfo:
            client.deploy(config, timeout=30)
        assert words in str(excinfo.value), (config, excinfo.value)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(Conflict) as excinfo:
            client.deploy(ServiceConfig(model_name="e", model_uri=IRIS, port=port), timeout=30)
        assert "already in use" in str(excinfo.value)
    assert client.find() == []


# --------------------------------------------------------------- 11. pickle


def test_pickle_model(client, tmp_path, monkeypatch):
    module_name = f"lc_pickled_{uuidlib.uuid4().hex[:8]}"
    (tmp_path / f"{module_name}.py").write_text(textwrap.dedent("""
        class Scaler:
            def __init__(self, factor):
                self.factor = factor

            def predict(self, instances):
                return [x * self.factor for x in instances]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(module_name)
    try:
        path = tmp_path / "scaler.pkl"
        path.write_bytes(pickle.dumps(module.Scaler(3)))
    finally:
        sys.modules.pop(module_name, None)

    svc = client.deploy(
        ServiceConfig(model_name="scaler", model_uri=str(path), model_type="pickle", working_dir=str(tmp_path)),
        timeout=60,
    )
    assert svc.is_running
    assert predict(svc.prediction_url, [1, 2, 5]) == (200, {"predictions": [3, 6, 15]})


# ----------------------------------------------------------------- 12. logs


def test_logs_tail_and_follow(client, tmp_path):
    uri = write_model(tmp_path, "chatty", """
        def model(instances):
            for instance in instances:
                print("predicting", instance, flush=True)
            return instances
    """)
    svc = client.deploy(model_config(uri, model_name="chatty"), timeout=60)
    tail = "".join(client.logs(svc.uuid, tail=20))
    assert "serving model" in tail
    assert "serving model 'chatty'" in tail

    marker = f"marker-{uuidlib.uuid4().hex}"
    chunks: list[str] = []
    subscribed = threading.Event()

    def follow() -> None:
        gen = client.logs(svc.uuid, tail=0, follow=True)
        try:
            subscribed.set()
            for chunk in gen:
                chunks.append(chunk)
                if marker in "".join(chunks):
                    break
        finally:
            gen.close()

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    subscribed.wait(10)
    # The follower may subscribe a moment after we send: keep predicting until it sees one.
    deadline = time.monotonic() + 15
    while reader.is_alive() and time.monotonic() < deadline:
        assert predict(svc.prediction_url, [marker]) == (200, {"predictions": [marker]})
        reader.join(0.3)
    assert not reader.is_alive(), f"follow never yielded the new log line; got {''.join(chunks)!r}"
    assert f"predicting {marker}" in "".join(chunks)


# ------------------------------------------------------------- 14. own uuid


def test_deploy_with_given_uuid_and_conflict(client, tmp_path):
    wanted = uuidlib.uuid4()
    config = model_config(constant_model(tmp_path, "own", "mine"))
    svc = client.deploy(config, uuid=wanted, timeout=60)
    assert svc.uuid == wanted
    assert client.get(wanted).uuid == wanted
    assert predict(svc.prediction_url, [1]) == (200, {"predictions": ["mine"]})

    with pytest.raises(Conflict):
        client.deploy(config, uuid=wanted, timeout=60)
    with pytest.raises(Conflict):
        client.deploy(config.model_copy(update={"model_name": "other"}), uuid=str(wanted), timeout=60)
    assert uuids(client.find()) == {wanted}
    assert client.get(wanted).version == 1


# ------------------------------------------- replace after a daemon restart


@pytest.mark.slow
def test_replace_after_daemon_kill_keeps_port_and_fails_no_request(client, home, tmp_path):
    """A restarted daemon takes the listening socket back from the live server, so a replace still hands over."""
    import signal as _signal

    first = client.deploy(model_config(constant_model(tmp_path, "ra1", "v1")), timeout=60)
    daemon_pid = client.daemon_info()["pid"]
    client.close()
    os.kill(daemon_pid, _signal.SIGKILL)
    wait_for(lambda: not pid_alive(daemon_pid), 10, what="daemon gone")
    assert predict(first.prediction_url, ["x"]) == (200, {"predictions": ["v1"]})

    readopted = client.get(first.uuid)  # auto-starts a new daemon, which re-adopts the server
    assert client.daemon_info()["pid"] != daemon_pid
    assert readopted.status.pid == first.status.pid and readopted.is_running

    load = Load(first.prediction_url)
    load.start()
    try:
        wait_for(lambda: load.successes_after(time.monotonic() - 60) >= 5, 10, what="load on v1")
        new = client.deploy(model_config(constant_model(tmp_path, "ra2", "v2")), replace=True, timeout=60)
        assert new.uuid == first.uuid and new.endpoint.port == first.endpoint.port
        assert not pid_alive(first.status.pid)
        assert predict(first.prediction_url, ["x"]) == (200, {"predictions": ["v2"]})
    finally:
        load.halt.set()
        load.join(15)
    failures = [o for o in load.outcomes if o.value is None]
    assert not failures, f"{len(failures)} of {len(load.outcomes)} requests failed, e.g. {failures[:3]}"
    assert f"replacing {first.uuid}: hand-over" in (home / "daemon.log").read_text()


# ------------------------------------------------- timeouts: stop grace, slow loads

# Tiny servers answering "ok": one that ignores SIGTERM, one that takes 1.5 s to load before it binds.
STUBBORN = server_script('PORT, BODY = int(sys.argv[1]), b"ok"\nimport signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n')
SLOW = server_script('PORT, BODY = int(sys.argv[1]), b"ok"\nimport time\nprint("loading weights", flush=True)\ntime.sleep(1.5)\n')


def test_stop_kills_after_the_services_stop_timeout(client, tmp_path):
    (tmp_path / "stubborn.py").write_text(STUBBORN)
    svc = client.deploy(ServiceConfig(model_name="stubborn", health_path="/", stop_timeout=0.5,
                                      command=[sys.executable, str(tmp_path / "stubborn.py"), "{port}"]), timeout=30)
    started = time.monotonic()
    client.stop(svc.uuid)  # the call's own timeout is the default 300 s: the service's 0.5 s applies
    assert time.monotonic() - started < 5
    assert not pid_alive(svc.status.pid) and not port_open(svc.endpoint.port)


@pytest.mark.slow
def test_short_deploy_timeout_leaves_a_loading_server_starting(client, tmp_path):
    (tmp_path / "slow.py").write_text(SLOW)
    config = ServiceConfig(model_name="slow", health_path="/", startup_timeout=60,
                           command=[sys.executable, str(tmp_path / "slow.py"), "{port}"])
    with pytest.raises(DeployError) as excinfo:
        client.deploy(config, timeout=0.3)
    assert "keeps starting" in str(excinfo.value)
    (svc,) = client.find(model_name="slow")
    assert svc.status.state == ServiceState.PENDING_STARTUP
    wait_for(lambda: client.get(svc.uuid).is_running, 15, what="the slow server to become active")
    assert port_open(svc.endpoint.port)


def slow_replace(client, home, tmp_path, tag: str, load_seconds: float):
    """Deploy v1, then start replacing it (in a thread) with a v2 that loads for ``load_seconds``.

    Returns once v2 is spawned: (v1 service, the thread, v2's pid, the daemon's pid).
    """
    old = client.deploy(model_config(constant_model(tmp_path, f"{tag}1", "v1")), timeout=60)
    slow = write_model(tmp_path, f"{tag}2",
                       f"import time\ntime.sleep({load_seconds})\ndef model(instances):\n    return ['v2' for _ in instances]\n")
    daemon_pid = client.daemon_info()["pid"]

    def replace() -> None:
        with contextlib.suppress(Exception):  # the daemon dies or shuts down under this call
            DaemonClient(home=home, auto_start=False).deploy(model_config(slow), replace=True, timeout=60)

    thread = threading.Thread(target=replace)
    thread.start()
    record = home / "services" / str(old.uuid) / "service.pid"
    wait_for(lambda: len(read_pid(record)) == 2, 10, what="the new version to be spawned")  # (with the previous one)
    return old, thread, read_pid(record)[0].pid, daemon_pid


@pytest.mark.slow
def test_daemon_killed_during_a_replace_leaves_exactly_one_server(client, home, tmp_path):
    """kill -9 of the daemon while the new version loads: the next daemon keeps the version
    service.json names (the old one, since the replace never committed) and stops the other."""
    old, thread, new_pid, daemon_pid = slow_replace(client, home, tmp_path, "kr", 3)
    os.kill(daemon_pid, signal.SIGKILL)
    thread.join(30)

    svc = client.get(old.uuid)  # a new daemon settles the cut-short replace while it rebuilds
    assert svc.version == 1 and svc.status.pid == old.status.pid and svc.is_running
    wait_for(lambda: not pid_alive(new_pid), 10, what="the uncommitted new version to be stopped")
    assert pid_alive(old.status.pid)
    for _ in range(5):
        assert predict(old.prediction_url, ["x"]) == (200, {"predictions": ["v1"]})
    assert PidRecord.loads((home / "services" / str(old.uuid) / "service.pid").read_text()).previous is None


def test_a_child_left_serving_by_its_dead_parent_is_followed_then_restarted_when_it_dies(client, tmp_path):
    """The main process dies (OOM, kill -9) but its child still serves the port: supervision
    follows the child (the serving process is the one that holds the port's socket). When that
    one dies too, it is a crash: restarted, on the same port."""
    svc = client.deploy(ServiceConfig(model_name="wrapped", health_path="/", command=[
        "sh", "-c", f"{sys.executable} -m http.server {{port}} --bind {{host}}; echo done"]), timeout=60)
    shell = psutil.Process(svc.status.pid)
    (worker,) = shell.children()
    os.kill(shell.pid, signal.SIGKILL)
    followed = wait_for(lambda: (s := client.get(svc.uuid)).status.pid == worker.pid and s, 10, what="the child to be followed")
    assert followed.is_running and followed.status.restarts == 0 and http_get(svc.endpoint.port, "/") == 200
    os.kill(worker.pid, signal.SIGKILL)
    back = wait_for(lambda: (s := client.get(svc.uuid)).is_running and s.status.pid not in (shell.pid, worker.pid) and s, 20,
                    what="the restart")
    assert back.status.restarts == 1
    assert back.endpoint.port == svc.endpoint.port and http_get(svc.endpoint.port, "/") == 200


def test_refused_replace_keeps_the_service_supervised(client, tmp_path):
    svc = client.deploy(model_config(constant_model(tmp_path, "rp1", "v1")), timeout=60)
    with pytest.raises(Conflict):
        client.deploy(model_config(constant_model(tmp_path, "rp2", "v2"), port=svc.endpoint.port + 1), replace=True)
    os.kill(svc.status.pid, signal.SIGKILL)
    back = wait_for(lambda: (s := client.get(svc.uuid)).is_running and s.status.pid != svc.status.pid and s, 20,
                    what="the restart after a refused replace")
    assert back.config.model_uri == svc.config.model_uri
    assert predict(svc.prediction_url, ["x"]) == (200, {"predictions": ["v1"]})


@pytest.mark.slow
def test_stop_all_during_a_replace_leaves_no_server(client, home, tmp_path):
    old, thread, new_pid, daemon_pid = slow_replace(client, home, tmp_path, "sa", 5)
    DaemonClient(home=home, auto_start=False).shutdown(stop_services=True)
    wait_for(lambda: not pid_alive(daemon_pid), 20, what="the daemon to exit")
    thread.join(30)
    assert not pid_alive(new_pid) and not pid_alive(old.status.pid)
    assert not port_open(old.endpoint.port)
