"""In-memory transports for tests: answers without sockets, processes or a daemon (as httpx's ``MockTransport``).

``InMemoryTransport(handler)`` hands each :class:`Request` to ``handler`` and
returns its :class:`Response`; :func:`error_response` turns an exception of
``daemon.exceptions`` into the answer the daemon would send, and
:func:`json_response` data into a 200. ``AsgiHandler(app)`` is a handler that
drives an ASGI app (e.g. the daemon's ``Api`` over a manager-like object) on
its own event loop.

Invariants: requests go through the same error mapping and version check as
over the socket (``DaemonClient`` does both), so a test of a caller sees what
it would see from a daemon; a handler that raises a ``ModeldError`` has it
returned as the daemon's JSON error, so it travels as over the wire; nothing
here opens a file, a socket or a process, and importing it costs the client no asyncio.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote

from .._version import __version__
from ..exceptions import ModeldError
from .transport import Request, Response, Transport, raise_for_status

Handler = Callable[[Request], Response]


def json_response(data: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(data).encode(), {"content-type": "application/json", "x-modeld-version": __version__})


def error_response(error: ModeldError) -> Response:
    return json_response({"error": error.to_dict()}, error.status_code)


class InMemoryTransport(Transport):
    """Calls ``handler(request) -> Response`` in this thread; records every request in ``requests``."""

    def __init__(self, handler: Handler):
        self.handler = handler
        self.requests: list[Request] = []

    def handle(self, request: Request) -> Response:
        self.requests.append(request)
        try:
            return self.handler(request)
        except ModeldError as error:
            return error_response(error)

    def stream(self, request: Request) -> Iterator[bytes]:
        response = self.handle(request)
        raise_for_status(response.status, response.body)
        if response.body:
            yield response.body


class AsgiHandler:
    """A handler that runs an ASGI app for each request, on an event loop of its own (one request at a time)."""

    def __init__(self, app: Callable[..., Any]):
        import asyncio  # here, not at the top: every client imports this module, and the client needs no asyncio

        self.app = app
        self.loop = asyncio.new_event_loop()

    def __call__(self, request: Request) -> Response:
        return self.loop.run_until_complete(self._run(request))

    def close(self) -> None:
        self.loop.close()

    async def _run(self, request: Request) -> Response:
        import asyncio

        path, _, query = request.target.partition("?")
        content = request.content or b""
        headers = [(b"content-length", str(len(content)).encode())]
        if content:
            headers.append((b"content-type", b"application/json"))
        scope = {
            "type": "http",
            "method": request.method,
            "path": unquote(path),
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "headers": headers,
        }
        sent_body = False
        finished = asyncio.Event()

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": content, "more_body": False}
            await finished.wait()  # the client stays until the whole answer is sent
            return {"type": "http.disconnect"}

        status, answer_headers, chunks = 500, {}, []

        async def send(message: dict[str, Any]) -> None:
            nonlocal status, answer_headers
            if message["type"] == "http.response.start":
                status = message["status"]
                answer_headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message.get("headers", [])}
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    finished.set()

        await self.app(scope, receive, send)
        finished.set()
        return Response(status, b"".join(chunks), answer_headers)
