"""The service model: what a model server is, what it should be, what it is.

ZenML's vocabulary (``ServiceState``, ``ServiceConfig``, ``ServiceStatus``,
``ServiceEndpoint``, ``BaseService``) so people who know it feel at home.
A ``BaseService`` serialises to one JSON document (``service.json``); the
``type`` field names the class, and :data:`SERVICE_REGISTRY` rebuilds the
right class from it in any process.
"""

from __future__ import annotations

import enum
import os
import time
from typing import Any, ClassVar
from urllib.parse import quote
from uuid import UUID, uuid4

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

# ServiceConfig and RestartPolicy live in config.py; they are re-exported here (public: a
# service holds its config, and flavors and users import both from daemon.models).
from .config import RestartPolicy as RestartPolicy, ServiceConfig as ServiceConfig


class ServiceState(str, enum.Enum):
    """Observed lifecycle state of a service (ZenML's members)."""

    INACTIVE = "inactive"  # no process: never started, stopped, or deleted
    PENDING_STARTUP = "pending_startup"  # process spawned, not yet answering its health probe
    ACTIVE = "active"  # process alive and its last health probe answered 200
    PENDING_SHUTDOWN = "pending_shutdown"  # asked to stop, process still alive
    ERROR = "error"  # failed to start, crash loop, or unhealthy; see last_error
    SCALED_TO_ZERO = "scaled_to_zero"  # no process: stopped for being idle (idle_timeout) or unloaded; wakes on demand

    def __str__(self) -> str:
        return self.value


class DesiredState(str, enum.Enum):
    """What supervision converges to (the admin state)."""

    RUNNING = "running"  # keep a healthy process, restart it when it dies
    STOPPED = "stopped"  # keep no process

    def __str__(self) -> str:
        return self.value


_edit_count = [0]  # moved by every attribute set on a service, its status or its endpoint


def changes() -> int:
    """A number that moves whenever any service, status or endpoint is edited in place.

    Views made from services (the API's cached JSON) are still good while it has not moved and
    they are asked about the same objects: new objects are made by replacing a field (an edit)
    or a whole service (a new object, told apart by identity).
    """
    return _edit_count[0]


class _EditCounted(BaseModel):
    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        _edit_count[0] += 1


class ServiceStatus(_EditCounted):
    """What was last observed of the service's process."""

    model_config = ConfigDict(extra="ignore")

    state: ServiceState = ServiceState.INACTIVE
    last_state: ServiceState = ServiceState.INACTIVE
    last_error: str = ""
    pid: int | None = None
    exit_code: int | None = None
    last_exit_code: int | None = None  # the code of the last server that exited, kept when another starts (/metrics)
    restarts: int = 0
    started_at: float | None = None
    updated_at: float = Field(default_factory=time.time)

    def moved_to(self, state: ServiceState, error: str | None = None) -> None:
        if state != self.state:
            self.last_state = self.state
            self.state = state
        if error is not None:
            self.last_error = error
        self.updated_at = time.time()


class ServiceEndpoint(_EditCounted):
    """Where the server answers."""

    model_config = ConfigDict(extra="ignore")

    protocol: str = "http"
    host: str = "127.0.0.1"
    port: int = 0
    health_path: str = "/health"
    prediction_path: str = ""
    model_name: str = ""
    unix_socket: str = Field("", description="the server's Unix socket, when it serves on one instead of a port")
    kserve: bool = Field(
        True,
        description="the server speaks KServe V1 (the built-in one): without a prediction_path, predictions go to "
        "/v1/models/<model_name>:predict; false (a command server): to its base URL",
    )
    root_path: str = Field(
        "",
        description="the path the service is served under on a host and port it shares (Ray Serve's route prefix, "
        "/<uuid>); health_path and prediction_path include it",
    )

    @property
    def base_url(self) -> str:
        if self.unix_socket:  # the requests-unixsocket convention: the socket path, percent-encoded, as host
            return f"http+unix://{quote(self.unix_socket, safe='')}"
        # A server bound to every address is reached on loopback.
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        host = f"[{host}]" if ":" in host else host
        return f"{self.protocol}://{host}:{self.port}"

    @property
    def service_url(self) -> str:
        """The service's own URL: its base URL, and its root path on a shared one (what ``ls`` shows)."""
        return self.base_url + self.root_path

    @computed_field  # type: ignore[prop-decorator]  # mypy refuses a decorator over a property (pydantic docs)
    @property
    def prediction_url(self) -> str:
        return f"{self.base_url}{self._prediction_path()}"

    def _prediction_path(self) -> str:
        if self.prediction_path or not self.kserve:
            return self.prediction_path
        return f"/v1/models/{quote(self.model_name, safe='')}:predict"

    @computed_field  # type: ignore[prop-decorator]  # mypy refuses a decorator over a property (pydantic docs)
    @property
    def health_check_url(self) -> str:
        return f"{self.base_url}{self.health_path}"

    def curl_example(self) -> str:
        """How to send one prediction from a shell."""
        path = self._prediction_path()
        where = (
            f"--unix-socket {self.unix_socket} http://localhost{path or '/'}" if self.unix_socket else f"{self.base_url}{path}"
        )
        return f"curl {where} -H 'content-type: application/json' -d '{{\"instances\": [...]}}'"


