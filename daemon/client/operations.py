"""The calls of the daemon's API, each defined once: the request it sends and how its answer is read.

Both clients are thin over this module: ``DaemonClient`` (blocking, ``calls.py``) and
``AsyncDaemonClient`` (asyncio, ``async_calls.py``). A method of either builds its :class:`Call`
here, has its transport carry ``Call.request``, and hands the answer to :meth:`Session.answer`,
which checks the daemon's version, raises an error answer as its class of ``daemon.exceptions``
and decodes the rest with ``Call.decode``. Only the I/O differs between the two clients.

Adding a call (``apply``, ``events``, ...): a builder here returning a :class:`Call` (or, for a
streamed answer, a :class:`~daemon.client.transport.Request`), then a method of one line in each
client. ``tests/test_async_client.py`` holds the two clients to the same public methods with the
same parameters, so a call added to one only fails until its twin is written.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote
from uuid import UUID

from .._version import __version__
from ..config import ServiceConfig
from ..exceptions import ModeldError, error_from_dict
from ..models import SERVICE_REGISTRY, BaseService, ServiceState
from ..paths import Paths
from .transport import UNFOLLOWED_STREAM_TIMEOUT, Request, Response

T = TypeVar("T")

DEFAULT_TIMEOUT = 300.0
MARGIN = 30.0  # seconds beyond an operation's own timeout before the client gives up on the socket
QUICK = 60.0  # seconds a call without a timeout of its own (find, get, ...) may take before the client gives up
LONGEST_WAIT = 1e9  # seconds (31 years); a socket timeout past ~9.2e9 s overflows


class VersionMismatchWarning(UserWarning):
    """The client and the running daemon are different versions of modeld."""


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request, and how its (successful) JSON answer becomes the call's result."""

    request: Request
    decode: Callable[[Any], T]
    wait: float | None = None  # the operation's own timeout (deploy, start, stop...); None: a quick call
    text: bool = False  # a good answer is text (decoded as UTF-8 and given to ``decode``), not JSON


# ------------------------------------------------------------------ decoders


def service(data: Any) -> BaseService:
    return SERVICE_REGISTRY.load(data)


def services(data: Any) -> list[BaseService]:
    return [service(item) for item in data["services"]]


def nothing(data: Any) -> None:
    return None


def as_is(data: Any) -> Any:
    return data


def as_dict(data: Any) -> dict[str, Any]:
    return dict(data)


def started_and_failed(data: Any) -> tuple[list[BaseService], dict[str, ModeldError]]:
    failed = {uuid: error_from_dict(500, {"error": error}) for uuid, error in data.get("failed", {}).items()}
    return services(data), failed


# ------------------------------------------------------------------ builders


def _flag(value: bool) -> str | None:
    return "true" if value else None


def _quote(uuid: UUID | str) -> str:
    return quote(str(uuid), safe="")


def deploy(config: ServiceConfig, replace: bool, timeout: float, uuid: UUID | str | None) -> Call[BaseService]:
    body: dict[str, Any] = {
        "config": config.with_client_defaults().model_dump(mode="json"),
        "replace": replace,
        "timeout": timeout,
    }
    if uuid is not None:
        body["uuid"] = str(uuid)
    return Call(Request("POST", "/v1/services", body=body), service, timeout)


def find(
    running: bool, service_uuid: UUID | str | None, filters: dict[str, Any], state: ServiceState | str | None
) -> Call[list[BaseService]]:
    query = {
        "running": _flag(running),
        "service_uuid": str(service_uuid) if service_uuid is not None else None,
        **filters,
        "state": str(state) if state is not None else None,
    }
    return Call(Request("GET", "/v1/services", query), services)


def get(uuid: UUID | str) -> Call[BaseService]:
    return Call(Request("GET", f"/v1/services/{_quote(uuid)}"), service)


def start(uuid: UUID | str, timeout: float) -> Call[BaseService]:
    return Call(Request("POST", f"/v1/services/{_quote(uuid)}/start", {"timeout": timeout}), service, timeout)


def unload(uuid: UUID | str) -> Call[BaseService]:
    return Call(Request("POST", f"/v1/services/{_quote(uuid)}/unload"), service)


