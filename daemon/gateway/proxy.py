"""The gateway's data plane: an asyncio HTTP/1.1 reverse proxy on raw Protocols.

One ``Downstream`` per client connection parses request heads by hand (``http1.py``), routes
them (``routes.Table``), and hands each request to an ``Exchange``, which streams the body to a
pooled keep-alive ``Upstream`` connection and the response back, byte for byte as it arrives:
nothing is buffered beyond what one ``data_received`` delivered, except

* an OpenAI POST (routed by its JSON body's ``model``), held whole up to ``max_body`` to read
  that field, as llama-swap does (``io.ReadAll``; the openai client puts ``messages`` first); a
  chunked one is sent on with its payload and a content-length, since it is whole by then;
* the first ``REPLAY_MAX`` bytes of a request, kept to retry it once on a new connection when a
  reused backend connection closes before any response byte (HTTP/1.1's keep-alive race, RFC 9112
  §9.3.1). A request larger than that is not retried (it got a 502).

Every forwarded request carries ``via: 1.1 modeld`` and ``x-forwarded-for: <client address>``
(RFC 9110 §7.6.3; the latter as nginx and llama-swap set it), every response ``via`` too.

Flow control both ways: a full write buffer on one side pauses reading on the other. A client
that disconnects closes its backend connection (the server sees the disconnect); a backend that
sends no response head within ``timeout`` gets the client a 504.

Standard library only (it runs as its own process; the daemon never carries these bytes).
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import replace

from . import http1, metrics
from .exchange import Exchange
from .http1 import VIA
from .pool import Gateway
from .routes import BY_BODY, Answer, Entry, Forward, error

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
RECHECK = frozenset({404, 409, 503})  # answers that a record written a moment ago could change
METRICS = b"/metrics"  # the daemon's, fetched for each scrape (metrics.py)
LINGER = 2.0  # seconds a connection closed after an early answer is still read (and dropped): see answer_and_close


class Downstream(asyncio.Protocol):
    """One client connection: heads parsed here, one request at a time (pipelined ones wait)."""

    HEAD, BODY, BUFFER, WAIT, CLOSED = range(5)

    def __init__(self, gw: Gateway):
        self.gw = gw
        self.state = self.HEAD
        self.buf = bytearray()
        self.exchange: Exchange | None = None
        self.close_after = False
        self.http10 = False  # the request in flight is HTTP/1.0 (kept alive only if the response says so)
        self.remaining = 0
        self.scanner: http1.ChunkedScanner | None = None
        self.held: bytearray | None = None  # an OpenAI body being read to route it
        self.held_head: http1.Head | None = None
        self.method = b""  # the request's in flight (a HEAD is answered without a body)
        self.forwarded = VIA  # the fields the gateway adds to each request (with the client's address)
        self.scraping: asyncio.Future[tuple[int, bytes, bytes]] | None = None  # a GET /metrics under way
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.loop = asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = None  # the response timeout of the exchange in flight (watch)
        self.began = self.loop.time()  # when the request in flight's head was read (for /metrics)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.gw.clients.add(self)
        self.close_after = self.gw.draining
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = transport.get_extra_info("peername")
            if peer:
                self.forwarded = VIA + b"x-forwarded-for: %s\r\n" % str(peer[0]).encode()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gw.clients.discard(self)
        self.state = self.CLOSED
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.exchange is not None:
            self.exchange.abort()
            self.exchange = None

    def watch(self) -> None:
        """The exchange in flight's request is on its way: its response head is due within the gateway's
        timeout of its last request byte (a 504 after). One timer serves the connection's requests one
        after another (re-armed when it fires early), not a timer made and cancelled per request."""
        if self.timer is None and self.exchange is not None:
            self.timer = self.loop.call_at(self.exchange.last_sent + self.gw.timeout, self._check_timeout)

    def _check_timeout(self) -> None:
        self.timer = None
        ex = self.exchange
        if ex is None or ex.done or ex.answered or ex.waking:
            return  # (the next request, or the wake's end, arms it again)
        left = ex.last_sent + self.gw.timeout - self.loop.time()
        if left > 0:  # a later request, or an upload still coming: the server's time starts at its end
            self.timer = self.loop.call_later(left, self._check_timeout)
            return
        ex.timed_out()

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
            if not self.buf and (end := data.find(b"\r\n\r\n")) >= 0:
                self._head(data[:end], data[end + 4 :])  # a whole head in one read: no copy through buf
                if self.state == self.HEAD and self.buf:
                    self._heads()
                return
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
                    self._head_too_large()
                return
            data, rest = bytes(self.buf[:end]), bytes(self.buf[end + 4 :])
            self.buf.clear()
            self._head(data, rest)

    def _head_too_large(self) -> None:
        self.answer_and_close(error(431, "RequestHeaderFieldsTooLarge", f"the request head is over {http1.MAX_HEAD} bytes"))

    def _head(self, data: bytes, rest: bytes) -> None:
        if len(data) > http1.MAX_HEAD:  # (a whole head in one read is not looked at in _heads)
            self._head_too_large()
            return
        try:
            head = http1.parse_request(data)
        except http1.BadMessage as exc:
            self.answer_and_close(error(400, "InvalidRequest", str(exc)))
            return
        self._request(head, rest)

    def _request(self, head: http1.Head, rest: bytes) -> None:
        self.close_after = head.close or self.gw.draining
        self.http10 = head.version == b"HTTP/1.0"
        self.method = head.method
        self.began = self.loop.time()
        has_body = head.chunked or bool(head.length)
        if head.length is not None and head.length > self.gw.max_body:
            route = self.gw.table.resolve(head.method, head.target)  # (the service it was for, counted)
            self.answer_and_close(
                replace(
                    error(413, "ContentTooLarge", f"the body is {head.length} bytes; the gateway's cap is {self.gw.max_body}"),
                    uuid=route.entry.uuid if isinstance(route, Forward) else "",
                )
            )
            return
        if head.target.partition(b"?")[0] == METRICS:
            self._metrics(head, has_body, rest)
            return
        route = self.gw.table.resolve(head.method, head.target)
        if isinstance(route, Answer) and route.status in RECHECK and self.gw.refresh():
            route = self.gw.table.resolve(head.method, head.target)
        if isinstance(route, Answer):
            if has_body:
                self.answer_and_close(route)
            else:
                self.counted(route)
                self.transport.write(route.encode(close=self.close_after, head=head.method == b"HEAD"))
                self.response_done(False, keep_buf=rest)
            return
        if head.expect is not None and head.expect.lower() == b"100-continue":
            self.transport.write(CONTINUE)
        if route is BY_BODY:
            self.state, self.held, self.held_head, self.remaining = self.BUFFER, bytearray(), head, head.length or 0
            self.scanner = http1.ChunkedScanner() if head.chunked else None
            self._hold(rest)
            return
        assert isinstance(route, Forward)
        self._forward(head, route.entry, route.target, has_body, rest)

    def _forward(
        self, head: http1.Head, entry: Entry, target: bytes, has_body: bool, rest: bytes, held: bytes = b"", length: bytes = b""
    ) -> None:
        extra = self.forwarded + length
        version = b"HTTP/1.1"
        if head.version == b"HTTP/1.0":
            # Sent on as HTTP/1.0 (as nginx does), so the server frames its answer for an HTTP/1.0
            # client (never chunked, RFC 9112 §6.1) and closes after it; with a Host if it had none.
            version = b"HTTP/1.0"
            if head.get(b"host") is None:
                host = entry.host if ":" not in entry.host else f"[{entry.host}]"
                extra += b"host: %s:%d\r\n" % (host.encode(), entry.port)
        out = b"%s %s %s\r\n%s%s" % (head.method, target, version, http1.forward_fields(head, extra), held)
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
            try:
                end = self.scanner.feed(data)
            except http1.BadMessage as exc:
                self._bad_body(str(exc))
                return
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

    def _bad_body(self, why: str) -> None:
        """A chunked body that cannot be framed: the backend's request is cut, the client told if it can be."""
        assert self.exchange is not None
        exchange, self.exchange = self.exchange, None
        if not exchange.answered:
            exchange.status = 400  # (counted as the answer the client gets)
        exchange.abort()
        if exchange.answered:
            self.transport.abort()
            return
        self.answer_and_close(error(400, "InvalidRequest", why))

    def _counted(self, n: int) -> None:
        """A chunked body over the cap: cut it (the backend sees an aborted request)."""
        self.remaining += n
        if self.remaining > self.gw.max_body and self.exchange is not None:
            exchange, self.exchange = self.exchange, None
            if not exchange.answered:
                exchange.status = 413  # (counted as the answer the client gets)
            exchange.abort()
            if exchange.answered:  # the backend's response has begun: no 413 after it, the client sees it cut
                self.state = self.CLOSED
                self.transport.abort()
                return
            self.answer_and_close(
                error(413, "ContentTooLarge", f"the body is over the gateway's cap of {self.gw.max_body} bytes")
            )

    def _hold(self, data: bytes) -> None:
        """An OpenAI request's body, read whole to find its ``model``, then routed and sent on."""
        assert self.held is not None and self.held_head is not None
        if self.scanner is not None:
            try:
                end = self.scanner.feed(data)
            except http1.BadMessage as exc:
                self.answer_and_close(error(400, "InvalidRequest", str(exc)))
                return
            take = len(data) if end < 0 else end
            if len(self.held) + take > self.gw.max_body:
                self.answer_and_close(
                    error(413, "ContentTooLarge", f"the body is over the gateway's cap of {self.gw.max_body} bytes")
                )
                return
            self.held += data[:take]
            if end < 0:
                return
            head, body, rest = self.held_head, http1.dechunk(bytes(self.held)), data[take:]
            head.drop = head.drop | {b"transfer-encoding", b"content-length"}
            length = b"content-length: %d\r\n" % len(body)
        else:
            take = min(self.remaining, len(data))
            self.held += data[:take]
            self.remaining -= take
            if self.remaining:
                return
            head, body, rest = self.held_head, bytes(self.held), data[take:]
            length = b""
        self.held = self.held_head = None
        self.scanner = None
        found = self.gw.table.resolve_body(body)
        if isinstance(found, Answer) and found.status in RECHECK and self.gw.refresh():
            found = self.gw.table.resolve_body(body)
        if isinstance(found, Answer):
            self.counted(found)
            self.transport.write(found.encode(close=self.close_after))
            self.response_done(False, keep_buf=rest)
            return
        if rest:
            self.buf += rest
        self._forward(head, found, head.target, False, b"", body, length)

    def _metrics(self, head: http1.Head, has_body: bool, rest: bytes) -> None:
        """``GET /metrics``: the daemon's text, fetched over its control socket; the connection waits."""
        if has_body or head.method not in (b"GET", b"HEAD"):
            self.answer_and_close(error(405, "MethodNotAllowed", "GET /metrics"))
            return
        self.state = self.WAIT
        self.buf += rest
        # The target as it came, query and all: the daemon refuses what it does not know (400, naming
        # it), so /metrics answers the same on the gateway's port as on the control socket.
        self.scraping = asyncio.ensure_future(metrics.fetch(self.gw.waker.daemon_socket, head.target))
        self.scraping.add_done_callback(lambda done: self._scraped(done, head.method == b"HEAD"))

    def _scraped(self, done: asyncio.Future[tuple[int, bytes, bytes]], head_only: bool) -> None:
        self.scraping = None
        if self.state == self.CLOSED or done.cancelled():
            return
        status, kind, body = done.result()
        self.transport.write(metrics.response(status, kind, body, close=self.close_after, head=head_only))
        self.response_done(False)

    # ------------------------------------------------------------ answering

    def response_done(self, close: bool, keep_buf: bytes = b"") -> None:
        self.exchange = None
        self.method = b""
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

    def counted(self, answer: Answer) -> None:
        """The gateway's own answer for a service, in its requests for /metrics (metrics.py)."""
        if answer.uuid and answer.uuid in self.gw.table.by_uuid:
            self.gw.counted.observe(answer.uuid, answer.status, self.loop.time() - self.began)

    def answer_and_close(self, answer: Answer) -> None:
        """Answer, then close so that the answer arrives (RFC 9112 §9.6): the write side is shut, and
        what the client still sends (a body past the cap, say) is read and dropped for up to ``LINGER``
        seconds, since a close with unread bytes would send a reset that can destroy the answer."""
        if self.state == self.CLOSED:
            return
        self.counted(answer)
        self.state = self.CLOSED  # (data_received drops what comes now)
        ex, self.exchange = self.exchange, None
        if ex is not None:
            ex.abort()  # (idempotent: an exchange that failed has let go of its backend already)
        self.transport.write(answer.encode(close=True, head=self.method == b"HEAD"))
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self.transport.resume_reading()
        self.loop.call_later(LINGER, self.transport.close)
