"""Starting and stopping one service's server (daemon/startstop.py) without a manager or a daemon:
the launcher, supervision and start/stop units over a registry of our own, on real servers. A start
records the server and leaves it active; a server that dies before it answers is a DeployError
with its log and the state the caller asked for; a stop takes the whole group (also a helper in a
session of its own) and records the service inactive; a forced stop does not wait for SIGTERM."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from daemon.exceptions import DeployError
from daemon.launch import Launcher
from daemon.models import DesiredState, LocalModelService, ServiceConfig, ServiceState
from daemon.service import ServiceRuntime
from daemon.testing import HELPER_SERVER, pid_alive, server_script, ticks_alive, wait_for
from daemon.testing.units import Units

SERVES = server_script("PORT, BODY = int(sys.argv[1]), b''\n")  # 200 on every GET; argv: port
# Takes no notice of SIGTERM: only a SIGKILL stops it. argv: port
DEAF = server_script("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nPORT, BODY = int(sys.argv[1]), b''\n")
# Prints why, then exits 3 before it serves.
DIES = "import sys\nprint('cannot load the weights: out of memory', flush=True)\nsys.exit(3)\n"


def command(tmp_path: Path, script: str, *argv: str, stop_timeout: float = 5) -> ServiceConfig:
    (tmp_path / "s.py").write_text(script)
    return ServiceConfig(model_type="command", model_name="m", command=[sys.executable, "s.py", *argv],
                         working_dir=str(tmp_path), health_path="/", stop_timeout=stop_timeout)


def registered(u: Units, config: ServiceConfig) -> ServiceRuntime:
    """A new service of ``config`` in the registry, as a deploy makes it before it starts it."""
    svc = LocalModelService(config=config)
    svc.service_path = str(u.paths.service_dir(svc.uuid))
    svc.endpoint = Launcher.endpoint(config, config.port)
    m = ServiceRuntime(svc)
    u.services[m.uuid] = m
    u.launcher.ensure_port(m, config)
    return m


def on_disk(u: Units, m: ServiceRuntime) -> LocalModelService:
    loaded, problems = u.store.load_all()
    assert not problems, problems
    (svc,) = [s for s in loaded if s.uuid == m.uuid]
    assert isinstance(svc, LocalModelService)
    return svc


def test_a_start_makes_the_service_active_with_its_server_recorded(units, tmp_path):
    async def go() -> None:
        m = registered(units, command(tmp_path, SERVES, "{port}"))
        async with m.lock:
            await units.startstop.start(m, 60, failing_state=DesiredState.STOPPED, op="deploy")
        assert m.proc is not None and m.proc.alive and m.task is not None  # running and supervised
        assert m.svc.status.state == ServiceState.ACTIVE and m.svc.status.pid == m.proc.pid
        record = units.store.read_pid(m.uuid)
        assert record is not None and record.ident == m.proc.ident and record.info.launch == m.proc.info.launch
        saved = on_disk(units, m)
        assert (saved.status.state, saved.status.pid, saved.desired_state) == (ServiceState.ACTIVE, m.proc.pid, DesiredState.RUNNING)
        async with m.lock:
            await units.startstop.stop(m, 10, force=True)

    asyncio.run(go())


@pytest.mark.parametrize("failing_state", [DesiredState.STOPPED, DesiredState.RUNNING])
def test_a_start_whose_server_dies_is_a_deploy_error_with_its_log_and_the_failing_state(units, tmp_path, failing_state):
    async def go() -> None:
        m = registered(units, command(tmp_path, DIES))
        async with m.lock:
            with pytest.raises(DeployError, match="before it answered its health check") as caught:
                await units.startstop.start(m, 60, failing_state=failing_state, op="deploy")
        assert str(m.uuid) in str(caught.value)
        assert "out of memory" in (caught.value.log_excerpt or "")
        assert m.proc is None and m.task is None  # nothing left running or supervised
        assert m.svc.status.state == ServiceState.ERROR and m.svc.desired_state == failing_state
        assert "out of memory" in m.svc.status.last_error
        saved = on_disk(units, m)
        assert (saved.status.state, saved.desired_state) == (ServiceState.ERROR, failing_state)

    asyncio.run(go())


def test_a_stop_stops_the_whole_group_and_records_the_service_inactive(units, tmp_path):
    helpers = tmp_path / "helpers"

    async def go() -> tuple[int, list[tuple[int, int]]]:
        m = registered(units, command(tmp_path, HELPER_SERVER, "{port}", str(helpers), "x"))
        async with m.lock:
            await units.startstop.start(m, 60, failing_state=DesiredState.STOPPED, op="deploy")
        assert m.proc is not None
        server = m.proc.pid
        # The server's helper, in a session of its own: (pid, start ticks).
        found = await asyncio.to_thread(wait_for, lambda: helpers.exists() and helpers.read_text().splitlines(), 10,
                                        what="the helper to record itself")
        started = [(int(line.split()[0]), int(line.split()[1])) for line in found]
        assert all(ticks_alive(pid, ticks) for pid, ticks in started)
        async with m.lock:
            await units.startstop.stop(m, 10, force=False)
        assert m.proc is None and m.task is None and m.svc.status.pid is None
        assert m.svc.status.state == ServiceState.INACTIVE and m.svc.desired_state == DesiredState.STOPPED
        saved = on_disk(units, m)
        assert (saved.status.state, saved.desired_state, saved.status.pid) == (ServiceState.INACTIVE, DesiredState.STOPPED, None)
        assert units.store.read_pid(m.uuid) is None
        return server, started

    server, started = asyncio.run(go())
    assert not pid_alive(server)
    for pid, ticks in started:
        wait_for(lambda pid=pid, ticks=ticks: not ticks_alive(pid, ticks), 10, what=f"the helper {pid} to go with its server")


def test_a_forced_stop_kills_at_once_a_server_that_ignores_sigterm(units, tmp_path):
    async def go() -> float:
        m = registered(units, command(tmp_path, DEAF, "{port}", stop_timeout=60))
        async with m.lock:
            await units.startstop.start(m, 60, failing_state=DesiredState.STOPPED, op="deploy")
        assert m.proc is not None
        proc = m.proc
        began = time.monotonic()
        async with m.lock:
            await units.startstop.stop(m, 60, force=True)
        took = time.monotonic() - began
        assert not proc.alive and not pid_alive(proc.pid)
        assert m.svc.status.state == ServiceState.INACTIVE and on_disk(units, m).status.state == ServiceState.INACTIVE
        return took

    assert asyncio.run(go()) < 10  # not the 60 s a SIGTERM would have been given
