"""Requests that wait for a service to wake (issue 12, on demand), and the call that wakes a ``command`` server.

A request to a service that is scaled to zero, or to an on-demand service starting or being scaled
to zero (``Entry.waits``), gets an ``Exchange`` like any other, which waits here instead of
connecting: its body bytes queue in the Exchange up to the usual limit, then the client is paused
(``exchange.PENDING_HIGH``), and its own timer answers a 504 after the wake timeout (``--wake-timeout``;
0: the service's ``startup_timeout``). The waiters of a service are looked at again whenever the
routing table changes and when a wake call ends:

* ``active`` (or a built-in server scaled to zero, which the daemon wakes on the connection): sent on;
* ``scaled_to_zero``, a ``command`` server: one wake call per service at a time, however many wait;
* still starting, or being scaled to zero: they go on waiting;
* anything else (stopped, error, deleted): the answer the table gives it (503, 404).

The wake call is the daemon's ``POST /v1/services/{uuid}/start?timeout=<wake timeout>`` over its
control socket (``$MODELD_HOME/modeld.sock``: HTTP/1.1 over AF_UNIX, one request per connection,
``connection: close``; the daemon answers once the server is healthy). A 2xx sends the waiters on
at once (the table may not have the record's ``active`` yet). An error sends them on if the table
says ``active`` meanwhile, lets them wait if it says the server is still starting (a start that ran
out of time keeps starting; their timers give the 504), and otherwise answers them 503 with the
daemon's message.

Standard library only (it runs as its own process).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING

from .routes import PASSING, SCALED_TO_ZERO, Answer, Entry, error

if TYPE_CHECKING:
    from .exchange import Exchange
    from .pool import Gateway

MAX_WAIT = 30 * 24 * 3600.0  # a startup_timeout of infinity (an old record's null) still needs a number
# A waiter's own 504 comes this long after the wake timeout, so that the daemon's answer to a start
# given that same timeout (its 503 when admission found no room, say) reaches the client first.
GRACE = 1.0
PROBE = 0.1  # seconds between two connects to a starting server while no daemon runs
RECHECK = 1.0  # seconds between two looks at waiters of a starting service (is its daemon still there?)
CALL_MARGIN = 30.0  # the daemon answers a start within its timeout; past this much more, it is not answering


class Waker:
    """The requests waiting for their service to wake, by uuid, and the wake call under way for each."""

    def __init__(self, gw: Gateway, daemon_socket: Path | None, wake_timeout: float = 0.0):
        self.gw = gw
        self.daemon_socket = daemon_socket  # None: no daemon to ask (a static table without --daemon-socket)
        self.wake_timeout = wake_timeout  # 0: each service's startup_timeout
        self.waiting: dict[str, list[Exchange]] = {}
        self.calls: dict[str, asyncio.Task[None]] = {}
        self.rechecks: set[str] = set()  # services whose waiters are looked at again in RECHECK s
        self.calls_made = 0

    def timeout(self, entry: Entry) -> float:
        return min(self.wake_timeout or entry.startup_timeout, MAX_WAIT)

    def wait(self, exchange: Exchange) -> None:
        uuid = exchange.entry.uuid
        self.waiting.setdefault(uuid, []).append(exchange)
        if uuid not in self.calls:  # (else it joins the call under way)
            self._look(uuid)

    def table_changed(self) -> None:
        for uuid in list(self.waiting):
            self._look(uuid)

    def _recheck(self, uuid: str) -> None:
        self.rechecks.discard(uuid)
        if uuid not in self.calls:
            self._look(uuid)

    def _waiters(self, uuid: str) -> list[Exchange]:
        waiters = [x for x in self.waiting.get(uuid, ()) if not x.done]  # (a client gone or answered 504)
        if waiters:
            self.waiting[uuid] = waiters
        else:
            self.waiting.pop(uuid, None)
        return waiters

    def _look(self, uuid: str, failure: str | None = None) -> None:
        waiters = self._waiters(uuid)
        if not waiters:
            return
        entry = self.gw.table.by_uuid.get(uuid)
        if entry is None:
            self._answer(uuid, error(404, "ServiceNotFound", f"service {uuid} was deleted while a request waited for it"))
        elif entry.state == "active" or entry.forwarded_asleep:
            self._send_on(uuid, entry)
        elif entry.state == SCALED_TO_ZERO and failure is None:
            if uuid not in self.calls:
                self.calls[uuid] = asyncio.get_running_loop().create_task(self._wake(entry))
        elif entry.state in PASSING and entry.desired == "running":
            # Starting, or on its way to zero (then woken): they wait on, up to their timeout. With
            # no daemon to record the server healthy (the start call got no answer: it died during
            # the wake), the gateway looks for the server itself; else it looks again in a second,
            # in case the daemon dies meanwhile.
            if entry.state == "pending_startup" and uuid not in self.calls:
                if failure is not None or not self.gw.daemon_alive():
                    self.calls[uuid] = asyncio.get_running_loop().create_task(self._until_it_answers(entry))
                elif uuid not in self.rechecks:
                    self.rechecks.add(uuid)
                    asyncio.get_running_loop().call_later(RECHECK, self._recheck, uuid)
        else:
            why = f"could not be woken: {failure}" if failure is not None else f"is {entry.state}"
            self._answer(
                uuid,
                error(
                    503,
                    "ServiceUnavailable",
                    f"service {uuid} ({entry.name}) {why}",
                    state=entry.state,
                    last_error=entry.last_error,
                ),
            )

    def _send_on(self, uuid: str, entry: Entry) -> None:
        for exchange in self.waiting.pop(uuid, ()):
            if not exchange.done:
                exchange.woken(entry)

    def _answer(self, uuid: str, answer: Answer) -> None:
        for exchange in self.waiting.pop(uuid, ()):
            if not exchange.done:
                exchange.wake_failed(answer)

    async def _until_it_answers(self, entry: Entry) -> None:
        """No daemon: connect to the starting server every PROBE s until it accepts, then send the
        waiters on; stop when none wait, or when the table moves on (a daemon is back)."""
        try:
            while self._waiters(entry.uuid) and self.gw.table.by_uuid.get(entry.uuid) == entry:
                try:
                    _reader, writer = await asyncio.open_connection(entry.host, entry.port)
                except OSError:
                    await asyncio.sleep(PROBE)
                    continue
                writer.close()
                self._send_on(entry.uuid, entry)
                return
        finally:
            self.calls.pop(entry.uuid, None)

    async def _wake(self, entry: Entry) -> None:
        """One wake call; then the waiters are sent on or answered."""
        self.calls_made += 1
        try:
            status, message = await start_service(self.daemon_socket, entry.uuid, self.timeout(entry))
            # The record the daemon wrote (active, or error) may not have reached the table yet. (Read
            # while the call still counts as under way: a table still saying scaled_to_zero starts none.)
            self.gw.refresh()
        finally:
            self.calls.pop(entry.uuid, None)
        if 200 <= status < 300:
            self._send_on(entry.uuid, self.gw.table.by_uuid.get(entry.uuid, entry))
        else:
            self._look(entry.uuid, failure=message)


async def start_service(daemon_socket: Path | None, uuid: str, timeout: float) -> tuple[int, str]:
    """The daemon's ``POST /v1/services/{uuid}/start?timeout=…``: (status, the error's message); (0, why) if no answer."""
    if daemon_socket is None:
        return 0, "the gateway has no daemon to ask (no --home nor --daemon-socket)"
    request = (
        f"POST /v1/services/{uuid}/start?timeout={timeout!r} HTTP/1.1\r\n"
        "host: modeld\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    ).encode()
    try:
        async with asyncio.timeout(timeout + CALL_MARGIN):
            reader, writer = await asyncio.open_unix_connection(str(daemon_socket))
            try:
                writer.write(request)
                data = await reader.read()  # (connection: close: the answer ends at EOF)
            finally:
                writer.close()
    except TimeoutError:
        return 0, f"the daemon did not answer the start within {timeout + CALL_MARGIN:g} s"
    except OSError as exc:
        return 0, f"the daemon is not running to start it ({daemon_socket}: {exc.strerror or exc})"
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0, f"the daemon's answer cannot be read: {head[:80]!r}"
    if 200 <= status < 300:
        return status, ""
    try:
        message = str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = body[:500].decode("utf-8", "replace") or f"HTTP {status}"
    return status, message
