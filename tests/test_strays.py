"""Stopping what no service keeps (daemon/strays.py) without a manager or a daemon, on real
processes tagged as a server's would be: an untracked server's whole group is killed, and only
the process its pid and start ticks name (never a pid reused meanwhile); a sweep stops the
launches no service keeps and the processes and cgroups of services that are gone, and keeps the
launches services run; one stray that cannot be reached is logged, never raised."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from uuid import UUID

import pytest

from daemon.containment import Cgroups, Containment, choose
from daemon.linux import ProcessIdentity, TaggedProcess, tagged_processes
from daemon.models import LocalModelService, ServiceConfig
from daemon.paths import Paths
from daemon.process import ProcessHandle
from daemon.service import ServiceRuntime
from daemon.settings import load_settings
from daemon.store import LaunchInfo
from daemon.strays import kill_untracked, log_failures, sweep_leftovers
from daemon.testing import pid_alive, reap_home, ticks_alive, wait_for

KEPT, GONE = "11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "h"
    (home / "run").mkdir(parents=True)
    try:
        yield home
    finally:
        reap_home(home)


def tagged(home: Path, uuid: str, launch: str, child: bool = False) -> subprocess.Popen[bytes]:
    """A process tagged as launch ``launch`` of service ``uuid`` of ``home`` would be, leading a
    process group of its own (with a child in that group if ``child``)."""
    env = {**os.environ, "MODELD_HOME": str(home), "MODELD_SERVICE_UUID": uuid, "MODELD_PROCESS": json.dumps({"launch": launch})}
    script = "sleep 1000 & exec sleep 1000" if child else "exec sleep 1000"
    return subprocess.Popen(["/bin/sh", "-c", script], env=env, start_new_session=True, stdin=subprocess.DEVNULL)


def scan(home: Path, pid: int) -> TaggedProcess:
    """The scan's view of ``pid`` (as a rebuild makes it), once its tag can be read."""
    return wait_for(lambda: next((p for p in tagged_processes(str(home)) if p.ident.pid == pid), None), 10,
                    what=f"pid {pid} to carry its tag")


def group_pids(pgid: int) -> set[int]:
    return {pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if _pgid(pid) == pgid and pid_alive(pid)}


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_kill_untracked_stops_the_group_of_the_process_its_pid_and_start_ticks_name(home):
    leader = tagged(home, GONE, "l1", child=True)
    try:
        p = scan(home, leader.pid)
        assert p.leads_group
        members = wait_for(lambda: g if len(g := group_pids(leader.pid)) == 2 else None, 10, what="the child to start")
        # The same pid with other start ticks is another process (the pid was reused): left alone.
        reused = replace(p, ident=ProcessIdentity(p.ident.pid, p.ident.start_ticks + 1, p.ident.boot_id))
        asyncio.run(kill_untracked(Containment(home, home / "run"), reused))
        assert all(pid_alive(pid) for pid in members)

        asyncio.run(kill_untracked(Containment(home, home / "run"), p))
        assert not ticks_alive(p.ident.pid, p.ident.start_ticks)
        wait_for(lambda: not group_pids(leader.pid), 10, what="its whole group to go")
    finally:
        leader.kill()
        leader.wait()


def containment_of(home: Path, kind: str) -> Containment:
    if kind == "tag":
        return Containment(home, home / "run")
    settings = load_settings(Paths(home))
    chosen = choose(home, home / "run", settings.cgroup, settings.named("cgroup"))
    if not isinstance(chosen, Cgroups):
        pytest.skip(f"no cgroups here: {chosen.reason}")
    return chosen


@pytest.mark.parametrize("kind", ["tag", "cgroup"])
def test_sweep_leftovers_stops_what_no_service_keeps_and_keeps_the_rest(home, kind):
    containment = containment_of(home, kind)
    started: list[subprocess.Popen[bytes]] = []

    def launch(uuid: str, name: str) -> subprocess.Popen[bytes]:
        """A tagged process of launch ``name``, in that launch's cgroup if there are cgroups."""
        group = containment.create(uuid, name)
        with containment.born_in(group):
            proc = tagged(home, uuid, name)
        started.append(proc)
        return proc

    async def go() -> None:
        m = ServiceRuntime(LocalModelService(uuid=UUID(KEPT), config=ServiceConfig(model_type="command", command=["sleep"])))
        kept = launch(KEPT, "keep")  # the launch the service runs
        old = launch(KEPT, "old")  # one a kill -9 of the daemon cut short
        deleted = launch(GONE, "g1")  # a service that is gone
        m.proc = ProcessHandle.adopt(scan(home, kept.pid).ident, LaunchInfo(launch="keep"))
        assert m.proc is not None
        scanned = [scan(home, p.pid) for p in (kept, old, deleted)]
        await sweep_leftovers(containment, [m], scanned)
        assert pid_alive(kept.pid) and m.proc.alive
        for proc in (old, deleted):
            await asyncio.to_thread(wait_for, lambda p=proc: p.poll() is not None, 10, what=f"pid {proc.pid} to be stopped")
        if isinstance(containment, Cgroups):
            assert containment.services() == [KEPT] and containment.launches(KEPT) == ["keep"]
        m.proc.close()

    try:
        asyncio.run(go())
    finally:
        for proc in started:
            proc.kill()
            proc.wait()
        containment.remove_service(KEPT)
        containment.prune()


def test_log_failures_logs_each_failure_and_raises_none(caplog):
    caplog.set_level(logging.ERROR, logger="modeld.manager")
    log_failures("sweeping", [None, ProcessLookupError(3, "No such process"), "done", OSError(19, "No such device")])
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in failures] == [
        "sweeping failed: ProcessLookupError: [Errno 3] No such process",
        "sweeping failed: OSError: [Errno 19] No such device",
    ]
    assert all(r.exc_info is not None for r in failures)
