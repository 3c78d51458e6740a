"""``AsyncDaemonClient``: ``DaemonClient``'s calls for asyncio applications.

Each method is ``DaemonClient``'s, awaited: the same request built by
:mod:`~daemon.client.operations`, the same answer decoded there, the same errors (the classes
of ``daemon.exceptions``), the same auto-start and version warning. Only the I/O is its own
(:mod:`~daemon.client.async_transport`). Calls made at once each get a connection of their
own, so ``asyncio.gather`` of a deploy and a find runs them at once.

``logs`` is an async iterator: ``async for chunk in client.logs(uuid, follow=True)``; one that
is left before its end is closed by ``contextlib.aclosing`` (or by the garbage collector).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

from ..config import ServiceConfig
from ..exceptions import DaemonNotRunning, ModeldError
from ..filters import filters_given
from ..models import BaseService, ServiceState
from ..paths import Paths
from . import operations as op
from .async_transport import AsyncTransport, AsyncUnixSocketTransport
from .autostart import ensure_daemon
from .eventstream import RETRY, EventCursor
from .operations import DEFAULT_TIMEOUT

T = TypeVar("T")

if TYPE_CHECKING:
    from .apply import ApplyReport


class AsyncDaemonClient(op.Session):
    """Talks to the modeld daemon of one home from asyncio code (or through the ``transport`` given).

    ``async with AsyncDaemonClient() as client: await client.find()``; without ``async with``,
    ``await client.aclose()`` when done.
    """

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        socket_path: str | os.PathLike[str] | None = None,
        auto_start: bool = True,
        timeout: float | None = None,
        transport: AsyncTransport | None = None,
    ):
        super().__init__(Paths(home, socket_path), timeout)
        if transport is None:
            paths = self.paths
            transport = AsyncUnixSocketTransport(paths, start_daemon=(lambda: ensure_daemon(paths)) if auto_start else None)
        self.transport = transport

    @property
    def auto_start(self) -> bool:
        return getattr(self.transport, "start_daemon", None) is not None

    # ------------------------------------------------------------------ calls

    async def deploy(
        self, config: ServiceConfig, replace: bool = False, timeout: float = DEFAULT_TIMEOUT, uuid: UUID | str | None = None
    ) -> BaseService:
        return await self._run(op.deploy(config, replace, timeout, uuid))

    async def find(
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
        return await self._run(op.find(running, service_uuid, filters_given(locals()), state))

    async def get(self, uuid: UUID | str) -> BaseService:
        return await self._run(op.get(uuid))

    async def start(self, uuid: UUID | str, timeout: float = DEFAULT_TIMEOUT) -> BaseService:
        return await self._run(op.start(uuid, timeout))

    async def unload(self, uuid: UUID | str) -> BaseService:
        """Scale the service to zero now: its server stops, and its next request wakes it."""
        return await self._run(op.unload(uuid))

    async def start_all(self, timeout: float = DEFAULT_TIMEOUT) -> tuple[list[BaseService], dict[str, ModeldError]]:
        """Start every service that is not running: (the services started, the error of each that failed, by uuid)."""
        return await self._run(op.start_all(timeout))

    async def stop(self, uuid: UUID | str, timeout: float = DEFAULT_TIMEOUT, force: bool = False) -> BaseService:
        return await self._run(op.stop(uuid, timeout, force))

    async def delete(self, uuid: UUID | str, timeout: float = DEFAULT_TIMEOUT, force: bool = False) -> None:
        await self._run(op.delete(uuid, timeout, force))

    async def logs(self, uuid: UUID | str, tail: int | None = None, follow: bool = False) -> AsyncIterator[str]:
        """The server's log as text chunks; with ``follow``, keeps yielding until the service goes."""
        async with contextlib.aclosing(self.transport.stream(self.streamed(op.logs(uuid, tail, follow)))) as chunks:
            async for chunk in chunks:
                yield chunk.decode(errors="replace")

    async def events(
        self, since: int | None = None, follow: bool = True, daemon_id: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """The daemon's events, as ``DaemonClient.events`` gives them (the same cursor: eventstream.py)."""
        cursor = EventCursor(since, daemon_id)
        if since is None:
            cursor.start_at((await self.daemon_info())["events"])
        while True:
            try:
                async with contextlib.aclosing(self.transport.stream(self.streamed(cursor.request(follow)))) as chunks:
                    async for chunk in chunks:
                        for event in cursor.feed(chunk):
                            yield event
            except RETRY:
                if not cursor.may_retry(follow):
                    raise
            cursor.ended()
            if not follow:
                return
            await asyncio.sleep(cursor.delay())

    async def apply(
        self,
        path_or_dict: str | os.PathLike[str] | Mapping[str, Any],
        prune: bool = False,
        dry_run: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        environ: Mapping[str, str] | None = None,
    ) -> ApplyReport:
        """As ``DaemonClient.apply``: the same plan and the same requests (daemon/client/apply.py), awaited."""
        from . import apply as ap
        from .applylock import ApplyLock

        desired = ap.desired_of(path_or_dict, prune, environ)
        lock = ApplyLock(self.paths)
        if not dry_run:
            await lock.acquire_async()  # (another apply of the home holds it: waits, the loop runs on)
        try:
            current = await self._run(ap.listing(desired))
            report = ap.planned(desired, current, prune, dry_run, self.paths, lock)
            for step, call in [] if dry_run else ap.calls_of(report, desired, current, timeout):
                try:
                    ap.record(step, await self._run(call))
                except ModeldError as exc:
                    ap.failed(step, exc)
        finally:
            lock.release()
        return report

    async def export(self, project: str | None = None) -> str:
        """As ``DaemonClient.export``."""
        from .apply import export_of, no_such_project

        found = await self.find(project=project)
        if project is not None and not found:
            raise no_such_project(project, await self.find())
        return export_of(found, project)

    async def daemon_info(self) -> dict[str, Any]:
        return await self._run(op.daemon_info())

    async def metrics(self) -> str:
        """As ``DaemonClient.metrics``."""
        return await self._run(op.metrics())

    async def openapi(self) -> dict[str, Any]:
        """The OpenAPI 3.1 description of the daemon's control API (``GET /v1/openapi.json``)."""
        return await self._run(op.openapi())

    async def shutdown(self, stop_services: bool = False) -> None:
        """Ask the daemon to exit; model servers keep running unless ``stop_services``."""
        await self._run(op.shutdown(stop_services))
        await self.aclose()

    async def is_running(self) -> bool:
        try:
            await self._run(op.daemon_info(start=False))
        except DaemonNotRunning:
            return False
        return True

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def __aenter__(self) -> AsyncDaemonClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, Any] | None = None,
        timeout: float | None = None,
        start: bool = True,
    ) -> Any:
        """One request, its JSON answer as it came (errors raised as their classes)."""
        return await self._run(op.raw(method, path, body, query, timeout, start))

    async def _run(self, call: op.Call[T]) -> T:
        return self.answer(call, await self.transport.handle(self.request(call)))