def start_all(timeout: float) -> Call[tuple[list[BaseService], dict[str, ModeldError]]]:
    return Call(Request("POST", "/v1/services/start", {"timeout": timeout}), started_and_failed, timeout)


def stop(uuid: UUID | str, timeout: float, force: bool) -> Call[BaseService]:
    query = {"timeout": timeout, "force": _flag(force)}
    return Call(Request("POST", f"/v1/services/{_quote(uuid)}/stop", query), service, timeout)


def delete(uuid: UUID | str, timeout: float, force: bool) -> Call[None]:
    query = {"timeout": timeout, "force": _flag(force)}
    return Call(Request("DELETE", f"/v1/services/{_quote(uuid)}", query), nothing, timeout)


def logs(uuid: UUID | str, tail: int | None, follow: bool) -> Request:
    """Streamed: the transport's ``stream`` carries it, on a connection of its own."""
    return Request(
        "GET",
        f"/v1/services/{_quote(uuid)}/logs",
        {"tail": tail, "follow": _flag(follow)},
        timeout=None if follow else UNFOLLOWED_STREAM_TIMEOUT,
    )


def daemon_info(start: bool = True) -> Call[dict[str, Any]]:
    return Call(Request("GET", "/v1/daemon", start=start), as_dict)


def shutdown(stop_services: bool) -> Call[dict[str, Any]]:
    """Never starts a daemon to shut it down."""
    return Call(Request("POST", "/v1/daemon/shutdown", {"stop_services": _flag(stop_services)}, start=False), as_dict)


def openapi() -> Call[dict[str, Any]]:
    return Call(Request("GET", "/v1/openapi.json"), as_dict)


def metrics() -> Call[str]:
    return Call(Request("GET", "/metrics"), str, text=True)


def raw(
    method: str,
    path: str,
    body: Any = None,
    query: dict[str, Any] | None = None,
    timeout: float | None = None,
    start: bool = True,
) -> Call[Any]:
    """Any request, its JSON answer as it came (the clients' ``_call``, for tests and calls not yet typed)."""
    return Call(Request(method, path, query, body, start=start), as_is, timeout)


# ------------------------------------------------------------------ what both clients share


class Session:
    """What a client keeps between calls, whatever its I/O: its home, its timeout, the daemon version seen."""

    client_version = __version__

    def __init__(self, paths: Paths, timeout: float | None):
        self.paths = paths
        self.timeout = timeout
        self.daemon_version: str | None = None

    def request(self, call: Call[Any]) -> Request:
        """``call.request`` with the seconds its socket may wait for the answer: the client's
        ``timeout`` if set, else the operation's own and a margin."""
        seconds: float | None = self.timeout if self.timeout is not None else (call.wait or QUICK) + MARGIN
        if seconds is not None and not seconds < LONGEST_WAIT:
            seconds = None  # also inf and nan, which a socket cannot hold either: wait as long as it takes
        return dataclasses.replace(call.request, timeout=seconds)

    def streamed(self, request: Request) -> Request:
        """A stream's request: one that ends by itself (not followed) waits the client's ``timeout`` if set."""
        if request.timeout is None or self.timeout is None:
            return request
        return dataclasses.replace(request, timeout=self.timeout)

    def answer(self, call: Call[T], response: Response) -> T:
        """The call's result from the daemon's answer; an error answer is raised as its class."""
        self._check_version(response.headers.get("x-modeld-version"))
        if call.text and response.status < 400:
            return call.decode(response.body.decode())
        data = response.json()
        if response.status >= 400:
            raise error_from_dict(response.status, data)
        return call.decode(data)

    def _check_version(self, version: str | None) -> None:
        if version is None or version == self.daemon_version:
            return
        self.daemon_version = version
        if version != self.client_version:
            relation = "newer" if _version_tuple(self.client_version) > _version_tuple(version) else "older"
            warnings.warn(
                f"this modeld client ({self.client_version}) is {relation} than the running daemon ({version}); "
                "restart the daemon (`modeld daemon stop && modeld daemon start`) to run the same version",
                VersionMismatchWarning,
                stacklevel=5,  # the caller of the client's method (method -> _run -> answer -> here)
            )


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("."))
