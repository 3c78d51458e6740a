"""The daemon's settings, in one place: :class:`DaemonSettings`, read once when the daemon starts.

Where a setting comes from; a later one wins::

    1. its default here (the same as before settings had a home);
    2. $MODELD_HOME/daemon.toml (optional), keys as the field names:   health_interval = 2
    3. the daemon process's environment, MODELD_<KEY>:                MODELD_HEALTH_INTERVAL=2

An empty environment variable counts as unset. An auto-started daemon inherits the environment of
the client that started it, so ``daemon.toml`` is the place for lasting settings.

``home`` and ``socket`` say where the daemon is, so neither comes from the file: they are what the
daemon was started with (``--home``/``MODELD_HOME``/default, ``--socket``/``MODELD_SOCKET``/
``<home>/modeld.sock``, see :class:`~daemon.paths.Paths`). The home cannot come from a file inside
it, and a client must find the socket before it could read any file (it reads no daemon.toml), so
a socket set there would be one no client finds. They are shown with the others all the same.

Invariants:

* a typo is never silent: a key in the file that is not a setting, a value that does not parse, a
  file that is not TOML, and a bad ``MODELD_<KEY>`` value each raise ``DaemonStartError`` naming
  the key and where it came from (the file's path and the key, or the variable's name); the
  daemon exits with 3 ("cannot start", the CLI's table) and the client's auto-start reports that
  line as it is;
* the units never read ``os.environ`` for a setting: the daemon builds this object once
  (``daemon_process.run``) and hands each unit what it needs.

Not settings (read where they are used, and left there):

* ``MODELD_DIE_AT`` and ``MODELD_FAIL_WRITE_AT``: fault injection for tests (``killpoints.py``,
  ``store.py``);
* ``MODELD_SERVICE_UUID`` and ``MODELD_PROCESS``: the tags the daemon sets for its children;
* ``MODELD_START_TIMEOUT``: how long a client waits for the daemon it auto-starts (the client's).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator

from .exceptions import DaemonStartError
from .paths import Paths

FILE_NAME = "daemon.toml"
ENV_PREFIX = "MODELD_"
DEFAULT = "default"  # the source of a setting nobody set
ARGUMENT = "argument"  # the source of a setting given on the daemon's command line
OFF = "off"  # the gateway setting that turns it off


class DaemonSettings(BaseModel):
    """Every daemon-level setting (see the module docstring for where each comes from)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    # Where the daemon is: from how it was started, never from daemon.toml.
    LOCATION: ClassVar[tuple[str, ...]] = ("home", "socket")

    home: Path = Field(description="the state folder (--home, MODELD_HOME; not in daemon.toml)")
    socket: Path = Field(description="the control socket (--socket, MODELD_SOCKET; not in daemon.toml)")
    log_level: str = Field("INFO", description="the daemon's log level (DEBUG, INFO, WARNING, ERROR, CRITICAL)")
    cgroup: str = Field(
        "",
        description="containment: empty picks cgroups where they can be had; a cgroup path names their base; "
        "off (or tag, 0, no) uses tags",
    )
    health_interval: float = Field(
        5.0, gt=0, allow_inf_nan=False, description="seconds between health probes of a healthy server"
    )
    warm_start: bool = Field(True, description="fork built-in servers from a pre-imported process (false: spawn cold)")
    gateway: str = Field(
        "127.0.0.1:9277",
        description="the gateway's address, host:port (one port for every model; :0 picks a free port once "
        "and keeps it); off: no gateway",
    )
    gateway_timeout: float = Field(
        300.0, gt=0, allow_inf_nan=False, description="seconds the gateway waits for a server's response head (then 504)"
    )
    gateway_max_body: int = Field(
        64 * 1024 * 1024, gt=0, description="the largest request body the gateway forwards, in bytes (then 413)"
    )
    max_active: int | None = Field(
        None,
        ge=1,
        description="the most servers of on-demand services (those with an idle_timeout) loaded at once; none: no cap",
    )
    memory_budget: int | None = Field(
        None,
        ge=1,
        description="bytes the servers of on-demand services may use together, by each one's peak "
        "(512MiB, 2GiB, 1.5GB are read too); none: no cap",
    )

    wake_timeout: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="seconds a request waits for a scaled-to-zero service to wake (then 504); default: the service's "
        "startup_timeout",
    )
    event_ring: int = Field(
        2_000, ge=1, description="the events the daemon keeps for a client that reconnects (GET /v1/events?since=)"
    )
    event_queue: int = Field(
        1_000, ge=1, description="new events a client of GET /v1/events may fall behind before its connection is closed"
    )

    apply: str = Field(
        "",
        description="a file `modeld apply` takes, applied once the daemon serves (after the rebuild); relative to "
        "the home; empty: none",
    )

    _sources: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in logging.getLevelNamesMapping():
            raise ValueError(f"unknown log level {value!r}; use DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level

    @field_validator("cgroup")
    @classmethod
    def _stripped(cls, value: str) -> str:
        return value.strip()

    @field_validator("gateway")
    @classmethod
    def _gateway_address(cls, value: str) -> str:
        value = value.strip()
        gateway_address(value)  # raises ValueError naming what is wrong
        return value.lower() if value.lower() == OFF else value

    @field_validator("max_active", "memory_budget", mode="before")
    @classmethod
    def _cap(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool):  # TOML's true is not a number (pydantic would take it for 1)
            raise ValueError("give a number, not true or false")
        if not isinstance(value, str):
            return value
        if value.strip().lower() in (OFF, "none"):  # a cap set in daemon.toml, lifted by MODELD_MAX_ACTIVE=off
            return None
        return byte_size(value) if info.field_name == "memory_budget" else value

    @property
    def apply_path(self) -> Path | None:
        """The file to apply at start, absolute (a relative one is under the home), or None."""
        if not self.apply:
            return None
        return self.home / Path(self.apply).expanduser()  # (an absolute right side wins)

    @property
    def gateway_address(self) -> tuple[str, int] | None:
        """(host, port) the gateway listens on (port 0: pick one once), or None for ``off``."""
        return gateway_address(self.gateway)

    @property
    def sources(self) -> dict[str, str]:
        """Where each setting came from: ``default``, the file's path, an environment variable's name,
        or for ``home`` and ``socket`` how the daemon was started (see ``Paths``)."""
        return {key: self._sources.get(key, DEFAULT) for key in type(self).model_fields}

    def named(self, key: str) -> str:
        """How a person would name where ``key`` was set: ``MODELD_CGROUP`` or ``<file>: cgroup``."""
        return _named(key, self.sources[key])

    def public(self) -> dict[str, Any]:
        """The effective settings as JSON (``GET /v1/daemon``'s ``settings``)."""
        return self.model_dump(mode="json")


def gateway_address(value: str) -> tuple[str, int] | None:
    """``host:port`` (``[v6]:port``; ``:port`` is 127.0.0.1) as (IP address, port), or None for ``off``.

    The host must be an IP address (``localhost`` is 127.0.0.1): the daemon binds it at start,
    without a lookup that could block it.
    """
    if value.strip().lower() == OFF:
        return None
    host, colon, port_text = value.strip().rpartition(":")
    if not colon or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r} is not host:port (e.g. 127.0.0.1:9277, :0 for a free port) or off")
    host = host.removeprefix("[").removesuffix("]") if host.startswith("[") else host
    host = {"": "127.0.0.1", "localhost": "127.0.0.1"}.get(host, host)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{value!r}: the host must be an IP address such as 127.0.0.1, not {host!r}") from None
    return host, int(port_text)


