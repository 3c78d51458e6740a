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
import sys
import time
from typing import Any, ClassVar, Literal
from urllib.parse import quote
from uuid import UUID, uuid4

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, computed_field, field_validator, model_validator

from .addresses import host_syntax_error

SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")
REDACTED = "********"
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib")
# The kernel refuses an argv item or environment entry (``KEY=VALUE``) longer than this, its
# terminating NUL included, with E2BIG (MAX_ARG_STRLEN: 32 pages of 4 KiB).
MAX_ARG_STRLEN = 128 * 1024
MAX_PATH = 4096  # PATH_MAX: no longer file name can be opened
NUL_MESSAGE = "a NUL byte cannot be part of a path, an argument or an environment variable"
# Longest text a {host} or {port} in a command's argv becomes (an IPv6 address with a zone; 65535).
_FILLED = {"{host}": 64, "{port}": 5, "{uuid}": 36, "{name}": 200}
# A field's unit, for those who write its value (the CLI reads 10M, and shows the default so).
SECONDS: dict[str, Any] = {"unit": "seconds"}
BYTES: dict[str, Any] = {"unit": "bytes"}


class ServiceState(str, enum.Enum):
    """Observed lifecycle state of a service (ZenML's members)."""

    INACTIVE = "inactive"  # no process: never started, stopped, or deleted
    PENDING_STARTUP = "pending_startup"  # process spawned, not yet answering its health probe
    ACTIVE = "active"  # process alive and its last health probe answered 200
    PENDING_SHUTDOWN = "pending_shutdown"  # asked to stop, process still alive
    ERROR = "error"  # failed to start, crash loop, or unhealthy; see last_error

    def __str__(self) -> str:
        return self.value


class DesiredState(str, enum.Enum):
    """What supervision converges to (the admin state)."""

    RUNNING = "running"  # keep a healthy process, restart it when it dies
    STOPPED = "stopped"  # keep no process

    def __str__(self) -> str:
        return self.value


class RestartPolicy(BaseModel):
    """When and how fast a crashed server is started again."""

    # Infinity and NaN are refused: JSON cannot store them (pydantic writes null), so a record
    # holding one could not be read back.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _stored_infinity(cls, data: Any, info: ValidationInfo) -> Any:
        return _infinity_read_back(data, info, ("backoff_initial", "backoff_max", "healthy_reset"))

    mode: Literal["on-failure", "always", "never"] = Field(
        "on-failure",
        description="when an exited server is started again: on-failure (an exit code other than 0), always, or never",
    )
    max_restarts: int = Field(5, ge=0, description="restarts in a row without a healthy run before giving up")
    backoff_initial: float = Field(
        0.1,
        ge=0,
        json_schema_extra=SECONDS,
        description="seconds before the second restart in a row, doubled each time after (the first exit after a healthy run restarts at once)",
    )
    backoff_max: float = Field(10.0, ge=0, json_schema_extra=SECONDS, description="cap of the doubling backoff, in seconds")
    healthy_reset: float = Field(
        10.0, ge=0, json_schema_extra=SECONDS, description="seconds of healthy run that reset the restart count"
    )
    liveness_failures: int = Field(
        3, ge=1, le=1_000_000, description="failed health probes in a row after which a server that was healthy counts as hung"
    )
    on_unhealthy: bool = Field(
        True,
        description="restart a hung server (stop, then start: a restart with the usual backoff); false: report it in error and leave it",
    )


