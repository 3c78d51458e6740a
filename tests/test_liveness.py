"""Liveness: a hung server is restarted, and supervision never dies (issue 9, classes 3 and 4).

Real hangs: a server frozen with SIGSTOP (which takes SIGTERM only once continued), one that
also ignores SIGTERM (SIGKILL at the stop timeout), and one whose health endpoint answers
500. Then the daemon itself runs out of file descriptors (its limit lowered with prlimit)
while servers crash: nothing ends in error, and the crashed server comes back.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from conftest import http_get, iris_config, modeld, predict
from daemon import DaemonClient, ServiceConfig, ServiceState
from daemon.testing import pid_alive, wait_for

# /health answers 500 while the file named by argv[2] exists; SIGTERM is ignored if argv[3] is "stubborn".
SICKLY = textwrap.dedent('''
    import http.server, os, signal, sys
    port, flag, mood = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    if mood == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            code = 500 if os.path.exists(flag) else 200
            self.send_response(code); self.send_header("content-length", "0"); self.end_headers()
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
''')


@pytest.fixture(autouse=True)
def fast_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELD_HEALTH_INTERVAL", "0.2")  # read by the daemon the client auto-starts


def sickly(tmp_path: Path, mood: str = "calm", **extra: object) -> ServiceConfig:
    (tmp_path / "sickly.py").write_text(SICKLY)
    return ServiceConfig(model_name="sickly", model_type="command", health_path="/health", working_dir=str(tmp_path),
                         command=[sys.executable, "sickly.py", "{port}", str(tmp_path / "sick"), mood], stop_timeout=1,
                         **extra)


def restarted(client: DaemonClient, uuid: object, old_pid: int, timeout: float = 30) -> object:
    return wait_for(lambda: (s := client.get(uuid)).status.state == ServiceState.ACTIVE and s.status.pid != old_pid and s,
                    timeout, interval=0.05, what="the hung server to be restarted")


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_a_frozen_builtin_server_is_restarted(client, home):
    svc = client.deploy(iris_config(model_name="frozen", stop_timeout=2, restart={"liveness_failures": 2}), timeout=60)
    os.kill(svc.status.pid, signal.SIGSTOP)
    back = restarted(client, svc.uuid, svc.status.pid)
    assert back.status.restarts == 1
    assert not pid_alive(svc.status.pid)
    assert predict(back.endpoint.prediction_url, [[5.1, 3.5, 1.4, 0.2]]) == (200, {"predictions": ["setosa"]})
    assert "is hung" in (home / "daemon.log").read_text()


@pytest.mark.slow
@pytest.mark.long
def test_a_frozen_server_that_ignores_sigterm_is_killed_at_the_stop_timeout(client, tmp_path):
    svc = client.deploy(sickly(tmp_path, "stubborn", restart={"liveness_failures": 2}), timeout=60)
    os.kill(svc.status.pid, signal.SIGSTOP)
    back = restarted(client, svc.uuid, svc.status.pid)
    assert back.status.restarts == 1 and not pid_alive(svc.status.pid)
    assert http_get(back.endpoint.port, "/health") == 200


def test_a_server_answering_500_is_restarted_and_counts_toward_max_restarts(client, tmp_path):
    svc = client.deploy(sickly(tmp_path, restart={"liveness_failures": 2, "max_restarts": 1, "backoff_initial": 0.05}),
                        timeout=60)
    (tmp_path / "sick").touch()
    wait_for(lambda: client.get(svc.uuid).status.restarts == 1, 30, what="the sick server to be restarted")
    assert not pid_alive(svc.status.pid)
    # The new one is never healthy while the file is there: it starts, not hung (it never was healthy).
    (tmp_path / "sick").unlink()
    back = restarted(client, svc.uuid, svc.status.pid)
    assert back.status.restarts == 1 and http_get(back.endpoint.port, "/health") == 200


@pytest.mark.slow
def test_when_not_restarted_on_unhealthy_it_is_in_error_until_started(client, tmp_path):
    for restart in ({"liveness_failures": 2, "on_unhealthy": False}, {"liveness_failures": 2, "mode": "never"}):
        svc = client.deploy(sickly(tmp_path, restart=restart), timeout=60)
        (tmp_path / "sick").touch()
        wait_for(lambda: client.get(svc.uuid).status.state == ServiceState.ERROR, 10, what="error for failing health")
        now = client.get(svc.uuid)
        assert now.status.pid == svc.status.pid and pid_alive(svc.status.pid) and now.status.restarts == 0
        assert "health check failing" in now.status.last_error
        # `start` of a service whose process is alive but unhealthy restarts it.
        (tmp_path / "sick").unlink()
        started = client.start(svc.uuid, timeout=30)
        assert started.status.state == ServiceState.ACTIVE and started.status.pid != svc.status.pid
        assert not pid_alive(svc.status.pid)
        client.delete(svc.uuid, timeout=10)


@pytest.mark.slow
def test_liveness_flags_of_the_cli(client, home, tmp_path):
    (tmp_path / "sickly.py").write_text(SICKLY)
    out = modeld("deploy", "--model-name", "s", "--working-dir", str(tmp_path), "--liveness-failures", "7",
                 "--no-restart-on-unhealthy", "--stop-command", "true {name} '{uuid}'", "--json", "--",
                 sys.executable, "sickly.py", "{port}", str(tmp_path / "sick"), "calm", home=home)
    assert out.returncode == 0, out.stderr
    import json

    config = json.loads(out.stdout)["config"]
    assert config["restart"]["liveness_failures"] == 7 and config["restart"]["on_unhealthy"] is False
    assert config["stop_command"] == ["true", "{name}", "{uuid}"]


# ------------------------------------------------------------------ supervision never dies


@pytest.mark.needs_root("to lower another process's fd limit and raise it back")
def test_supervision_survives_the_daemon_running_out_of_fds(client, home, tmp_path):
    services = [client.deploy(sickly(tmp_path, restart={"liveness_failures": 2}).model_copy(update={"model_name": f"s{i}"}),
                              timeout=60) for i in range(3)]
    daemon = psutil.Process(client.daemon_info()["pid"])
    client.close()
    limits = resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE)
    log = home / "daemon.log"

    def starve() -> bool:
        # The soft limit at the lowest free fd number: a new fd takes the lowest free number, so
        # nothing opens. Set again each round, since an fd closed below it (the daemon's side of the
        # client's connection, closed a moment after the client) would leave one free number.
        fds = {int(fd) for fd in os.listdir(f"/proc/{daemon.pid}/fd")}
        resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (min(set(range(len(fds) + 1)) - fds), limits[1]))
        return "cannot probe" in log.read_text()

    try:
        wait_for(starve, 10, interval=0.05, what="probes to fail for lack of fds")
        os.killpg(services[0].status.pid, signal.SIGKILL)  # a crash while the daemon cannot open a file
        wait_for(lambda: not pid_alive(services[0].status.pid), 10, what="the server to die")
        wait_for(lambda: "Too many open files" in log.read_text().split("cannot probe")[-1] or "going on" in log.read_text(),
                 10, what="the daemon to hit its limit restarting it")
    finally:
        resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, limits)
    again = DaemonClient(home=home)
    try:
        back = wait_for(lambda: (s := again.get(services[0].uuid)).status.state == ServiceState.ACTIVE
                        and s.status.pid != services[0].status.pid and s, 60, interval=0.1, what="the crashed server to be back")
        assert http_get(back.endpoint.port, "/health") == 200
        for svc in services[1:]:  # the others were never put in error for the daemon's own trouble
            now = again.get(svc.uuid)
            assert now.status.state == ServiceState.ACTIVE and now.status.pid == svc.status.pid and now.status.restarts == 0
    finally:
        again.close()


def test_backoff_arithmetic_cannot_overflow():
    from daemon.supervise import backoff_delay
    from daemon.config import RestartPolicy

    policy = RestartPolicy(mode="always", max_restarts=100000, backoff_max=0)
    assert [backoff_delay(policy, n) for n in (1, 2, 1025, 100000)] == [0.0, 0.0, 0.0, 0.0]
    huge = RestartPolicy(backoff_initial=1e300, backoff_max=1e308)
    assert backoff_delay(huge, 10**6) == 1e308
