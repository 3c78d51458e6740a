"""The rebuild (daemon/rebuild.py, daemon/strays.py) without a manager or a daemon: a first set
of units starts servers and is dropped without stopping them, as a daemon killed with kill -9
would be; a second set, over a registry of its own, rebuilds from the same home. Real processes:
the running server is re-adopted, not restarted; one whose pid file was never written is found
by its tags and adopted; a server of a service that is gone is stopped; a process a pid file
names but that carries no tag of the service is never signalled."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest

from daemon.launch import Launcher
from daemon.linux import ProcessIdentity
from daemon.logwriter import LogWriterClient
from daemon.models import DesiredState, LocalModelService, ServiceConfig, ServiceState
from daemon.paths import Paths
from daemon.service import ServiceRuntime
from daemon.store import LaunchInfo, PidRecord, Store
from daemon.testing import pid_alive, reap, reap_home, server_script
from daemon.testing.units import Units

SERVES = server_script("PORT, BODY = int(sys.argv[1]), b''\n")  # 200 on every GET


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Paths]:
    paths = Paths(tmp_path / "h")
    paths.run.mkdir(parents=True)
    try:
        yield paths
    finally:
        LogWriterClient(paths).stop()
        reap_home(paths.home)


def deploy(paths: Paths, tmp_path: Path) -> tuple[UUID, ProcessIdentity]:
    """A first daemon deploys a command server and dies (its server keeps running): (the service, its server)."""
    (tmp_path / "s.py").write_text(SERVES)
    config = ServiceConfig(model_type="command", model_name="m", command=[sys.executable, "s.py", "{port}"],
                           working_dir=str(tmp_path), health_path="/", stop_timeout=5)
    first = Units.over(paths)

    async def go() -> tuple[UUID, ProcessIdentity]:
        svc = LocalModelService(config=config)
        svc.service_path = str(paths.service_dir(svc.uuid))
        svc.endpoint = Launcher.endpoint(config, config.port)
        m = ServiceRuntime(svc)
        first.services[m.uuid] = m
        first.launcher.ensure_port(m, config)
        try:
            async with m.lock:
                await first.startstop.start(m, 60, failing_state=DesiredState.STOPPED, op="deploy")
            assert m.proc is not None
            return m.uuid, m.proc.ident
        finally:
            await first.die()

    return asyncio.run(go())


def rebuilt(paths: Paths) -> tuple[Units, list[str]]:
    """A second daemon rebuilds from the home: (it, its problems' messages), its supervision stopped."""
    second = Units.over(paths)

    async def go() -> list[str]:
        try:
            problems, spent = await second.rebuilder.rebuild()
            assert {"load", "scan", "restore", "sweep"} <= set(spent)
            for m in second.services.values():
                assert m.task is not None or m.svc.status.state == ServiceState.INACTIVE  # supervised if it runs
            return [p.message for p in problems]
        finally:
            await second.die()

    return second, asyncio.run(go())


def test_a_running_server_is_re_adopted_not_restarted(home, tmp_path):
    uuid, server = deploy(home, tmp_path)
    second, problems = rebuilt(home)
    m = second.services[uuid]
    assert not problems
    assert m.proc is not None and m.proc.ident == server and server.is_alive()
    assert m.svc.status.state == ServiceState.ACTIVE and m.svc.status.pid == server.pid


def test_a_server_whose_pid_file_was_never_written_is_found_by_its_tags_and_adopted(home, tmp_path):
    uuid, server = deploy(home, tmp_path)
    Store(home).clear_pid(uuid)  # as a daemon killed between the spawn and the write
    second, _ = rebuilt(home)
    m = second.services[uuid]
    assert m.proc is not None and m.proc.ident == server
    record = Store(home).read_pid(uuid)
    assert record is not None and record.ident == server  # written again


def test_the_server_of_a_service_that_is_gone_is_stopped(home, tmp_path):
    uuid, server = deploy(home, tmp_path)
    Store(home).delete(uuid)  # as a delete cut short: the folder is gone, the server is not
    second, _ = rebuilt(home)
    assert uuid not in second.services
    assert not server.is_alive()


def test_a_process_a_pid_file_names_without_the_service_tag_is_never_signalled(home, tmp_path):
    uuid, server = deploy(home, tmp_path)
    reap({server})  # the server died while no daemon watched ...
    stranger = subprocess.Popen(["sleep", "1000"], start_new_session=True)  # ... and its pid file names someone else
    try:
        ident = ProcessIdentity.of(stranger.pid)
        assert ident is not None
        Store(home).write_pid(uuid, PidRecord(ident, LaunchInfo()))
        second, _ = rebuilt(home)
        m = second.services[uuid]
        assert pid_alive(stranger.pid)
        assert m.proc is not None and m.proc.pid != stranger.pid  # a new server was started instead
        assert m.svc.status.state == ServiceState.PENDING_STARTUP
    finally:
        stranger.kill()
        stranger.wait()
