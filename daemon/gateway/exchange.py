"""One request and its response through the gateway (``Exchange``): the request body streamed to a
pooled backend connection, the response streamed back as it arrives, the 504 timer, and the answers
the gateway gives itself. See ``proxy.py``.

A backend connection that fails before any response byte (refused, or closed unanswered) is sent
again, if the request's first ``REPLAY_MAX`` bytes were kept, in two cases (``_unanswered``):

* the keep-alive race (RFC 9112 §9.3.1): a *reused* connection, once, at once;
* an idle stop (issue 12): the service is, or has just become (the records are read again),
  on its way to zero or scaled to zero: the request waits for the wake (``wake.py``) and is sent
  again on a new connection, fresh or reused alike, up to ``WAKE_RETRIES`` times.

A request to a service that must wake first waits in ``wake.py`` before it connects. Requests to a
``command`` service with an ``idle_timeout`` are counted in its activity file (``activity.py``) from
the Exchange's start to its end, however it ends (``_end``), and every request forwarded is counted
for ``/metrics`` as it ends, with its status (``metrics.py``).

Standard library only (it runs as its own process; the daemon never carries these bytes).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from . import http1
from .http1 import VIA
from .metrics import CLIENT_GONE
from .pool import Upstream
from .routes import Answer, Entry, error
from .wake import GRACE

if TYPE_CHECKING:  # for annotations only: an Exchange is made by its Downstream
    from .proxy import Downstream

REPLAY_MAX = 64 * 1024
WAKE_RETRIES = 2  # a request sent again after an idle stop it raced, at most this many times
PENDING_HIGH = 256 * 1024  # body bytes queued for a backend not yet connected, before the client is paused
NO_BODY_STATUS = frozenset({204, 304})


class Exchange:
    """One request and its response, between a Downstream and an Upstream."""

    def __init__(self, down: Downstream, entry: Entry, head: bytes, method: bytes):
        self.down = down
        self.gw = down.gw
        self.entry = entry
        self.key = (entry.host, entry.port)
        self.method = method
        self.up: Upstream | None = None
        self.pending: list[bytes] | None = [head]
        self.pending_size = len(head)
        self.replay: list[bytes] | None = [head]
        self.replay_size = len(head)
        self.retried = False
        self.wake_retries = 0
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
        self.loop = down.loop
        # When the last request byte went out: the timeout counts from there. The response's timer is
        # the client connection's (Downstream.watch, armed once for many requests); ``timer`` is a wake's.
        self.last_sent = self.loop.time()
        self.timer: asyncio.TimerHandle | None = None
        self.waking = False
        self.began = self.last_sent  # (for /metrics)
        self.status = CLIENT_GONE  # the response's status once its head is sent (metrics.py)
        self.spare_due = False  # open a spare backend connection when the response begins (see start)
        self.activity = self.gw.activities.of(entry.uuid) if entry.counted else None
        if self.activity is not None:
            self.activity.begin()

    # ------------------------------------------------------------ backend side

    def start(self) -> None:
        if self.entry.state != "active" and not self.entry.forwarded_asleep:
            self._await_wake()
            return
        self.down.watch()
        up = self.gw.take(self.key)
        if up is not None:
            self._attach(up)
        else:
            self.connecting = self.loop.create_task(self._connect())
        # A spare connection is opened once the response has begun (``_response_head``), so that its
        # connect and the server's accept never delay this request. Only for a backend that keeps
        # connections alive (one came from its pool): a server that closes after each response
        # (HTTP/1.0, http.server) and serves one connection at a time would accept the idle spare
        # and block on it, its own port and the daemon's health probes held up behind it until the
        # daemon killed it as hung.
        self.spare_due = self.gw.spare and up is not None

    async def _connect(self) -> None:
        try:
            up = await self.gw.connect(self.key)
        except OSError as exc:
            self._unanswered(f"cannot connect to {self.key[0]}:{self.key[1]}: {exc.strerror or exc}", reused=False)
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
        self.last_sent = self.loop.time()
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
        if not self.answered:
            where = f"the server at {self.key[0]}:{self.key[1]} closed the connection without answering"
            self._unanswered(where, reused=up.reused)
        else:
            self._end()
            self.down.transport.abort()  # a response cut short: the client must see it cut short

    def _unanswered(self, why: str, reused: bool) -> None:
        """The backend connection failed before any response byte: send the request again, or a 502."""
        if self.replay is not None and not self.done:
            if self.wake_retries < WAKE_RETRIES:
                stopping = self.gw.stopping(self.entry.uuid)
                if stopping is not None:
                    # An idle stop raced this request: wait for the wake, then send it again.
                    self.wake_retries += 1
                    self.entry = stopping
                    self.pending, self.pending_size = list(self.replay), self.replay_size
                    self._await_wake()
                    return
            if reused and not self.retried:
                # RFC 9112 §9.3.1: the server closed an idle connection as we reused it; nothing
                # was answered, so send it again once on a fresh connection.
                self.retried = True
                self.pending, self.pending_size = list(self.replay), self.replay_size
                self.connecting = self.loop.create_task(self._connect())
                return
        self._fail(error(502, "BadGateway", why + self.gw.unanswered()))

    # ------------------------------------------------------------ waiting for a wake

    def _await_wake(self) -> None:
        """Wait in the Waker (no backend yet); body bytes queue in ``pending`` up to PENDING_HIGH."""
        if self.timer is not None:
            self.timer.cancel()
        self.waking = True
        self.timer = self.loop.call_later(self.gw.waker.timeout(self.entry) + GRACE, self._wake_timed_out)
        self.gw.waker.wait(self)

    def woken(self, entry: Entry) -> None:
        """The service is up (or the daemon wakes it on the connection): connect and send."""
        if self.done:
            return
        self.entry = entry
        self.key = (entry.host, entry.port)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.waking = False
        self.last_sent = self.loop.time()  # (the response's timeout counts from the wake)
        self.down.watch()
        self.connecting = self.loop.create_task(self._connect())

    def wake_failed(self, answer: Answer) -> None:
        self._fail(answer)

    def _wake_timed_out(self) -> None:
        if not self.done:
            e = self.entry
            timeout = self.gw.waker.timeout(e)
            waited = self.loop.time() - self.began
            now = self.gw.table.by_uuid.get(e.uuid, e)  # (its record since: starting, say)
            message = (
                f"service {e.uuid} ({e.name}) did not wake within {timeout:g} s (wake_timeout; answered after {waited:.1f} s)"
            )
            self._fail(error(504, "GatewayTimeout", message, state=now.state))

    def timed_out(self) -> None:
        """No response head within the timeout since the last request byte (Downstream.watch's timer)."""
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
        if self.done:
            return  # (ended meanwhile: the client was answered otherwise, or is gone; nothing goes to it)
        if not self.answered:
            self.answered = True  # (the timeout is over: Downstream.watch's timer lets it be)
        if not self.in_head:
            held, self.response_head = self.response_head, b""
            self._response_body(data, held)
            return
        if not self.rbuf and (end := data.find(b"\r\n\r\n")) >= 0:
            try:  # a whole head in one read (the usual case): parsed from it, no copy through rbuf
                head = http1.parse_response(data[:end])
            except http1.BadMessage:
                self._broken_backend()
                return
            if head.status >= 200:
                self._response_head(head, data[end + 4 :])
                return
            self.rbuf += data  # an interim response: the loop below reads past it
        else:
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
        if self.spare_due:
            self.spare_due = False
            self.loop.call_soon(self.gw.keep_spare, self.key)  # (after this turn's writes to the client)
        self.status = head.status
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
        elif self.down.http10 and not extra:  # an HTTP/1.0 client that asked to keep it: it stays only if said
            extra = b"connection: keep-alive\r\n"
        out = head.first + b"\r\n" + http1.forward_fields(head, extra + VIA)
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
        self._end()
        up, self.up = self.up, None
        if up is not None:
            up.exchange = None
            if self.backend_close or leftover or self.down.state == self.down.BODY:
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
        if self.in_head:
            self.status = 502
        self._end()
        if self.in_head:
            self.down.answer_and_close(error(502, "BadGateway", "the server sent a response the gateway cannot read"))
        else:
            self.down.transport.abort()

    def _fail(self, answer: Answer) -> None:
        """An error answered to the client in place of the backend's response."""
        if self.done:
            return
        self.status = answer.status
        self._let_go_of_backend()
        if self.down.state == self.down.BODY:
            self.down.answer_and_close(answer)  # the rest of the request body is never read
        else:
            self.down.transport.write(answer.encode(close=self.down.close_after, head=self.method == b"HEAD"))
            self.down.response_done(False)

    def abort(self) -> None:
        """The client went away: close the backend connection, so the server sees it."""
        self._let_go_of_backend()

    def _let_go_of_backend(self) -> None:
        """This exchange is done: no timer, no connect under way, and its backend connection closed."""
        self._end()
        if self.connecting is not None:
            self.connecting.cancel()
        if self.up is not None:
            self.up.exchange = None
            self.up.transport.close()
            self.up = None

    def _end(self) -> None:
        """Done, however it ended: its wake timer cancelled and, once, its activity count given back."""
        if self.timer is not None:
            self.timer.cancel()
        if not self.done:
            self.done = True
            if self.activity is not None:
                self.activity.end()
            if self.entry.uuid in self.gw.table.by_uuid:  # (not a file again for a service deleted meanwhile)
                self.gw.counted.observe(self.entry.uuid, self.status, self.loop.time() - self.began)
