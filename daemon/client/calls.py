"""``DaemonClient``: the typed calls of the daemon's API, blocking, over a :class:`~daemon.client.transport.Transport`.

Invariants:

* each method is one request (``logs`` one streamed request, ``events`` one per
  reconnect, see eventstream.py), built by
  :mod:`~daemon.client.operations` (as ``AsyncDaemonClient``'s are) and
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
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

from ..config import ServiceConfig
from ..exceptions import DaemonNotRunning, ModeldError
from ..filters import filters_given
from ..models import BaseService, ServiceState
from ..paths import Paths
from . import operations as op
from .autostart import ensure_daemon
from .eventstream import RETRY, EventCursor
from .operations import DEFAULT_TIMEOUT as DEFAULT_TIMEOUT, VersionMismatchWarning as VersionMismatchWarning
from .transport import Transport, UnixSocketTransport

T = TypeVar("T")

if TYPE_CHECKING:
    from .apply import ApplyReport


class DaemonClient(op.Session):
    """Talks to the modeld daemon of one home (or through the ``transport`` given, e.g. in tests)."""

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        socket_path: str | os.PathLike[str] | None = None,
        auto_start: bool = True,
        timeout: float | None = None,
        transport: Transport | None = None,
    ):
        super().__init__(Paths(home, socket_path), timeout)
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
        return self._run(op.deploy(config, replace, timeout, uuid))

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
        project: str | None = None,
        state: ServiceState | str | None = None,
    ) -> list[BaseService]:
        """The services matching every filter given: ``running``, active only; ``state``, in that state."""
        return self._run(op.find(running, service_uuid, filters_given(locals()), state))

    def get(self, uuid: UUID | str) -> BaseService:
        return self._run(op.get(uuid))

    def start(self, uuid: UUID | str, timeout: float = DEFAULT_TIMEOUT) -> BaseService:
        return self._run(op.start(uuid, timeout))

    def unload(self, uuid: UUID | str) -> BaseService:
        """Scale the service to zero now: its server stops, and its next request wakes it."""
        return self._run(op.unload(uuid))

    def start_all(self, timeout: float = DEFAULT_TIMEOUT) -> tuple[list[BaseService], dict[str, ModeldError]]:
        """Start every service that is not running (after ``modeld daemon stop --all``, say):
        (the services started, the error of each that failed, by uuid)."""
        return self._run(op.start_all(timeout))

    def stop(self, uuid: UUID | str, timeout: float = DEFAULT_TIMEOUT, force: bool = False) -> BaseService:
        return self._run(op.stop(uuid, timeout, force))

    def delete(self, uuid: UUID | str, timeout: float = DEFAULT_TIMEOUT, force: bool = False) -> None:
        self._run(op.delete(uuid, timeout, force))

    def logs(self, uuid: UUID | str, tail: int | None = None, follow: bool = False) -> Iterator[str]:
        """The server's log as text chunks; with ``follow``, keeps yielding until the service goes."""
        for chunk in self.transport.stream(self.streamed(op.logs(uuid, tail, follow))):
            yield chunk.decode(errors="replace")

    def events(self, since: int | None = None, follow: bool = True, daemon_id: str | None = None) -> Iterator[dict[str, Any]]:
        """The daemon's events (see daemon/events.py), each a dict: those after ``since`` (the last seq you
        have; None: only new ones), then, with ``follow``, each as it happens, for as long as you iterate.

        Following goes on across daemon restarts and dropped connections: it reconnects (never starting
        a daemon itself) with the last seq and daemon_id it has, and yields the ``{"type": "gap"}`` event
        the daemon sends when some were lost. Without ``follow``, it ends after the events held now.
        """
        cursor = EventCursor(since, daemon_id)
        if since is None:
            cursor.start_at(self.daemon_info()["events"])
        while True:
            try:
                for chunk in self.transport.stream(self.streamed(cursor.request(follow))):
                    yield from cursor.feed(chunk)
            except RETRY:
                if not cursor.may_retry(follow):
                    raise
            cursor.ended()
            if not follow:
                return
            time.sleep(cursor.delay())

    def apply(
        self,
        path_or_dict: str | os.PathLike[str] | Mapping[str, Any],
        prune: bool = False,
        dry_run: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        environ: Mapping[str, str] | None = None,
    ) -> ApplyReport:
        """Make the services match a file (``modeld apply``'s TOML, or a dict shaped like it): create what
        is missing, replace in place what changed, leave the rest alone, and with ``prune`` delete the
        project's services the file lacks. Returns an :class:`~daemon.client.apply.ApplyReport`: the plan
        with ``dry_run`` (nothing changed), else each step's status ("done" or "failed", with its error).
        A file that does not validate raises ``ApplyFileError`` (an ``InvalidRequest``) and applies nothing.
        ``environ``: where ``{from_env = "KEY"}`` values are read (default: this process's environment)."""
        from .apply import run_apply

        return run_apply(self, path_or_dict, prune=prune, dry_run=dry_run, timeout=timeout, environ=environ)

    def export(self, project: str | None = None) -> str:
        """The services of ``project`` (default: all, which must then be of one project) as a file
        ``apply`` takes; applying it changes nothing. Secret env values are written ``{from_env = "KEY"}``."""
        from .apply import export_services

        return export_services(self, project)

    def daemon_info(self) -> dict[str, Any]:
        return self._run(op.daemon_info())

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI 3.1 description of the daemon's control API (``GET /v1/openapi.json``)."""
        return self._run(op.openapi())

    def metrics(self) -> str:
        """``GET /metrics``: the daemon's metrics in Prometheus' text format (see the README's Metrics)."""
        return self._run(op.metrics())

    def shutdown(self, stop_services: bool = False) -> None:
        """Ask the daemon to exit; model servers keep running unless ``stop_services``."""
        self._run(op.shutdown(stop_services))
        self.close()

    def is_running(self) -> bool:
        try:
            self._run(op.daemon_info(start=False))
        except DaemonNotRunning:
            return False
        return True

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, Any] | None = None,
        timeout: float | None = None,
        start: bool = True,
    ) -> Any:
        """One request, its JSON answer as it came (errors raised as their classes)."""
        return self._run(op.raw(method, path, body, query, timeout, start))

    def _run(self, call: op.Call[T]) -> T:
        return self.answer(call, self.transport.handle(self.request(call)))
