"""Error paths: writes that fail at a precise step, strangers named by a pid file, bad bind_unix homes.

The failing writes are real OSErrors (ENOSPC) raised inside the real daemon process at the
named write (``MODELD_FAIL_WRITE_AT``, see daemon/store.py): a full disk cannot be made to
refuse exactly one of the writes of an operation with RLIMIT_FSIZE, which refuses every write
past a size (tests/test_reliability.py covers that). Servers are real processes; the homes
are long on purpose (the model socket of a ``bind_unix`` service would not fit), so cleanup
is by this test's home, by pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from conftest import iris_config, predict
from daemon import DaemonClient, DeployError, InvalidRequest, ServiceConfig, ServiceState
from daemon.exceptions import DaemonNotRunning, StorageError
from daemon.linux import boot_id, start_ticks
from daemon.paths import Paths
from daemon.sockets import MAX_SOCKET_PATH, bind_private_socket
from daemon.store import PidRecord
from daemon.daemon_process import daemon_pid
from daemon import testing as harness
from daemon.testing import REPO, pid_alive, read_pid, reap_home, wait_for


@pytest.fixture
def long_home(home: Path, tmp_path: Path) -> Iterator[Path]:
    """A home whose model sockets (services/<uuid>/model.sock) would be too long; its own socket fits."""
    path = home / ("h" * (MAX_SOCKET_PATH - 50 - len(str(home))))
    path.mkdir(mode=0o700)
    assert len(str(path / "modeld.sock")) <= MAX_SOCKET_PATH < len(str(path)) + len("/services/") + 36 + len("/model.sock")
    (tmp_path / "srv.py").write_text(harness.TOKEN_SERVER)
    try:
        yield path
    finally:
        reap_home(path)


@contextlib.contextmanager
def daemon(home: Path, fail_at: str = "") -> Iterator[DaemonClient]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELD_")}
    env.update(MODELD_HOME=str(home), MODELD_FAIL_WRITE_AT=fail_at, MODELD_GATEWAY="off")  # no gateway: one port per machine
    with open(home / "daemon.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "--home", str(home)], env=env, cwd=REPO,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: daemon_pid(Paths(home)) == proc.pid and (home / "modeld.sock").exists(), 30, what="the daemon")
    client = DaemonClient(home, auto_start=False)
    try:

        def answers() -> bool:  # the socket file may be the killed daemon's, until this one binds it
            with contextlib.suppress(DaemonNotRunning):
                return bool(client.daemon_info())
            return False

        wait_for(answers, 30, what="the daemon to answer")
        yield client
    finally:
        client.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_a_socket_file_that_exists_accepts_connections(tmp_path):
    """The daemon's socket and a bind_unix service's appear only once they listen.

    A client that waits for the file and then connects (the auto-start, a test harness) was refused
    when it came between bind and listen (a CI run failed so).
    """
    path = tmp_path / "s.sock"
    done = threading.Event()
    refused = accepted = 0

    # A refusal counts only if the path still names the socket it refused: one whose file this loop has
    # unlinked meanwhile (it is unlinked, then closed) was the test's own teardown, not the bind (a connect
    # that looked the path up just before the unlink reaches the socket just after its close: a CI run on
    # 3.13 saw 1 in 1,657 so).
    def connect() -> None:
        nonlocal refused, accepted
        while not done.is_set():
            try:
                inode = os.stat(path).st_ino
            except FileNotFoundError:
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                try:
                    client.connect(str(path))
                    accepted += 1
                except ConnectionRefusedError:
                    with contextlib.suppress(FileNotFoundError):
                        refused += os.stat(path).st_ino == inode
                except FileNotFoundError:
                    pass

    thread = threading.Thread(target=connect)
    thread.start()
    try:
        for _ in range(2000):
            listener = bind_private_socket(path)
            os.unlink(path)  # before the close, so the file never names a closed socket
            listener.close()
    finally:
        done.set()
        thread.join(10)
    assert refused == 0 and accepted > 0, (refused, accepted)
    assert os.listdir(tmp_path) == []  # no temporary name left behind


def command(folder: Path, mode: str = "serve", **overrides: object) -> ServiceConfig:
    fields: dict[str, object] = dict(model_name="cmd", health_path="/", working_dir=str(folder), stop_timeout=3,
                                     command=[sys.executable, "srv.py", "{port}", mode], restart={"backoff_initial": 0.05})
    fields.update(overrides)
    return ServiceConfig(**fields)  # type: ignore[arg-type]


def servers(home: Path, uuid: object) -> list[int]:
    """The live server leaders tagged with this service."""
    return harness.server_leaders(harness.server_processes(home)).get(str(uuid), [])


def pid_file(home: Path, uuid: object) -> Path:
    return home / "services" / str(uuid) / "service.pid"


def test_writes_that_fail_never_leave_a_server_unsupervised_or_unstoppable(long_home, tmp_path):
    steps = "deploy.active,restart.pending,restart.restarted,supervise.active,stop.json"
    with daemon(long_home, steps) as client:
        # The last write of a deploy fails: the server runs all the same, and records name it.
        svc = client.deploy(command(tmp_path), timeout=30)
        assert svc.status.state == ServiceState.ACTIVE
        assert PidRecord.loads(pid_file(long_home, svc.uuid).read_text()).ident.pid == svc.status.pid
        assert servers(long_home, svc.uuid) == [svc.status.pid]

        # A crash while no write works: supervision restarts the server anyway.
        os.kill(svc.status.pid, signal.SIGKILL)
        restarted = wait_for(lambda: (s := client.get(svc.uuid)).status.state == ServiceState.ACTIVE
                             and s.status.pid not in (None, svc.status.pid) and s, 15, interval=0.05, what="a restart")
        assert restarted.status.restarts == 1 and servers(long_home, svc.uuid) == [restarted.status.pid]

        # A stop whose first write fails stops the server; its final write says stopped.
        stopped = client.stop(svc.uuid, timeout=10)
        assert stopped.status.state == ServiceState.INACTIVE and not servers(long_home, svc.uuid)
        assert not pid_alive(restarted.status.pid)
        log = (long_home / "daemon.log").read_text()
        for step in steps.split(","):
            assert f"failing the write {step} " in log, step  # each named write was reached, and failed


def test_a_failed_pid_write_or_record_stops_what_it_started_and_keeps_what_serves(long_home, tmp_path):
    with daemon(long_home, "restart.pid,replace.commit,replace.restore-pid,stop.stopped") as client:
        # A restart whose pid file cannot be written: the new server is stopped, the service is in error.
        crashy = client.deploy(command(tmp_path), timeout=30)
        os.kill(crashy.status.pid, signal.SIGKILL)
        failed = wait_for(lambda: (s := client.get(crashy.uuid)).status.state == ServiceState.ERROR and s, 15,
                          interval=0.05, what="the restart to fail")
        assert "could not be restarted" in failed.status.last_error and "service.pid" in failed.status.last_error
        wait_for(lambda: not servers(long_home, crashy.uuid), 10, what="the unrecorded server to be stopped")

        # A hand-over whose commit fails, then whose pid record of the old server fails too: the old
        # server keeps serving, and service.pid still names it (as the previous process of the record).
        web = client.deploy(iris_config(model_name="web"), timeout=60)
        with pytest.raises(StorageError, match="previous version keeps serving"):
            client.deploy(iris_config(model_name="web", env={"V": "2"}), replace=True, timeout=60)
        record = pid_file(long_home, web.uuid)
        assert web.status.pid in [i.pid for i in read_pid(record)], record.read_text()
        assert servers(long_home, web.uuid) == [web.status.pid]
        assert predict(web.endpoint.prediction_url, [[5.0, 3.4, 1.5, 0.2]]) == (200, {"predictions": ["setosa"]})

        # A stop whose final write fails: the server is stopped, and the caller is told it is not recorded.
        with pytest.raises(StorageError, match="was stopped, but that could not be recorded"):
            client.stop(web.uuid, timeout=10)
        assert not servers(long_home, web.uuid) and not pid_alive(web.status.pid)


@pytest.mark.slow
def test_strangers_bad_sockets_stale_temp_files_and_old_secrets(long_home, tmp_path):
    with daemon(long_home) as client:
        # bind_unix where the socket path cannot fit: a 400 naming the problem, nothing left on disk.
        with pytest.raises(InvalidRequest, match="longer than"):
            client.deploy(iris_config(model_name="unix", bind_unix=True), timeout=30)
        assert list((long_home / "services").iterdir()) == []

        # A replace that fails: the log excerpt masks the secret of the old version too.
        svc = client.deploy(command(tmp_path, env={"API_TOKEN": "old-secret-1"}), timeout=30)
        with pytest.raises(DeployError) as info:
            client.deploy(command(tmp_path, "fail", env={"API_TOKEN": "new-secret-2"}), replace=True, timeout=30)
        message = str(info.value)
        assert "starting with token" in message and "old-secret-1" not in message and "new-secret-2" not in message, message
        svc = client.get(svc.uuid)
        assert svc.status.state == ServiceState.ACTIVE and servers(long_home, svc.uuid) == [svc.status.pid]
        # The daemon stops and its server dies while none runs (a plain stop leaves the service
        # wanted running; `daemon stop --all` would keep it stopped).
        client.shutdown()
        wait_for(lambda: not pid_alive(daemon_pid(Paths(long_home)) or 0), 15, what="the daemon to stop")
        os.killpg(svc.status.pid, signal.SIGKILL)
        wait_for(lambda: not servers(long_home, svc.uuid), 15, what="the server to die")

    # A pid file naming a live process of ours with the right start time but no tag of the service,
    # and a temp file left by a write cut short.
    folder = long_home / "services" / str(svc.uuid)
    stale = folder / ".service.json.12345.0.tmp"
    stale.write_text("{half")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELD_")}
    stranger = subprocess.Popen(["sleep", "60"], env=env, start_new_session=True)
    try:
        ticks = wait_for(lambda: start_ticks(stranger.pid), 5, what="sleep to start")
        lines = pid_file(long_home, svc.uuid).read_text().splitlines() if pid_file(long_home, svc.uuid).exists() else []
        pid_file(long_home, svc.uuid).write_text("\n".join([str(stranger.pid), str(ticks), boot_id(), *lines[3:]]) + "\n")
        with daemon(long_home) as client:
            fresh = wait_for(lambda: (s := client.get(svc.uuid)).status.state == ServiceState.ACTIVE and s, 15,
                             interval=0.05, what="a fresh server")
            assert fresh.status.pid != stranger.pid and servers(long_home, svc.uuid) == [fresh.status.pid]
            assert stranger.poll() is None
            assert psutil.Process(stranger.pid).status() not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE)
            assert "is not its server" in (long_home / "daemon.log").read_text()
            assert not stale.exists()
            client.stop(svc.uuid, timeout=10)
            assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait(5)
