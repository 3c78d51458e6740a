"""``DaemonClient``: the typed calls of the daemon's API, over a :class:`~daemon.client.transport.Transport`.

Invariants:

* each method is one request (``logs`` one streamed request), built here and
  carried by the transport; services come back as ``BaseService`` objects
  and errors as the classes of ``daemon.exceptions``;
* by default the transport is the daemon's Unix socket, and any call that
  finds no daemon starts one (``autostart``) unless ``auto_start`` is off;
  ``shutdown`` and ``is_running`` never start one (decided per request);
* the client warns once (``VersionMismatchWarning``) for each daemon version
  it meets that is not its own.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote
from uuid import UUID

from .._version import __version__
from ..config import ServiceConfig
from ..exceptions import DaemonNotRunning, ModeldError, error_from_dict
from ..filters import filters_given
from ..models import SERVICE_REGISTRY, BaseService, ServiceState
from ..paths import Paths
from .autostart import ensure_daemon
from .transport import Request, Transport, UnixSocketTransport

DEFAULT_TIMEOUT = 300.0
_MARGIN = 30.0  # seconds beyond an operation's own timeout before the client gives up on the socket
_LONGEST_WAIT = 1e9  # seconds (31 years); a socket timeout past ~9.2e9 s overflows


class VersionMismatchWarning(UserWarning):
    """The client and the running daemon are different versions of modeld."""


class DaemonClient:
    """Talks to the modeld daemon of one home (or through the ``transport`` given, e.g. in tests)."""

    client_version = __version__

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        socket_path: str | os.PathLike[str] | None = None,
        auto_start: bool = True,
        timeout: float | None = None,
        transport: Transport | None = None,
    ):
        self.paths = Paths(home, socket_path)
        self.timeout = timeout
        self.daemon_version: str | None = None
        if transport is None:
            paths = self.paths
            transport = UnixSocketTransport(paths, start_daemon=(lambda: ensure_daemon(paths)) if auto_start else None)
        self.transport = transport

    @property
    def auto_start(self) -> bool:
        return getattr(self.transport, "start_daemon", None) is not None

    # ------------------------------------------------------------------ calls

    def deploy(
        self, config: ServiceConfig, replace: bool = False, timeout: float = DEFAULT_TIMEOUT, uuid: UUID | str | None = None
    ) -> BaseService:
        body: dict[str, Any] = {
            "config": config.with_client_defaults().model_dump(mode="json"),
            "replace": replace,
            "timeout": timeout,
        }
        if uuid is not None:
            body["uuid"] = str(uuid)
        return self._service(self._call("POST", "/v1/services", body=body, timeout=timeout))

    def find(
        self,
        running: bool = False,
        service_uuid: UUID | str | None = None,
        pipeline_name: str | None = None,
        pipeline_run_id: str | None = None,
        pipeline_step_name: str | None = None,
        model_name: str | None = None,
        model_uri: str | None = None,
        model_type: str | None = None,
        state: ServiceState | str | None = None,
    ) -> list[BaseService]:
        """The services matching every filter given: ``running``, active only; ``state``, in that state."""
        query = {
            "running": "true" if running else None,
            "service_uuid": str(service_uuid) if service_uuid is not None else None,
            **filters_given(locals()),
            "state": str(state) if state is not None else None,
        }
        data = self._call("GET", "/v1/services", query=query)
        return [self._service(item) for item in data["services"]]

    def get(self, uuid: UUID | str) -> BaseService:
        return self._service(self._call("GET", f"/v1/services/{_quote(uuid)}"))

    def start(self, uuid: UUID | str, timeout: float = DEFAULT_TIMEOUT) -> BaseService:
        return self._service(
            self._call("POST", f"/v1/services/{_quote(uuid)}/start", query={"timeout": timeout}, timeout=timeout)
        )

    def unload(self, uuid: UUID | str) -> BaseService:
        """Scale the service to zero now: its server stops, and its next request wakes it."""
        return self._service(self._call("POST", f"/v1/services/{_quote(uuid)}/unload"))

    def start_all(self, timeout: float = DEFAULT_TIMEOUT) -> tuple[list[BaseService], dict[str, ModeldError]]:
        """Start every service that is not running (after ``modeld daemon stop --all``, say):
        (the services started, the error of each that failed, by uuid)."""
        data = self._call("POST", "/v1/services/start", query={"timeout": timeout}, timeout=timeout)
        failed = {uuid: error_from_dict(500, {"error": error}) for uuid, error in data.get("failed", {}).items()}
        return [self._service(item) for item in data["services"]], failed

    def stop(self, uuid: UUID | str, timeout: float = DEFAULT_TIMEOUT, force: bool = False) -> BaseService:
        query = {"timeout": timeout, "force": "true" if force else None}
        return self._service(self._call("POST", f"/v1/services/{_quote(uuid)}/stop", query=query, timeout=timeout))

    def delete(self, uuid: UUID | str, timeout: float = DEFAULT_TIMEOUT, force: bool = False) -> None:
        query = {"timeout": timeout, "force": "true" if force else None}
        self._call("DELETE", f"/v1/services/{_quote(uuid)}", query=query, timeout=timeout)

    def logs(self, uuid: UUID | str, tail: int | None = None, follow: bool = False) -> Iterator[str]:
        """The server's log as text chunks; with ``follow``, keeps yielding until the service goes."""
        query = {"tail": tail, "follow": "true" if follow else None}
        for chunk in self.transport.stream(Request("GET", f"/v1/services/{_quote(uuid)}/logs", query)):
            yield chunk.decode(errors="replace")

    def daemon_info(self) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/daemon"))

    def metrics(self) -> str:
        """``GET /metrics``: the daemon's metrics in Prometheus' text format (see the README's Metrics)."""
        response = self.transport.handle(Request("GET", "/metrics", None, None, self.timeout or 60.0, True))
        self._check_version(response.headers.get("x-modeld-version"))
        if response.status >= 400:
            raise error_from_dict(response.status, response.json())
        return response.body.decode()

    def shutdown(self, stop_services: bool = False) -> None:
        """Ask the daemon to exit; model servers keep running unless ``stop_services``."""
        self._call("POST", "/v1/daemon/shutdown", query={"stop_services": "true" if stop_services else None}, start=False)
        self.close()

    def is_running(self) -> bool:
        try:
            self._call("GET", "/v1/daemon", start=False)
        except DaemonNotRunning:
            return False
        return True

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- helpers

    @staticmethod
    def _service(data: Any) -> BaseService:
        return SERVICE_REGISTRY.load(data)

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, Any] | None = None,
        timeout: float | None = None,
        start: bool = True,
    ) -> Any:
        socket_timeout: float | None = self.timeout if self.timeout is not None else (timeout or 60.0) + _MARGIN
        if socket_timeout is not None and not socket_timeout < _LONGEST_WAIT:
            socket_timeout = None  # also inf and nan, which a socket cannot hold either: wait as long as it takes
        response = self.transport.handle(Request(method, path, query, body, socket_timeout, start))
        self._check_version(response.headers.get("x-modeld-version"))
        data = response.json()
        if response.status >= 400:
            raise error_from_dict(response.status, data)
        return data

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
                stacklevel=4,
            )


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("."))


def _quote(uuid: UUID | str) -> str:
    return quote(str(uuid), safe="")
