"""The control API: HTTP/1.1 + JSON on the daemon's Unix socket (raw ASGI, served by uvicorn).

Routes (all under ``/v1`` but ``/metrics``; every response carries ``x-modeld-version``):

    GET    /v1/daemon                       version, pid, home, counts, problems, containment,
                                            settings (effective) and settings_sources (where each came from),
                                            on_demand (admission's caps and the on-demand servers loaded)
    POST   /v1/daemon/shutdown              ?stop_services=true also stops every server
    GET    /v1/services                     find; filters as query parameters (daemon.filters.FIND_PARAMS):
                                            running, service_uuid, pipeline_name, pipeline_run_id,
                                            pipeline_step_name, model_name, model_uri, model_type, project, state
    POST   /v1/services                     deploy: {"config": {...}, "replace": bool, "timeout": s, "uuid": opt}
    GET    /v1/services/{uuid}              one service
    POST   /v1/services/start               start every service: {"services": [...], "failed": {uuid: error}}
    POST   /v1/services/{uuid}/start        ?timeout=s
    POST   /v1/services/{uuid}/stop         ?timeout=s&force=bool
    POST   /v1/services/{uuid}/unload       scale it to zero now (it wakes on its next request)
    DELETE /v1/services/{uuid}              ?timeout=s&force=bool
    GET    /v1/services/{uuid}/logs         ?tail=N&follow=bool; text/plain, streamed
    GET    /v1/openapi.json                 this API as OpenAPI 3.1, made from the route table (daemon/openapi.py)
    GET    /v1/events                       ?since=SEQ&daemon_id=ID&follow=bool (default true); NDJSON, one
                                            event per line, streamed as they happen (see events.py); without
                                            since only new ones; a {"type": "gap"} line first when some are lost
    GET    /metrics                         Prometheus text format 0.0.4 (see metrics.py)

A service is the JSON of ``BaseService`` (secret env values masked); find
answers ``{"services": [...]}``. Errors are ``{"error": {"type", "message"}}``
(and ``log_excerpt`` when the error carries a server's last log lines) with a
4xx or 5xx status; ``type`` names a class of ``daemon.exceptions``.
Request bodies are capped at ``MAX_BODY`` bytes.

Each handler carries its spec (``@described``: summary, query parameters, body and answer models),
from which ``GET /v1/openapi.json`` is made; a request's query parameters are checked against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import metrics
from ._version import __version__
from .config import ServiceConfig
from .exceptions import DaemonError, InternalError, InvalidRequest, MethodNotAllowed, ModeldError, NotFound
from .filters import FIND_PARAMS
from .linux import trim_heap
from .logs import read_log
from .manager import Manager
from .models import BaseService
from .openapi import DaemonInfo, Deleted, ServiceList, ShutdownAnswer, StartAllAnswer, described, document, spec_of
from .request import MAX_BODY as MAX_BODY, Receive, Request, Send, validation_message, wait_disconnect
from .views import ServiceViews

log = logging.getLogger("modeld.api")

TRANSPORT = "modeld.transport"  # the key of a request's connection in the ASGI scope's state (see daemon_process.py)
EVENT_BATCH = 256  # events sent in one write at most
DEFAULT_TIMEOUT = 300.0


class DeployRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    config: ServiceConfig
    replace: bool = False
    timeout: float = Field(DEFAULT_TIMEOUT, gt=0)
    uuid: UUID | None = None


def _service_uuid(value: str) -> UUID:
    try:
        return UUID(value)
    except ValueError:
        raise InvalidRequest(f"{value!r} is not a service uuid") from None


def service_json(svc: BaseService) -> dict[str, Any]:
    return svc.public().model_dump(mode="json")


class Api:
    """The ASGI application of the daemon."""

    def __init__(self, manager: Manager, request_shutdown: Callable[[bool], None]):
        self.manager = manager
        self.request_shutdown = request_shutdown
        self.closing = asyncio.Event()
        self.views = ServiceViews(manager)
        self._openapi: bytes | None = None
        self.routes: list[tuple[str, re.Pattern[str], Callable[..., Awaitable[Any]]]] = [
            ("GET", re.compile(r"/v1/daemon"), self.daemon_info),
            ("POST", re.compile(r"/v1/daemon/shutdown"), self.shutdown),
            ("GET", re.compile(r"/v1/services"), self.find),
            ("POST", re.compile(r"/v1/services"), self.deploy),
            ("POST", re.compile(r"/v1/services/start"), self.start_all),
            ("GET", re.compile(r"/v1/services/(?P<uuid>[^/]+)"), self.get),
            ("DELETE", re.compile(r"/v1/services/(?P<uuid>[^/]+)"), self.delete),
            ("POST", re.compile(r"/v1/services/(?P<uuid>[^/]+)/start"), self.start),
            ("POST", re.compile(r"/v1/services/(?P<uuid>[^/]+)/stop"), self.stop),
            ("POST", re.compile(r"/v1/services/(?P<uuid>[^/]+)/unload"), self.unload),
            ("GET", re.compile(r"/v1/services/(?P<uuid>[^/]+)/logs"), self.logs),
            ("GET", re.compile(r"/v1/openapi\.json"), self.openapi),
            ("GET", re.compile(r"/v1/events"), self.events),
            ("GET", re.compile(r"/metrics"), self.metrics),
        ]

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            parsed = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
            query = {k: v[-1] for k, v in parsed.items()}
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            transport = scope.get("state", {}).get(TRANSPORT)
            request = Request(scope["method"], scope["path"], query, receive, send, headers, transport)
            request.repeated = tuple(k for k, v in parsed.items() if len(v) > 1)
            handler, params = self._route(request)
            if spec := spec_of(handler):
                request.accepts = dict(spec.query)
            result = await handler(request, **params)
            if result is not None:
                status, payload = result
                await self._send_json(send, status, payload)
        except asyncio.CancelledError:
            # The daemon is shutting down under a long call (a deploy waiting for health): say
            # so in JSON; the operation goes on from disk when the daemon starts again.
            error = DaemonError(
                "the daemon shut down during this call; the service goes on from where it was when it starts again"
            )
            with contextlib.suppress(Exception):
                await self._send_json(send, 503, {"error": error.to_dict()})
            raise
        except ModeldError as exc:
            await self._send_json(send, exc.status_code, {"error": exc.to_dict()})
        except ValidationError as exc:
            await self._send_json(send, 400, {"error": InvalidRequest(validation_message(exc)).to_dict()})
        except Exception as exc:  # the daemon answers, logs and keeps running, whatever broke
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            await self._send_json(send, 500, {"error": InternalError(f"{type(exc).__name__}: {exc}").to_dict()})

    def _route(self, request: Request) -> tuple[Callable[..., Awaitable[Any]], dict[str, Any]]:
        # A path a route spells out (/v1/services/start) is that route's, not a {uuid} of another.
        literal = any(not pattern.groupindex and pattern.fullmatch(request.path) for _, pattern, _ in self.routes)
        path_known = False
        for method, pattern, handler in self.routes:
            match = pattern.fullmatch(request.path)
            if match is None or (literal and pattern.groupindex):
                continue
            path_known = True
            if method == request.method:
                params = {k: _service_uuid(v) for k, v in match.groupdict().items()}
                return handler, params
        if path_known:
            raise MethodNotAllowed(f"{request.method} is not allowed on {request.path}")
        raise NotFound(f"no route {request.path!r}; see GET /v1/services")

    @staticmethod
    async def _send_json(send: Send, status: int, payload: Any) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"x-modeld-version", __version__.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    # ----------------------------------------------------------------- routes

    @described("The daemon: version, pid, home, effective settings and where each came from, counts", answer=DaemonInfo)
    async def daemon_info(self, request: Request) -> tuple[int, Any]:
        request.params()
        return 200, {
            "version": __version__,
            "pid": os.getpid(),
            "home": str(self.manager.paths.home),
            "socket": str(self.manager.paths.socket),
            "started_at": self.manager.started_at,
            "settings": self.manager.settings.public(),
            "settings_sources": self.manager.settings.sources,
            **self.manager.describe(),
            "events": self.manager.events.position(),
        }

    @described(
        "Ask the daemon to exit; stop_services also stops every server",
        query={"stop_services": bool},
        answer=ShutdownAnswer,
        status=202,
    )
    async def shutdown(self, request: Request) -> tuple[int, Any]:
        stop_services = request.params().get("stop_services", False)
        self.request_shutdown(stop_services)
        return 202, {"shutting_down": True, "stop_services": stop_services}

    @described("Find services: every filter given must match", query=FIND_PARAMS, answer=ServiceList, errors=(400,))
    async def find(self, request: Request) -> tuple[int, Any]:
        found = self.views.find(**request.params())
        return 200, self.views.list_json(found)

    @described(
        "Deploy a service (or replace one in place)", body=DeployRequest, answer=BaseService, errors=(400, 409, 413, 500, 503)
    )
    async def deploy(self, request: Request) -> tuple[int, Any]:
        request.params()
        body = await request.body()
        if not body.strip():
            raise InvalidRequest('deploy needs a JSON body: {"config": {...}, "replace": false, "timeout": 300}')
        deploy = DeployRequest.model_validate_json(body)
        svc = await self.manager.deploy(deploy.config, deploy.replace, deploy.timeout, deploy.uuid)
        return 200, service_json(svc)

    @described("One service", answer=BaseService, errors=(404,))
    async def get(self, request: Request, uuid: UUID) -> tuple[int, Any]:
        request.params()
        return 200, self.views.json(self.manager.get(uuid).svc)

    @described(
        "Start a service and wait until it is healthy", query={"timeout": float}, answer=BaseService, errors=(404, 500, 503)
    )
    async def start(self, request: Request, uuid: UUID) -> tuple[int, Any]:
        params = request.params()
        return 200, service_json(await self.manager.start(uuid, params.get("timeout", DEFAULT_TIMEOUT)))

    @described("Start every service that is not running", query={"timeout": float}, answer=StartAllAnswer)
    async def start_all(self, request: Request) -> tuple[int, Any]:
        params = request.params()
        started, failed = await self.manager.start_all(params.get("timeout", DEFAULT_TIMEOUT))
        return 200, {
            "services": [service_json(svc) for svc in started],
            "failed": {str(uuid): error.to_dict() for uuid, error in failed.items()},
        }

    @described(
        "Stop a service; force kills it at once", query={"timeout": float, "force": bool}, answer=BaseService, errors=(404, 500)
    )
    async def stop(self, request: Request, uuid: UUID) -> tuple[int, Any]:
        params = request.params()
        svc = await self.manager.stop(uuid, params.get("timeout", DEFAULT_TIMEOUT), params.get("force", False))
        return 200, service_json(svc)

    @described("Scale a service to zero now; its next request wakes it", answer=BaseService, errors=(404,))
    async def unload(self, request: Request, uuid: UUID) -> tuple[int, Any]:
        request.params()
        return 200, service_json(await self.manager.unload(uuid))

    @described("Stop a service and forget it", query={"timeout": float, "force": bool}, answer=Deleted, errors=(404, 500))
    async def delete(self, request: Request, uuid: UUID) -> tuple[int, Any]:
        params = request.params()
        await self.manager.delete(uuid, params.get("timeout", DEFAULT_TIMEOUT), params.get("force", False))
        return 200, {"deleted": str(uuid)}

    @described("The daemon's and its services' metrics, in Prometheus text format 0.0.4", media="text/plain; version=0.0.4")
    async def metrics(self, request: Request) -> None:
        request.params()
        body = await metrics.scrape(self.manager)
        headers = [
            (b"content-type", metrics.CONTENT_TYPE),
            (b"content-length", str(len(body)).encode()),
            (b"x-modeld-version", __version__.encode()),
        ]
        await request.send({"type": "http.response.start", "status": 200, "headers": headers})
        await request.send({"type": "http.response.body", "body": body})
        del body
        trim_heap()  # a scrape's text (0.5 MiB with 100 services, made three times over) is not kept in RSS

    @described(
        "The server's log, streamed; tail: its last N lines; follow: what comes next",
        query={"tail": int, "follow": bool},
        media="text/plain; charset=utf-8",
        errors=(404,),
    )
    async def logs(self, request: Request, uuid: UUID) -> None:
        """The server's log, streamed in bounded memory (see logs.read_log): everything, the
        last ``tail`` lines of the server's, and with ``follow`` what comes next, across rotations."""
        params = request.params()
        svc = self.manager.get(uuid).svc
        send = request.send
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"x-modeld-version", __version__.encode())],
            }
        )
        disconnected = asyncio.ensure_future(wait_disconnect(request.receive))
        closing = asyncio.ensure_future(self.closing.wait())

        async def keep_going(delay: float) -> bool:
            """Wait ``delay`` for new lines; False once the client, the daemon or the service is gone."""
            done, _ = await asyncio.wait({disconnected, closing}, timeout=delay)
            return not done and uuid in self.manager.services

        try:
            path = self.manager.paths.service_log(uuid)
            async for chunk in read_log(path, svc.config.log_backups, params.get("tail"), bool(params.get("follow")), keep_going):
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if disconnected.done():
                    break
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            disconnected.cancel()
            closing.cancel()

    @described("This API as OpenAPI 3.1, made from the route table and the daemon's models")
    async def openapi(self, request: Request) -> tuple[int, Any]:
        request.params()
        if self._openapi is None:  # made once: the routes and models do not change while the daemon runs
            self._openapi = json.dumps(document(self.routes)).encode()
        return 200, self._openapi

    @described(
        "The daemon's events as NDJSON, replayed from since, then followed",
        query={"since": int, "daemon_id": str, "follow": bool},
        media="application/x-ndjson",
    )
    async def events(self, request: Request) -> None:
        """The daemon's events as NDJSON (see events.py): from ``since`` (a replay from the ring, after a
        ``gap`` line if some are lost), then, with ``follow``, each as it happens, until the client or the
        daemon goes. A client that falls too far behind is dropped: its connection is cut at once."""
        params = request.params()
        if "daemon_id" in params and "since" not in params:
            raise InvalidRequest("daemon_id goes with since: the last seq you have of that daemon")
        follow = params.get("follow", True)
        bus = self.manager.events
        transport = request.transport
        since = params.get("since")
        if since is None and not follow:
            since = bus.oldest() - 1  # (follow=false alone: the events held now, then the end)
        sub = bus.subscribe(since, params.get("daemon_id"), transport.abort if transport is not None else None)
        upto = None if follow else bus.seq
        send = request.send
        disconnected = asyncio.ensure_future(wait_disconnect(request.receive))
        closing = asyncio.ensure_future(self.closing.wait())
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/x-ndjson"), (b"x-modeld-version", __version__.encode())],
                }
            )
            if sub.gap is not None:
                await send({"type": "http.response.body", "body": sub.gap, "more_body": True})
            while not (sub.dropped or disconnected.done() or closing.done()):
                lines = bus.take(sub, EVENT_BATCH, upto)
                if lines:
                    await send({"type": "http.response.body", "body": b"".join(lines), "more_body": True})
                elif not follow:
                    break
                else:
                    waiting: set[asyncio.Future[Any]] = {sub.wait(), disconnected, closing}
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if not (sub.dropped or disconnected.done()):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            bus.unsubscribe(sub)
            disconnected.cancel()
            closing.cancel()
