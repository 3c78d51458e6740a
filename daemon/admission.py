"""Admission: cap what is loaded, by count (``max_active``) and by bytes (``memory_budget``).

Only on-demand services count, those with an ``idle_timeout``: their servers are the ones that may
be scaled to zero to make room. A service without one is never counted and never chosen.

Two parts:

* :class:`Admission`, a pure decision. Given the on-demand services now loaded (each with its size,
  its last use and whether it can be unloaded now) and the one about to load (with its last known
  size; 0 if never measured), it answers which to scale to zero first, least recently used first,
  so that after the load both caps hold; or that nothing that can be unloaded now suffices, with a
  message that names the cap and what holds it. It unloads nothing when unloading everything it
  may would still not be enough (it never scales a server to zero for nothing).
* :class:`Gate`, the coroutine the wake, start and deploy paths await before they load a server
  (``make_room``, or ``admit`` around the load): it asks the decision, unloads the victims through
  an injected ``unload(uuid)`` coroutine, and waits (on :meth:`Gate.changed`, or polling every
  ``POLL`` seconds: a request in flight ends without telling anyone) until ``deadline``, then
  raises :class:`~daemon.exceptions.AdmissionRefused` (503) with the decision's message.

Invariant: between ``make_room`` returning and the load being seen as loaded, the service holds a
*reservation* that counts as loaded (and cannot be unloaded) in every other decision, so two wakes
racing for the last slot never both get it. ``admit`` releases it when the load is over (the
server is then counted as loaded, or it failed and holds nothing).

``GET /v1/daemon``'s ``on_demand`` (:func:`describe`) shows the caps and what is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .exceptions import AdmissionRefused, ModeldError
from .memory import Sizes
from .models import DesiredState, ServiceState
from .service import ServiceRuntime
from .settings import format_size

log = logging.getLogger("modeld.admission")


@dataclass(frozen=True)
class Loaded:
    """An on-demand service whose server is loaded (or loading), as admission sees it."""

    uuid: str
    model_name: str
    size: int  # bytes: the highest seen (0: never measured)
    last_use: float  # time.time() of its last request, else of when it turned active
    busy: str = ""  # why it cannot be unloaded now ("in flight", "starting", ...); "" if it can
    on_demand: bool = True  # False: no idle_timeout, never counted nor chosen

    @property
    def unloadable(self) -> bool:
        return not self.busy


@dataclass(frozen=True)
class Loading:
    """The service about to load."""

    uuid: str
    model_name: str
    size: int = 0  # its last known size in bytes (0: never measured)


@dataclass(frozen=True)
class Decision:
    """Scale ``victims`` to zero (in this order), then load; or, if ``refused``, nothing suffices now."""

    victims: tuple[str, ...] = ()
    refused: str = ""  # the message: which cap, and what holds it
    final: bool = False  # waiting cannot help (the service alone is larger than the budget)

    @property
    def admitted(self) -> bool:
        return not self.refused


class Admission:
    """The caps; :meth:`decide` is pure (no clock read, no I/O)."""

    def __init__(self, max_active: int | None = None, memory_budget: int | None = None) -> None:
        self.max_active = max_active
        self.memory_budget = memory_budget

    @property
    def capped(self) -> bool:
        return self.max_active is not None or self.memory_budget is not None

    def decide(self, loaded: Iterable[Loaded], loading: Loading, now: float) -> Decision:
        """What to scale to zero before ``loading`` loads, least recently used first (see the module docstring).

        ``loaded`` may hold ``loading`` itself (a start of a service that is loaded or starting, a deploy
        over a loaded one): it is admitted at once, with nothing unloaded. It holds its room already, and a
        start that waited here while its own lock is held could keep an unload of it waiting too.
        """
        entries = [e for e in loaded if e.on_demand]
        if not self.capped or any(e.uuid == loading.uuid for e in entries):
            return Decision()
        others = entries
        if self.memory_budget is not None and loading.size > self.memory_budget:
            return Decision(
                refused=f"memory_budget={_budget(self.memory_budget)} is less than {_who(loading)}'s last measured size, "
                f"{format_size(loading.size)}: it cannot be loaded while the budget is so",
                final=True,
            )
        victims, fits = self._least_recently_used(others, len(others) + 1, sum(e.size for e in others) + loading.size)
        if fits:
            return Decision(victims=victims)
        return Decision(refused=self._held(others, loading, now))

    def excess(self, loaded: Iterable[Loaded]) -> tuple[str, ...]:
        """What to scale to zero, least recently used first among those that can go now, so that what
        is loaded holds the caps with nothing more loaded (servers found beyond them: a daemon
        restarted with lower caps, or over servers loaded past them); () if they hold."""
        entries = [e for e in loaded if e.on_demand]
        return self._least_recently_used(entries, len(entries), sum(e.size for e in entries))[0]

    def _least_recently_used(self, entries: Sequence[Loaded], count: int, used: int) -> tuple[tuple[str, ...], bool]:
        """The unloadable ``entries``, least recently used first, that must go for ``count`` servers
        using ``used`` bytes to fit the caps; and whether they then fit."""
        victims: list[str] = []
        for entry in sorted((e for e in entries if e.unloadable), key=lambda e: (e.last_use, e.uuid)):
            if self._fits(count, used):
                break
            victims.append(entry.uuid)
            count, used = count - 1, used - entry.size
        return tuple(victims), self._fits(count, used)

    def _fits(self, count: int, used: int) -> bool:
        return (self.max_active is None or count <= self.max_active) and (
            self.memory_budget is None or used <= self.memory_budget
        )

    def _held(self, others: Sequence[Loaded], loading: Loading, now: float) -> str:
        """Which cap stops ``loading``, and what holds it (unloading every one that may be would not do)."""
        movable = [e for e in others if e.unloadable]
        stuck = [e for e in others if not e.unloadable]
        holders = ", ".join(_holder(e, now) for e in sorted(others, key=lambda e: (e.last_use, e.uuid))) or "nothing"
        parts = []
        if self.max_active is not None and len(stuck) + 1 > self.max_active:
            parts.append(f"max_active={self.max_active} is held by {holders}")
        if self.memory_budget is not None and sum(e.size for e in stuck) + loading.size > self.memory_budget:
            stuck_bytes = sum(e.size for e in stuck)
            parts.append(
                f"memory_budget={_budget(self.memory_budget)} is held by {holders} "
                f"({format_size(stuck_bytes)} that cannot be unloaded now, and {_who(loading)} needs "
                f"{format_size(loading.size)})"
            )
        unloadable = f"; {len(movable)} that could be unloaded would not be enough" if movable else ""
        return f"cannot load {_who(loading)}: " + "; ".join(parts) + unloadable


def _who(entry: Loaded | Loading) -> str:
    return f"{entry.model_name} ({entry.uuid[:8]})" if entry.model_name else entry.uuid[:8]


def _holder(entry: Loaded, now: float) -> str:
    used = f"last used {max(now - entry.last_use, 0.0):.1f} s ago" if entry.last_use else "never used"
    why = f", {entry.busy}" if entry.busy else ""
    return f"{entry.model_name or '?'} ({entry.uuid[:8]}, {format_size(entry.size)}, {used}{why})"


def _budget(size: int) -> str:
    return f"{size}" if size < 1024 else f"{size} ({format_size(size)})"


class Gate:
    """Make room before a load: decide, unload, wait; the reservations that keep racing loads apart."""

    POLL = 0.05  # seconds between two looks while nothing can be unloaded

    def __init__(
        self,
        admission: Admission,
        loaded: Callable[[], Iterable[Loaded]],
        unload: Callable[[str], Awaitable[object]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.admission = admission
        self._loaded = loaded
        self._unload = unload
        self._clock = clock
        self._reserved: dict[str, Loading] = {}
        self._leaving: set[str] = set()  # being unloaded by a load: not chosen again meanwhile
        self._changed = asyncio.Event()

    def changed(self) -> None:
        """Something was unloaded, stopped or finished a request: waiting loads look again now."""
        self._changed.set()

    def current(self, loading: Loading | None = None) -> list[Loaded]:
        """What counts as loaded now: the loaded on-demand services (those another load is unloading
        cannot be chosen again) and the reservations of the other loads."""
        found = [replace(e, busy="being unloaded") if e.uuid in self._leaving else e for e in self._loaded()]
        seen = {e.uuid for e in found}
        for uuid, reserved in self._reserved.items():
            if uuid not in seen and (loading is None or uuid != loading.uuid):
                found.append(Loaded(uuid, reserved.model_name, reserved.size, self._clock(), busy="loading"))
        return found

    async def make_room(self, loading: Loading, deadline: float) -> None:
        """Unload what must go so ``loading`` fits, waiting up to ``deadline`` (``time.monotonic()``) for
        room; then hold a reservation for it (release it with :meth:`release`, or use :meth:`admit`).

        Raises ``AdmissionRefused`` (503) naming the cap and what holds it when there is no room in time.

        No lock is held across an await: a decision and its reservation are taken in one step of the
        loop (nothing else runs between them), so an unload that waits for a service's own lock (held by
        a start of that service, itself in here) cannot deadlock with this one.
        """
        if not self.admission.capped:
            return
        while True:
            decision = self.admission.decide(self.current(loading), loading, self._clock())
            if decision.admitted:
                self._reserved[loading.uuid] = loading  # the room being made is this load's
                if not decision.victims:
                    return
                try:
                    await self._unload_all(decision.victims, loading)
                except BaseException:
                    self._reserved.pop(loading.uuid, None)
                    raise
                decision = self.admission.decide(self.current(loading), loading, self._clock())
                if decision.admitted and not decision.victims:
                    return
                self._reserved.pop(loading.uuid, None)  # an unload failed, or others came: decide again
            if decision.final:
                raise AdmissionRefused(decision.refused)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AdmissionRefused(decision.refused or f"cannot load {_who(loading)}: no room was made in time")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, self.POLL))

    async def _unload_all(self, victims: Sequence[str], loading: Loading) -> None:
        """Scale ``victims`` to zero, in order; one that fails stays loaded (the caller decides again)."""
        self._leaving.update(victims)
        try:
            for uuid in victims:
                log.info("admission: scaling %s to zero to load %s", uuid, loading.uuid)
                try:
                    await self._unload(uuid)
                except ModeldError as exc:
                    log.warning("admission: could not unload %s: %s", uuid, exc)
        finally:
            self._leaving.difference_update(victims)
            self.changed()

    def release(self, uuid: str) -> None:
        """The load of ``uuid`` is over (its server is counted as loaded now, or it failed)."""
        if self._reserved.pop(uuid, None) is not None:
            self.changed()

    @contextlib.asynccontextmanager
    async def admit(self, loading: Loading, deadline: float) -> AsyncIterator[None]:
        """``make_room``, then the caller's load, then the reservation released."""
        await self.make_room(loading, deadline)
        try:
            yield
        finally:
            self.release(loading.uuid)


