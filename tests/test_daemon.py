"""The daemon as a process: crash and re-adoption, one daemon per home, auto-start races,
start failures, stop with and without the servers, stale pids (corrupt state, reused pids:
test_reliability.py; peer checks: test_access.py).

Everything is real: daemons, model servers, sockets and signals. Waits have deadlines.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil
import pytest

from conftest import iris_config, modeld, port_open, predict
from daemon import DaemonClient, DaemonStartError, ServiceState, VersionMismatchWarning
from daemon.linux import start_ticks
from daemon.paths import Paths
from daemon.daemon_process import daemon_pid
from daemon import testing as harness
from daemon.testing import REPO, pid_alive, processes_of, wait_for


SETOSA = [[5.0, 3.4, 1.5, 0.2]]


# ------------------------------------------------------------------ helpers


def current_daemon_pid(home: Path) -> int | None:
    return daemon_pid(Paths(home))


def stop_daemon(client: DaemonClient, stop_services: bool = False) -> None:
    """Ask the daemon to exit and wait until its process is gone."""
    pid = client.daemon_info()["pid"]
    client.shutdown(stop_services=stop_services)
    wait_for(lambda: not pid_alive(pid), 30, what=f"daemon {pid} to exit")


def wait_active(client: DaemonClient, uuid, timeout: float = 30, not_pid: int | None = None):
    """Wait until the service is ACTIVE (with a pid other than ``not_pid``); the service."""

    def check():
        svc = client.get(uuid)
        if svc.status.state == ServiceState.ACTIVE and svc.status.pid and svc.status.pid != not_pid:
            return svc
        return None

    return wait_for(check, timeout, interval=0.05, what=f"service {uuid} to be active")


def daemon_processes(home: Path) -> list[psutil.Process]:
    """Processes running ``python -m daemon`` whose environment names this home."""
    def is_daemon(proc: psutil.Process) -> bool:
        with contextlib.suppress(psutil.Error):
            cmdline = proc.cmdline()
            return any(a == "-m" and b == "daemon" for a, b in zip(cmdline, cmdline[1:]))
        return False

    return [p for p in processes_of(home) if is_daemon(p)]


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(5)


# -------------------------------------------------------------------- tests


@pytest.mark.slow
def test_kill9_daemon_servers_keep_serving_and_are_readopted(client, home):
    svc = client.deploy(iris_config(), timeout=60)
    assert svc.is_running
    server_pid, port, url = svc.status.pid, svc.endpoint.port, svc.endpoint.prediction_url
    first_daemon = client.daemon_info()["pid"]

    killed_at = time.time()
    os.kill(first_daemon, signal.SIGKILL)
    wait_for(lambda: not pid_alive(first_daemon), 10, what="the daemon to die")

    # No daemon runs, yet the server answers.
    assert pid_alive(server_pid)
    assert predict(url, SETOSA) == (200, {"predictions": ["setosa"]})

    # The next call starts a new daemon, which re-adopts the same process on the same port.
    again = client.get(svc.uuid)
    second_daemon = client.daemon_info()["pid"]
    assert second_daemon != first_daemon
    assert again.status.state == ServiceState.ACTIVE
    assert again.status.pid == server_pid
    assert again.status.updated_at >= killed_at  # probed afresh, not the state read from disk
    assert again.endpoint.port == port
    assert again.status.restarts == 0
    assert predict(url, SETOSA) == (200, {"predictions": ["setosa"]})

    # The adopted server is not the new daemon's child; its exit is still noticed (pidfd).
    assert psutil.Process(server_pid).ppid() != second_daemon
    os.kill(server_pid, signal.SIGKILL)
    restarted = wait_active(client, svc.uuid, timeout=30, not_pid=server_pid)
    assert restarted.status.pid != server_pid
    assert restarted.status.restarts == 1
    assert restarted.endpoint.port == port
    assert client.daemon_info()["pid"] == second_daemon
    assert predict(url, SETOSA) == (200, {"predictions": ["setosa"]})


def test_second_daemon_on_same_home_refuses(client, home):
    info = client.daemon_info()
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "--home", str(home)],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode != 0
    assert "already running" in result.stderr
    assert str(info["pid"]) in result.stderr
    assert "Traceback" not in result.stderr

    # The first daemon is untouched.
    assert (home / "modeld.sock").exists()
    assert current_daemon_pid(home) == info["pid"]
    with DaemonClient(home=home, auto_start=False) as other:
        assert other.daemon_info()["pid"] == info["pid"]
    assert client.find() == []


@pytest.mark.slow
@pytest.mark.long
def test_many_clients_auto_start_one_daemon(home, tmp_path):
    """10 processes call at the same moment with no daemon running: all succeed, through one
    daemon, and the services they deploy all live in it (none with a second, orphaned daemon)."""
    clients = 10
    (tmp_path / "tiny.py").write_text(harness.TINY_SERVER)
    go = tmp_path / "go"
    os.mkfifo(go)
    snippet = (
        "import os, sys\n"
        "from daemon import DaemonClient, ServiceConfig\n"
        "home, folder, go, n = sys.argv[1:]\n"
        "config = ServiceConfig(model_name='auto' + n, model_type='command', health_path='/', working_dir=folder,\n"
        "                       command=[sys.executable, 'tiny.py', '{port}', n])\n"
        "open(os.path.join(folder, 'ready-' + n), 'w').close()\n"
        "open(go).close()  # a FIFO: every client is released when the test opens it for writing\n"
        "client = DaemonClient(home)\n"
        "print(client.daemon_info()['pid'], client.deploy(config, timeout=60).uuid)\n"
    )
    procs: list[subprocess.Popen] = []
    try:
        for n in range(clients):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", snippet, str(home), str(tmp_path), str(go), str(n)],
                    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    start_new_session=True,
                )
            )
        wait_for(lambda: len(list(tmp_path.glob("ready-*"))) == clients, 30, what=f"{clients} clients to be ready")
        assert current_daemon_pid(home) is None
        with open(go, "w"):
            pass
        outputs = []
        for proc in procs:
            out, err = proc.communicate(timeout=150)  # above the deploy's own 60 s, plus a daemon start under load
            assert proc.returncode == 0, err
            outputs.append(out.split())
    finally:
        for proc in procs:
            kill_group(proc)

    assert len({pid for pid, _ in outputs}) == 1, outputs
    pid = int(outputs[0][0])
    assert [p.pid for p in daemon_processes(home)] == [pid]
    with DaemonClient(home, auto_start=False) as client:
        snap, settled = harness.wait_settled(client, home)
    assert settled, harness.describe(snap)
    assert set(snap.services) == {uuid for _, uuid in outputs}
    assert not any(harness.check(snap).values()), harness.check(snap)
    assert [p.pid for p in daemon_processes(home)] == [pid]


def test_daemon_start_failure_reported_at_once(home, monkeypatch):
    monkeypatch.setenv("MODELD_LOG_LEVEL", "BOGUS")
    c = DaemonClient(home=home)
    started = time.monotonic()
    with pytest.raises(DaemonStartError) as info:
        c.daemon_info()
    elapsed = time.monotonic() - started
    assert elapsed < 10, elapsed
    assert "BOGUS" in str(info.value)
    assert "exited with code" in str(info.value)
    assert daemon_processes(home) == []


@pytest.mark.slow
@pytest.mark.long
def test_daemon_stop_keeps_servers_and_stop_all_stops_them(client, home):
    svc = client.deploy(iris_config(), timeout=60)
    pid, port, url = svc.status.pid, svc.endpoint.port, svc.endpoint.prediction_url
    first_daemon = client.daemon_info()["pid"]

    result = modeld("daemon", "stop", home=home)
    assert result.returncode == 0, result.stderr
    assert "keep running" in result.stdout
    assert current_daemon_pid(home) is None
    wait_for(lambda: not pid_alive(first_daemon), 5, what="the daemon to exit")
    assert not (home / "modeld.sock").exists()
    assert pid_alive(pid)
    assert port_open(port)
    assert predict(url, SETOSA) == (200, {"predictions": ["setosa"]})

    # A new daemon adopts it; `stop --all` then takes the server down with the daemon.
    assert client.get(svc.uuid).status.pid == pid
    result = modeld("daemon", "stop", "--all", home=home)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: not pid_alive(pid), 10, what="the server to stop")
    wait_for(lambda: not port_open(port), 10, what="the port to close")
    assert current_daemon_pid(home) is None
    saved = json.loads((home / "services" / str(svc.uuid) / "service.json").read_text())
    assert (saved["desired_state"], saved["desired_reason"]) == ("stopped", "stopped by `modeld daemon stop --all`")

    # The stop is remembered: a call that auto-starts the daemon (a user only looking) starts nothing.
    result = modeld("ls", home=home)
    assert result.returncode == 0, result.stderr
    assert svc.uuid.hex[:8] in result.stdout.replace("-", "") and "inactive" in result.stdout
    assert current_daemon_pid(home) is not None
    now = client.get(svc.uuid)
    assert (now.status.state, now.status.pid) == (ServiceState.INACTIVE, None) and not port_open(port)
    info = modeld("info", str(svc.uuid), home=home)
    assert "stopped (stopped by `modeld daemon stop --all`)" in info.stdout

    # `modeld start --all` brings it back, same port, and the record says running again.
    result = modeld("start", "--all", home=home)
    assert result.returncode == 0, result.stderr
    back = wait_active(client, svc.uuid, not_pid=pid)
    assert back.endpoint.port == port and back.desired_state.value == "running" and back.desired_reason == ""
    assert predict(url, SETOSA) == (200, {"predictions": ["setosa"]})


@pytest.mark.slow
def test_stale_pid_is_never_signalled(client, home):
    other_boot = client.deploy(iris_config(model_name="a"), timeout=60)
    reused_pid = client.deploy(iris_config(model_name="b"), timeout=60)
    stop_daemon(client)
    for svc in (other_boot, reused_pid):  # the servers die while no daemon runs (a reboot): they should run again
        os.killpg(svc.status.pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(svc.status.pid), 10, what="the server to die")

    env = {k: v for k, v in os.environ.items() if k != "MODELD_HOME"}
    sleeps = [subprocess.Popen(["sleep", "60"], env=env, start_new_session=True) for _ in range(2)]
    try:
        for sleeper in sleeps:
            wait_for(lambda: start_ticks(sleeper.pid) is not None, 5, what="sleep to start")
        # A process from another boot: right pid and start time, different boot id.
        (home / "services" / str(other_boot.uuid) / "service.pid").write_text(
            f"{sleeps[0].pid}\n{start_ticks(sleeps[0].pid)}\n00000000-0000-4000-8000-000000000000\n"
        )
        # A live unrelated process: this boot, but a different start time (a reused pid).
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        (home / "services" / str(reused_pid.uuid) / "service.pid").write_text(
            f"{sleeps[1].pid}\n{start_ticks(sleeps[1].pid) + 12345}\n{boot}\n"
        )

        for svc, sleeper in zip((other_boot, reused_pid), sleeps):
            fresh = wait_active(client, svc.uuid, not_pid=sleeper.pid)  # auto-starts the daemon
            assert fresh.status.pid not in (sleeper.pid, svc.status.pid)
            assert predict(fresh.endpoint.prediction_url, SETOSA)[0] == 200
        for sleeper in sleeps:
            assert sleeper.poll() is None, "the daemon signalled an unrelated process"
            assert psutil.Process(sleeper.pid).status() != psutil.STATUS_STOPPED

        # Stopping the services does not reach the unrelated processes either.
        for svc in (other_boot, reused_pid):
            client.stop(svc.uuid, timeout=10)
        for sleeper in sleeps:
            assert sleeper.poll() is None
    finally:
        for sleeper in sleeps:
            kill_group(sleeper)


def test_version_mismatch_warns_once(client, home):
    client.daemon_info()
    old = DaemonClient(home=home)
    old.client_version = "0.0.1"
    try:
        with pytest.warns(VersionMismatchWarning) as caught:
            old.daemon_info()
        assert len(caught) == 1
        message = str(caught[0].message)
        assert "older" in message and "0.0.1" in message
        with warnings.catch_warnings():
            warnings.simplefilter("error", VersionMismatchWarning)
            old.find()  # warned once per daemon version, not on every call
    finally:
        old.close()
