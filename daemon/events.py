"""The daemon's events: what happened to which service, in order, for ``GET /v1/events``.

An event is one JSON object, sent as one line (NDJSON)::

    {"seq": 12, "time": 1764412345.123456, "daemon_id": "9f2c41d07ab3e655", "uuid": "3f2a...",
     "model_name": "iris", "type": "exited", "detail": "...", "signal": 9}

- ``seq`` increases by one per event within one daemon's life; ``daemon_id`` is drawn at random
  when the daemon starts (``begin``), so a client that sees another one knows the count started over;
- ``type`` is one of ``TYPES``; ``exited`` carries ``exit_code`` (it exited) or ``signal`` (it was
  killed), neither when the code is unknown (a server that is not the daemon's child, adopted from
  an earlier daemon, reaped by its new parent before the daemon read it, on a kernel before 6.15);
- ``detail`` is one line for people (the state's reason, the first line of an error).

Where events come from: a state change (``transitions.change_state`` calls ``state_changed``: the
event is the new state's, or the step's where the step says more, see ``BY_STEP``), and the facts
no state says (``emit``: exited, deployed, replaced, deleted, woken, scaled_to_zero).

The bus keeps the last ``event_ring`` events (a setting, 2,000 by default, about 350 bytes each, 0.7 MB when full:
a replay for a client that reconnects with ``since``). A subscriber is a cursor into the ring, not
a copy: its queue is the events after its cursor, and it may fall ``event_queue`` events (1,000)
behind the newest (besides a replay it asked for), beyond what its socket holds. One that falls
further behind, or whose next event left the ring, is dropped (``on_drop`` closes its connection)
so that it never holds the daemon or other clients up: when it comes back with its last ``seq`` it
gets the replay, or a ``gap`` if the ring moved on.

A ``gap`` line (``{"type": "gap", "seq": N, ...}``) says: events up to ``N`` of this daemon (or any
of an earlier daemon) will not come; what follows starts at ``N + 1``.

Everything here runs on the daemon's event loop (``emit`` wakes subscribers with futures).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .settings import DaemonSettings

if TYPE_CHECKING:
    from .models import BaseService, ServiceState
    from .process import ProcessHandle

log = logging.getLogger("modeld.events")

TYPES = frozenset(
    {
        "deployed",
        "starting",
        "healthy",
        "unhealthy",
        "exited",
        "restarting",
        "stopped",
        "scaled_to_zero",
        "woken",
        "replaced",
        "deleted",
        "error",
    }
)
RING = DaemonSettings.model_fields["event_ring"].default  # events kept for a replay
QUEUE = DaemonSettings.model_fields["event_queue"].default  # new events a subscriber may be behind before it is dropped
DETAIL_MAX = 500  # characters of a detail

# A state change's event, by the state it moves to (pending_shutdown says nothing yet: the
# stopped, scaled_to_zero or deleted that ends it does).
BY_STATE = {
    "pending_startup": "starting",
    "active": "healthy",
    "error": "error",
    "inactive": "stopped",
    "scaled_to_zero": "scaled_to_zero",
}
# Steps (``change_state(step=...)``) that say more than the state they move to; these make an
# event also when the state stays the same (a restart's spawn after its decision).
BY_STEP = {
    "restart.pending": "restarting",  # supervision decided to restart it (after an exit or a hang)
    "restart.restarted": "starting",  # the restart's new server is spawned
    "supervise.unhealthy": "unhealthy",  # failing its health check (reported, or stopped as hung)
}


class Subscriber:
    """One client's cursor into the ring (see the module docstring)."""

    def __init__(self, next_seq: int, floor: int, on_drop: Callable[[], None] | None):
        self.next_seq = next_seq  # the next event it is sent
        self.floor = floor  # the newest event when it subscribed: what it is behind counts from here
        self.on_drop = on_drop
        self.gap: bytes | None = None  # the line it is sent first, if any
        self.dropped = False
        self.waiter: asyncio.Future[None] | None = None

    def wait(self) -> asyncio.Future[None]:
        """A future done at the next event (or at the drop)."""
        self.waiter = asyncio.get_running_loop().create_future()
        if self.dropped:
            self.waiter.set_result(None)
        return self.waiter

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class EventBus:
    """The events of one daemon's life: the ring, the sequence, the subscribers."""

    def __init__(self, ring: int = RING, queue: int = QUEUE):
        self.daemon_id = os.urandom(8).hex()  # (not secrets.token_hex: secrets imports hashlib, and OpenSSL's ~3.6 MiB with it)
        self.seq = 0
        self.queue = queue
        self.ring: deque[bytes] = deque(maxlen=ring)  # the lines of events oldest() to seq (contiguous)
        self.subscribers: set[Subscriber] = set()
        self.exits_reported: weakref.WeakSet[ProcessHandle] = weakref.WeakSet()

    def oldest(self) -> int:
        """The seq of the oldest event held (seq + 1 when none is)."""
        return self.seq - len(self.ring) + 1

    def position(self) -> dict[str, Any]:
        """The daemon's id and its newest seq (GET /v1/daemon: where a client that wants only new events starts)."""
        return {"daemon_id": self.daemon_id, "seq": self.seq}

    def emit(self, kind: str, svc: BaseService | None = None, detail: str = "", code: int | None = None) -> None:
        """Record an event and wake every subscriber; ``code``: an exit code (< 0: killed by that signal)."""
        assert kind in TYPES, kind
        self.seq += 1
        line = self._line(kind, self.seq, svc, detail, code)
        self.ring.append(line)
        oldest = self.oldest()
        for sub in list(self.subscribers):
            if self.seq - max(sub.next_seq - 1, sub.floor) > self.queue or sub.next_seq < oldest:
                self.drop(sub)
            else:
                sub.wake()

    def _line(self, kind: str, seq: int, svc: BaseService | None, detail: str, code: int | None = None) -> bytes:
        first = detail.strip().splitlines()[0] if detail.strip() else ""
        event: dict[str, Any] = {
            "seq": seq,
            "time": round(time.time(), 6),
            "daemon_id": self.daemon_id,
            "uuid": str(svc.uuid) if svc is not None else None,
            "model_name": (svc.config.model_name or svc.config.name or None) if svc is not None else None,
            "type": kind,
            "detail": first[:DETAIL_MAX],
        }
        if code is not None:
            event["signal" if code < 0 else "exit_code"] = abs(code)
        return json.dumps(event, separators=(",", ":")).encode() + b"\n"

    # ------------------------------------------------------------ subscribers

    def subscribe(self, since: int | None, daemon_id: str | None = None, on_drop: Callable[[], None] | None = None) -> Subscriber:
        """A subscriber from ``since`` (the last seq the client has; None: only new events), with the
        ``gap`` it is sent first if the ring no longer holds ``since + 1`` or ``daemon_id`` is another daemon's."""
        oldest = self.oldest()
        if since is None:
            return self._add(Subscriber(self.seq + 1, self.seq, on_drop))
        why = ""
        if daemon_id is not None and daemon_id != self.daemon_id:
            why = f"the daemon restarted (daemon_id {daemon_id} is gone; this one is {self.daemon_id})"
        elif since > self.seq:
            # No such event yet. Said as it is: the daemon cannot tell a seq of an earlier daemon (without
            # its daemon_id) from one not reached yet; either way what it holds is sent (a client that
            # reconnects after a restart misses nothing).
            held = f"the {len(self.ring)} it holds follow" if self.ring else "none is held yet"
            earlier = (
                ""
                if daemon_id == self.daemon_id
                else f" (daemon_id {self.daemon_id}; a seq from an earlier daemon? seq starts over when the daemon restarts)"
            )
            why = f"no event {since} yet: this daemon's newest is {self.seq}{earlier}; {held}"
        elif since + 1 < oldest:
            why = f"events {since + 1} to {oldest - 1} are no longer held (the last {self.ring.maxlen} are)"
        sub = Subscriber(oldest if why else since + 1, self.seq, on_drop)
        if why:
            sub.gap = self._gap(sub.next_seq - 1, why)
        return self._add(sub)

    def _gap(self, seq: int, why: str) -> bytes:
        line = {"seq": seq, "time": round(time.time(), 6), "daemon_id": self.daemon_id, "uuid": None, "model_name": None}
        return json.dumps({**line, "type": "gap", "detail": why}, separators=(",", ":")).encode() + b"\n"

    def _add(self, sub: Subscriber) -> Subscriber:
        self.subscribers.add(sub)
        return sub

    def take(self, sub: Subscriber, most: int, upto: int | None = None) -> list[bytes]:
        """The next ``most`` lines for ``sub`` (up to seq ``upto``), moving its cursor past them."""
        if sub.dropped or not self.ring:
            return []
        start = sub.next_seq - self.oldest()
        if start < 0:  # (its next event left the ring: emit drops it; said here too for safety)
            self.drop(sub)
            return []
        last = self.seq if upto is None else min(upto, self.seq)
        count = min(most, last - sub.next_seq + 1)
        if count <= 0:
            return []
        lines = list(itertools.islice(self.ring, start, start + count))
        sub.next_seq += len(lines)
        return lines

    def drop(self, sub: Subscriber) -> None:
        """Stop sending to ``sub``: it fell too far behind (or left); its connection is closed."""
        if sub.dropped:
            return
        sub.dropped = True
        self.subscribers.discard(sub)
        sub.wake()
        if sub.on_drop is not None:
            log.warning("an events client fell %d events behind; closing its connection", self.seq - sub.next_seq + 1)
            sub.on_drop()

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)


