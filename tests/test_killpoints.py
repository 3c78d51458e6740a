"""kill -9 of the daemon at every durable step of every operation (daemon/killpoints.py).

The daemon is started with ``MODELD_DIE_AT=<step>`` and sent through the operation until it dies
there; the next daemon must converge: every file readable, the operation done or not done (as
the table below says, per step), one server for the service or none, no server that no service
tracks, and the server kept when one was already running. The test is parametrized over the
list the daemon exports, and a step without an expectation here fails, so none can be missed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

import psutil


from daemon import DaemonClient, ServiceConfig
from daemon.exceptions import DaemonError
from daemon.killpoints import KILL_POINTS
from daemon import testing as harness
from daemon.linux import start_ticks
from daemon.runtime._serve import FORK_SERVER_NAME, forkserver
from daemon.testing import processes_of, wait_for


# step -> (the operation is done after the restart, the server alive before the restart is kept)
EXPECTED: dict[str, tuple[bool, bool]] = {
    "deploy.after-json": (True, False),  # nothing ran yet: the new daemon starts it
    "deploy.after-spawn": (True, True),  # no pid file names it: found by its environment, adopted
    "deploy.after-pid": (True, True),
    "deploy.after-healthy": (True, True),
    "start.after-json": (True, False),
    "start.after-spawn": (True, True),
    "start.after-pid": (True, True),
    "start.after-healthy": (True, True),
    "stop.after-json": (True, False),  # service.json says stopped: the new daemon stops it
    "stop.after-exit": (True, False),
    "unload.after-json": (True, False),  # should run, yet pending_shutdown: the scale to zero is finished
    "unload.after-exit": (True, False),
    "replace.after-spawn": (False, True),  # the new version is not recorded anywhere: killed
    "replace.after-pid": (False, True),  # service.json has the old version: it stays
    "replace.after-json": (True, True),  # service.json has the new version: the old one goes
    "replace.after-old-stopped": (True, True),
    "replace-restart.after-old-stopped": (False, False),  # the old config is started again
    "replace-restart.after-json": (True, False),
    "replace-restart.after-spawn": (True, True),
    "replace-restart.after-pid": (True, True),
    "replace-restart.after-healthy": (True, True),
    "delete.after-rename": (True, False),  # the folder is gone: the server is killed
    "delete.after-stop": (True, False),
    "delete.mid-unlink": (True, False),
    "restart.after-spawn": (True, True),
    "restart.after-pid": (True, True),
    "restore.after-spawn": (True, True),
    "restore.after-pid": (True, True),
}

UUID = "3c0c8f0e-1d7a-4a4b-9c61-5b0f4a1c2d3e"
BUILTIN_OPS = ("deploy", "replace", "restore", "unload")  # the rest use cheaper command servers


def config(folder: Path, kind: str, tag: str, model_name: str = "m") -> ServiceConfig:
    common = dict(pipeline_name="kp", pipeline_step_name="s", model_name=model_name, working_dir=str(folder),
                  stop_timeout=3, restart={"backoff_initial": 0.05})
    if kind == "command":
        return ServiceConfig(model_type="command", command=[sys.executable, "tiny.py", "{port}", tag], health_path="/", **common)
    return ServiceConfig(model_type="python", model_uri=f"{tag}.py:model", **common)


def the_server(home: Path) -> list[int]:
    return harness.server_leaders(harness.server_processes(home)).get(UUID, [])


def fork_server_ready(home: Path) -> bool:
    """The daemon's fork server has named itself, which it does just before it says it is ready."""
    return any(p.name() == FORK_SERVER_NAME for p in processes_of(home) if p.status() != psutil.STATUS_ZOMBIE)


def run_until_killed(name: str, home: Path, folder: Path, warm: bool = False) -> None:
    """Drive the operation of ``name`` on a daemon armed to die at ``name``; return once it has.

    ``warm``: the server spawned at that step is forked by the fork server (whose environment
    its /proc entry shows), after a first, cold spawn has started the fork server.
    """
    op = name.split(".")[0]
    kind = "python" if op in BUILTIN_OPS or warm else "command"
    daemon = harness.DaemonProcess(home)
    assert daemon.start(None if op == "restore" else f"{name}@2" if warm and op == "deploy" else name)
    client = DaemonClient(home, auto_start=False)
    try:
        if warm:  # a first server starts the fork server; the one killed at the step is forked
            client.deploy(config(folder, kind, "a", model_name="warmup"), timeout=30)
            wait_for(lambda: fork_server_ready(home), 15, what="the fork server")
        if op != "deploy":
            client.deploy(config(folder, kind, "a"), uuid=UUID, timeout=30)
        if op == "restore":  # the server dies while no daemon runs; the next daemon starts it
            daemon.kill9()
            os.killpg(the_server(home)[0], signal.SIGKILL)  # all of it (a worker left serving would be followed)
            wait_for(lambda: not the_server(home), 10, what="the server to die")
            assert not daemon.start(name), "the daemon should have died while rebuilding"
        elif op == "restart":
            os.killpg(the_server(home)[0], signal.SIGKILL)  # a crash of all of it (a worker left serving would be followed)
            wait_for(lambda: not daemon.alive(), 10, what="the daemon to die restarting the server")
        else:
            if op == "start":
                client.stop(UUID, timeout=10)
            calls = {
                "deploy": lambda: client.deploy(config(folder, kind, "a"), uuid=UUID, timeout=30),
                "start": lambda: client.start(UUID, timeout=30),
                "stop": lambda: client.stop(UUID, timeout=10),
                "replace": lambda: client.deploy(config(folder, kind, "b"), replace=True, uuid=UUID, timeout=30),
                "replace-restart": lambda: client.deploy(config(folder, kind, "b"), replace=True, uuid=UUID, timeout=30),
                "delete": lambda: client.delete(UUID, timeout=10),
                "unload": lambda: client.unload(UUID),
            }
            with pytest.raises(DaemonError):
                calls[op]()
        daemon.wait_dead()
        assert f"kill point {name} reached" in daemon.paths.daemon_log.read_text()
    finally:
        client.close()


