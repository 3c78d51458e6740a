"""Reliability: reused pids, corrupt state, configs that cannot work, a disk that refuses writes.

Everything is real: the unrelated process is a ``sleep`` of the same uid, the corrupt files
are written by hand, the stranger on a port is a real listening socket, and the full disk is
a real EFBIG from the kernel (RLIMIT_FSIZE on the daemon, with SIGXFSZ ignored, so the write
returns an error instead of killing it). Waits have deadlines.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from conftest import iris_config, modeld, port_open, predict
from daemon import DaemonClient, DeployError, InvalidRequest, ServiceConfig, ServiceState
from daemon.exceptions import Conflict, StorageError
from daemon.linux import boot_id, start_ticks
from daemon.models import DesiredState
from daemon.paths import Paths
from daemon.runtime._serve import FORK_SERVER_NAME
from daemon.daemon_process import daemon_pid
from daemon.testing import pid_alive, processes_of, wait_for

SETOSA = [[5.0, 3.4, 1.5, 0.2]]


# ------------------------------------------------------------------ helpers


def stop_daemon(client: DaemonClient, stop_services: bool = False) -> None:
    pid = client.daemon_info()["pid"]
    client.shutdown(stop_services=stop_services)
    wait_for(lambda: not pid_alive(pid), 30, what=f"daemon {pid} to exit")


def wait_state(client: DaemonClient, uuid, state: ServiceState, timeout: float = 30, not_pid: int | None = None):
    def check():
        svc = client.get(uuid)
        return svc if svc.status.state == state and svc.status.pid != not_pid else None

    return wait_for(check, timeout, interval=0.05, what=f"{uuid} to be {state}")


LOG_WRITER_NAME = "modeld-logd"


def servers_of(home: Path) -> list[psutil.Process]:
    """Live processes of this home other than its daemon, its fork server (warm servers are forked from it) and its log writer."""
    daemon = daemon_pid(Paths(home))

    def fork_server(p: psutil.Process) -> bool:
        # It names itself once it has imported what it preloads; before that, it is the daemon's
        # child running serve.py --fork-server (the servers it forks are its children, not the daemon's).
        return p.name() in (FORK_SERVER_NAME, LOG_WRITER_NAME) or (p.ppid() == daemon and "--fork-server" in p.cmdline())

    found = []
    for p in processes_of(home):
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.pid != daemon and p.status() != psutil.STATUS_ZOMBIE and not fork_server(p):
                found.append(p)
    return found


@contextlib.contextmanager
def unrelated_sleep():
    """A live process of our uid that modeld has nothing to do with (not tagged with the home)."""
    env = {k: v for k, v in os.environ.items() if k != "MODELD_HOME"}
    proc = subprocess.Popen(["sleep", "120"], env=env, start_new_session=True)
    try:
        wait_for(lambda: start_ticks(proc.pid) is not None, 5, what="sleep to start")
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def reused_pid_file(path: Path, stranger: int) -> str:
    """Rewrite ``service.pid`` as if its server had died and the kernel had given its pid to ``stranger``:
    this boot, a start time before the stranger's (the old server's), the old key=value lines."""
    lines = path.read_text().splitlines()
    ticks = start_ticks(stranger)
    assert ticks is not None and int(lines[1]) < ticks
    text = "\n".join([str(stranger), lines[1], boot_id(), *lines[3:]]) + "\n"
    path.write_text(text)
    return text


def write_model(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return f"{path}:model"


# ----------------------------------------------------------- 3. pid reuse


@pytest.mark.slow
def test_reused_pid_is_never_signalled_and_a_fresh_server_starts(client, home):
    runs = client.deploy(iris_config(model_name="runs"), timeout=60)
    stopped = client.deploy(iris_config(model_name="stopped"), timeout=60)
    pid_files = {svc.uuid: home / "services" / str(svc.uuid) / "service.pid" for svc in (runs, stopped)}
    saved = {uuid: path.read_text() for uuid, path in pid_files.items()}
    stop_daemon(client)
    for svc in (runs, stopped):  # servers gone, as after a reboot; "runs" should run again, "stopped" should not
        os.killpg(svc.status.pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(svc.status.pid), 10, what="the server to die")
    stopped_json = home / "services" / str(stopped.uuid) / "service.json"
    data = json.loads(stopped_json.read_text())
    data["desired_state"] = DesiredState.STOPPED.value
    stopped_json.write_text(json.dumps(data))

    with unrelated_sleep() as a, unrelated_sleep() as b:
        for (uuid, path), stranger in zip(pid_files.items(), (a, b)):
            path.write_text(saved[uuid])
            reused_pid_file(path, stranger.pid)

        # The new daemon (auto-started) sees both pid files naming live processes of its uid.
        fresh = wait_state(client, runs.uuid, ServiceState.ACTIVE, not_pid=a.pid)
        assert fresh.status.pid not in (a.pid, runs.status.pid, None)
        assert predict(fresh.endpoint.prediction_url, SETOSA) == (200, {"predictions": ["setosa"]})
        assert fresh.endpoint.port == runs.endpoint.port
        idle = client.get(stopped.uuid)
        assert idle.status.state == ServiceState.INACTIVE and idle.status.pid is None
        assert not any(s.uuid == stopped.uuid for s in client.find(running=True))

        # Neither stranger was signalled: alive, not stopped, and nothing in the log acts on them.
        for stranger in (a, b):
            assert stranger.poll() is None, "the daemon signalled an unrelated process"
            assert psutil.Process(stranger.pid).status() not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE)
        log = (home / "daemon.log").read_text()
        for stranger in (a, b):
            assert f"pid {stranger.pid}" not in log, log
        # The pid file now names the fresh server; the stale one for the stopped service is gone.
        assert pid_files[runs.uuid].read_text().split()[0] == str(fresh.status.pid)
        assert not pid_files[stopped.uuid].exists()

        # Operations on the services never reach the strangers either.
        client.stop(runs.uuid, timeout=10)
        client.delete(stopped.uuid, timeout=10)
        assert a.poll() is None and b.poll() is None


# -------------------------------------------------------- 4. corrupt state


CORRUPTIONS = {
    "truncated": lambda raw: raw[: len(raw) // 2],
    "empty": lambda raw: b"",
    "not JSON": lambda raw: b"\x00\xffthis is not JSON {{{",
    "wrong schema": lambda raw: json.dumps({**json.loads(raw), "config": {"model_type": "quantum", "port": "eighty"}}).encode(),
    "JSON of another shape": lambda raw: b"[1, 2, 3]",
}


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_corrupt_service_json_is_set_aside_reported_and_its_server_stopped(client, home):
    good = client.deploy(iris_config(model_name="good"), timeout=60)
    victims = {kind: client.deploy(iris_config(model_name=f"v{i}"), timeout=60) for i, kind in enumerate(CORRUPTIONS)}
    stop_daemon(client)  # servers keep running, as after a daemon crash
    originals = {}
    for kind, svc in victims.items():
        path = home / "services" / str(svc.uuid) / "service.json"
        originals[kind] = CORRUPTIONS[kind](path.read_bytes())
        path.write_bytes(originals[kind])

    info = client.daemon_info()  # a fresh daemon rebuilds from disk
    problems = {p["path"]: p for p in info["problems"]}
    assert len(problems) == len(CORRUPTIONS), info["problems"]
    log = (home / "daemon.log").read_text()
    status = modeld("daemon", "status", home=home)
    assert status.returncode == 0, status.stderr
    for kind, svc in victims.items():
        folder = home / "services" / str(svc.uuid)
        path = folder / "service.json"
        assert not path.exists(), kind
        (aside,) = folder.glob("service.json.corrupt-*")
        assert aside.read_bytes() == originals[kind], f"{kind}: set aside, not rewritten or deleted"
        problem = problems[str(path)]
        assert problem["set_aside_as"] == str(aside) and problem["message"], (kind, problem)
        # Reported in the daemon's log and by `modeld daemon status`.
        assert f"set aside unreadable {path} as {aside.name}" in log, (kind, log)
        assert f"problem: {path}: " in status.stdout and str(aside) in status.stdout, (kind, status.stdout)
        # Its server was still running: stopped rather than left untracked on its port.
        assert not pid_alive(svc.status.pid), kind
        assert not port_open(svc.endpoint.port), kind
        assert f"pid {svc.status.pid}) was stopped" in problem["message"], (kind, problem)
        assert not (folder / "service.pid").exists()

    # The good service was re-adopted untouched and keeps working; new deploys work too.
    assert info["counts"]["total"] == 1
    again = client.get(good.uuid)
    assert again.status.state == ServiceState.ACTIVE and again.status.pid == good.status.pid
    assert predict(again.endpoint.prediction_url, SETOSA) == (200, {"predictions": ["setosa"]})
    other = client.deploy(iris_config(model_name="after"), timeout=60)
    assert predict(other.endpoint.prediction_url, SETOSA)[0] == 200
    assert sorted(s.uuid for s in client.find()) == sorted([good.uuid, other.uuid])
    assert {p.pid for p in servers_of(home)} == {good.status.pid, other.status.pid}


# -------------------------------------------------------- 6. bad configs

MARGIN = 5.0  # seconds beyond the call's timeout that the answer may take (a loaded 2-core machine)


def assert_consistent(client: DaemonClient, home: Path, name: str, live: set[int] = frozenset()) -> None:
    """After a refused deploy: no record, or one in error/inactive without a pid; no process but ``live``."""
    for svc in client.find(model_name=name):
        assert svc.status.state in (ServiceState.ERROR, ServiceState.INACTIVE), svc.status
        assert svc.status.pid is None and svc.desired_state == DesiredState.STOPPED
        assert svc.status.last_error
    wait_for(lambda: {p.pid for p in servers_of(home)} <= set(live), 10, what="no process left behind")


def timed(call, timeout: float):
    started = time.monotonic()
    with pytest.raises(Exception) as excinfo:
        call()
    elapsed = time.monotonic() - started
    assert elapsed < timeout + MARGIN, f"answered after {elapsed:.1f}s, timeout {timeout}s"
    return excinfo.value


@pytest.mark.slow
@pytest.mark.long
def test_bad_configs_fail_clearly_within_their_timeout(client, home, tmp_path):
    keep = client.deploy(iris_config(model_name="keep"), timeout=60)
    timeout = 2.0
    py = sys.executable

    # A port someone else holds: refused before anything is created, built-in or command server.
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        port = stranger.getsockname()[1]
        for config in (iris_config(model_name="port", port=port),
                       ServiceConfig(model_name="port", health_path="/", port=port,
                                     command=[py, "-m", "http.server", "{port}", "--bind", "{host}"])):
            exc = timed(lambda: client.deploy(config, timeout=timeout), timeout)
            assert isinstance(exc, Conflict) and f"port {port}" in str(exc) and "already in use" in str(exc), exc
        assert_consistent(client, home, "port", {keep.status.pid})
        assert client.find(model_name="port") == []

    # A missing model file, a command that does not exist: 400s naming them, no record.
    missing = str(tmp_path / "nowhere" / "model.py")
    exc = timed(lambda: client.deploy(iris_config(model_name="nofile", model_uri=f"{missing}:model"), timeout=timeout), timeout)
    assert isinstance(exc, InvalidRequest) and missing in str(exc) and "does not exist" in str(exc), exc
    exc = timed(lambda: client.deploy(ServiceConfig(model_name="nocmd", command=["modeld-no-such-server", "{port}"]), timeout=timeout), timeout)
    assert isinstance(exc, InvalidRequest) and "modeld-no-such-server" in str(exc), exc
    assert client.find(model_name="nofile") == client.find(model_name="nocmd") == []

    # A command that exits at once: the exit code and its last words, a record in error, no process.
    exc = timed(lambda: client.deploy(ServiceConfig(
        model_name="exits", health_path="/",
        command=[py, "-c", "import sys; print('bad flag --frobnicate'); sys.exit(3)", "{port}"]), timeout=timeout), timeout)
    assert isinstance(exc, DeployError) and "exited with code 3" in str(exc) and "bad flag --frobnicate" in str(exc), exc
    assert_consistent(client, home, "exits", {keep.status.pid})

    # A server that never becomes healthy (listens, answers 404 on its health path), and a
    # built-in one whose model never finishes loading: killed at the timeout, record in error.
    never = ServiceConfig(model_name="never", health_path="/healthz", startup_timeout=timeout,
                          command=[py, "-m", "http.server", "{port}", "--bind", "{host}"])
    exc = timed(lambda: client.deploy(never, timeout=timeout), timeout)
    assert isinstance(exc, DeployError) and f"did not become healthy within {timeout:g}s" in str(exc) and "404" in str(exc), exc
    assert_consistent(client, home, "never", {keep.status.pid})
    slow = write_model(tmp_path, "slow", """
        import time
        time.sleep(600)
        model = len
    """)
    exc = timed(lambda: client.deploy(iris_config(model_name="slow", model_uri=slow, startup_timeout=timeout), timeout=timeout), timeout)
    assert isinstance(exc, DeployError) and "did not become healthy" in str(exc), exc
    assert_consistent(client, home, "slow", {keep.status.pid})

    # With a longer startup_timeout the call still returns at its timeout, saying the server keeps
    # starting under supervision; deleting it leaves nothing behind.
    exc = timed(lambda: client.deploy(iris_config(model_name="loading", model_uri=slow), timeout=2), 2)
    assert isinstance(exc, DeployError) and "keeps starting" in str(exc), exc
    (loading,) = client.find(model_name="loading")
    assert loading.status.state == ServiceState.PENDING_STARTUP and pid_alive(loading.status.pid)
    client.delete(loading.uuid, timeout=10)
    assert_consistent(client, home, "loading", {keep.status.pid})

    # Through all of it the good service kept serving.
    assert client.get(keep.uuid).status.pid == keep.status.pid
    assert predict(keep.endpoint.prediction_url, SETOSA) == (200, {"predictions": ["setosa"]})


# ------------------------------------------------------------ 9. disk full

FSIZE_LIMIT = 64 * 1024  # bytes: a service.json is ~2 KiB, one with 120 KiB of env values is not
BIG_ENV = {f"PAD{i}": "x" * 30_000 for i in range(4)}  # each under the kernel's 128 KiB per string


def start_limited_daemon(home: Path) -> subprocess.Popen[bytes]:
    """A daemon whose files cannot grow past FSIZE_LIMIT: writes past it fail with EFBIG."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer
        resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))

    log = open(home / "daemon.log", "ab")
    with log:
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "--home", str(home)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True, preexec_fn=limit,
                                restore_signals=False, cwd=Path(__file__).resolve().parent.parent)
    wait_for(lambda: (home / "modeld.sock").exists() and daemon_pid(Paths(home)) == proc.pid, 30, what="daemon")
    return proc


