"""On-demand services (``idle_timeout``): scaling one to zero, and waking it again.

Scaled to zero means no server process: the service keeps its uuid, its port or socket and its
URL, its desired state stays ``running``, and nothing counts as a restart. A built-in server's
listening socket stays held by the daemon, which watches it (``loop.add_reader``): a pending
connection wakes the service (``load``, a start as any other: warm fork, health, supervision),
and the new server accepts what waited in the backlog. A ``command`` service is woken by the
gateway, through ``POST /v1/services/{uuid}/start``, which comes to ``load`` too.

Invariants:
- ``load`` is the one way a scaled-to-zero service is loaded again (a wake on its socket, a start,
  a deploy over it): admission's cap check belongs there. The caller holds the service's lock.
- A scale to zero cancels supervision before it stops the server, so the exit is no crash (no
  restart, ``restarts`` and the crash count untouched), and it is a graceful stop: a built-in
  server stops accepting and drains, and a connection that comes meanwhile waits in the backlog
  of the socket the daemon holds, then wakes the service.
- A wake whose server cannot serve never leaves the waiting requests unanswered: 503 (it failed)
  or 504 (past ``wake_timeout``), answered by ``waiting.answer_waiting`` on a copy of the socket
  (a failed start closes the service's own).
- While scaled to zero and watched, ``m.watching`` is set; ``close_listener`` (a stop, a delete,
  a shutdown) stops the watch first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from uuid import UUID

from . import events, killpoints, metrics
from .exceptions import AdmissionRefused, ModeldError, StillStarting, StorageError
from .launch import Launcher
from .memory import Sizes
from .models import DesiredState, ServiceState
from .paths import Paths
from .runtime._serve.counters import RequestCounters
from .service import ServiceRuntime, is_builtin
from .sockets import fetch_listener
from .startstop import StartStop
from .store import Store
from .supervise import Supervisor
from .transitions import change_state, move, save
from .waiting import answer_waiting

log = logging.getLogger("modeld.manager")


def _no_cap(m: ServiceRuntime, timeout: float) -> contextlib.AbstractAsyncContextManager[None]:
    return contextlib.nullcontext()


class OnDemand:
    """Scales the services of one home to zero and wakes them (see the module docstring)."""

    def __init__(
        self,
        paths: Paths,
        store: Store,
        launcher: Launcher,
        supervisor: Supervisor,
        startstop: StartStop,
        services: Mapping[UUID, ServiceRuntime],
        wake_timeout: float | None = None,
        sizes: Sizes | None = None,
    ):
        self.paths = paths
        self.store = store
        self.launcher = launcher
        self.supervisor = supervisor
        self.startstop = startstop
        self.services = services
        self.wake_timeout = wake_timeout  # the setting; None: each service's startup_timeout
        self.sizes = sizes  # measured once more as a server goes (its peak, for admission)
        # Room for one more loaded server (admission.py's Gate.admit, set by the manager): entered
        # around every load of an on-demand service; no cap by default.
        self.room: Callable[[ServiceRuntime, float], contextlib.AbstractAsyncContextManager[None]] = _no_cap
        self._tasks: set[asyncio.Task[None]] = set()

    def timeout_of(self, m: ServiceRuntime) -> float:
        return self.wake_timeout if self.wake_timeout is not None else m.svc.config.startup_timeout

    # ------------------------------------------------------------ to zero

    async def scale_to_zero(self, m: ServiceRuntime) -> None:
        """Stop the server gracefully and record ``scaled_to_zero`` (strict); the caller holds the lock.

        A built-in service's socket stays held and is watched from then on.
        """
        await self.supervisor.cancel_supervision(m)
        svc = m.svc
        svc.desired_state = DesiredState.RUNNING
        svc.desired_reason = ""
        proc = m.proc
        builtin = is_builtin(svc.config)
        if proc is not None:
            if builtin and m.listener is None and proc.alive and proc.info.fd_socket:
                # A re-adopted server whose socket the daemon does not hold yet: take it first,
                # so that the port is never free between the server's exit and the watch.
                m.listener = await asyncio.to_thread(fetch_listener, proc.info.fd_socket)
            if proc.alive and self.sizes is not None:
                await self.sizes.measure_service(m, force=True)
            if proc.alive:
                # Recorded first, as a stop is: the gateway, reading it, holds a request that meets
                # the closing port for the wake instead of answering 502 (docs/on-demand-design.md).
                change_state(self.store, svc, ServiceState.PENDING_SHUTDOWN, step="scale-to-zero.stopping", strict=False)
                killpoints.reached("unload.after-json")
                await self.supervisor.terminate(m, proc, svc.config.stop_timeout)
                killpoints.reached("unload.after-exit")
            if proc.exited.done() and not proc.exited.cancelled():
                svc.status.exit_code = proc.exited.result()
            self.launcher.forget_process(m, proc)
        svc.status.pid = None
        move(svc, ServiceState.SCALED_TO_ZERO)
        if builtin:
            if m.listener is None:
                self.launcher.ensure_port(m, svc.config)
            self.watch(m)
        save(self.store, svc, step="scale-to-zero", strict=True)
        events.emit("scaled_to_zero", svc)  # event
        log.info("scaled %s to zero", svc.uuid)

    # ------------------------------------------------------------ the watch

    def watch(self, m: ServiceRuntime) -> None:
        """Wake the service on the next connection to its held socket (built-in services)."""
        if m.listener is None or m.watching is not None:
            return
        loop = asyncio.get_running_loop()
        loop.add_reader(m.listener.fileno(), self._pending, m)
        m.watching = loop

    def _pending(self, m: ServiceRuntime) -> None:
        m.unwatch()  # (level-triggered: once is enough; the wake takes it from here)
        task = asyncio.get_running_loop().create_task(self._wake(m), name=f"wake-{m.uuid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _wake(self, m: ServiceRuntime) -> None:
        try:
            async with m.lock:
                if self.services.get(m.uuid) is not m or m.listener is None:
                    return  # deleted meanwhile
                if m.svc.status.state != ServiceState.SCALED_TO_ZERO:
                    return  # started (or stopped) meanwhile: it serves, or nothing should wake it
                await self.wake(m)
        except Exception:
            log.exception("%s: the wake failed", m.uuid)

    async def wake(self, m: ServiceRuntime) -> None:
        """Load the service for the connections waiting on its socket; if it cannot serve them in
        time, answer them (503: the wake failed, 504: past wake_timeout). The caller holds the lock."""
        assert m.listener is not None
        timeout = self.timeout_of(m)
        held = m.listener.dup()  # a failed start closes the service's socket: its waiting requests still get their answer
        started = time.monotonic()
        counters: RequestCounters | None = None
        log.info("%s: a request is waiting; waking it", m.uuid)
        try:
            try:
                await self.load(m, timeout)
            except ModeldError as exc:
                if isinstance(exc, AdmissionRefused):
                    status, kind, message = 503, "ServiceUnavailable", f"service {m.uuid} could not wake: {exc}"
                elif isinstance(exc.__cause__, StillStarting) or time.monotonic() - started >= timeout:
                    status, kind = 504, "GatewayTimeout"
                    message = f"service {m.uuid} did not wake within {timeout:g} s (wake_timeout)"
                else:
                    status, kind = 503, "ServiceUnavailable"
                    message = f"service {m.uuid} could not wake: {exc}"

                def observe(answered: int) -> None:  # each answer, as the built-in server counts its own (metrics)
                    nonlocal counters
                    if counters is None:
                        counters = RequestCounters(str(self.paths.requests_file(m.uuid, "direct")))
                    counters.observe(answered, time.monotonic() - started)

                count = await answer_waiting(held, status, kind, message, observe)
                log.warning("%s: answered %d waiting requests %d: %s", m.uuid, count, status, exc)
                if m.svc.status.state == ServiceState.SCALED_TO_ZERO:
                    self.watch(m)  # (refused room: nothing started) the next request tries again
        finally:
            held.close()
            if counters is not None:
                counters.close()

    # ------------------------------------------------------------ loading

    async def load(self, m: ServiceRuntime, timeout: float) -> None:
        """Load a scaled-to-zero service: a start, waited for up to ``timeout``. The one way back from
        zero (socket wakes, start, the gateway's start, deploy): the caller holds the lock.

        A load that fails leaves the service in ``error`` with its desired state still ``running``:
        a scaled-to-zero service is one left running, and a wake that fails (the model no longer
        loads, its server killed while it loads) is no one asking it to stop. As after a crash loop
        given up, it stays in error until someone starts (or stops) it; a daemon restart does not
        start it again."""
        m.unwatch()
        m.failures = 0
        events.emit("woken", m.svc)  # event
        metrics.woken(m.uuid)  # metrics
        try:
            async with self.room(m, timeout):
                await self.startstop.start(m, timeout, failing_state=DesiredState.RUNNING)
        except AdmissionRefused as exc:  # nothing started: it stays scaled to zero, and the events say why
            events.emit("scaled_to_zero", m.svc, f"its wake was refused: {exc}")  # event
            log.warning("%s: the load from zero was refused: %s", m.uuid, exc)
            raise
        except ModeldError as exc:
            # (said here too: a wake by the gateway's start call leaves no other trace in daemon.log)
            log.warning(
                "%s: the load from zero failed (%s): %s", m.uuid, m.svc.status.state.value, (str(exc).splitlines() or [""])[0]
            )
            raise

    async def unload(self, m: ServiceRuntime) -> None:
        """Scale the service to zero now, whatever it runs (the caller holds the lock)."""
        if m.svc.status.state == ServiceState.SCALED_TO_ZERO and m.proc is None:
            if is_builtin(m.svc.config):
                if m.listener is None:
                    self.launcher.ensure_port(m, m.svc.config)
                self.watch(m)
            return
        await self.scale_to_zero(m)

    def restore_scaled(self, m: ServiceRuntime) -> None:
        """At a rebuild: a service recorded scaled to zero with no server. Its socket is bound again
        (as for a server the daemon must start) and watched; it stays scaled to zero."""
        svc = m.svc
        svc.status.pid = None
        write = svc.status.state != ServiceState.SCALED_TO_ZERO
        try:
            if is_builtin(svc.config):
                self.launcher.ensure_port(m, svc.config)
                self.watch(m)
        except ModeldError as exc:
            change_state(self.store, svc, ServiceState.ERROR, f"cannot listen again: {exc}", step="restore.failed", strict=False)
            return
        change_state(self.store, svc, ServiceState.SCALED_TO_ZERO, step="restore.scaled", strict=False, write=write)

    def forget(self, uuid: UUID) -> None:
        """A deleted service's activity file goes with it (and its request counters)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.paths.activity_file(uuid))
        metrics.forget(self.paths, uuid)  # metrics

    async def idle_stop(self, m: ServiceRuntime, still_idle: Callable[[ServiceRuntime], bool]) -> None:
        """The idle checker's stop: under the lock, if the service is still active and idle."""
        async with m.lock:
            if self.services.get(m.uuid) is not m or m.svc.status.state != ServiceState.ACTIVE or not still_idle(m):
                return
            log.info("%s: no request for %g s; scaling it to zero", m.uuid, m.svc.config.idle_timeout)
            try:
                await self.scale_to_zero(m)
                metrics.idle_stopped(m.uuid)  # metrics
            except StorageError as exc:
                log.error("%s: %s", m.uuid, exc)