# Steps where a server has just been forked by the fork server (warm): it is found through the
# fork server's record, as its /proc environ is not its own. A new daemon's first spawn is cold.
WARM_POINTS = [p for p in KILL_POINTS if p.split(".")[0] in ("deploy", "start", "replace", "restart")
               and p.endswith((".after-spawn", ".after-pid"))]


@pytest.mark.slow
@pytest.mark.parametrize("name", KILL_POINTS)
def test_daemon_killed_at_step_converges(name, home, tmp_path):
    check_killed_at(name, home, tmp_path, warm=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", WARM_POINTS)
def test_daemon_killed_at_step_of_a_warm_start_converges(name, home, tmp_path):
    check_killed_at(name, home, tmp_path, warm=True)


def check_killed_at(name: str, home: Path, tmp_path: Path, warm: bool) -> None:
    assert name in EXPECTED, f"kill point {name} has no expected outcome in this test: add one"
    done, kept = EXPECTED[name]
    op = name.split(".")[0]
    (tmp_path / "tiny.py").write_text(harness.TINY_SERVER)
    for tag in ("a", "b"):
        (tmp_path / f"{tag}.py").write_text(f"def model(instances):\n    return [{tag!r} for _ in instances]\n")

    run_until_killed(name, home, tmp_path, warm)
    before = the_server(home)
    if warm:  # the server killed at the step (the newest, in a replace) was forked, not spawned
        assert os.path.exists(forkserver.record_path(home / "run", max(before, key=start_ticks))), before

    assert harness.DaemonProcess(home).start()
    with DaemonClient(home, auto_start=False) as client:
        snap, settled = harness.wait_settled(client, home, timeout=15)
    assert settled, harness.describe(snap)
    assert not any(harness.check(snap).values()), harness.check(snap)

    # Every file on disk is whole and no half-deleted folder is left.
    services = home / "services"
    assert not [p.name for p in services.iterdir() if p.name.startswith(".")]
    for path in services.glob("*/service.json"):
        json.loads(path.read_text())

    svc = snap.services.get(UUID)
    server = the_server(home)
    if op == "delete":
        assert svc is None and not server and not (services / UUID).exists()
        return
    assert svc is not None
    if op == "stop":
        assert svc.status.state.value == "inactive" and not server
        return
    if op == "unload":
        assert svc.status.state.value == "scaled_to_zero" and not server
        assert harness.answer_tag(svc) == "a"  # and its next request wakes it
        return
    assert svc.status.state.value == "active" and server == [svc.status.pid]
    if op.startswith("replace"):
        assert (svc.version, harness.answer_tag(svc)) == ((2, "b") if done else (1, "a"))
    else:
        assert harness.answer_tag(svc) == "a"
    if kept:
        assert svc.status.pid in before, (svc.status.pid, before)
    else:
        assert svc.status.pid not in before


def test_a_call_cut_by_the_daemons_death_is_not_sent_again(home, tmp_path):
    """A deploy done just before the daemon died must not be re-sent to the next daemon, which an
    auto-starting client would reach: that would deploy a second server."""
    (tmp_path / "a.py").write_text("def model(instances):\n    return ['a' for _ in instances]\n")
    assert harness.DaemonProcess(home).start("deploy.after-healthy")
    client = DaemonClient(home)  # auto-start on, as a user's
    try:
        client.daemon_info()  # the connection is kept alive: a reconnect would be a "retry"
        with pytest.raises(DaemonError) as info:
            client.deploy(config(tmp_path, "python", "a"), timeout=30)
        assert "kill point deploy.after-healthy reached" in (home / "daemon.log").read_text()
        services = client.find()  # auto-starts the next daemon, which re-adopts the server
        assert len(services) == 1 and services[0].status.state.value == "active"
        assert len(the_server_of(home, services[0].uuid)) == 1
        assert "may or may not have been done" in str(info.value)
    finally:
        client.close()


def the_server_of(home: Path, uuid) -> list[int]:
    return harness.server_leaders(harness.server_processes(home)).get(str(uuid), [])
