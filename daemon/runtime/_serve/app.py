"""The KServe V1 data plane as a raw ASGI app (no framework: the runtime imports only the stdlib and uvicorn).

Routes: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/<name>`` (ready) and
``POST /v1/models/<name>:predict`` with ``{"instances": [...]}`` ->
``{"predictions": [...]}``. Every answer is JSON, errors included: a bad body is a
400 naming the problem, a body over ``MAX_BODY`` a 413, a model exception a 500
with its message, and the server keeps serving. While ``draining`` every answer
says ``Connection: close`` so keep-alive clients reconnect to whichever process
keeps serving (a hand-over).
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from .identity import log

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from typing import Any, Protocol

    from .loading import Predict

    # ASGI (https://asgi.readthedocs.io): a scope and a message are dicts whose values differ in type by key
    # (str, bytes, int, lists of header pairs, server-specific extensions), hence Any.
    Scope = dict[str, Any]
    Message = dict[str, Any]
    Receive = Callable[[], Awaitable[Message]]
    Send = Callable[[Message], Awaitable[None]]

    class Respond(Protocol):
        """The answer to one request: ``obj`` is JSON-encoded unless it is bytes already."""

        def __call__(
            self, status: int, obj: bytes | dict[str, object], close: bool = False, allow: str | None = None
        ) -> Awaitable[None]: ...


MAX_BODY = 64 * 1024 * 1024


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    names: dict[type[object], str] = {str: "string", list: "array", dict: "object"}
    return names.get(type(value), type(value).__name__)


def _json_default(obj: object) -> object:
    tolist: object = getattr(obj, "tolist", None)  # numpy arrays and scalars
    if callable(tolist):
        return tolist()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class _Disconnected(Exception):
    pass


class App:
    def __init__(self, name: str, predict: Predict) -> None:
        self.name = name
        self.predict = predict
        self.draining = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        started = False

        async def respond(status: int, obj: bytes | dict[str, object], close: bool = False, allow: str | None = None) -> None:
            nonlocal started
            body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            if allow:
                headers.append((b"allow", allow.encode()))
            if close or self.draining:
                # While draining, tell keep-alive clients to reconnect (and so
                # reach the process that keeps serving).
                headers.append((b"connection", b"close"))
            started = True
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        try:
            await self._route(scope, receive, respond)
        except _Disconnected:
            pass
        except Exception as exc:  # noqa: BLE001  (a bug here must still give a JSON answer)
            import traceback

            traceback.print_exc()
            if not started:
                await respond(500, {"error": f"internal server error: {_error(exc)}"})

    async def _route(self, scope: Scope, receive: Receive, respond: Respond) -> None:
        method, path = scope["method"], scope["path"]

        def wrong_method(allowed: str) -> Awaitable[None]:
            return respond(405, {"error": f"method {method} not allowed for {path}; use {allowed}"}, allow=allowed)

        if path == "/health":
            if method != "GET":
                return await wrong_method("GET")
            return await respond(200, {"status": "ok"})
        if path in ("/v1/models", "/v1/models/"):
            if method != "GET":
                return await wrong_method("GET")
            return await respond(200, {"models": [self.name]})
        prefix = "/v1/models/"
        if path.startswith(prefix):
            rest = path[len(prefix) :]
            if rest.endswith(":predict"):
                if method != "POST":
                    return await wrong_method("POST")
                name = rest[: -len(":predict")]
                if name != self.name:
                    return await self._not_found(name, respond)
                return await self._predict(scope, receive, respond)
            if "/" not in rest and ":" not in rest:
                if method != "GET":
                    return await wrong_method("GET")
                if rest != self.name:
                    return await self._not_found(rest, respond)
                return await respond(200, {"name": self.name, "ready": True})
        return await respond(404, {"error": f"not found: {path}"})

    async def _not_found(self, name: str, respond: Respond) -> None:
        await respond(404, {"error": f"model '{name}' not found; this server serves '{self.name}'"})

    async def _predict(self, scope: Scope, receive: Receive, respond: Respond) -> None:
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    too_big = int(value) > MAX_BODY
                except ValueError:
                    too_big = False
                if too_big:
                    return await respond(413, {"error": f"request body larger than {MAX_BODY} bytes"}, close=True)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                return await respond(413, {"error": f"request body larger than {MAX_BODY} bytes"}, close=True)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break

        try:
            payload = json.loads(b"".join(chunks))
        except ValueError as exc:
            return await respond(400, {"error": f"request body is not valid JSON: {exc}"})
        if not isinstance(payload, dict):
            return await respond(
                400, {"error": f'request body must be a JSON object {{"instances": [...]}}, got {_json_type(payload)}'}
            )
        if "instances" not in payload:
            return await respond(400, {"error": 'request body has no "instances" field; expected {"instances": [...]}'})
        instances = payload["instances"]
        if not isinstance(instances, list):
            return await respond(400, {"error": f'"instances" must be a list, got {_json_type(instances)}'})

        try:
            # In a worker thread: health probes stay responsive during a slow predict.
            result = await asyncio.to_thread(self.predict, instances)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001  (whatever the model's code raises is a 500, and the server keeps serving)
            import traceback

            traceback.print_exc()
            log(f"predict failed: {_error(exc)}")
            return await respond(500, {"error": _error(exc)})

        try:
            if callable(getattr(result, "tolist", None)):
                result = result.tolist()
            elif isinstance(result, tuple):
                result = list(result)
            body = json.dumps({"predictions": result}, default=_json_default, allow_nan=False).encode()
        except Exception as exc:  # noqa: BLE001  (tolist() is the model's code; any failure is a 500)
            return await respond(500, {"error": f"model output is not JSON-serialisable: {_error(exc)}"})
        await respond(200, body)