# Units of byte_size: decimal (kB, MB, GB, TB) and binary (KiB … TiB, and K, M, G, T as the CLI reads them).
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    **{f"{p}{s}": 1024 ** (i + 1) for i, p in enumerate("kmgt") for s in ("ib", "")},
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def byte_size(text: str) -> int:
    """``"512MiB"``, ``"2GiB"``, ``"1.5GB"``, ``"1000"`` as a number of bytes (rounded down); ValueError naming the text."""
    match = _SIZE.fullmatch(text)
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise ValueError(f"{text!r} is not a size: bytes, or a number with B, kB, MB, GB, TB, KiB, MiB, GiB or TiB")
    return int(float(match.group(1)) * unit) if "." in match.group(1) else int(match.group(1)) * unit


def format_size(size: int) -> str:
    """Bytes as people read them: 0 B, 512.0 KiB, 1.5 GiB."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def _named(key: str, source: str) -> str:
    if source == ARGUMENT:
        return "--" + key.replace("_", "-")
    return f"{source}: {key}" if source not in (DEFAULT, env_name(key)) else env_name(key)


def file_keys() -> list[str]:
    return [key for key in DaemonSettings.model_fields if key not in DaemonSettings.LOCATION]


def load_settings(
    paths: Paths, environ: Mapping[str, str] | None = None, arguments: Mapping[str, Any] | None = None
) -> DaemonSettings:
    """The effective settings of the daemon of ``paths``: defaults, then daemon.toml, then ``environ``,
    then ``arguments`` (the daemon's command line: ``--apply FILE``; their source is ``argument``).

    Raises ``DaemonStartError`` ("cannot start the daemon: <where>: <problem>") for a bad file or value.
    """
    environ = os.environ if environ is None else environ
    path = paths.home / FILE_NAME
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, value in _read_file(path).items():
        values[key], sources[key] = value, str(path)
    for key in file_keys():
        if environ.get(env_name(key)):  # an empty variable counts as unset
            values[key], sources[key] = environ[env_name(key)], env_name(key)
    for key, value in (arguments or {}).items():
        values[key], sources[key] = value, ARGUMENT
    try:
        settings = DaemonSettings(home=paths.home, socket=paths.socket, **values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = str(error["loc"][0]) if error["loc"] else "?"
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"{_named(key, sources.get(key, DEFAULT))}: {message} (got {values.get(key)!r})")
        raise DaemonStartError("cannot start the daemon: " + "; ".join(problems)) from None
    settings._sources.update(sources, home=paths.home_from, socket=paths.socket_from)
    return settings


def _read_file(path: Path) -> dict[str, Any]:
    """daemon.toml's keys (none if there is no file); every key must be a setting."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise DaemonStartError(f"cannot start the daemon: {path}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DaemonStartError(
            f"cannot start the daemon: {path}: cannot read it: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    known = file_keys()
    for key in data:
        if key in DaemonSettings.LOCATION:
            how = "--home or MODELD_HOME" if key == "home" else "--socket or MODELD_SOCKET (clients look for it there)"
            raise DaemonStartError(f"cannot start the daemon: {path}: {key}: not read from {FILE_NAME}; set {how}")
        if key not in known:
            raise DaemonStartError(
                f"cannot start the daemon: {path}: {key}: unknown setting (the settings are {', '.join(known)})"
            )
    return data
