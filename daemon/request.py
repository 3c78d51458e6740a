"""The request side of the socket API: a request, its body read under a cap, its query checked.

``Request.params`` checks the query against the names and types a route accepts (its spec's, see
openapi.py) and converts them; every refusal is an ``InvalidRequest`` naming the parameter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from pydantic import ValidationError

from .exceptions import InvalidRequest, PayloadTooLarge
from .models import ServiceState

MAX_BODY = 1024 * 1024
Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


def validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    receive: Receive
    send: Send
    headers: dict[str, str]
    transport: asyncio.Transport | None = None  # the connection, where the server says (see daemon_process.TRANSPORT)
    accepts: dict[str, type] = field(default_factory=dict)  # the query parameters of its route's spec
    repeated: tuple[str, ...] = ()  # query parameters given more than once

    async def body(self) -> bytes:
        declared = self.headers.get("content-length", "0")
        if declared.isdigit() and int(declared) > MAX_BODY:  # refuse at once, before reading anything
            raise PayloadTooLarge(f"request body of {declared} bytes is larger than the cap of {MAX_BODY} bytes")
        chunks, size = [], 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise InvalidRequest("client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                raise PayloadTooLarge(f"request body is larger than {MAX_BODY} bytes")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    def params(self, **types: type) -> dict[str, Any]:
        """The query parameters, checked against the names and types a route accepts (by default, its spec's)."""
        types = types or self.accepts
        unknown = sorted(set(self.query) - set(types))
        if unknown:
            allowed = ", ".join(sorted(types)) or "none"
            raise InvalidRequest(f"unknown query parameter {unknown[0]!r}; allowed: {allowed}")
        if self.repeated:
            raise InvalidRequest(f"query parameter {self.repeated[0]!r} given more than once: which one is meant?")
        return {name: _convert_param(name, self.query[name], kind) for name, kind in types.items() if name in self.query}


def _convert_param(name: str, value: str, kind: type) -> Any:
    try:
        if kind is bool:
            lowered = value.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if kind is UUID:
            return UUID(value)
        converted = kind(value)
        if kind in (int, float) and not 0 <= converted < float("inf"):  # also refuses nan
            raise ValueError
        return converted
    except ValueError:
        what = {
            bool: "true or false",
            UUID: "a uuid",
            int: "a whole number >= 0",
            float: "a number >= 0",
            ServiceState: "one of " + ", ".join(s.value for s in ServiceState),
        }.get(kind, kind.__name__)
        raise InvalidRequest(f"query parameter {name!r} must be {what}, not {value!r}") from None


async def wait_disconnect(receive: Receive) -> None:
    """Return once the client has gone; the request's own (empty) body messages come first and are skipped."""
    while (await receive())["type"] != "http.disconnect":
        pass
