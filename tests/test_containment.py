"""Containment: every process a server starts goes with it (issue 9, class 1), with real processes.

Servers here fight back: one starts a helper in a session of its own (``setsid``), one
daemonizes (forks, leaves its session, serves from a grandchild while the parent exits 0).
Each test runs with the containment the daemon picks (a cgroup v2 per service as root where
there is a cgroup2 hierarchy) and, where it matters, again with ``MODELD_CGROUP=off`` (the
environment tag every descendant inherits).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import http_get, modeld
from daemon import DaemonClient, ServiceConfig, ServiceState
from daemon.linux import cgroup2_mount
from daemon.testing import pid_alive, wait_for

MODES = ["default", "tag"]

# How the test servers below serve (GET -> 200 "ok"), once they have done what they are for.
SERVE = textwrap.dedent('''
    import http.server
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.send_header("content-length", "2"); self.end_headers(); self.wfile.write(b"ok")
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
''')

# A server that starts a helper in a session of its own before it serves; the helper's pid
# goes to a file, so that the test knows it (and can check it dies with its server).
HELPER_SERVER = textwrap.dedent('''
    import subprocess, sys
    port, pids = int(sys.argv[1]), sys.argv[2]
    helper = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    with open(pids, "a") as f:
        f.write(f"{helper.pid}\\n")
''') + SERVE

# A server that daemonizes: the parent exits 0 at once, the grandchild (a new session) binds later.
DAEMONIZING_SERVER = textwrap.dedent('''
    import os, sys, time
    port, pids = int(sys.argv[1]), sys.argv[2]
    if os.fork() > 0:
        sys.exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    with open(pids, "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(0.3)
''') + SERVE


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "tag":
        monkeypatch.setenv("MODELD_CGROUP", "off")
    return str(request.param)


def expected_kind(mode: str) -> str:
    can_cgroup = cgroup2_mount() is not None and os.geteuid() == 0
    return "cgroup" if mode == "default" and can_cgroup else "tag"


def pids_in(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def command_config(tmp_path: Path, script: str, name: str, **extra: object) -> ServiceConfig:
    (tmp_path / f"{name}.py").write_text(script)
    return ServiceConfig(model_name=name, model_type="command", health_path="/", working_dir=str(tmp_path),
                         command=[sys.executable, f"{name}.py", "{port}", str(tmp_path / f"{name}.pids")], **extra)


@pytest.mark.slow
def test_a_helper_in_a_session_of_its_own_goes_with_every_stop(client, home, tmp_path, mode):
    assert client.daemon_info()["containment"] == expected_kind(mode)
    svc = client.deploy(command_config(tmp_path, HELPER_SERVER, "helper", stop_timeout=2), timeout=60)
    pids = tmp_path / "helper.pids"
    first = pids_in(pids)
    assert len(first) == 1 and pid_alive(first[0])

    # A crash restart: the old helper goes, the new server has its own.
    os.kill(svc.status.pid, signal.SIGKILL)
    wait_for(lambda: len(pids_in(pids)) == 2 and client.get(svc.uuid).status.state == ServiceState.ACTIVE, 20,
             what="the crash restart")
    wait_for(lambda: not pid_alive(first[0]), 10, what="the first helper to go with its crashed server")
    second = pids_in(pids)[1]
    assert pid_alive(second)

    # A stop: the helper goes too, and a start brings a new one.
    client.stop(svc.uuid, timeout=10)
    assert not pid_alive(second)
    client.start(svc.uuid, timeout=60)
    third = pids_in(pids)[2]
    assert pid_alive(third)

    # `daemon stop --all`: everything stops, and a daemon started again adopts no helper as the
    # server (the service stays stopped until asked for).
    client.shutdown(stop_services=True)
    wait_for(lambda: not pid_alive(third), 20, what="the helper to stop with `daemon stop --all`")
    again = DaemonClient(home=home)
    try:
        after = again.get(svc.uuid)
        assert (after.status.state, after.status.pid, after.desired_state.value) == (ServiceState.INACTIVE, None, "stopped")
        assert len(pids_in(pids)) == 3
        again.start(svc.uuid, timeout=60)
        fourth = pids_in(pids)[3]

        # A delete: the helper goes, and with cgroups the service's cgroup is removed.
        again.delete(svc.uuid, timeout=10)
        assert not pid_alive(fourth)
        if expected_kind(mode) == "cgroup":
            assert not list(Path(cgroup2_mount()).glob(f"modeld-*/{svc.uuid}"))
    finally:
        again.close()


@pytest.mark.slow
def test_a_daemonizing_server_is_followed_not_lost(client, home, tmp_path, mode):
    svc = client.deploy(command_config(tmp_path, DAEMONIZING_SERVER, "daemonize", stop_timeout=2), timeout=60)
    pids = tmp_path / "daemonize.pids"
    grandchild = pids_in(pids)[0]
    assert svc.status.state == ServiceState.ACTIVE and svc.status.pid == grandchild
    assert http_get(svc.endpoint.port, "/") == 200

    # A daemon killed with -9 and started again re-adopts the grandchild: not restarted.
    os.kill(int((home / "daemon.pid").read_text().split()[0]), signal.SIGKILL)
    wait_for(lambda: not (home / "modeld.sock").exists() or not client.is_running(), 10, what="the daemon to die")
    again = DaemonClient(home=home)
    try:
        after = again.get(svc.uuid)
        assert (after.status.state, after.status.pid, after.status.restarts) == (ServiceState.ACTIVE, grandchild, 0)

        # Its crash is a crash: restarted, daemonizing again, and followed again.
        os.kill(grandchild, signal.SIGKILL)
        wait_for(lambda: len(pids_in(pids)) == 2 and again.get(svc.uuid).status.state == ServiceState.ACTIVE, 20,
                 what="the restart of the daemonizing server")
        second = pids_in(pids)[1]
        assert again.get(svc.uuid).status.pid == second and again.get(svc.uuid).status.restarts == 1
        again.stop(svc.uuid, timeout=10)
        assert not pid_alive(second)
    finally:
        again.close()


NEVER_SERVES = textwrap.dedent('''
    import os, subprocess, sys, time
    helper = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    with open(sys.argv[2], "a") as f:
        f.write(f"{helper.pid}\\n")
    time.sleep(0.2)
    sys.exit(0)  # the main process goes; its helper stays, serving nothing
''')


@pytest.mark.slow
def test_when_no_descendant_serves_the_rest_is_killed_and_it_is_a_crash(client, home, tmp_path, mode):
    config = command_config(tmp_path, NEVER_SERVES, "quitter", startup_timeout=3, restart={"mode": "never"})
    with pytest.raises(Exception, match="before it answered"):
        client.deploy(config, timeout=30)
    helper = pids_in(tmp_path / "quitter.pids")[0]
    wait_for(lambda: not pid_alive(helper), 10, what="the helper of a server that never served to be killed")


@pytest.mark.slow
def test_a_stray_helper_left_while_no_daemon_ran_is_stopped_not_adopted(client, home, tmp_path, mode):
    """The seen case: the server dies while no daemon runs, its helper (same tags, its own session,
    leading its own group) lives on. The next daemon must not take the helper for the server."""
    svc = client.deploy(command_config(tmp_path, HELPER_SERVER, "helper", stop_timeout=2), timeout=60)
    helper = pids_in(tmp_path / "helper.pids")[0]
    client.shutdown(stop_services=False)
    wait_for(lambda: not client.is_running(), 10, what="the daemon to stop")
    os.kill(svc.status.pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(svc.status.pid), 10, what="the server to die")
    assert pid_alive(helper)
    again = DaemonClient(home=home)
    try:
        wait_for(lambda: again.get(svc.uuid).status.state == ServiceState.ACTIVE, 30, what="the service to be started again")
        after = again.get(svc.uuid)
        assert after.status.pid not in (helper, svc.status.pid)
        assert not pid_alive(helper)
        assert http_get(after.endpoint.port, "/") == 200
    finally:
        again.close()


def test_containment_is_shown_and_cgroups_are_named_from_the_canonical_home(client, home, tmp_path):
    kind = client.daemon_info()["containment"]
    out = modeld("daemon", "status", home=home)
    assert f"containment: {kind}" in out.stdout
    if kind != "cgroup":
        pytest.skip("no cgroup containment here (needs root, or a delegated cgroup, and cgroup2)")
    svc = client.deploy(command_config(tmp_path, HELPER_SERVER, "helper"), timeout=60)
    digest = hashlib.sha256(os.fsencode(str(home.resolve()))).hexdigest()[:16]
    parent = Path(cgroup2_mount()) / f"modeld-{digest}"
    leaves = list((parent / str(svc.uuid)).iterdir())
    procs = [int(p) for leaf in leaves if leaf.is_dir() for p in (leaf / "cgroup.procs").read_text().split()]
    assert svc.status.pid in procs and pids_in(tmp_path / "helper.pids")[0] in procs


# ------------------------------------------------------------- as an ordinary user


def _delegated_cgroup(uid: int) -> Path:
    mount = cgroup2_mount()
    assert mount is not None
    path = Path(mount) / f"modeld-test-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    for name in ("", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"):
        os.chown(path / name if name else path, uid, uid)
    return path


def _as_user(uid: int, work: object, cgroup: Path | None = None) -> object:
    """Run ``work()`` in a forked child that switched to ``uid`` (after entering ``cgroup``); its JSON result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on, only os._exit
        code = 1
        try:
            os.close(r)
            if cgroup is not None:
                (cgroup / "cgroup.procs").write_text("0")
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            result = work()  # type: ignore[operator]
            os.write(w, json.dumps({"ok": result}).encode())
            code = 0
        except BaseException as exc:  # noqa: BLE001  (reported to the parent)
            os.write(w, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    answer = json.loads(data or b'{"error": "no answer"}')
    if "error" in answer:
        raise AssertionError(f"as uid {uid}: {answer['error']}")
    return answer["ok"]


@pytest.mark.needs_root("to delegate a cgroup to another uid and switch a child to it")
@pytest.mark.skipif(cgroup2_mount() is None, reason="no cgroup2 hierarchy is mounted here")
def test_a_daemon_of_an_ordinary_user_contains_its_servers_in_its_delegated_cgroup(home, tmp_path):
    """The user path: a daemon running as uid 65534 in a cgroup subtree delegated to it (as
    systemd's Delegate=yes leaves one) puts each service in a cgroup of its own below it."""
    uid = 65534
    cgroup = _delegated_cgroup(uid)
    user_home = Path(f"/tmp/mdu{os.getpid()}")
    work = Path(f"/tmp/mdw{os.getpid()}")
    for path in (user_home, work):
        path.mkdir(mode=0o700)
        os.chown(path, uid, uid)
    (work / "helper.py").write_text(HELPER_SERVER)
    os.chmod(work / "helper.py", 0o644)
    system_python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
    # What the daemon imports later must be imported now: after setuid this interpreter's own
    # files (under root's home here) may not be readable any more.
    import concurrent.futures.thread  # noqa: F401
    import ctypes  # noqa: F401
    import http.client  # noqa: F401
    import logging
    import shlex  # noqa: F401

    import uvicorn.lifespan.off  # noqa: F401
    import uvicorn.protocols.http.h11_impl  # noqa: F401

    import daemon.api  # noqa: F401
    import daemon.daemon_process  # noqa: F401
    import daemon.logs  # noqa: F401
    import daemon.logwriter  # noqa: F401

    daemon_pid = os.fork()
    if daemon_pid == 0:
        code = 1
        try:
            (cgroup / "cgroup.procs").write_text("0")
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.setsid()
            fd = os.open(user_home / "daemon.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.environ["MODELD_HOME"] = str(user_home)
            os.environ["MODELD_WARM_START"] = "0"
            sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)
            logging.root.handlers.clear()  # (pytest's): the daemon logs to its daemon.log
            from daemon.paths import Paths
            from daemon.daemon_process import run

            code = run(Paths(user_home))
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    try:
        def deploy_and_check() -> dict[str, object]:
            c = DaemonClient(home=user_home, auto_start=False)
            wait_for(c.is_running, 30, what="the user's daemon")
            info = c.daemon_info()
            svc = c.deploy(ServiceConfig(model_name="h", model_type="command", health_path="/", working_dir=str(work),
                                         command=[system_python, "helper.py", "{port}", str(work / "h.pids")],
                                         stop_timeout=2), timeout=60)
            helper = int((work / "h.pids").read_text().split()[0])
            leaves = [p for p in cgroup.glob(f"modeld-*/{svc.uuid}/*") if p.is_dir()]
            procs = sorted(int(x) for leaf in leaves for x in (leaf / "cgroup.procs").read_text().split())
            c.stop(svc.uuid, timeout=10)
            gone = bool(wait_for(lambda: not pid_alive(helper), 10, what="the helper to go"))
            c.shutdown(stop_services=True)
            return {"containment": info["containment"], "server": svc.status.pid, "helper": helper, "procs": procs,
                    "helper_gone_after_stop": gone}

        try:
            result = _as_user(uid, deploy_and_check)
        except AssertionError as exc:
            log = user_home / "daemon.log"
            raise AssertionError(f"{exc}\n--- the user's daemon.log ---\n{log.read_text()[-3000:] if log.exists() else '(none)'}") from None
        assert isinstance(result, dict)
        assert result["containment"] == "cgroup", (user_home / "daemon.log").read_text()[-2000:]
        assert result["server"] in result["procs"] and result["helper"] in result["procs"]
        assert result["helper_gone_after_stop"]
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.kill(daemon_pid, signal.SIGKILL)
        os.waitpid(daemon_pid, 0)
        for leaf in sorted(cgroup.rglob("*"), key=lambda p: -len(p.parts)):
            if leaf.is_dir():
                (leaf / "cgroup.kill").write_text("1")
                wait_for(lambda: "populated 0" in (leaf / "cgroup.events").read_text(), 10, what=f"{leaf} empty")
                leaf.rmdir()
        cgroup.rmdir()
        subprocess.run(["rm", "-rf", str(user_home), str(work)], check=False)


# ------------------------------------------------------------------ stop_command

# A "container": the server hands its work to a process it does not wait for (as `docker run`
# hands it to dockerd), whose pid goes to a file; the stop command stops that one, as
# `docker stop` would, and leaves a trace of what it was given.
CONTAINER_SERVER = textwrap.dedent('''
    import http.server, os, sys
    port, folder = int(sys.argv[1]), sys.argv[2]
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
        def log_message(self, *a):
            pass
    with open(os.path.join(folder, "server.pid"), "w") as f:
        f.write(str(os.getpid()))
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
''')
STOPPER = textwrap.dedent('''
    import os, sys
    folder, name, uuid, port = sys.argv[1:5]
    with open(os.path.join(folder, "stops"), "a") as f:
        f.write(f"{name} {uuid} {port} {os.environ.get('STOP_TOKEN', '')} {os.environ.get('MODELD_SERVICE_UUID', '-')}\\n")
    sys.exit(int(os.environ.get("STOP_EXIT", "0")))
''')


def test_stop_command_runs_before_the_signals_and_after_an_unexpected_exit(client, tmp_path):
    (tmp_path / "server.py").write_text(CONTAINER_SERVER)
    (tmp_path / "stopper.py").write_text(STOPPER)
    config = ServiceConfig(
        name="box", model_name="box", model_type="command", health_path="/", working_dir=str(tmp_path),
        command=[sys.executable, "server.py", "{port}", str(tmp_path)], env={"STOP_TOKEN": "t0k"},
        stop_command=[sys.executable, "stopper.py", str(tmp_path), "{name}", "{uuid}", "{port}"], stop_timeout=3,
    )
    svc = client.deploy(config, timeout=60)
    stops = tmp_path / "stops"

    client.stop(svc.uuid, timeout=10)
    # It ran with the placeholders filled in and the service's env, but not as a server of the service.
    assert stops.read_text().split() == ["box", str(svc.uuid), str(svc.endpoint.port), "t0k", "-"]
    assert not pid_alive(svc.status.pid)  # and the signals followed (this server ignores nothing)

    started = client.start(svc.uuid, timeout=30)
    os.kill(started.status.pid, signal.SIGKILL)  # an unexpected exit: the stop command runs before the restart
    wait_for(lambda: len(stops.read_text().splitlines()) == 2, 10, what="the stop command after a crash")
    # A new pid, not None: while the stop command runs after the exit, the record says active with no pid yet.
    back = wait_for(lambda: (s := client.get(svc.uuid)).status.state == ServiceState.ACTIVE and s.status.pid not in (None, started.status.pid)
                    and s, 20, what="the restart")

    # A stop command that fails: the signals follow all the same.
    env = {**config.env, "STOP_EXIT": "3"}
    failing = client.deploy(config.model_copy(update={"env": env, "model_name": "box2", "name": "box2"}), timeout=60)
    client.stop(failing.uuid, timeout=10)
    assert not pid_alive(failing.status.pid)
    assert stops.read_text().splitlines()[-1].split()[0] == "box2"
    assert client.get(back.uuid).status.state == ServiceState.ACTIVE


@pytest.mark.needs_root("to create cgroups under the cgroup2 mount")
def test_a_cgroup_removed_while_another_thread_kills_it_is_gone_not_an_error(tmp_path):
    """Two paths can finish the same delete at once at a rebuild (the stray's launch is killed
    and removed while the deleted service's folder is): a cgroup removed under the other
    answers ENOENT or ENODEV, which means gone. Seen in CI as a daemon that would not start."""
    import threading

    from daemon.containment import Cgroups, choose
    from daemon.paths import Paths
    from daemon.settings import load_settings
    from daemon.strays import kill_and_remove

    home = tmp_path / "h"
    (home / "run").mkdir(parents=True)
    settings = load_settings(Paths(home))  # the cgroup setting a daemon started from here would use
    containment = choose(home, home / "run", settings.cgroup, settings.named("cgroup"))
    if not isinstance(containment, Cgroups):
        pytest.skip(f"no cgroups here: {containment.reason}")
    errors: list[BaseException] = []

    def guarded(fn, *args):
        try:
            fn(*args)
        except BaseException as exc:  # noqa: BLE001 - any is the failure
            errors.append(exc)

    try:
        for round_ in range(40):
            uuid = f"race{round_}"
            group = containment.create(uuid, "l1")
            child = subprocess.Popen(["sleep", "100"])
            try:
                (group.path / "cgroup.procs").write_text(str(child.pid))
                threads = [threading.Thread(target=guarded, args=(containment.remove_service, uuid)),
                           threading.Thread(target=guarded, args=(kill_and_remove, containment.group(uuid, "l1")))]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(30)
            finally:
                child.kill()
                child.wait()
            assert not errors, errors
            assert not (containment.parent / uuid).exists()
    finally:
        containment.prune()
        with contextlib.suppress(OSError):
            containment.parent.rmdir()
