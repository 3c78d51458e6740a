"""The idle checker: active services with an ``idle_timeout`` that received no request for that long
are scaled to zero (``OnDemand.idle_stop``).

About once a second (never more often than ``idle_timeout / 4``) it reads each such service's
activity file (one ``pread`` of 16 bytes, see runtime/_serve/activity.py): a service is idle when
no request is in flight and ``now - max(last request, time it turned active)`` reaches its
``idle_timeout``. The time it turned active is when the checker first saw its current server
active (a restarted daemon starts the count again: it never stops a server sooner than asked).

Invariant: with no on-demand service the checker has no task and costs no wake-up at all (the
daemon's idle-CPU target); ``poke`` starts it when one may have come (a deploy, a replace, a
rebuild), and it ends itself once none is left.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from uuid import UUID

from .models import ServiceState
from .paths import Paths
from .runtime._serve import activity
from .service import ServiceRuntime

log = logging.getLogger("modeld.manager")

TICK = 1.0  # seconds between checks, at most


class IdleChecker:
    def __init__(
        self,
        paths: Paths,
        services: Mapping[UUID, ServiceRuntime],
        stop: Callable[[ServiceRuntime, Callable[[ServiceRuntime], bool]], Awaitable[None]],
        measure: Callable[[ServiceRuntime], Awaitable[int]] | None = None,
    ):
        self.paths = paths
        self.services = services
        self.stop = stop  # OnDemand.idle_stop
        self.measure = measure  # Sizes.measure_service: each active one's memory, for admission (throttled there)
        # Whether something could wake the service again (a command server: only a running gateway);
        # one that nothing could wake is left loaded (set by the manager).
        self.can_wake: Callable[[ServiceRuntime], bool] = lambda m: True
        self._task: asyncio.Task[None] | None = None
        self._since: dict[UUID, tuple[int, float]] = {}  # uuid: (pid, time.time() it was first seen active)
        self._stopping: set[UUID] = set()

    def poke(self) -> None:
        """Start checking, if a service has an idle_timeout and the checker is not running."""
        if self._task is None and any(m.svc.config.idle_timeout is not None for m in self.services.values()):
            self._task = asyncio.get_running_loop().create_task(self._run(), name="idle-checker")

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        try:
            while True:
                ondemand = [m for m in self.services.values() if m.svc.config.idle_timeout is not None]
                if not ondemand:
                    return
                self.check(ondemand)
                if self.measure is not None:
                    for m in ondemand:
                        if m.svc.status.state == ServiceState.ACTIVE and m.proc is not None:
                            await self.measure(m)
                await asyncio.sleep(min(TICK, *((m.svc.config.idle_timeout or TICK) / 4 for m in ondemand)))
        finally:
            if self._task is asyncio.current_task():
                self._task = None

    def check(self, ondemand: list[ServiceRuntime]) -> None:
        now = time.time()
        for uuid in [u for u in self._since if u not in self.services]:
            del self._since[uuid]
        for m in ondemand:
            proc = m.proc
            if m.svc.status.state != ServiceState.ACTIVE or proc is None:
                self._since.pop(m.uuid, None)
                continue
            seen = self._since.get(m.uuid)
            if seen is None or seen[0] != proc.pid:
                self._since[m.uuid] = (proc.pid, now)
                continue
            if m.uuid not in self._stopping and self.idle(m, now) and self.can_wake(m):
                self._stopping.add(m.uuid)
                task = asyncio.get_running_loop().create_task(self._stop(m), name=f"idle-stop-{m.uuid}")
                task.add_done_callback(functools.partial(self._stopped, m.uuid))

    def _stopped(self, uuid: UUID, _task: asyncio.Task[None]) -> None:
        self._stopping.discard(uuid)

    async def _stop(self, m: ServiceRuntime) -> None:
        try:
            await self.stop(m, lambda m: self.idle(m, time.time()))
        except Exception:
            log.exception("%s: the idle stop failed", m.uuid)

    def idle(self, m: ServiceRuntime, now: float) -> bool:
        """Whether the service's server has had no request for its idle_timeout (see the module docstring)."""
        timeout = m.svc.config.idle_timeout
        seen = self._since.get(m.uuid)
        if timeout is None or seen is None or m.proc is None or seen[0] != m.proc.pid:
            return False
        found = activity.read(str(self.paths.activity_file(m.uuid)))
        last, in_flight = (found[0], found[1]) if found is not None else (0.0, 0)
        return in_flight == 0 and now - max(last, seen[1]) >= timeout
