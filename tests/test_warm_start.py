"""Built-in servers forked from the warm fork server are what a cold spawn would be.

The first built-in deploy of a daemon spawns cold and starts the fork server; later ones
are forked from it once it is ready. These tests check, on real processes, that a warm
server has its own session and process group, the service's env, cwd and log, that its
exit code reaches the daemon, and that it is re-adopted after a daemon restart.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from conftest import port_open, predict

from daemon import DaemonClient, DeployError, ServiceConfig, ServiceState
from daemon.linux import holds_socket, listening_inodes
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