def describe(admission: Admission, loaded: Iterable[Loaded]) -> dict[str, Any]:
    """``GET /v1/daemon``'s ``on_demand``: the caps and each loaded on-demand server's size and last use."""
    return {
        "max_active": admission.max_active,
        "memory_budget": admission.memory_budget,
        "loaded": [
            {"uuid": e.uuid, "model_name": e.model_name, "size_bytes": e.size, "last_use": e.last_use or None}
            for e in sorted(loaded, key=lambda e: (e.last_use, e.uuid))
            if e.on_demand
        ],
    }


# (last use as time.time(), 0.0 if none yet; requests in flight) of a service, from its activity file.
Activity = Callable[[str], tuple[float, int]]


def no_activity(uuid: str) -> tuple[float, int]:
    """Until the activity files are read: no request seen, none in flight (last use is the start)."""
    return 0.0, 0


def loaded_services(services: Iterable[ServiceRuntime], sizes: Sizes, activity: Activity = no_activity) -> list[Loaded]:
    """The on-demand services whose server is alive, as admission counts them (a service with no
    idle_timeout is left out: it never counts). Reads no file but through ``activity``."""
    found = []
    for m in services:
        svc = m.svc
        if svc.config.idle_timeout is None:
            continue
        state = svc.status.state
        alive = m.proc is not None and m.proc.alive
        # A server that crashed and that supervision restarts (after a backoff) holds its room
        # meanwhile: else another load would take it and the restart would go past the caps.
        restarting = (
            not alive
            and m.task is not None
            and not m.task.done()
            and svc.desired_state == DesiredState.RUNNING
            and state in (ServiceState.ACTIVE, ServiceState.PENDING_STARTUP)
        )
        if not alive and not restarting:
            continue
        last, in_flight = activity(str(svc.uuid))
        if restarting:
            busy = "restarting"
        elif state == ServiceState.PENDING_STARTUP:
            busy = "starting"
        elif state == ServiceState.PENDING_SHUTDOWN:
            busy = "stopping"
        elif in_flight:
            busy = f"{in_flight} in flight"
        elif m.replacing is not None or m.lock.locked():
            busy = "an operation on it is under way"
        else:
            busy = ""
        found.append(
            Loaded(
                uuid=str(svc.uuid),
                model_name=svc.config.model_name or svc.config.name,
                size=sizes.size(svc.uuid),
                last_use=max(last, svc.status.started_at or 0.0),
                busy=busy,
            )
        )
    return found


def loading_of(m: ServiceRuntime, sizes: Sizes) -> Loading:
    """The service ``m`` about to load, with its last known size, as :meth:`Gate.make_room` takes it."""
    return Loading(uuid=str(m.uuid), model_name=m.svc.config.model_name or m.svc.config.name, size=sizes.size(m.uuid))
