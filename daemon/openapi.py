"""The control API described as OpenAPI 3.1 (``GET /v1/openapi.json``), made from the API itself.

Each handler of ``Api.routes`` carries its :class:`RouteSpec` (the ``@described(...)`` line over
it in ``api.py``): a summary, its query parameters, its request body's model and its answer's.
:func:`document` walks the route table and turns each route into an operation, the models into
JSON Schema with pydantic (``components/schemas``), so the description cannot drift from what is
served:

* a route is in the document because it is in the table, at the path its pattern spells
  (``(?P<uuid>[^/]+)`` is ``{uuid}``), and a route without a spec fails the document
  (``UndescribedRoute``, and ``tests/test_openapi.py``) rather than going missing from it;
* the query parameters are the very ones the handler accepts: ``Request.params()`` checks a
  request against its route's spec, so one list says both what is taken and what is told;
* bodies and answers are the pydantic models the daemon reads and writes (``ServiceConfig``
  within ``DeployRequest``, ``BaseService``, ``DaemonSettings``), and the answer shapes that are
  plain dicts in the handlers are drawn here as models (the tests check real answers against them).

Operation ids are the handlers' names, which are ``DaemonClient``'s method names.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from ._version import __version__
from .models import BaseService
from .settings import DaemonSettings

REF_TEMPLATE = "#/components/schemas/{model}"
F = TypeVar("F", bound=Callable[..., Any])


# ------------------------------------------------------------------ the answers' shapes


class ErrorDetail(BaseModel):
    type: str = Field(description="the class of daemon.exceptions, e.g. ServiceNotFound")
    message: str = Field(description="the whole text, log excerpt included")
    log_excerpt: str | None = Field(None, description="a server's last log lines, secrets masked; absent when none")


class ErrorAnswer(BaseModel):
    """Every error: a 4xx or 5xx status with this body."""

    error: ErrorDetail


class ServiceList(BaseModel):
    services: list[BaseService] = Field(description="oldest first")


class StartAllAnswer(BaseModel):
    services: list[BaseService] = Field(description="the services started")
    failed: dict[str, ErrorDetail] = Field(description="the error of each service that failed, by uuid")


class Deleted(BaseModel):
    deleted: UUID


class ShutdownAnswer(BaseModel):
    shutting_down: bool
    stop_services: bool


class DaemonInfo(BaseModel):
    """The daemon: what it is, its effective settings, its services' counts; more keys may come."""

    model_config = ConfigDict(extra="allow")

    version: str
    pid: int
    home: str
    socket: str
    started_at: float
    settings: DaemonSettings
    settings_sources: dict[str, str] = Field(description="where each setting came from: default, a variable, or the file")
    counts: dict[str, int] = Field(description="services by state, and total")
    problems: list[dict[str, Any]] = Field(description="what the last rebuild found wrong")
    containment: str
    on_demand: dict[str, Any] = Field(description="admission's caps and the on-demand servers loaded")


# ------------------------------------------------------------------ the spec of a route


@dataclass(frozen=True)
class RouteSpec:
    summary: str
    query: Mapping[str, type] = field(default_factory=dict)  # name -> type, as Request.params reads it
    body: type[BaseModel] | None = None  # the JSON request body's model
    answer: type[BaseModel] | None = None  # the JSON answer's model; None: see media
    status: int = 200
    media: str = "application/json"  # the answer's content type
    errors: tuple[int, ...] = ()  # the error statuses worth naming (every route may answer any with ErrorAnswer)
    description: str = ""


class UndescribedRoute(Exception):
    """A route of the table has no ``@described`` spec."""


def described(summary: str, **spec: Any) -> Callable[[F], F]:
    """Attach a :class:`RouteSpec` to a route's handler."""

    def attach(handler: F) -> F:
        handler.__dict__["route_spec"] = RouteSpec(summary, **spec)
        return handler

    return attach


def spec_of(handler: Callable[..., Any]) -> RouteSpec | None:
    spec = getattr(handler, "route_spec", None)
    return spec if isinstance(spec, RouteSpec) else None


def openapi_path(pattern: re.Pattern[str]) -> str:
    """``/v1/services/(?P<uuid>[^/]+)/stop`` -> ``/v1/services/{uuid}/stop``; ``openapi\\.json`` -> ``openapi.json``."""
    return re.sub(r"\\(.)", r"\1", re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern.pattern))


# ------------------------------------------------------------------ the document


Route = tuple[str, re.Pattern[str], Callable[..., Any]]


def document(routes: list[Route]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of these routes."""
    specs = []
    for method, pattern, handler in routes:
        spec = spec_of(handler)
        if spec is None:
            name = getattr(handler, "__name__", handler)
            raise UndescribedRoute(f"route {method} {pattern.pattern} ({name}) has no @described spec")
        specs.append((method, pattern, handler, spec))

    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(ErrorAnswer, "serialization")]
    for _, _, _, spec in specs:
        if spec.body is not None:
            wanted.append((spec.body, "validation"))
        if spec.answer is not None:
            wanted.append((spec.answer, "serialization"))
    refs, schemas = models_json_schema(list(dict.fromkeys(wanted)), ref_template=REF_TEMPLATE)

    paths: dict[str, dict[str, Any]] = {}
    for method, pattern, handler, spec in specs:
        operation: dict[str, Any] = {"operationId": handler.__name__, "summary": spec.summary}
        if spec.description:
            operation["description"] = spec.description
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
            for name in pattern.groupindex
        ]
        parameters += [
            {"name": name, "in": "query", "required": False, "schema": _param_schema(kind)} for name, kind in spec.query.items()
        ]
        if parameters:
            operation["parameters"] = parameters
        if spec.body is not None:
            body_schema = refs[(spec.body, "validation")]
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body_schema}}}
        if spec.answer is not None:
            answer_schema = refs[(spec.answer, "serialization")]
        else:
            answer_schema = {"type": "string"} if spec.media.startswith("text/") else {"type": "object"}
        error = {"content": {"application/json": {"schema": refs[(ErrorAnswer, "serialization")]}}}
        operation["responses"] = {
            str(spec.status): {"description": spec.summary, "content": {spec.media: {"schema": answer_schema}}},
            **{str(code): {"description": _reason(code), **error} for code in spec.errors},
            "default": {"description": "an error (ErrorAnswer; its type names the class of daemon.exceptions)", **error},
        }
        paths.setdefault(openapi_path(pattern), {})[method.lower()] = operation

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "modeld control API",
            "version": __version__,
            "description": "HTTP/1.1 + JSON on the daemon's Unix socket ($MODELD_HOME/modeld.sock), "
            "e.g. `curl --unix-socket $MODELD_HOME/modeld.sock http://localhost/v1/services`. "
            "Every answer carries x-modeld-version.",
        },
        "servers": [{"url": "http://localhost", "description": "over the daemon's Unix socket"}],
        "paths": paths,
        "components": {"schemas": schemas.get("$defs", {})},
    }


def _param_schema(kind: type) -> dict[str, Any]:
    if kind is bool:
        return {"type": "boolean"}
    if kind is UUID:
        return {"type": "string", "format": "uuid"}
    if kind is int:
        return {"type": "integer", "minimum": 0}
    if kind is float:
        return {"type": "number", "minimum": 0}
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return {"type": "string", "enum": [member.value for member in kind]}
    return {"type": "string"}


def _reason(code: int) -> str:
    from http import HTTPStatus

    return HTTPStatus(code).phrase
