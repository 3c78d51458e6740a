"""Replacing a service in place (daemon/replace.py) without a manager or a daemon: the launcher,
supervision and start/stop units over a registry of our own, on real servers. A hand-over keeps
the port and retires the old version once the new one answers; a stop-then-start starts the new
version; either one that fails leaves the previous version serving. Which service a deploy
replaces is a lookup over the registry."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import pytest

from daemon.exceptions import Conflict, DeployError
from daemon.launch import Launcher
from daemon.models import DesiredState, LocalModelService, ServiceConfig, ServiceState
from daemon.service import ServiceRuntime
from daemon.testing import IRIS, server_script
from daemon.testing.units import Units

# A command server that answers its health check; argv: port, then anything (its "version").
SERVES = server_script("PORT, BODY = int(sys.argv[1]), b''\n")  # 200 on every GET


def command(tmp_path: Path, *argv: str) -> ServiceConfig:
    (tmp_path / "s.py").write_text(SERVES)
    return ServiceConfig(model_type="command", model_name="m", command=[sys.executable, *argv], working_dir=str(tmp_path),
                         health_path="/", stop_timeout=5)


async def started(u: Units, config: ServiceConfig) -> ServiceRuntime:
    """A service of ``config``, started (as a deploy would) and in the registry."""
    svc = LocalModelService(config=config)
    svc.service_path = str(u.paths.service_dir(svc.uuid))
    svc.endpoint = Launcher.endpoint(config, config.port)
    m = ServiceRuntime(svc)
    u.services[m.uuid] = m
    u.startstop.launcher.ensure_port(m, config)
    async with m.lock:
        await u.startstop.start(m, 60, failing_state=DesiredState.STOPPED, op="deploy")
    return m


async def stopped(u: Units, m: ServiceRuntime) -> None:
    async with m.lock:
        await u.startstop.stop(m, 10, force=True)


def test_a_hand_over_keeps_the_port_and_retires_the_old_version_once_the_new_one_answers(units, caplog):
    caplog.set_level(logging.INFO, logger="modeld.manager")

    async def go() -> None:
        m = await started(units, ServiceConfig(model_name="iris", model_uri=IRIS, stop_timeout=5))
        old, port = m.proc, m.svc.endpoint.port
        assert old is not None
        async with m.lock:
            await units.replacer.replace(m, m.svc.config.model_copy(update={"description": "v2"}), timeout=60)
        assert m.proc is not None and m.proc is not old and m.proc.alive and not old.alive
        assert (m.svc.version, m.proc.info.version, m.svc.endpoint.port) == (2, "2", port)
        assert m.svc.status.state == ServiceState.ACTIVE and m.task is not None  # supervised again
        record = units.store.read_pid(m.uuid)
        assert record is not None and record.ident == m.proc.ident and record.previous is None
        await stopped(units, m)

    asyncio.run(go())
    assert "hand-over on the listening socket" in caplog.text


def test_a_hand_over_whose_new_version_fails_leaves_the_old_one_serving(units, tmp_path):
    (tmp_path / "broken.py").write_text("raise SystemExit('this model does not load')\n")

    async def go() -> None:
        m = await started(units, ServiceConfig(model_name="iris", model_uri=IRIS, stop_timeout=5))
        old = m.proc
        assert old is not None
        broken = m.svc.config.model_copy(update={"model_uri": f"{tmp_path / 'broken.py'}:model"})
        async with m.lock:
            with pytest.raises(DeployError, match="the previous version keeps serving"):
                await units.replacer.replace(m, broken, timeout=60)
        assert m.proc is old and old.alive and m.svc.version == 1 and m.svc.config.model_uri == IRIS
        assert m.task is not None and m.replacing is None
        record = units.store.read_pid(m.uuid)
        assert record is not None and record.ident == old.ident and record.previous is None
        await stopped(units, m)

    asyncio.run(go())


def test_a_stop_then_start_starts_the_new_version(units, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="modeld.manager")

    async def go() -> None:
        m = await started(units, command(tmp_path, "s.py", "{port}", "v1"))
        old = m.proc
        assert old is not None
        async with m.lock:
            await units.replacer.replace(m, command(tmp_path, "s.py", "{port}", "v2"), timeout=60)
        assert m.proc is not None and m.proc is not old and m.proc.alive and not old.alive
        assert m.svc.version == 2 and m.svc.config.command[-1] == "v2" and m.svc.status.state == ServiceState.ACTIVE
        await stopped(units, m)

    asyncio.run(go())
    assert "stop, then start" in caplog.text


def test_a_stop_then_start_whose_new_version_fails_starts_the_previous_one_again(units, tmp_path):
    (tmp_path / "dies.py").write_text("import sys; sys.exit(3)\n")

    async def go() -> None:
        m = await started(units, command(tmp_path, "s.py", "{port}", "v1"))
        old = m.proc
        async with m.lock:
            with pytest.raises(DeployError, match="exited with code 3.*the previous version was started again"):
                await units.replacer.replace(m, command(tmp_path, "dies.py", "{port}"), timeout=60)
        assert m.proc is not None and m.proc is not old and m.proc.alive
        assert m.svc.version == 1 and m.svc.config.command[-1] == "v1" and m.svc.status.state == ServiceState.ACTIVE
        await stopped(units, m)

    asyncio.run(go())


def test_the_service_a_deploy_replaces_is_the_newest_of_the_same_names(units, tmp_path):
    def keep(**names: str) -> ServiceRuntime:
        m = ServiceRuntime(LocalModelService(config=command(tmp_path, "s.py", "{port}").model_copy(update=names)))
        units.services[m.uuid] = m
        return m

    older, newer = keep(pipeline_name="p", model_name="m"), keep(pipeline_name="p", model_name="m")
    newer.svc.created_at = older.svc.created_at + 1
    other = keep(pipeline_name="p", model_name="other")
    find = units.replacer.service_to_replace
    same = command(tmp_path, "s.py", "{port}").model_copy(update={"pipeline_name": "p", "model_name": "m"})
    assert find(same, replace=True, uuid=None) is newer
    assert find(same, replace=False, uuid=None) is None  # no replace: a new service
    assert find(same, replace=True, uuid=other.uuid) is other  # a uuid names the service
    with pytest.raises(Conflict, match="deploy with replace"):
        find(same, replace=False, uuid=other.uuid)
