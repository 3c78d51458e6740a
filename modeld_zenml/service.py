"""ZenML's view of a model server that the modeld daemon runs.

ZenML keeps its own record of every service (config, admin state, last
status, endpoint) in its store; modeld's daemon keeps the process, its pid
file and its ``service.json``. :class:`ModeldDeploymentService` joins the
two: every question ZenML asks (``check_status``, ``get_logs``) and every
order it gives (``provision``, ``deprovision``) is one call to the daemon
over its socket, for the modeld service named by ``status.modeld_uuid``.

That uuid is the ZenML service id when the service was first deployed, and
stays the same modeld uuid when a continuous deployment hands a model over
to a new ZenML record (see :mod:`modeld_zenml.deployer`). Both records
survive restarts: ZenML's in its store, modeld's on disk; if the daemon's
record is gone, ``provision`` (``zenml model-deployer models start``)
deploys the service again from the config ZenML kept, under the same uuid.

Status comes from the daemon only. ZenML's ``update_status()`` would health-check the
endpoint itself (an HTTP GET of its health URL); here the endpoint's state is what the daemon
reported (``ModeldDeploymentEndpoint.check_status``), so no code path connects to a model's
port to learn its state: ``zenml model-deployer models list`` does not wake a service that is
scaled to zero (ZenML's ``ServiceState.SCALED_TO_ZERO``, the daemon's state of the same name).
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit
from uuid import UUID

from pydantic import Field, PrivateAttr, model_validator
from zenml.constants import DEFAULT_SERVICE_START_STOP_TIMEOUT
from zenml.enums import ServiceState
from zenml.models.v2.misc.service import ServiceType
from zenml.services.service import BaseDeploymentService, ServiceConfig
from zenml.services.service_endpoint import (
    BaseServiceEndpoint,
    ServiceEndpointConfig,
    ServiceEndpointProtocol,
    ServiceEndpointStatus,
)
from zenml.services.service_monitor import HTTPEndpointHealthMonitor, HTTPEndpointHealthMonitorConfig
from zenml.services.service_status import ServiceStatus

from modeld_zenml.settings import modeld_fields, run_settings, with_run_settings

if TYPE_CHECKING:
    import daemon
    from daemon.client import DaemonClient

# modeld's run settings (every field of daemon.config.ServiceConfig that ZenML's ServiceConfig lacks),
# made from modeld's fields: None leaves modeld's default.
ModeldRunSettings = with_run_settings(ServiceConfig, "ModeldRunSettings", __name__)
_RUN_SETTINGS = tuple(run_settings())


class ModeldDeploymentConfig(ModeldRunSettings):  # type: ignore[misc,valid-type]  # a class made at run time
    """What to serve and how: ZenML's service fields plus modeld's run settings.

    ``model_uri`` is ``path/to/file.py:attr``, ``package.module:attr`` or a
    ``.pkl``/``.joblib`` file for modeld's built-in KServe-V1 server, or the
    ``{model_uri}`` of a ``command``. Every other modeld setting left ``None``
    takes modeld's default. ``modeld_home`` and ``modeld_socket`` are filled
    in by the deployer, so any process (the ZenML CLI in another shell) finds
    the daemon that runs the service.
    """

    modeld_home: str = ""
    modeld_socket: str = ""

    @model_validator(mode="after")
    def _valid_for_modeld(self) -> ModeldDeploymentConfig:
        # Fail where the config is written (the pipeline step), with modeld's message.
        self.to_modeld()
        return self

    def to_modeld(self) -> daemon.ServiceConfig:
        """The modeld ``ServiceConfig`` this describes (raises pydantic's ValidationError if it cannot run)."""
        from daemon.config import ServiceConfig as ModeldConfig

        fields = modeld_fields(self, _RUN_SETTINGS)
        return ModeldConfig(**fields)


class ModeldDeploymentServiceStatus(ServiceStatus):
    """ZenML's last view of the service, plus the modeld service it maps to."""

    modeld_uuid: UUID | None = None
    pid: int | None = None


class ModeldDeploymentEndpointConfig(ServiceEndpointConfig):
    """The path predictions go to (modeld's KServe route for a built-in server unless the config says
    otherwise; none, the base URL, for a command server without a prediction_path)."""

    prediction_path: str = ""


class ModeldDeploymentEndpoint(BaseServiceEndpoint):
    """The server's HTTP endpoint, as modeld reports it. Its state is the daemon's, never a probe of its own."""

    config: ModeldDeploymentEndpointConfig = Field(default_factory=ModeldDeploymentEndpointConfig)
    status: ServiceEndpointStatus = Field(default_factory=lambda: ServiceEndpointStatus(protocol=ServiceEndpointProtocol.HTTP))
    # Kept for the health check's URL (``healthcheck_url``) and for the records ZenML stored with it;
    # never asked to check anything (see check_status).
    monitor: HTTPEndpointHealthMonitor = Field(default_factory=HTTPEndpointHealthMonitor)

    def check_status(self) -> tuple[ServiceState, str]:
        """What the daemon last said of the server (``ModeldDeploymentService._sync``), with no connection to it.

        ZenML's own check would GET the health URL of every service it lists: a connection to a
        scaled-to-zero server's port is what wakes it, so ``zenml model-deployer models list`` would
        load every model. The daemon probes its servers itself; its answer is the endpoint's state.
        """
        return self.status.state, self.status.last_error

    @property
    def prediction_url(self) -> str | None:
        uri = self.status.uri
        # (an empty path: a command server without a prediction_path, whose URL is its base URL)
        return f"{uri}{self.config.prediction_path}" if uri else None


class ModeldDeploymentService(BaseDeploymentService):
    """A model server deployed through ZenML and run by the modeld daemon."""

    SERVICE_TYPE = ServiceType(
        name="modeld-deployment",
        type="model-serving",
        flavor="modeld",
        description="Model server supervised by the local modeld daemon",
    )

    config: ModeldDeploymentConfig
    status: ModeldDeploymentServiceStatus = Field(default_factory=ModeldDeploymentServiceStatus)
    endpoint: ModeldDeploymentEndpoint = Field(default_factory=ModeldDeploymentEndpoint)

    # How long the current start/stop may wait (ZenML's provision/deprovision take no timeout).
    _timeout: float = PrivateAttr(default=DEFAULT_SERVICE_START_STOP_TIMEOUT)
    # Set by the deployer for a continuous deployment: provision replaces the modeld service in place.
    _handover: bool = PrivateAttr(default=False)

    @property
    def modeld_uuid(self) -> UUID:
        """The modeld service behind this ZenML service (its own id unless a hand-over says otherwise)."""
        return self.status.modeld_uuid or self.uuid

    def client(self) -> DaemonClient:
        """A client of the daemon that runs this service (it starts the daemon if none answers)."""
        from daemon.client import DaemonClient

        return DaemonClient(home=self.config.modeld_home or None, socket_path=self.config.modeld_socket or None)

    # ------------------------------------------------------------ ZenML's hooks

    def check_status(self) -> tuple[ServiceState, str]:
        """The state modeld observes (it probes the server and restarts it; ZenML only reads)."""
        from daemon.exceptions import ModeldError, ServiceNotFound

        try:
            with self.client() as client:
                svc = client.get(self.modeld_uuid)
        except ServiceNotFound:
            self.status.pid = None
            message = f"the modeld daemon has no service {self.modeld_uuid} (deleted outside ZenML); starting it deploys it again"
            self._endpoint_state(ServiceState.INACTIVE, message)
            return ServiceState.INACTIVE, message
        except ModeldError as exc:
            self._endpoint_state(ServiceState.ERROR, f"cannot ask the modeld daemon: {exc}")
            return ServiceState.ERROR, f"cannot ask the modeld daemon: {exc}"
        self._sync(svc)
        # SCALED_TO_ZERO too (ZenML's member of the same name): no server runs; its next request loads it.
        return ServiceState(svc.status.state.value), svc.status.last_error

    def get_logs(self, follow: bool = False, tail: int | None = None) -> Generator[str, bool, None]:
        """The server's stdout and stderr from its ``service.log``, one line at a time."""
        return _lines(self._log_chunks(follow, tail))

    def _log_chunks(self, follow: bool, tail: int | None) -> Iterator[str]:
        with self.client() as client:
            yield from client.logs(self.modeld_uuid, tail=tail, follow=follow)

    def provision(self) -> None:
        """Make modeld run this service: start it, or deploy it if modeld does not know it (yet)."""
        from daemon.exceptions import DeployError, ServiceNotFound

        config = self.config.to_modeld()
        with self.client() as client:
            try:
                try:
                    if self._handover:
                        svc = client.deploy(config, replace=True, timeout=self._wait(), uuid=self.modeld_uuid)
                    else:
                        svc = client.start(self.modeld_uuid, timeout=self._wait())
                except ServiceNotFound:
                    svc = client.deploy(config, timeout=self._wait(), uuid=self.modeld_uuid)
            except DeployError:
                # timeout 0 means "do not wait": a server that keeps starting is what was asked for.
                svc = client.get(self.modeld_uuid)
                if self._timeout > 0 or svc.status.state.value != ServiceState.PENDING_STARTUP.value:
                    raise
        self._handover = False
        self.status.modeld_uuid = svc.uuid
        self._sync(svc)

    def deprovision(self, force: bool = False) -> None:
        """Stop the server (SIGTERM to its process group, SIGKILL after the timeout; ``force``: at once)."""
        from daemon.exceptions import ServiceNotFound

        with self.client() as client:
            try:
                svc = client.stop(self.modeld_uuid, timeout=self._grace(self._timeout), force=force)
            except ServiceNotFound:
                return  # nothing runs: stopped is what was asked for
        self._sync(svc)

    def remove(self, timeout: float, force: bool = False) -> None:
        """Stop the server and make modeld forget it (its folder, log and pid file)."""
        from daemon.exceptions import ServiceNotFound

        with self.client() as client:
            try:
                client.delete(self.modeld_uuid, timeout=self._grace(timeout), force=force)
            except ServiceNotFound:
                pass  # already gone
        self.status.pid = None

    def start(self, timeout: int = 0) -> None:
        """ZenML's start; ``provision`` waits on modeld up to ``timeout`` (0: does not wait)."""
        self._timeout = timeout
        super().start(timeout=timeout)

    def stop(self, timeout: int = 0, force: bool = False) -> None:
        """ZenML's stop; ``deprovision`` gives modeld ``timeout`` before SIGKILL."""
        self._timeout = timeout
        super().stop(timeout=timeout, force=force)

    @property
    def prediction_url(self) -> str | None:
        """Where to POST ``{"instances": [...]}``, as the daemon last reported it (asked if not known yet)."""
        if self.endpoint.prediction_url is None:
            self.update_status()
        return self.endpoint.prediction_url

    @property
    def healthcheck_url(self) -> str | None:
        return self.endpoint.monitor.get_healthcheck_uri(self.endpoint)

    # ---------------------------------------------------------------- helpers

    def _wait(self) -> float:
        """How long a start may wait for health: ZenML's 0 ("do not wait") is the shortest modeld accepts."""
        return max(float(self._timeout), 0.001)

    def _grace(self, timeout: float) -> float:
        """How long a stop may take before SIGKILL: ZenML's 0 ("do not wait") still stops gracefully
        (modeld takes the shorter of this and the service's ``stop_timeout``)."""
        return float(timeout) if timeout > 0 else float(DEFAULT_SERVICE_START_STOP_TIMEOUT)

    def _sync(self, svc: daemon.BaseService) -> None:
        """Copy what modeld reports (pid, host, port, paths) into ZenML's record."""
        self.status.modeld_uuid = svc.uuid
        self.status.pid = svc.status.pid
        port = svc.endpoint.port or None
        url = urlsplit(svc.endpoint.base_url)
        self.endpoint.status.protocol = ServiceEndpointProtocol.HTTP
        self.endpoint.status.hostname = url.hostname if port else None
        self.endpoint.status.port = port
        self.endpoint.config.prediction_path = urlsplit(svc.endpoint.prediction_url).path
        self.endpoint.monitor.config = HTTPEndpointHealthMonitorConfig(healthcheck_uri_path=svc.endpoint.health_path)
        self._endpoint_state(ServiceState(svc.status.state.value), svc.status.last_error)

    def _endpoint_state(self, state: ServiceState, error: str) -> None:
        """The endpoint's state is the daemon's view of the server (see ``ModeldDeploymentEndpoint.check_status``)."""
        self.endpoint.status.update_state(state)
        self.endpoint.status.last_error = error


def _lines(chunks: Iterator[str]) -> Generator[str, bool, None]:
    """Text chunks as whole lines (ZenML's CLI prints each item on its own line)."""
    pending = ""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split("\n")
        yield from lines
    if pending:
        yield pending