def test_a_write_that_fails_keeps_the_previous_state_and_says_why(home):
    home.chmod(0o700)
    daemon = start_limited_daemon(home)
    client = DaemonClient(home=home, auto_start=False)
    try:
        web = [sys.executable, "-m", "http.server", "{port}", "--bind", "{host}"]
        builtin = client.deploy(iris_config(model_name="builtin"), timeout=60)
        command = client.deploy(ServiceConfig(model_name="command", health_path="/", command=web), timeout=60)
        files = {svc.uuid: home / "services" / str(svc.uuid) / "service.json" for svc in (builtin, command)}
        before = {uuid: path.read_bytes() for uuid, path in files.items()}

        # A new service whose record cannot be written: a clear error, nothing created, no process left.
        with pytest.raises(StorageError) as excinfo:
            client.deploy(iris_config(model_name="big", env=BIG_ENV), timeout=60)
        assert "service.json" in str(excinfo.value) and "File too large" in str(excinfo.value), excinfo.value
        assert client.find(model_name="big") == []
        assert sorted(p.name for p in (home / "services").iterdir()) == sorted(str(u) for u in files)

        # Updates whose record cannot be written (a hand-over, and a stop-then-start): the
        # previous version keeps serving, its service.json is untouched.
        for svc, config in ((builtin, iris_config(model_name="builtin", env=BIG_ENV)),
                            (command, ServiceConfig(model_name="command", health_path="/", command=web, env=BIG_ENV))):
            with pytest.raises(StorageError) as excinfo:
                client.deploy(config, replace=True, timeout=60)
            assert "File too large" in str(excinfo.value) and "previous version" in str(excinfo.value), excinfo.value
            now = client.get(svc.uuid)
            assert now.status.state == ServiceState.ACTIVE and now.version == svc.version
            assert now.config.env == {}
            assert now.endpoint.port == svc.endpoint.port
        assert predict(builtin.endpoint.prediction_url, SETOSA) == (200, {"predictions": ["setosa"]})
        assert client.get(builtin.uuid).status.pid == builtin.status.pid  # the hand-over kept the old server
        for uuid, path in files.items():
            assert json.loads(path.read_bytes())["config"] == json.loads(before[uuid])["config"]
            assert json.loads(path.read_bytes())["version"] == json.loads(before[uuid])["version"]
        assert {p.pid for p in servers_of(home)} == {builtin.status.pid, client.get(command.uuid).status.pid}

        # The daemon stayed up and works: reads, and writes that fit.
        assert daemon.poll() is None
        assert client.daemon_info()["pid"] == daemon.pid
        small = client.deploy(iris_config(model_name="builtin", env={"SMALL": "1"}), replace=True, timeout=60)
        assert small.version == builtin.version + 1 and small.config.env == {"SMALL": "1"}
        assert predict(small.endpoint.prediction_url, SETOSA)[0] == 200
    finally:
        client.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait(10)
