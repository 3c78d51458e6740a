"""The gateway's routing table and its answers that need no backend (the model lists, the errors).

A route is ``model_name -> [Entry]`` and ``uuid -> Entry``; an Entry has the service's endpoint,
state and last_error, and what on demand needs (issue 12): the model type, ``idle_timeout`` and
``startup_timeout``. In the prototype the table comes from the command line
(``--route name=iris,uuid=...,addr=127.0.0.1:8000``); in the product it is rebuilt from
``services/*/service.json`` (see docs/gateway-design.md). ``resolve`` is pure: it maps a request
line to a backend and a path, or to a local JSON answer.

Errors are JSON, in the shape both modeld and OpenAI use: ``{"error": {"type", "message", ...}}``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from urllib.parse import unquote_to_bytes

OPENAI_BY_BODY = frozenset({b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings"})
_MODELS = b"/v1/models"
_SERVICES = b"/v1/services/"

SCALED_TO_ZERO = "scaled_to_zero"
BUILT_IN = frozenset({"python", "pickle"})  # the daemon holds their socket and wakes them itself
# States of an on-demand service that a request waits through (bounded by the wake timeout)
# instead of getting a 503: woken by someone else, or being scaled to zero (then woken again).
PASSING = frozenset({"pending_startup", "pending_shutdown"})


@dataclass(frozen=True)
class Entry:
    uuid: str
    name: str
    host: str
    port: int
    state: str = "active"
    last_error: str = ""
    private: bool = False  # served on a Unix socket only (bind_unix): never reached through the gateway
    created: int = field(default_factory=lambda: int(time.time()))
    model_type: str = "command"
    idle_timeout: float | None = None  # on demand: scaled to zero after this long without a request
    startup_timeout: float = 300.0  # the wake timeout when the gateway's is 0
    desired: str = "running"
    woken: bool = False  # starting from scaled_to_zero (its record's last_state): a wake, on demand or not

    @property
    def ready(self) -> bool:
        return self.state == "active"

    @property
    def waits(self) -> bool:
        """A request to it waits for a wake (proxy.py's Exchange), not a 503, while it is meant to run
        and is scaled to zero, being scaled to zero (pending_shutdown is only that while the desired
        state is running: a stop records stopped first), or starting as an on-demand service or from
        zero (an unload of any service, then its wake)."""
        if self.desired != "running":
            return False
        if self.state in (SCALED_TO_ZERO, "pending_shutdown"):
            return True
        return self.state == "pending_startup" and (self.idle_timeout is not None or self.woken)

    @property
    def counted(self) -> bool:
        """The gateway writes its activity file (the contract's one writer for ``command`` servers)."""
        return self.idle_timeout is not None and self.model_type == "command"

    @property
    def forwarded_asleep(self) -> bool:
        """Scaled to zero, yet forwarded at once: the daemon holds a built-in server's socket and wakes it."""
        return self.state == SCALED_TO_ZERO and self.model_type in BUILT_IN


@dataclass(frozen=True)
class Forward:
    """Send the request to ``entry``'s server with ``target`` as its request target."""

    entry: Entry
    target: bytes


@dataclass(frozen=True)
class Answer:
    """Answer locally: status and a JSON body; ``uuid``: the service it answers for, if one (counted in
    that service's requests for /metrics: a 503 for a stopped service, a 413 on its way to it, ...)."""

    status: int
    body: dict[str, object]
    uuid: str = ""

    def encode(self, close: bool = False, head: bool = False) -> bytes:
        """The response; only its head (with the body's length) for a HEAD request (RFC 9110 §9.3.2)."""
        payload = json.dumps(self.body).encode()
        reason = _REASONS.get(self.status, b"")
        return b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
            self.status,
            reason,
            len(payload),
            b"connection: close\r\n" if close else b"",
            b"" if head else payload,
        )


BY_BODY = object()  # the route depends on the JSON body's "model" (OpenAI's POST routes)

_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    409: b"Conflict",
    411: b"Length Required",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def error(status: int, type_: str, message: str, **extra: object) -> Answer:
    return Answer(status, {"error": {"type": type_, "message": message, **extra}})


ROUTES_KEPT = 1024  # request lines whose route a Table remembers (see resolve)
ROUTE_KEPT_MAX = 512  # bytes of the longest request target remembered


class Table:
    def __init__(self, entries: list[Entry]):
        self.by_uuid = {e.uuid: e for e in entries}
        self.by_name: dict[str, list[Entry]] = {}
        for e in entries:
            self.by_name.setdefault(e.name, []).append(e)
        # A table never changes (a change is a new Table), so a request line's route is the same each
        # time: a client's next request to the same URL skips the parsing and lookups (forwards only).
        self.routes: dict[tuple[bytes, bytes], Forward | object] = {}

    # ------------------------------------------------------------------ lookups

    def named(self, name: str) -> Entry | Answer:
        found = self.by_name.get(name)
        if not found:
            return error(404, "ModelNotFound", f"no model named {name!r}", models=sorted(self.by_name))
        if len(found) > 1:
            uuids = sorted(e.uuid for e in found)
            return error(409, "AmbiguousModel", f"{len(found)} services serve {name!r}; use /v1/services/<uuid>/...", uuids=uuids)
        return self.usable(found[0])

    @staticmethod
    def usable(entry: Entry) -> Entry | Answer:
        if entry.private:
            return replace(
                error(
                    403,
                    "Forbidden",
                    f"service {entry.uuid} ({entry.name}) serves on a Unix socket only (bind_unix), "
                    "which the gateway's port, open to every local user, must not reach",
                ),
                uuid=entry.uuid,
            )
        if entry.state != "active" and not entry.waits:
            return replace(
                error(
                    503,
                    "ServiceUnavailable",
                    f"service {entry.uuid} ({entry.name}) is {entry.state}",
                    state=entry.state,
                    last_error=entry.last_error,
                ),
                uuid=entry.uuid,
            )
        return entry

    # ------------------------------------------------------------------ routing

    def resolve(self, method: bytes, target: bytes) -> Forward | Answer | object:
        found = self.routes.get((method, target))
        if found is not None:
            return found
        found = self._resolve(method, target)
        if not isinstance(found, Answer) and len(target) <= ROUTE_KEPT_MAX:
            if len(self.routes) >= ROUTES_KEPT:
                self.routes.clear()
            self.routes[(method, target)] = found
        return found

    def _resolve(self, method: bytes, target: bytes) -> Forward | Answer | object:
        path, _, query = target.partition(b"?")
        if path.startswith(_SERVICES):
            uuid, _, rest = path[len(_SERVICES) :].partition(b"/")
            entry = self.by_uuid.get(uuid.decode("latin-1"))
            if entry is None:
                return error(404, "ServiceNotFound", f"no service {uuid.decode('latin-1')!r}", services=sorted(self.by_uuid))
            usable = self.usable(entry)
            if isinstance(usable, Answer):
                return usable
            return Forward(entry, b"/" + rest + (b"?" + query if query else b""))
        if path == _MODELS:
            return self.model_list() if method in (b"GET", b"HEAD") else error(405, "MethodNotAllowed", "GET /v1/models")
        if path.startswith(_MODELS + b"/"):
            # The name as its service has it: percent-decoded (a space is %20); the verb follows the
            # last colon, unless the whole is a model's name (one may hold a colon).
            name, colon, verb = path[len(_MODELS) + 1 :].rpartition(b":")
            if not colon or unquote_to_bytes(path[len(_MODELS) + 1 :]).decode("utf-8", "replace") in self.by_name:
                name, colon = path[len(_MODELS) + 1 :], b""
            found = self.named(unquote_to_bytes(name).decode("utf-8", "replace"))
            if not colon and method in (b"GET", b"HEAD"):  # both protocols' model object, answered here
                entry = found if isinstance(found, Entry) else None
                if entry is None and isinstance(found, Answer) and found.status == 503:
                    entry = self.by_name[unquote_to_bytes(name).decode("utf-8", "replace")][0]
                if entry is None:
                    return found
                return Answer(200, self.model_object(entry))
            if isinstance(found, Answer):
                return found
            return Forward(found, target)
        if path in OPENAI_BY_BODY and method == b"POST":
            return BY_BODY
        return error(404, "NotFound", f"no gateway route for {method.decode()} {path.decode('latin-1')}")

    def resolve_body(self, body: bytes) -> Entry | Answer:
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):
            return error(400, "InvalidRequest", "the body is not a JSON object")
        if not isinstance(model, str):
            return error(400, "InvalidRequest", 'the body has no "model" string', models=sorted(self.by_name))
        return self.named(model)

    # ------------------------------------------------------------------ local answers

    @staticmethod
    def model_object(e: Entry) -> dict[str, object]:
        return {
            "id": e.name,
            "object": "model",
            "created": e.created,
            "owned_by": "modeld",
            "name": e.name,
            "ready": e.ready,
            "uuid": e.uuid,
            "state": e.state,
        }

    def model_list(self) -> Answer:
        return Answer(200, {"object": "list", "data": [self.model_object(e) for e in self.by_uuid.values()]})