_bus = EventBus()


def begin(ring: int = RING, queue: int = QUEUE) -> EventBus:
    """A new bus for a daemon that starts (a new daemon_id, seq from 0); ``emit`` goes to it from now on."""
    global _bus
    _bus = EventBus(ring, queue)
    return _bus


def bus() -> EventBus:
    return _bus


def emit(kind: str, svc: BaseService | None = None, detail: str = "", code: int | None = None) -> None:
    """Record an event on the daemon's bus (see ``EventBus.emit``)."""
    _bus.emit(kind, svc, detail, code)


def state_changed(svc: BaseService, before: ServiceState, state: ServiceState, error: str | None, step: str) -> None:
    """``change_state``'s event: by ``BY_STEP``, else by the new state if it changed; the reason is the detail."""
    kind = BY_STEP.get(step) or (BY_STATE.get(state.value) if state != before else None)
    if kind is not None:
        _bus.emit(kind, svc, error or (f"pid {svc.status.pid}" if kind == "healthy" and svc.status.pid else ""))


def exited(svc: BaseService, proc: ProcessHandle, code: int | None, why: str = "") -> None:
    """The server's process ``proc`` exited with ``code``: one ``exited`` event per process,
    however many places learn of the exit (a start's health wait, then supervision)."""
    if proc in _bus.exits_reported:
        return
    _bus.exits_reported.add(proc)
    if code is None:
        what = "exited (its exit code is unknown: it is not the daemon's child)"
    else:
        what = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    _bus.emit("exited", svc, f"pid {proc.pid} {what}" + (f": {why}" if why else ""), code)