class ServiceConfig(BaseModel):
    """Everything needed to (re)create a model server.

    The first eight fields are ZenML's; the rest say how to run it.
    ``python`` and ``working_dir`` are filled in by the deploying client
    (its interpreter and its working directory) unless given.

    This is the one definition of a service's settings: ``modeld deploy``'s
    options (deployers/cli/options.py) and the ZenML deployment config
    (modeld_zenml/settings.py) are made from these fields, their types,
    defaults and descriptions (each field needs one: it is the option's
    help). ``json_schema_extra`` says what else they need to know:
    ``unit`` ("seconds", "bytes") picks how a value is written on the
    command line.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    service_type: str = Field("model-server", description="ZenML's service type name (kept as given)")
    name: str = Field("", max_length=200, description="service name, shown by `modeld ls` and usable instead of the uuid")
    description: str = Field("", max_length=10_000, description="free text")
    pipeline_name: str = Field("", max_length=1000, description="pipeline that deployed it")
    pipeline_run_id: str = Field("", max_length=1000, description="pipeline run id")
    pipeline_step_name: str = Field("", max_length=1000, description="pipeline step that deployed it")
    model_name: str = Field("", max_length=200, description="model name: the KServe route is /v1/models/<model_name>")
    model_uri: str = Field(
        "", max_length=4096, description="module:attr, path/file.py:attr, a .pkl/.joblib file, or what a command server loads"
    )
    model_type: Literal["python", "pickle", "command"] = Field(
        "python",
        description="runtime: the built-in server for a python or pickle model, or any argv (command); "
        "without it, command if an argv is given, pickle for a .pkl/.pickle/.joblib model_uri",
    )
    command: list[str] = Field(
        default_factory=list, description="argv of a `command` server; may use {port} {host} {model_uri} {uuid} {name}"
    )
    health_path: str = Field("/health", max_length=MAX_PATH, description="path probed for health")
    prediction_path: str = Field(
        "", description="path of predictions, e.g. /invocations for mlflow; default: KServe's /v1/models/<model_name>:predict"
    )
    host: str = Field(
        "127.0.0.1", description="address the server binds: an IP address, or a name (the daemon resolves it, IPv4 first)"
    )
    port: int = Field(0, ge=0, le=65535, description="port the server binds; 0: pick a free one once, then keep it")
    bind_unix: bool = Field(False, description="serve a built-in model on a Unix socket private to the user, not on TCP")
    env: dict[str, str] = Field(default_factory=dict, description="environment of the server")
    secret_env: list[str] = Field(default_factory=list, description="env keys never echoed, beside those that look secret")
    python: str = Field(
        "", max_length=MAX_PATH, description="interpreter for python/pickle models; default: the deploying client's"
    )
    working_dir: str = Field("", max_length=MAX_PATH, description="cwd of the server; default: the deploying client's")
    restart: RestartPolicy = Field(
        default_factory=RestartPolicy, description="when and how fast a crashed or hung server is started again"
    )
    startup_timeout: float = Field(
        300.0, gt=0, json_schema_extra=SECONDS, description="seconds a starting server may take to answer its health probe"
    )
    stop_timeout: float = Field(10.0, ge=0, json_schema_extra=SECONDS, description="seconds between SIGTERM and SIGKILL on stop")
    stop_command: list[str] = Field(
        default_factory=list,
        description="argv run before the signals on every stop, and after an unexpected exit before a restart "
        "(e.g. docker stop {name}); placeholders as command's plus {uuid} and {name}; bounded by stop_timeout",
    )
    log_max_bytes: int = Field(
        10 * 1024 * 1024, ge=4096, le=1 << 40, json_schema_extra=BYTES, description="size at which service.log is rotated"
    )
    log_backups: int = Field(2, ge=0, le=1000, description="rotated files kept: service.log.1 … service.log.N")

    @field_validator("health_path", "prediction_path")
    @classmethod
    def _path_absolute(cls, value: str, info: ValidationInfo) -> str:
        if (value or info.field_name == "health_path") and not value.startswith("/"):
            raise ValueError("must start with '/'")
        if any(c.isspace() for c in value):
            raise ValueError("must not contain white space")
        return value

    @field_validator("name", "model_name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if "/" in value or any(not c.isprintable() for c in value):
            raise ValueError("must not contain '/' or control characters (it is part of URLs and tables)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _stored_infinity(cls, data: Any, info: ValidationInfo) -> Any:
        return _infinity_read_back(data, info, ("startup_timeout", "stop_timeout"))

    @model_validator(mode="before")
    @classmethod
    def _infer_model_type(cls, data: Any) -> Any:
        """Without an explicit model_type: an argv means `command`, a pickle file means `pickle`."""
        if isinstance(data, dict) and "model_type" not in data:
            uri = str(data.get("model_uri") or "")
            if data.get("command"):
                data = {**data, "model_type": "command"}
            elif uri.endswith(PICKLE_SUFFIXES):
                data = {**data, "model_type": "pickle"}
        return data

    @field_validator("working_dir", "python", "model_uri")
    @classmethod
    def _path_text(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError(NUL_MESSAGE)
        return value

    @field_validator("host")
    @classmethod
    def _host_syntax(cls, value: str, info: ValidationInfo) -> str:
        """Syntax only: whether the name resolves is the daemon's to find out (a lookup may be slow)."""
        if "\x00" in value:
            raise ValueError(NUL_MESSAGE)
        problem = None if _stored(info) else host_syntax_error(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("command", "stop_command")
    @classmethod
    def _argv(cls, value: list[str], info: ValidationInfo) -> list[str]:
        model_uri = info.data.get("model_uri", "")
        for i, item in enumerate(value):
            if "\x00" in item:
                raise ValueError(f"item {i}: {NUL_MESSAGE}")
            if _stored(info):
                continue
            # As exec will see it: {model_uri}, {host}, {port} filled in (at their longest).
            size = (
                _os_size(item, f"item {i}")
                + 1
                + item.count("{model_uri}") * (_os_size(model_uri, "model_uri") - len("{model_uri}"))
            )
            size += sum(item.count(key) * (longest - len(key)) for key, longest in _FILLED.items())
            if size > MAX_ARG_STRLEN:
                raise ValueError(
                    f"item {i} is {size - 1} bytes as the server gets it; the kernel takes at most "
                    f"{MAX_ARG_STRLEN - 1} bytes per argument (MAX_ARG_STRLEN)"
                )
        return value

    @field_validator("env")
    @classmethod
    def _env_entries(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        for key, text in value.items():
            shown = repr(key) if len(key) <= 60 else repr(key[:60]) + "..."
            if _stored(info) and "\x00" not in key + text:
                continue
            if not key:
                raise ValueError("a variable name cannot be empty")
            if "=" in key:
                raise ValueError(f"the name {shown} contains '=', which ends a variable's name")
            if "\x00" in key or "\x00" in text:
                raise ValueError(f"{shown}: {NUL_MESSAGE}")
            size = _os_size(key, f"the name {shown}") + 1 + _os_size(text, f"the value of {shown}") + 1
            if size > MAX_ARG_STRLEN:  # the value is never shown: it may be a secret
                raise ValueError(
                    f"{shown}: the entry NAME=VALUE is {size - 1} bytes; the kernel takes at most "
                    f"{MAX_ARG_STRLEN - 1} bytes per environment entry (MAX_ARG_STRLEN, 128 KiB)"
                )
        return value

    @model_validator(mode="after")
    def _runtime_needs(self) -> ServiceConfig:
        if self.model_type == "command" and not self.command:
            raise ValueError("model_type 'command' needs a command (argv list)")
        if self.model_type != "command" and not self.model_uri:
            raise ValueError(f"model_type {self.model_type!r} needs a model_uri")
        if self.bind_unix and self.model_type == "command":
            raise ValueError(
                "bind_unix works with the built-in python and pickle servers; a command server binds what its argv says"
            )
        if self.bind_unix and self.port:
            raise ValueError("bind_unix serves on a Unix socket: leave port at 0")
        return self

    def with_client_defaults(self) -> ServiceConfig:
        """Fill in the interpreter and working directory of the calling process."""
        update: dict[str, Any] = {}
        if not self.python and self.model_type != "command":
            update["python"] = sys.executable
        if not self.working_dir:
            update["working_dir"] = os.getcwd()
        return self.model_copy(update=update) if update else self

    def is_secret(self, key: str) -> bool:
        upper = key.upper()
        return key in self.secret_env or any(marker in upper for marker in SECRET_MARKERS)

    def secret_values(self) -> set[str]:
        """The env values to mask in text."""
        return {v for k, v in self.env.items() if len(v) >= 4 and self.is_secret(k)}  # shorter ones would mask ordinary words

    def scrub(self, text: str, *also: ServiceConfig) -> str:
        """``text`` with every secret env value masked: a server may print its token, an error may quote that.

        ``also``: other configs whose secrets may be in the same text (the previous version's, during a replace).
        """
        values = self.secret_values().union(*(c.secret_values() for c in also))
        for value in sorted(values, key=len, reverse=True):  # longest first: one containing another is masked whole
            text = text.replace(value, REDACTED)
        return text

    def redacted(self) -> ServiceConfig:
        """A copy whose secret env values are masked, for anything shown or logged."""
        if not any(self.is_secret(k) for k in self.env):
            return self
        env = {k: (REDACTED if self.is_secret(k) else v) for k, v in self.env.items()}
        return self.model_copy(update={"env": env})


def _stored(info: ValidationInfo) -> bool:
    """Whether a record is being read back (see :meth:`ServiceRegistry.load`), not taken as input.

    The checks that came after records were first written (a host's syntax, env names, sizes
    exec refuses) apply to input only: a record an earlier version accepted still loads, and
    its server is never set aside for them (one that cannot start says why when it tries).
    """
    return bool(info.context and info.context.get("stored"))


def _infinity_read_back(data: Any, info: ValidationInfo, fields: tuple[str, ...]) -> Any:
    """An earlier version took infinity in these fields and stored it as null (all JSON has for
    it; -inf and NaN were refused by their bounds): read back, null is the largest float, which
    waits as long, so the record loads and its server is not set aside."""
    if not _stored(info) or not isinstance(data, dict) or not any(data.get(f, 0) is None for f in fields):
        return data
    return {**data, **{f: sys.float_info.max for f in fields if f in data and data[f] is None}}


def _os_size(text: str, what: str) -> int:
    """Bytes of ``text`` as the OS gets it (a path, an argument, an environment entry)."""
    try:
        return len(os.fsencode(text))
    except UnicodeError:
        raise ValueError(f"{what} is not valid Unicode text (a lone surrogate)") from None


_changes = [0]  # moved by every attribute set on a service, its status or its endpoint


def changes() -> int:
    """A number that moves whenever any service, status or endpoint is edited in place.

    Views made from services (the API's cached JSON) are still good while it has not moved and
    they are asked about the same objects: new objects are made by replacing a field (an edit)
    or a whole service (a new object, told apart by identity).
    """
    return _changes[0]


class _Counted(BaseModel):
    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        _changes[0] += 1


class ServiceStatus(_Counted):
    """What was last observed of the service's process."""

    model_config = ConfigDict(extra="ignore")

    state: ServiceState = ServiceState.INACTIVE
    last_state: ServiceState = ServiceState.INACTIVE
    last_error: str = ""
    pid: int | None = None
    exit_code: int | None = None
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


class ServiceEndpoint(_Counted):
    """Where the server answers."""

    model_config = ConfigDict(extra="ignore")

    protocol: str = "http"
    host: str = "127.0.0.1"
    port: int = 0
    health_path: str = "/health"
    prediction_path: str = ""
    model_name: str = ""
    unix_socket: str = Field("", description="the server's Unix socket, when it serves on one instead of a port")

    @property
    def base_url(self) -> str:
        if self.unix_socket:  # the requests-unixsocket convention: the socket path, percent-encoded, as host
            return f"http+unix://{quote(self.unix_socket, safe='')}"
        # A server bound to every address is reached on loopback.
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        host = f"[{host}]" if ":" in host else host
        return f"{self.protocol}://{host}:{self.port}"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def prediction_url(self) -> str:
        path = self.prediction_path or f"/v1/models/{quote(self.model_name, safe='')}:predict"
        return f"{self.base_url}{path}"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def health_check_url(self) -> str:
        return f"{self.base_url}{self.health_path}"

    def curl_example(self) -> str:
        """How to send one prediction from a shell."""
        path = self.prediction_path or f"/v1/models/{quote(self.model_name, safe='')}:predict"
        where = f"--unix-socket {self.unix_socket} http://localhost{path}" if self.unix_socket else f"{self.base_url}{path}"
        return f"curl {where} -H 'content-type: application/json' -d '{{\"instances\": [...]}}'"


class ServiceType(BaseModel):
    """Names the class of a service, so any process can rebuild it from JSON."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: str = "model-serving"
    flavor: str = "modeld"
    name: str = "model-server"


class BaseService(_Counted):
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
