"""GET /v1/openapi.json: the control API as OpenAPI 3.1, made from the route table and the daemon's models.

The document is checked three ways: it is valid OpenAPI 3.1 (openapi-spec-validator), every route
of ``Api.routes`` is in it (the table is walked, so a route added without a spec fails here), and
a real daemon's answers match the schemas it gives for them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from conftest import iris_config
from daemon import DaemonClient, InvalidRequest
from daemon.api import Api
from daemon.client import AsgiHandler, InMemoryTransport
from daemon.openapi import UndescribedRoute, document, openapi_path, spec_of
from daemon.paths import Paths
from daemon.settings import load_settings
from daemon.testing import UnixHTTP


def api_over(tmp_path: Path) -> Api:
    """The daemon's ASGI app over a manager-like object (no daemon: the routes and their specs are what is read)."""
    paths = Paths(tmp_path / "home")
    manager = SimpleNamespace(services={}, paths=paths, settings=load_settings(paths, environ={}))
    return Api(manager, lambda stop_services: None)  # type: ignore[arg-type]


def test_the_document_is_valid_openapi_3_1(tmp_path: Path) -> None:
    doc = document(api_over(tmp_path).routes)
    assert doc["openapi"].startswith("3.1")
    validate(doc)  # raises, saying where, on anything OpenAPI 3.1 refuses


def test_every_route_in_the_table_is_described(tmp_path: Path) -> None:
    """Walks Api.routes: each route has a spec, is in the document at its path and method, with its
    path parameters and its spec's query parameters; the document has no operation besides them."""
    api = api_over(tmp_path)
    doc = document(api.routes)
    described = set()
    for method, pattern, handler in api.routes:
        spec = spec_of(handler)
        assert spec is not None and spec.summary, f"{method} {pattern.pattern}: no @described spec"
        operation = doc["paths"][openapi_path(pattern)][method.lower()]
        assert operation["operationId"] == handler.__name__
        params = {(p["in"], p["name"]) for p in operation.get("parameters", [])}
        assert params == {("path", name) for name in pattern.groupindex} | {("query", name) for name in spec.query}
        assert str(spec.status) in operation["responses"] and "default" in operation["responses"]
        described.add((openapi_path(pattern), method.lower()))
    in_doc = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert in_doc == described
    assert len({op["operationId"] for item in doc["paths"].values() for op in item.values()}) == len(api.routes)
    # Each path template matches the route it came from (a path param spelled where the pattern has it).
    for method, pattern, _ in api.routes:
        assert pattern.fullmatch(re.sub(r"\{\w+\}", "x", openapi_path(pattern))), (method, pattern.pattern)


def test_a_route_added_without_a_spec_fails_the_document(tmp_path: Path) -> None:
    api = api_over(tmp_path)

    async def events(request: Any) -> None:
        pass

    api.routes.append(("GET", re.compile(r"/v1/events"), events))
    with pytest.raises(UndescribedRoute, match=r"GET /v1/events \(events\) has no @described spec"):
        document(api.routes)


def test_query_parameters_are_those_of_the_spec(tmp_path: Path) -> None:
    """The daemon takes the query parameters its document tells, and refuses others, naming them."""
    handler = AsgiHandler(api_over(tmp_path))
    client = DaemonClient(transport=InMemoryTransport(handler))
    try:
        doc = client.openapi()
        stop = doc["paths"]["/v1/services/{uuid}/stop"]["post"]
        told = sorted(p["name"] for p in stop["parameters"] if p["in"] == "query")
        assert told == ["force", "timeout"]
        with pytest.raises(InvalidRequest, match=r"unknown query parameter 'bogus'; allowed: force, timeout"):
            client._call("POST", "/v1/services/0b6f1f5e-8f39-4c5e-b7f5-2a8d7a5d5a01/stop", query={"bogus": "1"})
        with pytest.raises(InvalidRequest, match=r"unknown query parameter 'timeout'; allowed: none"):
            client._call("GET", "/v1/openapi.json", query={"timeout": "1"})
    finally:
        client.close()
        handler.close()


def check_answer(doc: dict[str, Any], method: str, path: str, status: int, data: Any) -> None:
    """``data`` (a real answer) is valid against the schema the document gives for it."""
    response = doc["paths"][path][method]["responses"][str(status)]
    schema = next(iter(response["content"].values()))["schema"]
    Draft202012Validator({**schema, "components": doc["components"]}).validate(data)


def test_a_real_daemons_answers_match_the_document(client: DaemonClient, home: Path) -> None:
    """Served by a real daemon, the same bytes each time (made once), and its answers fit their schemas."""
    doc = client.openapi()
    validate(doc)
    conn = UnixHTTP(Paths(home).socket)
    try:
        first, again = conn.get("/v1/openapi.json"), conn.get("/v1/openapi.json")
    finally:
        conn.close()
    assert first == again and json.loads(first) == doc

    svc = client.deploy(iris_config())
    uuid = str(svc.uuid)
    check_answer(doc, "get", "/v1/daemon", 200, client._call("GET", "/v1/daemon"))
    check_answer(doc, "get", "/v1/services", 200, client._call("GET", "/v1/services"))
    check_answer(doc, "get", "/v1/services/{uuid}", 200, client._call("GET", f"/v1/services/{uuid}"))
    check_answer(doc, "post", "/v1/services/{uuid}/stop", 200, client._call("POST", f"/v1/services/{uuid}/stop"))
    check_answer(doc, "post", "/v1/services/start", 200, client._call("POST", "/v1/services/start"))
    with pytest.raises(InvalidRequest) as info:
        client.find(state="sleeping")
    check_answer(doc, "get", "/v1/services", 400, {"error": info.value.to_dict()})
    check_answer(doc, "delete", "/v1/services/{uuid}", 200, client._call("DELETE", f"/v1/services/{uuid}"))
    check_answer(doc, "post", "/v1/daemon/shutdown", 202, client._call("POST", "/v1/daemon/shutdown", start=False))
    # A wrong answer is caught: the check can fail.
    with pytest.raises(Exception, match="'pid' is a required property"):
        check_answer(doc, "get", "/v1/daemon", 200, {"version": "x"})
