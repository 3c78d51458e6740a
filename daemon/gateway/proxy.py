"""The gateway's data plane: an asyncio HTTP/1.1 reverse proxy on raw Protocols.

One ``Downstream`` per client connection parses request heads by hand (``http1.py``), routes
them (``routes.Table``), and hands each request to an ``Exchange``, which streams the body to a
pooled keep-alive ``Upstream`` connection and the response back, byte for byte as it arrives:
nothing is buffered beyond what one ``data_received`` delivered, except

* an OpenAI POST (routed by its JSON body's ``model``), held whole up to ``max_body`` to read
  that field, as llama-swap does (``io.ReadAll``; the openai client puts ``messages`` first);
* the first ``REPLAY_MAX`` bytes of a request, kept to retry it once on a new connection when a
  reused backend connection closes before any response byte (HTTP/1.1's keep-alive race, RFC 9112
  §9.3.1). A request larger than that is not retried (it got a 502).

Flow control both ways: a full write buffer on one side pauses reading on the other. A client
that disconnects closes its backend connection (the server sees the disconnect); a backend that
sends no response head within ``timeout`` gets the client a 504.

Standard library only (it runs as its own process; the daemon never carries these bytes).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from . import http1
from .routes import BY_BODY, Answer, Entry, Forward, Table, error

REPLAY_MAX = 64 * 1024
PENDING_HIGH = 256 * 1024  # body bytes queued for a backend not yet connected, before the client is paused
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
NO_BODY_STATUS = frozenset({204, 304})
RECHECK = frozenset({404, 409, 503})  # answers that a record written a moment ago could change


class Gateway:
    """What every connection shares: the table, the backend pool, the limits."""

    def __init__(
        self, table: Table, timeout: float = 60.0, max_body: int = 64 * 1024 * 1024, max_idle: int = 64, spare: bool = True
    ):
        self.table = table
        self.timeout = timeout  # seconds to the backend's response head (504 after)
        self.max_body = max_body
        self.max_idle = max_idle  # idle connections kept per backend
        self.spare = spare  # keep one connection open ahead of need per backend in use (keep_spare)
        self.idle: dict[tuple[str, int], list[Upstream]] = {}
        self.warming: set[tuple[str, int]] = set()  # backends a spare connection is being opened to
        self.daemon_alive: Callable[[], bool] = lambda: True  # (__main__ reads the home's daemon.pid)
        # Read the records again now, before an answer that may be stale; True if the table changed
        # (home.HomeTable.refresh: a deploy that has just returned may not have reached the table yet).
        self.refresh: Callable[[], bool] = lambda: False

    def take(self, key: tuple[str, int]) -> Upstream | None:
        idle = self.idle.get(key)
        while idle:
            up = idle.pop()  # LIFO: the warmest connection, least likely closed by the server's idle timeout
            if not up.transport.is_closing():
                return up
        return None

    def give(self, up: Upstream) -> None:
        idle = self.idle.setdefault(up.key, [])
        if len(idle) >= self.max_idle or up.transport.is_closing():
            up.transport.close()
            return
        up.reused = True
        idle.append(up)

    def forget(self, up: Upstream) -> None:
        idle = self.idle.get(up.key)
        if idle and up in idle:
            idle.remove(up)

    def keep_spare(self, key: tuple[str, int]) -> None:
        """Open one idle connection ahead of need when a backend's pool is empty, so the next request
        (a new client's stream, the one after a disconnect closed its connection) skips the connect."""
        if self.idle.get(key) or key in self.warming:
            return
        self.warming.add(key)

        async def spare() -> None:
            try:
                up = await self.connect(key)
            except OSError:
                return
            finally:
                self.warming.discard(key)
            self.give(up)

        asyncio.get_running_loop().create_task(spare())

    async def connect(self, key: tuple[str, int]) -> Upstream:
        loop = asyncio.get_running_loop()
        _transport, up = await loop.create_connection(lambda: Upstream(self, key), key[0], key[1])
        return up

    def unanswered(self) -> str:
        """Said after a 502: why no one will restart the server, when the daemon is not running."""
        return "" if self.daemon_alive() else "; the daemon is not running to restart it"


class Upstream(asyncio.Protocol):
    """One backend connection; idle in the pool or serving one Exchange."""

    def __init__(self, gw: Gateway, key: tuple[str, int]):
        self.gw = gw
        self.key = key
        self.exchange: Exchange | None = None
        self.reused = False  # it sat idle in the pool: the server may have closed it meanwhile (retryable)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.exchange is None:
            self.transport.close()  # bytes on an idle connection: not ours to guess about
            return
        self.exchange.response_data(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.gw.forget(self)
        if self.exchange is not None:
            self.exchange.upstream_lost(self)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.down.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.down.transport.resume_reading()


class Exchange:
    """One request and its response, between a Downstream and an Upstream."""

    def __init__(self, down: Downstream, entry: Entry, head: bytes, method: bytes):
        self.down = down
        self.gw = down.gw
        self.key = (entry.host, entry.port)
        self.method = method
        self.up: Upstream | None = None
        self.pending: list[bytes] | None = [head]
        self.pending_size = len(head)
        self.replay: list[bytes] | None = [head]
        self.replay_size = len(head)
        self.retried = False
        self.answered = False  # any response byte from the backend (then no retry, no error answer)
        self.done = False
        self.in_head = True
        self.rbuf = bytearray()
        self.remaining = 0  # body bytes still to come (Content-Length framing)
        self.scanner: http1.ChunkedScanner | None = None
        self.until_close = False
        self.backend_close = False
        self.response_head = b""  # a fixed-length response's head, sent with its first body bytes
        self.connecting: asyncio.Task[None] | None = None
        self.last_sent = 0.0  # when the last request byte went out: the timeout counts from there
        self.timer = asyncio.get_running_loop().call_later(self.gw.timeout, self._timed_out)

    # ------------------------------------------------------------ backend side

    def start(self) -> None:
        up = self.gw.take(self.key)
        if up is not None:
            self._attach(up)
        else:
            self.connecting = asyncio.get_running_loop().create_task(self._connect())
        if self.gw.spare:
            self.gw.keep_spare(self.key)

    async def _connect(self) -> None:
        try:
            up = await self.gw.connect(self.key)
        except OSError as exc:
            where = f"{self.key[0]}:{self.key[1]}"
            self._fail(error(502, "BadGateway", f"cannot connect to {where}: {exc.strerror or exc}{self.gw.unanswered()}"))
            return
        if self.done:
            self.gw.give(up)
            return
        self._attach(up)

    def _attach(self, up: Upstream) -> None:
        self.up = up
        up.exchange = self
        if self.pending:
            up.transport.write(b"".join(self.pending))
        self.pending = None
        self.down.transport.resume_reading()

    def body(self, data: bytes) -> None:
        """Request body bytes from the client, forwarded as they come."""
        if self.replay is not None:
            self.replay_size += len(data)
            if self.replay_size <= REPLAY_MAX:
                self.replay.append(data)
            else:
                self.replay = None
        self.last_sent = asyncio.get_running_loop().time()
        if self.up is not None:
            self.up.transport.write(data)
        elif self.pending is not None:
            self.pending.append(data)
            self.pending_size += len(data)
            if self.pending_size > PENDING_HIGH:
                self.down.transport.pause_reading()

    def upstream_lost(self, up: Upstream) -> None:
        if self.done or up is not self.up:
            return
        self.up = None
        if self.until_close and not self.in_head:
            self._finish(close_client=True)  # a response delimited by the close of its connection
            return
        if not self.answered and up.reused and not self.retried and self.replay is not None:
            # RFC 9112 §9.3.1: the server closed an idle connection as we reused it; nothing
            # was answered, so send it again once on a fresh connection.
            self.retried = True
            self.pending, self.pending_size = list(self.replay), self.replay_size
            self.connecting = asyncio.get_running_loop().create_task(self._connect())
            return
        if not self.answered:
            self._fail(
                error(
                    502,
                    "BadGateway",
                    f"the server at {self.key[0]}:{self.key[1]} closed the connection without answering{self.gw.unanswered()}",
                )
            )
        else:
            self.done = True
            self.timer.cancel()
            self.down.transport.abort()  # a response cut short: the client must see it cut short

    def _timed_out(self) -> None:
        left = self.last_sent + self.gw.timeout - asyncio.get_running_loop().time()
        if left > 0 and not self.done:  # an upload still coming: the server's time starts at its end
            self.timer = asyncio.get_running_loop().call_later(left, self._timed_out)
            return
        if not self.answered and not self.done:
            self._fail(
                error(
                    504,
                    "GatewayTimeout",
                    f"the server at {self.key[0]}:{self.key[1]} did not answer within {self.gw.timeout:g} s",
                )
            )

    # ------------------------------------------------------------ response

    def response_data(self, data: bytes) -> None:
        if not self.answered:
            self.answered = True
            self.timer.cancel()
        if not self.in_head:
            held, self.response_head = self.response_head, b""
            self._response_body(data, held)
            return
        self.rbuf += data
        while self.in_head:
            end = self.rbuf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.rbuf) > http1.MAX_HEAD:
                    self._broken_backend()
                return
            try:
                head = http1.parse_response(bytes(self.rbuf[:end]))
            except http1.BadMessage:
                self._broken_backend()
                return
            rest = bytes(self.rbuf[end + 4 :])
            self.rbuf.clear()
            if 100 <= head.status < 200:
                if head.status == 101:
                    self._broken_backend()  # Upgrade is hop-by-hop and never asked for
                    return
                self.rbuf += rest
                continue  # interim responses: 100 was answered by the gateway already
            self._response_head(head, rest)

    def _response_head(self, head: http1.Head, rest: bytes) -> None:
        self.in_head = False
        self.backend_close = head.close
        extra = b""
        if self.method == b"HEAD" or head.status in NO_BODY_STATUS:
            self.remaining = 0
        elif head.chunked:
            self.scanner = http1.ChunkedScanner()
        elif head.length is not None:
            self.remaining = head.length
        else:
            self.until_close = True
            extra = b"connection: close\r\n"
        if self.down.close_after and not extra:
            extra = b"connection: close\r\n"
        out = head.first + b"\r\n" + http1.forward_fields(head, extra)
        if self.scanner is None and not self.until_close and self.remaining == 0:
            self.down.transport.write(out)
            self._finish(leftover=rest)
        elif not rest and self.scanner is None and not self.until_close:
            # A fixed-length body is on its way and the client can use the head only with it: send
            # both at once (a send costs ~0.1 ms on a loaded VM). Streams are never held this way.
            self.response_head = out
        else:
            self._response_body(rest, out)  # the head and the body bytes that came with it: one send

    def _response_body(self, data: bytes, head: bytes = b"") -> None:
        if self.until_close:
            self.down.transport.write(head + data)
            return
        if self.scanner is not None:
            end = self.scanner.feed(data)
        else:
            end = self.remaining if len(data) >= self.remaining else -1
            self.remaining -= min(len(data), self.remaining)
        if end < 0:
            self.down.transport.write(head + data if head else data)
            return
        self.down.transport.write(head + (data[:end] if end < len(data) else data))
        self._finish(leftover=data[end:])

    def _finish(self, leftover: bytes = b"", close_client: bool = False) -> None:
        self.done = True
        self.timer.cancel()
        up, self.up = self.up, None
        if up is not None:
            up.exchange = None
            if self.backend_close or leftover or self.down.state == Downstream.BODY:
                up.transport.close()
            else:
                self.gw.give(up)
        self.down.response_done(close_client or self.until_close)

    def _broken_backend(self) -> None:
        """The server sent what cannot be framed: drop its connection; the client gets a 502, or a cut."""
        if self.up is not None:
            self.up.exchange = None
            self.up.transport.close()
            self.up = None
        self.done = True
        self.timer.cancel()
        if self.in_head:
            self.down.answer_and_close(error(502, "BadGateway", "the server sent a response the gateway cannot read"))
        else:
            self.down.transport.abort()

    def _fail(self, answer: Answer) -> None:
        """An error answered to the client in place of the backend's response."""
        if self.done:
            return
        self._let_go_of_backend()
        if self.down.state == Downstream.BODY:
            self.down.answer_and_close(answer)  # the rest of the request body is never read
        else:
            self.down.transport.write(answer.encode(close=self.down.close_after))
            self.down.response_done(False)

    def abort(self) -> None:
        """The client went away: close the backend connection, so the server sees it."""
        self._let_go_of_backend()

    def _let_go_of_backend(self) -> None:
        """This exchange is done: no timer, no connect under way, and its backend connection closed."""
        self.done = True
        self.timer.cancel()
        if self.connecting is not None:
            self.connecting.cancel()
        if self.up is not None:
            self.up.exchange = None
            self.up.transport.close()
            self.up = None


class Downstream(asyncio.Protocol):
    """One client connection: heads parsed here, one request at a time (pipelined ones wait)."""

    HEAD, BODY, BUFFER, WAIT, CLOSED = range(5)

    def __init__(self, gw: Gateway):
        self.gw = gw
        self.state = self.HEAD
        self.buf = bytearray()
        self.exchange: Exchange | None = None
        self.close_after = False
        self.remaining = 0
        self.scanner: http1.ChunkedScanner | None = None
        self.held: bytearray | None = None  # an OpenAI body being read to route it
        self.held_head: http1.Head | None = None
        self.transport: asyncio.Transport = None  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = self.CLOSED
        if self.exchange is not None:
            self.exchange.abort()
            self.exchange = None

    def pause_writing(self) -> None:
        if self.exchange is not None and self.exchange.up is not None:
            self.exchange.up.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.exchange is not None and self.exchange.up is not None:
            self.exchange.up.transport.resume_reading()

    # ------------------------------------------------------------ reading

    def data_received(self, data: bytes) -> None:
        if self.state == self.BODY:
            self._body(data)
        elif self.state == self.BUFFER:
            self._hold(data)
        elif self.state == self.HEAD:
            self.buf += data
            self._heads()
        elif self.state == self.WAIT:
            self.buf += data  # pipelined: read once the response in flight is done
            if len(self.buf) > http1.MAX_HEAD:
                self.transport.pause_reading()

    def _heads(self) -> None:
        while self.state == self.HEAD and self.buf:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > http1.MAX_HEAD:
                    self.answer_and_close(error(400, "InvalidRequest", "request head too large"))
                return
            try:
                head = http1.parse_request(bytes(self.buf[:end]))
            except http1.BadMessage as exc:
                self.answer_and_close(error(400, "InvalidRequest", str(exc)))
                return
            rest = bytes(self.buf[end + 4 :])
            self.buf.clear()
            self._request(head, rest)

    def _request(self, head: http1.Head, rest: bytes) -> None:
        self.close_after = head.close
        has_body = head.chunked or bool(head.length)
        if head.length is not None and head.length > self.gw.max_body:
            self.answer_and_close(
                error(413, "ContentTooLarge", f"the body is {head.length} bytes; the gateway's cap is {self.gw.max_body}")
            )
            return
        route = self.gw.table.resolve(head.method, head.target)
        if isinstance(route, Answer) and route.status in RECHECK and self.gw.refresh():
            route = self.gw.table.resolve(head.method, head.target)
        if isinstance(route, Answer):
            if has_body:
                self.answer_and_close(route)
            else:
                self.transport.write(route.encode(close=self.close_after))
                self.response_done(False, keep_buf=rest)
            return
        if (head.get(b"expect") or b"").lower() == b"100-continue":
            self.transport.write(CONTINUE)
        if route is BY_BODY:
            if head.chunked or head.length is None:
                self.answer_and_close(error(411, "LengthRequired", "an OpenAI request needs a content-length"))
                return
            self.state, self.held, self.held_head, self.remaining = self.BUFFER, bytearray(), head, head.length
            self._hold(rest)
            return
        assert isinstance(route, Forward)
        self._forward(head, route.entry, route.target, has_body, rest)

    def _forward(self, head: http1.Head, entry: Entry, target: bytes, has_body: bool, rest: bytes, held: bytes = b"") -> None:
        out = b"%s %s HTTP/1.1\r\n%s%s" % (head.method, target, http1.forward_fields(head), held)
        self.exchange = exchange = Exchange(self, entry, out, head.method)
        if has_body:
            self.state = self.BODY
            self.remaining = head.length or 0
            self.scanner = http1.ChunkedScanner() if head.chunked else None
        else:
            self.state = self.WAIT
        if rest:
            self.data_received(rest)  # queued behind the head: one send for both (each send costs ~0.1 ms here)
        exchange.start()

    def _body(self, data: bytes) -> None:
        assert self.exchange is not None
        if self.scanner is not None:
            end = self.scanner.feed(data)
            self._counted(len(data) if end < 0 else end)
        else:
            end = self.remaining if len(data) >= self.remaining else -1
            self.remaining -= min(len(data), self.remaining)
        if self.state != self.BODY:
            return
        if end < 0:
            self.exchange.body(data)
            return
        self.exchange.body(data[:end] if end < len(data) else data)
        self.state = self.WAIT
        if end < len(data):
            self.buf += data[end:]

    def _counted(self, n: int) -> None:
        """A chunked body over the cap: cut it (the backend sees an aborted request)."""
        self.remaining += n
        if self.remaining > self.gw.max_body and self.exchange is not None:
            self.exchange.abort()
            self.exchange = None
            self.answer_and_close(
                error(413, "ContentTooLarge", f"the body is over the gateway's cap of {self.gw.max_body} bytes")
            )

    def _hold(self, data: bytes) -> None:
        assert self.held is not None and self.held_head is not None
        take = min(self.remaining, len(data))
        self.held += data[:take]
        self.remaining -= take
        if self.remaining:
            return
        head, body, rest = self.held_head, bytes(self.held), data[take:]
        self.held = self.held_head = None
        found = self.gw.table.resolve_body(body)
        if isinstance(found, Answer) and found.status in RECHECK and self.gw.refresh():
            found = self.gw.table.resolve_body(body)
        if isinstance(found, Answer):
            self.transport.write(found.encode(close=self.close_after))
            self.response_done(False, keep_buf=rest)
            return
        if rest:
            self.buf += rest
        self._forward(head, found, head.target, False, b"", body)

    # ------------------------------------------------------------ answering

    def response_done(self, close: bool, keep_buf: bytes = b"") -> None:
        self.exchange = None
        if close or self.close_after or self.state == self.BODY:
            self.state = self.CLOSED
            self.transport.close()
            return
        self.state = self.HEAD
        if keep_buf:
            self.buf += keep_buf
        self.transport.resume_reading()
        if self.buf:
            self._heads()

    def answer_and_close(self, answer: Answer) -> None:
        if self.state == self.CLOSED:
            return
        self.state = self.CLOSED
        self.transport.write(answer.encode(close=True))
        self.transport.close()
