"""The launcher alone (daemon/launch.py), without a manager or a daemon: what precheck refuses
before anything is created, and port claims as the kernel's binds would have them."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path
from uuid import UUID

import pytest

from daemon.containment import Containment
from daemon.exceptions import Conflict, InvalidRequest
from daemon.launch import Launcher
from daemon.logwriter import LogWriterClient
from daemon.config import ServiceConfig
from daemon.models import LocalModelService
from daemon.paths import Paths
from daemon.service import ServiceRuntime
from daemon.store import Store


@pytest.fixture
def launcher(tmp_path: Path) -> tuple[Launcher, dict[UUID, ServiceRuntime]]:
    paths = Paths(tmp_path / "h")
    paths.run.mkdir(parents=True)
    services: dict[UUID, ServiceRuntime] = {}
    return Launcher(paths, Store(paths), Containment(paths.home, paths.run), LogWriterClient(paths), services), services


def keeping(services: dict[UUID, ServiceRuntime], host: str, port: int) -> ServiceRuntime:
    """A service that keeps ``port`` on ``host`` for life (its server may be down)."""
    m = ServiceRuntime(LocalModelService(config=ServiceConfig(model_uri="m.py:model", host=host)))
    m.svc.endpoint = m.svc.endpoint.model_copy(update={"host": host, "port": port})
    services[m.uuid] = m
    return m


def command(tmp_path: Path, **kw: object) -> ServiceConfig:
    return ServiceConfig(model_type="command", command=[sys.executable, "-c", "pass", "{port}"], working_dir=str(tmp_path), **kw)


def test_precheck_refuses_what_cannot_run_naming_the_field(launcher, tmp_path):
    launch, _ = launcher
    with pytest.raises(InvalidRequest, match="model file"):
        launch.precheck(ServiceConfig(model_uri=f"{tmp_path}/absent.py:model"), fresh=True)
    with pytest.raises(InvalidRequest, match="working_dir"):
        launch.precheck(command(tmp_path).model_copy(update={"working_dir": str(tmp_path / "nowhere")}), fresh=True)
    with pytest.raises(InvalidRequest, match="command"):
        launch.precheck(command(tmp_path).model_copy(update={"command": ["/no/such/program"]}), fresh=True)
    with pytest.raises(InvalidRequest, match="config.host"):  # a name not resolved (resolve_hosts was not asked)
        launch.precheck(command(tmp_path, host="some-host.invalid"), fresh=True)
    launch.precheck(command(tmp_path), fresh=True)  # and what can run passes


def test_a_port_kept_for_life_conflicts_exactly_as_binds_would(launcher, tmp_path):
    launch, services = launcher
    owner = keeping(services, "127.0.0.1", 40123)
    with pytest.raises(Conflict, match="40123"):
        launch.precheck(command(tmp_path, host="0.0.0.0", port=40123), fresh=False)  # the wildcard takes every v4 address
    launch.precheck(command(tmp_path, host="127.0.0.2", port=40123), fresh=False)  # another address: no conflict
    launch.precheck(command(tmp_path, host="::1", port=40123), fresh=False)  # another family: no conflict
    launch.precheck(command(tmp_path, host="127.0.0.1", port=40123), fresh=False, owner=owner)  # its own claim
    asyncio.run(launch.resolve_hosts(["localhost"]))
    with pytest.raises(Conflict):
        launch.precheck(command(tmp_path, host="localhost", port=40123), fresh=False)  # the same address, spelled otherwise


def test_a_fresh_command_service_is_refused_a_port_someone_else_holds(launcher, tmp_path):
    launch, _ = launcher
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(Conflict):
            launch.precheck(command(tmp_path, port=port), fresh=True)