class ServiceType(BaseModel):
    """Names the class of a service, so any process can rebuild it from JSON."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: str = "model-serving"
    flavor: str = "modeld"
    name: str = "model-server"


class BaseService(_EditCounted):
    """A supervised model server: identity, config, desired and observed state."""

    model_config = ConfigDict(extra="ignore")

    SERVICE_TYPE: ClassVar[ServiceType] = ServiceType()

    uuid: UUID = Field(default_factory=uuid4)
    type: ServiceType = Field(default_factory=lambda: ServiceType())
    config: ServiceConfig
    status: ServiceStatus = Field(default_factory=ServiceStatus)
    endpoint: ServiceEndpoint = Field(default_factory=ServiceEndpoint)
    desired_state: DesiredState = DesiredState.RUNNING
    desired_reason: str = Field(
        "",
        description="why the desired state is what it is, when not asked for this service alone "
        "(e.g. stopped by `modeld daemon stop --all`)",
    )
    created_at: float = Field(default_factory=time.time)
    version: int = Field(1, description="bumped on every replace")
    service_path: str = Field("", description="the service's folder in the daemon's store")

    @model_validator(mode="after")
    def _command_endpoint(self) -> BaseService:
        """A command server is no KServe server: also in a record written before ``endpoint.kserve`` was."""
        if self.config.model_type == "command" and self.endpoint.kserve:
            self.endpoint.kserve = False
        return self

    @property
    def is_running(self) -> bool:
        return self.status.state == ServiceState.ACTIVE

    @property
    def is_stopped(self) -> bool:
        return self.status.state == ServiceState.INACTIVE

    @property
    def is_failed(self) -> bool:
        return self.status.state == ServiceState.ERROR

    @property
    def prediction_url(self) -> str:
        return self.endpoint.prediction_url

    @property
    def log_path(self) -> str:
        return os.path.join(self.service_path, "service.log") if self.service_path else ""

    def public(self) -> BaseService:
        """A copy fit to show: secret env values masked, also where the last error quotes them."""
        status = self.status
        scrubbed = self.config.scrub(status.last_error) if status.last_error else status.last_error
        if scrubbed != status.last_error:
            status = status.model_copy(update={"last_error": scrubbed})
        return self.model_copy(update={"config": self.config.redacted(), "status": status})


class ServiceRegistry:
    """Maps a service's ``type.name`` to its class (as ZenML's ServiceRegistry)."""

    def __init__(self) -> None:
        self._classes: dict[str, type[BaseService]] = {}

    def register(self, cls: type[BaseService]) -> type[BaseService]:
        self._classes[cls.SERVICE_TYPE.name] = cls
        return cls

    def service_class(self, name: str) -> type[BaseService]:
        try:
            return self._classes[name]
        except KeyError:
            raise ValueError(f"unknown service type {name!r}; known: {sorted(self._classes)}") from None

    def load(self, data: dict[str, Any]) -> BaseService:
        """Rebuild the right class from a JSON document (already parsed)."""
        name = (data.get("type") or {}).get("name", ServiceType().name)
        return self.service_class(name).model_validate(data, context={"stored": True})

    def load_json(self, raw: str | bytes) -> BaseService:
        import json

        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("service JSON must be an object")
        return self.load(data)


SERVICE_REGISTRY = ServiceRegistry()


@SERVICE_REGISTRY.register
class LocalModelService(BaseService):
    """A model server run and supervised by the local modeld daemon."""

    SERVICE_TYPE: ClassVar[ServiceType] = ServiceType(name="model-server")
