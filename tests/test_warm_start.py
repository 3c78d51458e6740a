"""Built-in servers forked from the warm fork server are what a cold spawn would be.

The first built-in deploy of a daemon spawns cold and starts the fork server; later ones
are forked from it once it is ready. These tests check, on real processes, that a warm
server has its own session and process group, the service's env, cwd and log, that its
exit code reaches the daemon (read from the kernel, or from the fork server's report), and that
it is re-adopted after a daemon restart.
"""

from __future__ import annotations

import os
import select
import signal
import time
from pathlib import Path

import pytest
from conftest import pidfd_keeps_exit_codes, port_open, predict

from daemon import DaemonClient, DeployError, ServiceConfig, ServiceState
from daemon.linux import ProcessIdentity, _pidfd_exit_status, exit_code_of, holds_socket, listening_inodes
from daemon.runtime._serve import FORK_SERVER_NAME
from daemon.testing import pid_alive, wait_for

MODEL = """
import os, sys
import helper  # a sibling of this file, importable as when the file is run as a script
print("loading the env model", flush=True)
def model(instances):
    return [os.environ.get("FOO"), os.environ.get("MODELD_SERVICE_UUID"), os.getcwd(), helper.X]
"""


def warm_ready(client: DaemonClient, work: Path) -> None:
    """Deploy (cold) once, so that the fork server starts, and wait until it says it is ready."""
    first = client.deploy(ServiceConfig(model_name="first", model_uri=f"{work}/env_model.py:model"), timeout=60)
    log = Path(first.service_path) / "service.log"
    assert "starting a warm server" not in log.read_text()  # nothing to fork from yet

    def warm_deploy_works() -> bool:
        svc = client.deploy(ServiceConfig(model_name="probe", model_uri=f"{work}/env_model.py:model"), timeout=60)
        warm = "starting a warm server" in (Path(svc.service_path) / "service.log").read_text()
        client.delete(svc.uuid, force=True)
        return warm

    wait_for(warm_deploy_works, 20, interval=0.05, what="the fork server to be ready")


