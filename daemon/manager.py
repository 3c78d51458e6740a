"""The engine: every service of one home in memory (the registry), the per-service locks, and
the operations a client asks for (deploy, start, stop, delete, start all, shutdown).

One :class:`ServiceRuntime` per service holds what only the running daemon knows:
the process handle (pidfd), the listening socket it holds for built-in
servers, and the supervision task. All of it runs on one asyncio loop;
operations on a service are serialised by its ``asyncio.Lock`` and cancel
its supervision task first, so the two never act on a process at once.

The manager decides which service an operation is about and holds its lock; the work is done
by one object per concept, each wired over the same registry by ``Units.wire`` (units.py): ``Launcher`` (launch.py),
``Supervisor`` (supervise.py), ``StartStop`` (startstop.py), ``Replacer`` (replace.py) and
``Rebuilder`` (rebuild.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import time
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

from . import events, killpoints
from .admission import Admission, Gate, Loaded, describe as describe_on_demand, loaded_services, loading_of
from .containment import Containment, choose as choose_containment
from .exceptions import Conflict, InvalidRequest, ModeldError, ServiceNotFound, StorageError
from .gatewayd import GatewaySupervisor
from .models import BaseService, DesiredState, LocalModelService, ServiceConfig, ServiceState, changes
from .paths import Paths
from .runtime._serve.activity import read as read_activity
from .service import ServiceRuntime, is_builtin
from .settings import DaemonSettings
from .store import Problem
from .transitions import change_state, move, save
from .units import Units

log = logging.getLogger("modeld.manager")

STOPPED_BY_STOP_ALL = "stopped by `modeld daemon stop --all`"


_state_of = operator.attrgetter("svc.status.state")


class Manager:
    def __init__(self, paths: Paths, settings: DaemonSettings):
        self.paths = paths
        self.settings = settings
        self.services: dict[UUID, ServiceRuntime] = {}
        self.problems: list[Problem] = []
        self.started_at = time.time()
        self.events = events.begin(settings.event_ring, settings.event_queue)  # a new daemon_id, seq from 0
        self._create_lock = asyncio.Lock()
        self.containment: Containment = choose_containment(paths.home, paths.run, settings.cgroup, settings.named("cgroup"))
        if self.containment.reason:
            log.info("containment: tag (%s)", self.containment.reason)
        else:
            log.info("containment: %s", self.containment.kind)
        self.units = Units.wire(
            paths,
            self.containment,
            self.services,
            warm_start=settings.warm_start,
            health_interval=settings.health_interval,
            wake_timeout=settings.wake_timeout,
        )
        # Each unit by its name, as the operations below use them.
        self.store = self.units.store
        self.logs = self.units.logs
        self.launcher = self.units.launcher
        self.prober = self.units.prober
        self.supervisor = self.units.supervisor
        self.startstop = self.units.startstop
        self.replacer = self.units.replacer
        self.rebuilder = self.units.rebuilder
        self.ondemand = self.units.ondemand
        self.idle = self.units.idle
        self._counted: tuple[int, list[ServiceRuntime], dict[str, int]] = (-1, [], {})
        self.gateway = GatewaySupervisor(paths, settings)
        # On demand (admission.py): the caps, each server's size (units.sizes), each one's last use
        # (its activity file), and the gate every load of an on-demand service passes.
        self.admission = Admission(settings.max_active, settings.memory_budget)
        self.sizes = self.units.sizes
        self.gate = Gate(self.admission, self.loaded_on_demand, self._unload_for_room)
        self.ondemand.room = self.room
        self.idle.can_wake = self.can_wake
        self.rebuilder.fits = self.fits_now

    # ------------------------------------------------------------------ queries

    def get(self, uuid: UUID) -> ServiceRuntime:
        try:
            return self.services[uuid]
        except KeyError:
            raise ServiceNotFound(f"no service with uuid {uuid}") from None

    def loaded_on_demand(self) -> list[Loaded]:
        """The on-demand services whose server is alive, with size and last use, as admission counts them."""
        return loaded_services(self.services.values(), self.sizes, self.activity)

    def activity(self, uuid: str) -> tuple[float, int]:
        """(last request, requests in flight) from the service's activity file; (0.0, 0) if none."""
        found = read_activity(str(self.paths.activity_file(uuid)))
        return (found[0], found[1]) if found is not None else (0.0, 0)

    def gateway_runs(self) -> bool:
        return self.settings.gateway_address is not None and self.gateway.describe()["gateway_pid"] is not None

    def can_wake(self, m: ServiceRuntime) -> bool:
        """Whether a scaled-to-zero ``m`` could be woken: a built-in one on its socket, a command one
        only through a running gateway (the idle checker leaves the others loaded)."""
        return is_builtin(m.svc.config) or self.gateway_runs()

    def room(
        self, m: ServiceRuntime, timeout: float, config: ServiceConfig | None = None
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """Room for ``m``'s server under the caps, made before it loads (admission.py); waits up to the
        wake timeout (``timeout`` if shorter), then AdmissionRefused (503). Only on-demand services count:
        ``config`` is the one the server loads with (a replace's new one; by default the service's)."""
        if (config or m.svc.config).idle_timeout is None or not self.admission.capped:
            return contextlib.nullcontext()
        wait = min(timeout, self.ondemand.timeout_of(m))
        return self.gate.admit(loading_of(m, self.sizes), time.monotonic() + wait)

    def fits_now(self, m: ServiceRuntime) -> bool:
        """Whether ``m``'s server may load now under the caps with nothing unloaded for it (the rebuild's
        starts of on-demand services: one that does not fit stays scaled to zero)."""
        if m.svc.config.idle_timeout is None or not self.admission.capped:
            return True
        decision = self.admission.decide(self.gate.current(), loading_of(m, self.sizes), time.time())
        return decision.admitted and not decision.victims

    async def hold_caps(self) -> None:
        """Scale to zero, least recently used first, the on-demand servers loaded beyond the caps (after
        a rebuild: re-adopted servers that a daemon with other caps, or one killed mid-way, left)."""
        if not self.admission.capped:
            return
        for uuid in self.admission.excess(self.gate.current()):
            log.info("admission: scaling %s to zero: the servers found loaded are more than the caps allow", uuid)
            try:
                await self._unload_for_room(uuid)
            except (ModeldError, ServiceNotFound) as exc:
                log.warning("admission: could not unload %s: %s", uuid, exc)

    async def _unload_for_room(self, uuid: str) -> None:
        """Admission's unload of a least recently used on-demand service (under its lock)."""
        async with self._locked(UUID(uuid)) as m:
            if m.svc.status.state == ServiceState.ACTIVE and m.proc is not None:
                await self.ondemand.scale_to_zero(m)

    def counts(self) -> dict[str, int]:
        """Services by state. Counted again only when a service came or went or anything was
        edited (``models.changes()``; a runtime's service is never replaced): GET /v1/daemon asks
        this, and a thousand services took milliseconds to count."""
        members = list(self.services.values())
        stamp = changes()
        if stamp != self._counted[0] or members != self._counted[1]:  # (identity compares: fast)
            states = list(map(_state_of, members))
            counts = {state.value: states.count(state) for state in ServiceState}
            counts["total"] = len(states)
            self._counted = (stamp, members, counts)
        return dict(self._counted[2])

    # --------------------------------------------------------------- operations

    async def deploy(self, config: ServiceConfig, replace: bool, timeout: float, uuid: UUID | None = None) -> BaseService:
        fresh = False  # deployed: the service this deploy updates in place, or the new one it creates
        if config.idle_timeout is not None and not is_builtin(config) and not self.gateway_runs():
            why = (
                "is off (the gateway setting)"
                if self.settings.gateway_address is None
                else f"is not running ({self.gateway.error})"
            )
            raise InvalidRequest(
                "idle_timeout on a command service needs the gateway: a command server scaled to zero wakes only "
                f"through it, and the gateway {why}; set the gateway, or deploy without idle_timeout"
            )
        await self.launcher.resolve_hosts([config.host])  # before the create lock: a lookup may be slow
        while True:
            async with self._create_lock:
                deployed = self.replacer.service_to_replace(config, replace, uuid)
                self.launcher.precheck(config, fresh=deployed is None, owner=deployed)
                if deployed is None:
                    svc = LocalModelService(config=config) if uuid is None else LocalModelService(config=config, uuid=uuid)
                    svc.service_path = str(self.paths.service_dir(svc.uuid))
                    svc.endpoint = self.launcher.endpoint(config, config.port)
                    deployed = ServiceRuntime(svc)
                    self.launcher.ensure_port(deployed, config, refused=Conflict)
                    await deployed.lock.acquire()  # free: nobody else knows it yet
                    self.services[svc.uuid] = deployed
                    events.emit(
                        "deployed", svc, f"{config.model_type} {config.model_uri or next(iter(config.command), '')}"
                    )  # event
                    fresh = True
                    break
            # Wait for the service's own lock outside the create lock: an operation on it
            # (a slow stop, say) must not hold up deploys of other models.
            await deployed.lock.acquire()
            if self.services.get(deployed.uuid) is deployed:
                break
            deployed.lock.release()  # deleted meanwhile: look again
        try:
            if fresh:
                log.info("deploying %s (%s %s)", deployed.uuid, config.model_type, config.model_uri or config.command)
                try:
                    async with self.room(deployed, timeout):
                        await self.startstop.start(deployed, timeout, failing_state=DesiredState.STOPPED, op="deploy")
                except StorageError:
                    # Its record could not be written (disk full): it must not live on in memory only.
                    self.services.pop(deployed.uuid, None)
                    with contextlib.suppress(StorageError):
                        self.store.delete(deployed.uuid)
                    raise
            else:
                deployed.unwatch()  # a scaled-to-zero service is loaded by the replace's start
                try:
                    # (the new config says whether it counts: a replace may add or drop its idle_timeout)
                    async with self.room(deployed, timeout, config):
                        await self.replacer.replace(deployed, config, timeout)
                    self.sizes.forget(deployed.uuid)  # another model now: the old one's size says nothing
                finally:
                    if deployed.svc.status.state == ServiceState.SCALED_TO_ZERO:  # (refused before anything changed)
                        self.ondemand.watch(deployed)
            return deployed.svc
        finally:
            deployed.lock.release()
            self.idle.poke()

    @contextlib.asynccontextmanager
    async def _locked(self, uuid: UUID) -> AsyncIterator[ServiceRuntime]:
        """The service, with its lock held; ServiceNotFound if it is deleted while we wait."""
        m = self.get(uuid)
        async with m.lock:
            if self.services.get(uuid) is not m:
                raise ServiceNotFound(f"service {uuid} was deleted meanwhile")
            yield m

    async def start(self, uuid: UUID, timeout: float) -> BaseService:
        async with self._locked(uuid) as m:
            if m.svc.status.state == ServiceState.SCALED_TO_ZERO:
                await self.ondemand.load(m, timeout)  # (the gateway's wake of a command service comes here)
                return m.svc
            m.failures = 0
            async with self.room(m, timeout):
                await self.startstop.start(m, timeout, failing_state=DesiredState.STOPPED)
            return m.svc

    async def unload(self, uuid: UUID) -> BaseService:
        """Scale the service to zero now (see ondemand.py): it wakes on its next request."""
        async with self._locked(uuid) as m:
            if m.svc.status.state == ServiceState.ERROR:
                # (an error stays until someone starts, replaces or deletes the service)
                raise Conflict(f"service {uuid} is in error ({m.svc.status.last_error}); start, replace or delete it")
            await self.ondemand.unload(m)
            return m.svc

    async def start_all(self, timeout: float) -> tuple[list[BaseService], dict[UUID, ModeldError]]:
        """Start every service that is not running (as ``start`` of each, all at once): the way back
        after ``modeld daemon stop --all``. (the services started, the errors of those that failed)"""
        wanted = [
            uuid
            for uuid, m in self.services.items()
            if not (m.svc.desired_state == DesiredState.RUNNING and m.svc.status.state == ServiceState.ACTIVE)
        ]
        results = await asyncio.gather(*(self.start(uuid, timeout) for uuid in wanted), return_exceptions=True)
        started, failed = [], {}
        for uuid, result in zip(wanted, results, strict=True):
            if isinstance(result, ServiceNotFound):
                continue  # deleted meanwhile
            if isinstance(result, ModeldError):
                failed[uuid] = result
            elif isinstance(result, BaseException):
                raise result
            else:
                started.append(result)
        return started, failed

    async def stop(self, uuid: UUID, timeout: float, force: bool = False) -> BaseService:
        async with self._locked(uuid) as m:
            await self.startstop.stop(m, timeout, force)
            return m.svc

    async def delete(self, uuid: UUID, timeout: float, force: bool = False) -> None:
        """Decide the delete on disk first (the folder is renamed away), then stop the server.

        A daemon killed at any step finishes the delete when it restarts: the renamed folder
        is removed and the server, which no service tracks any more, is killed (see
        rebuild.Rebuilder.untracked_candidates). Nothing is written, so a delete works on a full disk too.
        """
        async with self._locked(uuid) as m:
            await self.supervisor.cancel_supervision(m)
            trash = self.store.retire(uuid)
            killpoints.reached("delete.after-rename")
            move(m.svc, ServiceState.PENDING_SHUTDOWN)  # (not written: the folder is gone)
            for proc in (m.replacing, m.proc):
                if proc is not None:
                    await self.supervisor.terminate(m, proc, min(timeout, m.svc.config.stop_timeout), force)
                    self.launcher.unlink_sockets(proc)
            m.replacing = m.proc = None
            m.close_listener()
            self.ondemand.forget(uuid)
            await asyncio.to_thread(self.containment.remove_service, str(uuid))  # and anything its launches left
            killpoints.reached("delete.after-stop")
            self.services.pop(uuid, None)
            self.sizes.forget(uuid)
            if trash is not None:
                self.store.purge(trash)
            events.emit("deleted", m.svc)  # event
            log.info("deleted %s", uuid)

    # ------------------------------------------------------------ daemon life

    async def rebuild(self) -> None:
        """Load every service from disk, re-adopt live servers, start those that should run (see rebuild.py)."""
        self.problems, spent = await self.rebuilder.rebuild()
        await self.hold_caps()
        self.idle.poke()
        self.gateway.start()  # on the loop's thread, no spawn in flight (see gatewayd.py); it routes from disk
        log.info(
            "rebuilt %d services in %.2f s (%s; %s)",
            len(self.services),
            sum(spent.values()),
            ", ".join(f"{step} {seconds:.2f}" for step, seconds in spent.items()),
            self.counts(),
        )

    async def shutdown(self, stop_services: bool) -> None:
        await self.units.stop_watching()
        if stop_services:
            await asyncio.gather(*(self._stop_for_shutdown(m) for m in self.services.values()))
            await asyncio.to_thread(self.logs.stop)  # last, once every server has written its last line
            await self.gateway.stop()
        self.gateway.let_go()  # (a plain stop: it keeps serving the servers that keep running)
        self.units.let_go()
        await asyncio.to_thread(self.containment.prune)

    async def _stop_for_shutdown(self, m: ServiceRuntime) -> None:
        """Stop the service for ``daemon stop --all``: it stays stopped, also when a later call starts the daemon
        again, until someone asks for it (start, start --all, a deploy or replace of it)."""
        svc = m.svc
        if svc.desired_state == DesiredState.RUNNING:
            svc.desired_state = DesiredState.STOPPED
            svc.desired_reason = STOPPED_BY_STOP_ALL
        if m.replacing is not None and m.replacing.alive:  # a hand-over cut short by the shutdown
            await m.replacing.terminate(svc.config.stop_timeout)
            self.launcher.unlink_sockets(m.replacing)
        if m.proc is not None and m.proc.alive:
            await self.supervisor.terminate(m, m.proc, svc.config.stop_timeout)
            self.launcher.forget_process(m, m.proc)
        svc.status.pid = None
        if svc.status.state == ServiceState.ERROR:  # (an error stays, as at a rebuild)
            save(self.store, svc, step="halt", strict=False)
        else:
            change_state(self.store, svc, ServiceState.INACTIVE, step="halt", strict=False)

    def describe(self) -> dict[str, Any]:
        return {
            "counts": self.counts(),
            "problems": [vars(p) for p in self.problems],
            "containment": self.containment.kind,
            **({"containment_note": self.containment.reason} if self.containment.reason else {}),
            "log_writer": writer.pid if (writer := self.logs.pid()) else None,
            **self.gateway.describe(),
            "on_demand": describe_on_demand(self.admission, self.loaded_on_demand()),
        }
