"""Following ``GET /v1/events`` across reconnects and daemon restarts, without I/O (sans-IO).

:class:`EventCursor` holds what a following client must remember: the last ``seq`` it has and the
``daemon_id`` it came from, the part of a line not yet ended, and the backoff between reconnects.
The sync client (``DaemonClient.events``) and an async one drive the same cursor; only the reading
and the sleeping differ::

    cursor = EventCursor(since)
    if cursor.since is None:                          # only new events: start at the daemon's newest
        cursor.start_at(daemon_info()["events"])
    while True:
        try:
            for chunk in stream(cursor.request(follow)):      # (async for ... in an async transport)
                yield from cursor.feed(chunk)
        except RETRY as exc:                                  # the daemon went, or is not back yet
            if not cursor.may_retry(follow):
                raise
        cursor.ended()
        if not follow:
            return
        sleep(cursor.delay())                                 # (await asyncio.sleep(...))

On a reconnect the request carries ``since`` and ``daemon_id``: the daemon replays what was missed,
after a ``gap`` line if the ring moved on or the daemon is another one (it restarted). A line cut
short by a dropped connection is discarded; its event comes again in the replay.
"""

from __future__ import annotations

import json
from typing import Any

from ..exceptions import DaemonError, ProtocolError
from .transport import UNFOLLOWED_STREAM_TIMEOUT, Request

# What ends a stream without ending the following: no daemon answers (DaemonNotRunning), the
# connection broke (ProtocolError and the other DaemonErrors, OSError). An error the daemon
# answered (a RequestError: a bad since, say) is raised.
RETRY: tuple[type[BaseException], ...] = (DaemonError, OSError)
FIRST_DELAY = 0.01  # seconds before the second reconnect in a row (the first is at once), doubling
MAX_DELAY = 0.5


class EventCursor:
    """Where a client following the daemon's events is (see the module docstring)."""

    def __init__(self, since: int | None = None, daemon_id: str | None = None):
        self.since = since
        self.daemon_id = daemon_id
        self.connections = 0  # requests made
        self.quiet = 0  # streams in a row that ended (or failed) without an event
        self._partial = b""

    def start_at(self, position: dict[str, Any]) -> None:
        """Start after the daemon's newest event (``GET /v1/daemon``'s ``events``): only new ones come."""
        self.since, self.daemon_id = int(position["seq"]), str(position["daemon_id"])

    def request(self, follow: bool) -> Request:
        """The next request: the first may start a daemon (if the client may), a reconnect never does
        (a client that follows must not start a daemon someone stopped)."""
        query: dict[str, Any] = {"since": self.since, "daemon_id": self.daemon_id if self.since is not None else None}
        query["follow"] = "true" if follow else "false"
        self.connections += 1
        timeout = None if follow else UNFOLLOWED_STREAM_TIMEOUT
        return Request("GET", "/v1/events", query, timeout=timeout, start=self.connections == 1)

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        """The events ended in ``chunk`` (with what came before it), moving the cursor past them."""
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        found = []
        for line in lines:
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError as exc:
                raise ProtocolError(f"the daemon sent an event that is not JSON: {line[:200]!r}") from exc
            if not isinstance(event, dict) or not isinstance(event.get("seq"), int):
                raise ProtocolError(f"the daemon sent an event without a seq: {line[:200]!r}")
            # A gap's seq is the last one that will not come: the same place for the cursor.
            self.since, self.daemon_id = event["seq"], event.get("daemon_id", self.daemon_id)
            found.append(event)
        if found:
            self.quiet = 0
        return found

    def ended(self) -> None:
        """The stream ended (or failed): a line it cut short is dropped (the replay sends it again)."""
        self._partial = b""
        self.quiet += 1

    def may_retry(self, follow: bool) -> bool:
        """Whether a stream that failed to open or broke is tried again: only when following, and not
        the first request (a client that finds no daemon at all is told at once)."""
        return follow and self.connections > 1

    def delay(self) -> float:
        """Seconds before the next reconnect: at once after a stream that brought events, then backing off
        while none come (a daemon that is stopping ends each new stream at once; one that is gone refuses)."""
        if self.quiet <= 1:
            return 0.0
        return min(FIRST_DELAY * 2.0 ** min(self.quiet - 2, 16), MAX_DELAY)