def write_models(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    (work / "env_model.py").write_text(MODEL)
    (work / "helper.py").write_text("X = 42\n")
    (work / "bad.py").write_text("raise RuntimeError('broken at load')\n")
    return work


def test_a_warm_server_is_a_server_of_its_own(client, home, tmp_path):
    work = write_models(tmp_path)
    warm_ready(client, work)
    svc = client.deploy(ServiceConfig(model_name="env", model_uri="env_model.py:model", env={"FOO": "bar"},
                                      working_dir=str(work)), timeout=60)
    log = (Path(svc.service_path) / "service.log").read_text()
    assert "starting a warm server" in log and "loading the env model" in log  # its stdout is its log
    assert predict(svc.prediction_url, [1]) == (200, {"predictions": ["bar", str(svc.uuid), str(work), 42]})
    pid = svc.status.pid
    assert os.getsid(pid) == pid and os.getpgid(pid) == pid  # its own session and process group

    # A model that fails to load: its exit code reaches the deploy's error.
    try:
        client.deploy(ServiceConfig(model_name="bad", model_uri=f"{work}/bad.py:model"), timeout=60)
    except DeployError as exc:
        assert "exited with code 3" in str(exc) and "broken at load" in str(exc)
    else:
        raise AssertionError("a model that cannot load was deployed")

    # kill -9: the restart (warm too) answers on the same port; stop gives the exit code 0.
    os.kill(pid, signal.SIGKILL)
    back = wait_for(lambda: (s := client.get(svc.uuid)).is_running and s.status.pid != pid and s, 20, what="the restart")
    assert back.status.restarts == 1 and not pid_alive(pid)
    assert predict(svc.prediction_url, [1])[0] == 200
    stopped = client.stop(svc.uuid, timeout=10)
    assert stopped.status.exit_code == 0 and not port_open(svc.endpoint.port)


@pytest.mark.slow
def test_warm_servers_are_readopted_after_a_daemon_restart(client, home, tmp_path):
    work = write_models(tmp_path)
    warm_ready(client, work)
    svc = client.deploy(ServiceConfig(model_name="kept", model_uri=f"{work}/env_model.py:model"), timeout=60)
    assert "starting a warm server" in (Path(svc.service_path) / "service.log").read_text()
    client.shutdown()  # the daemon goes, and its fork server with it; the servers stay
    wait_for(lambda: not (home / "modeld.sock").exists(), 10, what="the daemon to exit")
    assert pid_alive(svc.status.pid)
    again = client.get(svc.uuid)  # a new daemon re-adopts it without a restart
    assert again.status.state == ServiceState.ACTIVE and again.status.pid == svc.status.pid
    assert again.status.restarts == 0
    assert predict(svc.prediction_url, [1])[0] == 200
    # The new daemon holds the server's listening socket again (fetched after the rebuild), so
    # a crash restart keeps the port: the same socket inode in both processes.
    inodes = listening_inodes(svc.endpoint.port)
    daemon = client.daemon_info()["pid"]
    wait_for(lambda: holds_socket(daemon, inodes), 10, what="the daemon to hold the re-adopted server's listening socket")


# ---------------------------------------------- exit codes of processes that are not our children


def exited_child(code: int | None) -> tuple[int, ProcessIdentity, int]:
    """A child that exits with ``code`` (None: is killed by SIGKILL), left a zombie: (pid, identity, pidfd)."""
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # waits until the parent has its identity: a zombie has none to read
        os.close(go_w)
        os.read(go_r, 1)
        if code is not None:
            os._exit(code)
        time.sleep(60)
        os._exit(0)
    os.close(go_r)
    ident = ProcessIdentity.of(pid)
    fd = os.pidfd_open(pid)
    os.write(go_w, b"x")
    os.close(go_w)
    assert ident is not None
    if code is None:
        os.kill(pid, signal.SIGKILL)
    assert select.select([fd], [], [], 10)[0], "the child did not exit"
    return pid, ident, fd


@pytest.mark.parametrize("code, expected", [(None, -signal.SIGKILL), (3, 3), (0, 0)])
def test_an_exit_code_is_read_from_the_zombie_then_from_the_pidfd_once_reaped(code, expected):
    pid, ident, fd = exited_child(code)
    try:
        assert exit_code_of(fd, ident) == expected  # a zombie: its /proc/<pid>/stat says it
        if _pidfd_exit_status(fd) is None:  # (the kernel keeps it in the pidfd only once reaped)
            wrong = ProcessIdentity(pid, ident.start_ticks + 1, ident.boot_id)
            assert exit_code_of(fd, wrong) is None  # another process's stat (the pid reused) is not read
        os.waitpid(pid, 0)  # reaped by its parent: the zombie is gone
        if not pidfd_keeps_exit_codes():
            assert exit_code_of(fd, ident) is None  # the parent's report is the fallback then
            pytest.skip(f"this kernel ({os.uname().release}) keeps no exit status in a pidfd (6.15+)")
        assert exit_code_of(fd, ident) == expected
    finally:
        os.close(fd)


def fork_server_of(daemon_pid: int) -> int:
    """The daemon's (one) fork server: its child named FORK_SERVER_NAME."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        name, fields = stat[stat.index(b"(") + 1 : stat.rindex(b")")], stat[stat.rindex(b")") + 2 :].split()
        if name == FORK_SERVER_NAME.encode() and int(fields[1]) == daemon_pid:
            found.append(int(entry))
    assert len(found) == 1, found
    return found[0]


def test_a_warm_servers_exit_code_does_not_wait_for_the_fork_server(client, home, tmp_path):
    work = write_models(tmp_path)
    warm_ready(client, work)
    svc = client.deploy(ServiceConfig(model_name="quick", model_uri=f"{work}/env_model.py:model", restart={"mode": "never"}),
                        timeout=60)
    assert "starting a warm server" in (Path(svc.service_path) / "service.log").read_text()
    fork_server = fork_server_of(client.daemon_info()["pid"])
    os.kill(fork_server, signal.SIGSTOP)  # it cannot reap nor report until continued
    try:
        os.kill(svc.status.pid, signal.SIGKILL)
        gone = wait_for(lambda: (s := client.get(svc.uuid)).status.state == ServiceState.ERROR and s, 10,
                        what="the exit to be known while the fork server is stopped")
        assert gone.status.exit_code == -signal.SIGKILL
    finally:
        os.kill(fork_server, signal.SIGCONT)


@pytest.mark.slow
def test_with_the_fork_servers_reports_alone_a_warm_servers_exit_code_still_comes(client, home, tmp_path, monkeypatch):
    monkeypatch.setenv("MODELD_EXIT_CODES", "reports")  # read by the daemon the client auto-starts: as on a kernel
    work = write_models(tmp_path)  # whose zombie was reaped before it was read, and keeps no exit status in a pidfd
    warm_ready(client, work)
    svc = client.deploy(ServiceConfig(model_name="reported", model_uri=f"{work}/env_model.py:model",
                                      restart={"mode": "never"}), timeout=60)
    assert "starting a warm server" in (Path(svc.service_path) / "service.log").read_text()
    fork_server = fork_server_of(client.daemon_info()["pid"])
    os.kill(fork_server, signal.SIGSTOP)
    try:
        os.kill(svc.status.pid, signal.SIGKILL)
        time.sleep(0.3)  # (the claim: nothing is known in this time, while the fork server cannot report)
        assert client.get(svc.uuid).status.state == ServiceState.ACTIVE
    finally:
        os.kill(fork_server, signal.SIGCONT)
    gone = wait_for(lambda: (s := client.get(svc.uuid)).status.state == ServiceState.ERROR and s, 10,
                    what="the fork server's report")
    assert gone.status.exit_code == -signal.SIGKILL
