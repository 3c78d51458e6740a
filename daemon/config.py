"""A service's settings: ``ServiceConfig`` (and its ``RestartPolicy``), with the checks input must pass.

This is the one definition of what can be configured: ``modeld deploy``'s options
(deployers/cli.py) and the ZenML deployment config (modeld_zenml/settings.py) are made
from these fields. Checks added after records were first written apply to input only
(see ``_read_back``): a ``service.json`` an earlier version accepted still loads.
``daemon.models`` re-exports ``ServiceConfig`` and ``RestartPolicy`` (a service holds its
config; flavors import them from there).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

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
_PLACEHOLDER_LONGEST = {"{host}": 64, "{port}": 5, "{uuid}": 36, "{name}": 200}
# A field's unit, for those who write its value (the CLI reads 10M, and shows the default so).
SECONDS: dict[str, Any] = {"unit": "seconds"}
BYTES: dict[str, Any] = {"unit": "bytes"}


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
    ``python``, ``working_dir`` and ``search_path`` are filled in by the
    deploying client (its interpreter, its working directory and its PATH)
    unless given.

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
    search_path: str = Field(
        "",
        description="PATH the command and its children resolve programs with; filled from the deploying client's "
        "PATH; empty: the daemon's PATH (env's PATH, when given, wins)",
    )
    restart: RestartPolicy = Field(
        default_factory=RestartPolicy, description="when and how fast a crashed or hung server is started again"
    )
    startup_timeout: float = Field(
        300.0, gt=0, json_schema_extra=SECONDS, description="seconds a starting server may take to answer its health probe"
    )
    idle_timeout: float | None = Field(
        None,
        gt=0,
        json_schema_extra=SECONDS,
        description="seconds without a request after which the server is stopped (scaled to zero) until the next "
        "request wakes it; default: never",
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
    project: str = Field(
        "", max_length=200, description="the set it belongs to (`modeld apply`'s file names it; `--prune` deletes within it)"
    )

    @field_validator("health_path", "prediction_path")
    @classmethod
    def _path_absolute(cls, value: str, info: ValidationInfo) -> str:
        if (value or info.field_name == "health_path") and not value.startswith("/"):
            raise ValueError("must start with '/'")
        if any(c.isspace() for c in value):
            raise ValueError("must not contain white space")
        return value

    @field_validator("name", "model_name", "project")
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

    @field_validator("search_path")
    @classmethod
    def _search_path_fits(cls, value: str, info: ValidationInfo) -> str:
        """The server gets it as its environment's ``PATH=...`` entry: what exec takes for one."""
        if "\x00" in value:
            raise ValueError(NUL_MESSAGE)
        if not _read_back(info) and len("PATH=") + _os_size(value, "search_path") + 1 > MAX_ARG_STRLEN:
            raise ValueError(
                f"is {_os_size(value, 'search_path')} bytes; as the server's PATH=... it must fit in "
                f"{MAX_ARG_STRLEN - 1} bytes (MAX_ARG_STRLEN)"
            )
        return value

    @field_validator("host")
    @classmethod
    def _host_syntax(cls, value: str, info: ValidationInfo) -> str:
        """Syntax only: whether the name resolves is the daemon's to find out (a lookup may be slow)."""
        if "\x00" in value:
            raise ValueError(NUL_MESSAGE)
        problem = None if _read_back(info) else host_syntax_error(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("command", "stop_command")
    @classmethod
    def _argv_fits_exec(cls, value: list[str], info: ValidationInfo) -> list[str]:
        model_uri = info.data.get("model_uri", "")
        for i, item in enumerate(value):
            if "\x00" in item:
                raise ValueError(f"item {i}: {NUL_MESSAGE}")
            if _read_back(info):
                continue
            # As exec will see it: {model_uri}, {host}, {port} filled in (at their longest).
            size = (
                _os_size(item, f"item {i}")
                + 1
                + item.count("{model_uri}") * (_os_size(model_uri, "model_uri") - len("{model_uri}"))
            )
            size += sum(item.count(key) * (longest - len(key)) for key, longest in _PLACEHOLDER_LONGEST.items())
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
            if _read_back(info) and "\x00" not in key + text:
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
        """Fill in the interpreter, working directory and PATH of the calling process; a relative
        ``working_dir`` is made absolute against the caller's (the daemon's own is not the caller's)."""
        update: dict[str, Any] = {}
        if not self.python and self.model_type != "command":
            update["python"] = sys.executable
        if not self.working_dir:
            update["working_dir"] = os.getcwd()
        elif not os.path.isabs(self.working_dir):
            update["working_dir"] = os.path.abspath(self.working_dir)
        if not self.search_path and os.environ.get("PATH"):
            update["search_path"] = os.environ["PATH"]
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


def _read_back(info: ValidationInfo) -> bool:
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
    if not _read_back(info) or not isinstance(data, dict) or not any(data.get(f, 0) is None for f in fields):
        return data
    return {**data, **{f: sys.float_info.max for f in fields if f in data and data[f] is None}}


def _os_size(text: str, what: str) -> int:
    """Bytes of ``text`` as the OS gets it (a path, an argument, an environment entry)."""
    try:
        return len(os.fsencode(text))
    except UnicodeError:
        raise ValueError(f"{what} is not valid Unicode text (a lone surrogate)") from None


def replace_key(config: ServiceConfig) -> tuple[str, str, str, str, str]:
    """What a deploy with replace and no uuid matches: the same pipeline, step and model names (ZenML's
    rule), and the same project and name (two services of different names are never each other's)."""
    return (config.project, config.name, config.pipeline_name, config.pipeline_step_name, config.model_name)
