"""modeld_zenml takes a service's state, and its endpoint's, from the daemon: it never connects to the model's port.

ZenML's ``update_status()`` (what ``zenml model-deployer models list`` runs for every service)
health-checks the endpoint over HTTP unless told otherwise; a connection to a scaled-to-zero
server's port is what wakes it. Here the daemon is an in-memory transport answering a record, and
the model's port is a listening socket the test holds: its accept queue must stay empty.
Skipped when ZenML is not installed (``MODELD_EXTRAS=test,zenml ./scripts/test``).
"""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from daemon import DaemonClient, LocalModelService, ServiceState
from daemon.client.memory import InMemoryTransport, error_response, json_response
from daemon.client.transport import Request, Response
from daemon.exceptions import ServiceNotFound
from daemon.testing import IRIS

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("zenml") is None, reason="ZenML is not installed: pip install 'modeld[zenml]'"),
    pytest.mark.slow,  # ZenML's import alone takes seconds
]


@pytest.fixture
def port() -> Iterator[socket.socket]:
    """A model's port that nobody may connect to: a listener whose backlog the test inspects."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.setblocking(False)
        yield listener


def no_connection(listener: socket.socket) -> bool:
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


class Daemon:
    """The daemon's answers about one service, whose state the test sets."""

    def __init__(self, port: int, idle_timeout: float | None = 30):
        from daemon.config import ServiceConfig

        config = ServiceConfig(model_name="iris", model_uri=IRIS, model_type="python", idle_timeout=idle_timeout)
        self.svc = LocalModelService(config=config)
        self.svc.endpoint.port = port
        self.svc.endpoint.model_name = "iris"
        self.gone = False
        self.requests: list[Request] = []

    def handle(self, request: Request) -> Response:
        self.requests.append(request)
        if self.gone:
            return error_response(ServiceNotFound(f"no service with uuid {self.svc.uuid}"))
        assert (request.method, request.path) == ("GET", f"/v1/services/{self.svc.uuid}"), request
        return json_response(self.svc.public().model_dump(mode="json"))


@pytest.fixture
def zenml_service(port: socket.socket, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Daemon]]:
    from modeld_zenml import ModeldDeploymentConfig, ModeldDeploymentService

    daemon = Daemon(port.getsockname()[1])
    monkeypatch.setattr(
        ModeldDeploymentService,
        "client",
        lambda self: DaemonClient(transport=InMemoryTransport(daemon.handle), auto_start=False),
    )
    config = ModeldDeploymentConfig(model_name="iris", model_uri=IRIS, model_type="python", idle_timeout=30)
    service = ModeldDeploymentService(uuid=daemon.svc.uuid, config=config)
    service.admin_state = ServiceState.ACTIVE.value  # as ZenML records a deployed service
    yield service, daemon


def test_scaled_to_zero_is_reported_as_zenmls_state_with_no_connection(zenml_service, port):
    from zenml.services.service_status import ServiceState as ZenMLState

    service, daemon = zenml_service
    assert hasattr(ZenMLState, "SCALED_TO_ZERO")
    daemon.svc.status.state = ServiceState.SCALED_TO_ZERO

    # What `zenml model-deployer models list` runs for each service (BaseModelDeployer.find_model_server).
    service.update_status()
    assert service.status.state == ZenMLState.SCALED_TO_ZERO
    assert service.endpoint.status.state == ZenMLState.SCALED_TO_ZERO
    assert not service.is_running and not service.is_stopped and not service.is_failed
    assert service.check_status() == (ZenMLState.SCALED_TO_ZERO, "")
    assert service.endpoint.is_active() is False
    assert service.prediction_url == f"http://127.0.0.1:{daemon.svc.endpoint.port}/v1/models/iris:predict"
    assert len(daemon.requests) >= 4  # every answer came from the daemon ...
    assert no_connection(port)  # ... and nothing knocked on the model's port


def test_active_is_the_daemons_word_too(zenml_service, port):
    """A loaded server is not probed by ZenML either: the daemon probes it, and says so."""
    from zenml.services.service_status import ServiceState as ZenMLState

    service, daemon = zenml_service
    daemon.svc.status.state = ServiceState.ACTIVE
    assert service.is_running  # (the port holds no server: a probe of ZenML's would have failed it)
    assert service.endpoint.status.state == ZenMLState.ACTIVE

    daemon.svc.status.state = ServiceState.ERROR
    daemon.svc.status.last_error = "the model no longer loads"
    service.update_status()
    assert (service.status.state, service.endpoint.status.state) == (ZenMLState.ERROR, ZenMLState.ERROR)
    assert service.endpoint.status.last_error == "the model no longer loads"

    daemon.gone = True
    service.update_status()
    assert service.status.state == ZenMLState.INACTIVE and service.endpoint.status.state == ZenMLState.INACTIVE
    assert no_connection(port)


def test_a_command_services_prediction_url_is_its_base_url(port, monkeypatch):
    """As the daemon reports it: a command server without a prediction_path serves no KServe route."""
    from daemon.config import ServiceConfig
    from modeld_zenml import ModeldDeploymentConfig, ModeldDeploymentService

    daemon = Daemon(port.getsockname()[1], idle_timeout=None)
    daemon.svc.config = ServiceConfig(model_name="web", command=["server", "{port}"])
    daemon.svc.endpoint.kserve = False
    daemon.svc.status.state = ServiceState.ACTIVE
    monkeypatch.setattr(
        ModeldDeploymentService, "client", lambda self: DaemonClient(transport=InMemoryTransport(daemon.handle), auto_start=False)
    )
    service = ModeldDeploymentService(uuid=daemon.svc.uuid, config=ModeldDeploymentConfig(model_name="web", command=["server", "{port}"]))
    service.update_status()
    assert service.prediction_url == f"http://127.0.0.1:{port.getsockname()[1]}" == daemon.svc.endpoint.prediction_url
    assert no_connection(port)


def test_idle_timeout_is_a_setting_of_the_zenml_config():
    from modeld_zenml import ModeldDeploymentConfig

    assert "idle_timeout" in ModeldDeploymentConfig.model_fields
    assert ModeldDeploymentConfig(model_name="iris", model_uri=IRIS, idle_timeout=30).to_modeld().idle_timeout == 30
    assert ModeldDeploymentConfig(model_name="iris", model_uri=IRIS).to_modeld().idle_timeout is None


def test_no_code_path_of_the_flavor_probes_a_port():
    """The flavor imports nothing that opens a connection of its own, and never asks ZenML's monitor to check."""
    import ast

    from daemon.testing import REPO

    for path in (REPO / "modeld_zenml").glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        probes = {"socket", "http.client", "urllib.request", "requests", "httpx", "aiohttp"}
        assert not {name for name in imported if name in probes or name.split(".")[0] in probes - {"http.client", "urllib.request"}}, (
            path.name,
            imported,
        )
        called = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        assert "check_endpoint_status" not in called, path.name
