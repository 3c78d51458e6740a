"""The engine: every service in memory, the operations on them, and their supervision.

One :class:`ServiceRuntime` per service holds what only the running daemon knows:
the process handle (pidfd), the listening socket it holds for built-in
servers, and the supervision task. All of it runs on one asyncio loop;
operations on a service are serialised by its ``asyncio.Lock`` and cancel
its supervision task first, so the two never act on a process at once.

Supervision of one service is a loop with few, explicit steps: wait until
the process is healthy (probing every few ms, backing off), then wait for
its exit on the pidfd while the shared beat (``health.Prober``) probes it at
a calm pace, restarting it if it hangs; on exit, follow a process it left
serving or apply the restart policy with exponential backoff; a crash loop
ends in ``error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import UUID

from . import killpoints
from .adopt import classify_untracked
from .containment import Containment, Group, choose as choose_containment, launch_of
from .exceptions import Conflict, DeployError, ModeldError, ServiceNotFound, StillStarting, StorageError
from .health import (
    Batch,
    Prober,
    ProbeTarget,
    probe,
    probe_all,
)
from .launch import Launcher
from .linux import (
    ProcessIdentity,
    TaggedProcess,
    signal_verified,
    tagged_processes,
)
from .logwriter import LogWriterClient
from .models import BaseService, DesiredState, LocalModelService, ServiceConfig, ServiceState, changes
from .paths import Paths
from .process import ProcessHandle
from .runtime._serve import forkserver
from .service import ServiceRuntime, is_builtin, serves, serving_member
from .settings import DaemonSettings
from .sockets import fetch_listener, fetch_listeners
from .store import LaunchInfo, PidRecord, Problem, Store
from .supervise import Supervisor

log = logging.getLogger("modeld.manager")

STOPPED_BY_STOP_ALL = "stopped by `modeld daemon stop --all`"


_state_of = operator.attrgetter("svc.status.state")


class Manager:
    def __init__(self, paths: Paths, settings: DaemonSettings):
        self.paths = paths
        self.settings = settings
        self.store = Store(paths)
        self.services: dict[UUID, ServiceRuntime] = {}
        self.problems: list[Problem] = []
        self.started_at = time.time()
        self._ours: set[tuple[str, ProcessIdentity]] = set()  # (service uuid, process) tagged as ours, found at rebuild
        self._create_lock = asyncio.Lock()
        self.containment: Containment = choose_containment(paths.home, paths.run, settings.cgroup, settings.named("cgroup"))
        if self.containment.reason:
            log.info("containment: tag (%s)", self.containment.reason)
        else:
            log.info("containment: %s", self.containment.kind)
        self.logs = LogWriterClient(paths)
        self.launcher = Launcher(paths, self.store, self.containment, self.logs, self.services, settings.warm_start)
        self.prober = Prober(settings.health_interval)  # every healthy server, on one shared beat
        self.supervisor = Supervisor(paths, self.store, self.logs, self.launcher, self.prober)
        # Re-adoption: all servers probed in one job.
        self._probe_batch = Batch(_probe_list)
        self._listeners_task: asyncio.Future[None] | None = None
        self._counted: tuple[int, list[ServiceRuntime], dict[str, int]] = (-1, [], {})

    # ------------------------------------------------------------------ queries

    def get(self, uuid: UUID) -> ServiceRuntime:
        try:
            return self.services[uuid]
        except KeyError:
            raise ServiceNotFound(f"no service with uuid {uuid}") from None

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
        fresh = False
        await self.launcher.resolve_hosts([config.host])  # before the create lock: a lookup may be slow
        while True:
            async with self._create_lock:
                target = self._replace_target(config, replace, uuid)
                self.launcher.precheck(config, fresh=target is None, owner=target)
                if target is None:
                    svc = LocalModelService(config=config) if uuid is None else LocalModelService(config=config, uuid=uuid)
                    svc.service_path = str(self.paths.service_dir(svc.uuid))
                    svc.endpoint = self.launcher.endpoint(config, config.port)
                    target = ServiceRuntime(svc)
                    try:
                        self.launcher.ensure_port(target, config)
                    except DeployError as exc:
                        raise Conflict(str(exc)) from exc
                    await target.lock.acquire()  # free: nobody else knows it yet
                    self.services[svc.uuid] = target
                    fresh = True
                    break
            # Wait for the service's own lock outside the create lock: an operation on it
            # (a slow stop, say) must not hold up deploys of other models.
            await target.lock.acquire()
            if self.services.get(target.uuid) is target:
                break
            target.lock.release()  # deleted meanwhile: look again
        try:
            if fresh:
                log.info("deploying %s (%s %s)", target.uuid, config.model_type, config.model_uri or config.command)
                try:
                    await self._start_locked(target, timeout, failing_state=DesiredState.STOPPED, op="deploy")
                except StorageError:
                    # Its record could not be written (disk full): it must not live on in memory only.
                    self.services.pop(target.uuid, None)
                    with contextlib.suppress(StorageError):
                        self.store.delete(target.uuid)
                    raise
            else:
                await self._replace_locked(target, config, timeout)
            return target.svc
        finally:
            target.lock.release()

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
            m.failures = 0
            await self._start_locked(m, timeout, failing_state=DesiredState.STOPPED)
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
            await self._stop_locked(m, timeout, force)
            return m.svc

    async def delete(self, uuid: UUID, timeout: float, force: bool = False) -> None:
        """Decide the delete on disk first (the folder is renamed away), then stop the server.

        A daemon killed at any step finishes the delete when it restarts: the renamed folder
        is removed and the server, which no service tracks any more, is killed (see _untracked).
        Nothing is written, so a delete works on a full disk too.
        """
        async with self._locked(uuid) as m:
            await self.supervisor.cancel_supervision(m)
            trash = self.store.retire(uuid)
            killpoints.reached("delete.after-rename")
            m.svc.status.moved_to(ServiceState.PENDING_SHUTDOWN)
            for proc in (m.replacing, m.proc):
                if proc is not None:
                    await self.supervisor.terminate(m, proc, min(timeout, m.svc.config.stop_timeout), force)
                    self.launcher.unlink_sockets(proc)
            m.replacing = m.proc = None
            m.close_listener()
            await asyncio.to_thread(self.containment.remove_service, str(uuid))  # and anything its launches left
            killpoints.reached("delete.after-stop")
            self.services.pop(uuid, None)
            if trash is not None:
                self.store.purge(trash)
            log.info("deleted %s", uuid)

    # ------------------------------------------------------------ daemon life

    async def rebuild(self) -> None:
        """Load every service from disk, re-adopt live servers, start those that should run."""
        clock = [time.monotonic()]
        spent: dict[str, float] = {}

        def took(step: str) -> None:
            clock.append(time.monotonic())
            spent[step] = clock[-1] - clock[-2]

        scan = asyncio.ensure_future(self._tagged())  # /proc is read in a thread meanwhile
        services, self.problems = self.store.load_all()
        took("load")
        await asyncio.to_thread(self.logs.ensure)  # this home's log writer: the one still running, or a new one
        took("log writer")
        tagged = await scan
        took("scan")
        # A pid file is trusted only for a process that carries its service's tag: one whose pid
        # and start time match by chance (a pid file copied from elsewhere, edited by hand) is a
        # stranger, never signalled.
        self._ours = {(p.service_uuid, p.ident) for p in tagged}
        await asyncio.gather(*(self._stop_orphan(problem) for problem in self.problems))
        await self.launcher.resolve_hosts([svc.config.host for svc in services])  # before anything binds or claims
        records = {svc.uuid: self.store.read_pid(svc.uuid) for svc in services}  # read once, for both steps
        untracked = await self._untracked(services, tagged, records)
        took("untracked")
        results = await asyncio.gather(
            *(self._restore(svc, records[svc.uuid], untracked.get(str(svc.uuid), [])) for svc in services),
            return_exceptions=True,
        )
        for svc, result in zip(services, results, strict=True):
            if isinstance(result, Exception):
                log.error("could not restore %s: %s", svc.uuid, result, exc_info=result)
                self.problems.append(Problem(svc.service_path, f"could not be restored: {type(result).__name__}: {result}"))
        took("restore")
        await self._sweep(tagged)
        took("sweep")
        self._listeners_task = asyncio.ensure_future(self._fetch_adopted_listeners())
        log.info(
            "rebuilt %d services in %.2f s (%s; %s)",
            len(self.services),
            clock[-1] - clock[0],
            ", ".join(f"{step} {seconds:.2f}" for step, seconds in spent.items()),
            self.counts(),
        )

    async def _fetch_adopted_listeners(self) -> None:
        """Hold the listening sockets of the re-adopted built-in servers again, all in one job.

        Done once the rebuild is over, off its critical path (a thousand servers each woken for
        it slowed their probes): until then a crash restart binds the port anew, as it would
        for a server whose socket cannot be fetched, and a replace fetches its own.
        """
        wanted = [
            (m, m.proc)
            for m in self.services.values()
            if m.proc is not None and m.listener is None and is_builtin(m.svc.config) and m.proc.info.fd_socket
        ]
        if not wanted:
            return
        socks = await asyncio.to_thread(fetch_listeners, [proc.info.fd_socket or "" for _, proc in wanted])
        for (m, proc), sock in zip(wanted, socks, strict=True):
            if sock is None:
                continue
            if m.proc is proc and m.listener is None:  # (else it was restarted or replaced meanwhile)
                m.listener = sock
            else:
                sock.close()

    async def _sweep(self, tagged: list[TaggedProcess]) -> None:
        """Stop every process of this home's services that belongs to no launch a service keeps.

        Run once every service is restored: what is left is what a server started and left
        behind when it died while no daemon watched (a helper in a session of its own, a
        daemonized child), launches a kill -9 of the daemon cut short, and services deleted
        meanwhile. Cgroups are swept by their folders; processes by their tags (``tagged``:
        the scan made at the start of the rebuild; what was started since is kept).
        """
        keep: dict[str, set[str | None]] = {}
        for m in self.services.values():
            keep[str(m.uuid)] = {p.info.launch for p in (m.proc, m.replacing) if p is not None and p.alive}
        doomed = [
            self.containment.group(uuid, launch)
            for uuid in self.containment.services()
            for launch in self.containment.launches(uuid)
            if launch not in keep.get(uuid, set())
        ]
        strays = [p for p in tagged if launch_of(p.info) not in keep.get(p.service_uuid, set()) and p.ident.is_alive()]
        for group in doomed:
            log.warning("stopping what is left of launch %s of service %s", group.launch, group.uuid)
        _log_failures(
            "sweeping",
            await asyncio.gather(
                *(self._kill_untracked(p) for p in strays),
                *(asyncio.to_thread(_kill_and_remove, group) for group in doomed),
                return_exceptions=True,
            ),
        )
        gone = [uuid for uuid in self.containment.services() if uuid not in keep]
        _log_failures(
            "removing the cgroup of a deleted service",
            await asyncio.gather(
                *(asyncio.to_thread(self.containment.remove_service, uuid) for uuid in gone), return_exceptions=True
            ),
        )

    async def shutdown(self, stop_services: bool) -> None:
        if self._listeners_task is not None:
            self._listeners_task.cancel()
        for m in self.services.values():
            await self.supervisor.cancel_supervision(m)
        if stop_services:
            await asyncio.gather(*(self._halt(m) for m in self.services.values()))
            await asyncio.to_thread(self.logs.stop)  # last, once every server has written its last line
        for m in self.services.values():
            if m.proc is not None:
                m.proc.close()
            m.close_listener()
        self.launcher.fork_servers.close()
        self.prober.close()
        self.logs.close()
        await asyncio.to_thread(self.containment.prune)

    async def _halt(self, m: ServiceRuntime) -> None:
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
        if svc.status.state != ServiceState.ERROR:
            svc.status.moved_to(ServiceState.INACTIVE)
        self.supervisor.save_if_possible(svc, step="halt")

    async def _tagged(self) -> list[TaggedProcess]:
        """Every live process tagged as a server (or a server's child) of this home."""
        forked = self.containment.forked()
        tagged = await asyncio.to_thread(tagged_processes, str(self.paths.home), forked)
        for pid in set(forked) - {p.ident.pid for p in tagged}:
            with contextlib.suppress(OSError):  # the record of a forked server that is gone
                os.unlink(forkserver.record_path(self.paths.run, pid))
        return tagged

    def _group_of(self, uuid: UUID | str, info: LaunchInfo) -> Group:
        return self.containment.group(str(uuid), info.launch)

    def _adopt_recorded(self, uuid: UUID | str, ident: ProcessIdentity, info: LaunchInfo | None = None) -> ProcessHandle | None:
        """Adopt the process a pid file names, if it is alive and tagged as this service's (see rebuild)."""
        if (str(uuid), ident) not in self._ours:
            if ident.is_alive():
                log.warning(
                    "%s: pid %d named by its pid file is not its server (no tag of the service); leaving it alone",
                    uuid,
                    ident.pid,
                )
            return None
        info = info or LaunchInfo()
        return ProcessHandle.adopt(ident, info, self._group_of(uuid, info))

    async def _untracked(
        self, services: list[BaseService], tagged: list[TaggedProcess], records: dict[UUID, PidRecord | None]
    ) -> dict[str, list[TaggedProcess]]:
        """Candidates for adoption: processes of this home's servers that no pid file names, by service uuid.

        A daemon killed between spawning a server and writing its pid file leaves one, as does
        a delete or a replace cut short. Each server carries this home, its service's uuid and its
        launch in its environment, and its children inherit them, so they are found in /proc: a
        stranger has none of these tags and is never touched. Processes of a launch a pid file
        names go with that launch; those of services that are gone are stopped here, before any
        server starts (they may hold its port); what else no service keeps is stopped by _sweep.
        """
        known = {str(svc.uuid) for svc in services}
        found = classify_untracked(known, tagged, records)
        gone = [uuid for uuid in self.containment.services() if uuid not in known]
        _log_failures(
            "stopping an untracked process",
            await asyncio.gather(
                *(self._kill_untracked(p) for p in found.doomed),
                *(asyncio.to_thread(self.containment.remove_service, uuid) for uuid in gone),
                return_exceptions=True,
            ),
        )
        return found.candidates

    async def _kill_untracked(self, p: TaggedProcess) -> None:
        """SIGKILL an untracked server's group (or one stray worker) and wait until it is gone.

        The leader is first stopped through a pidfd checked against its start time: stopped, it
        cannot exit and free its pgid for someone else before the group is killed. With cgroups,
        the whole launch it belongs to goes too.
        """
        fd = signal_verified(p.ident, signal.SIGSTOP if p.leads_group else signal.SIGKILL)
        if fd is None:
            return
        try:
            if p.leads_group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.ident.pid, signal.SIGKILL)
            log.warning("killed pid %d of service %s: no pid file names it", p.ident.pid, p.service_uuid)
            loop = asyncio.get_running_loop()
            gone = loop.create_future()

            def on_exit() -> None:
                if not gone.done():
                    gone.set_result(None)

            loop.add_reader(fd, on_exit)
            try:
                await asyncio.wait_for(gone, 10)
            except TimeoutError:
                log.error("pid %d did not exit within 10s of SIGKILL", p.ident.pid)
            finally:
                loop.remove_reader(fd)
        finally:
            os.close(fd)
        launch = launch_of(p.info)
        if self.containment.kind == "cgroup" and launch is not None:
            await asyncio.to_thread(_kill_and_remove, self.containment.group(p.service_uuid, launch))

    async def _adopt_untracked(self, svc: BaseService, candidates: list[TaggedProcess]) -> ProcessHandle | None:
        """Adopt the one server spawned for this version of the service whose pid file was never
        written, if it serves (holds the service's listening socket: a helper it started never
        does); kill any other (a second one, an older or newer version, one not wanted)."""
        keep = None
        if svc.desired_state == DesiredState.RUNNING:
            serving = []
            for p in candidates:
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    info = LaunchInfo.from_tag(p.info)
                    if info.version == str(svc.version) and await asyncio.to_thread(serves, svc, p.ident.pid):
                        serving.append((p, info))
            if len(serving) == 1:
                p, info = serving[0]
                keep = ProcessHandle.adopt(p.ident, info, self._group_of(svc.uuid, info))
        for p in candidates:
            if keep is None or p.ident != keep.ident:
                await self._kill_untracked(p)
        if keep is not None:
            log.warning("%s: adopting pid %d, spawned before its pid file was written", svc.uuid, keep.pid)
            try:
                self.store.write_pid(svc.uuid, PidRecord(keep.ident, keep.info), step="restore.adopt-pid")
            except StorageError as exc:  # it is adopted all the same; its tags let the next daemon find it again
                log.error("%s: %s", svc.uuid, exc)
        return keep

    async def _settle_replace(self, svc: BaseService, record: PidRecord) -> PidRecord:
        """A daemon died in the middle of a hand-over: keep the process whose version service.json
        has, stop the other, so one server, and only one, serves the service."""
        main, prev = record.split_previous()
        if prev is None:  # an unreadable prev= line: nothing to settle but the recorded server
            return main
        keep, drop = (main, prev) if main.info.version == str(svc.version) else (prev, main)
        loser = self._adopt_recorded(svc.uuid, drop.ident, drop.info)
        if loser is not None:
            log.warning(
                "%s: a replace was cut short; stopping pid %d (version %s), keeping version %s",
                svc.uuid,
                loser.pid,
                drop.info.version,
                keep.info.version,
            )
            await loser.terminate(svc.config.stop_timeout)
            self.launcher.unlink_sockets(loser)
        try:
            self.store.write_pid(svc.uuid, keep, step="restore.settle-pid")
        except StorageError as exc:  # the record still names both: the next daemon settles it the same way
            log.error("%s: %s", svc.uuid, exc)
        return keep

    async def _stop_orphan(self, problem: Problem) -> None:
        """A set-aside service's server would hold its port untracked: stop it (its service.pid says which)."""
        uuid = Path(problem.path).parent.name
        record = self.store.read_pid(uuid)
        proc = self._adopt_recorded(uuid, record.ident, record.info) if record else None
        if proc is None:
            return
        log.warning("stopping the server (pid %d) of the set-aside %s", proc.pid, problem.path)
        await proc.terminate(10.0)
        self.store.clear_pid(uuid)
        problem.message += f"; its server (pid {proc.pid}) was stopped"

    async def _follow_recorded(self, svc: BaseService, record: PidRecord) -> ProcessHandle | None:
        """The recorded server died while no daemon watched. If a process it started serves the
        service (a server that daemonized), that is the server now; else what is left of its
        launch is stopped, so that a new server finds its port free."""
        group = self._group_of(svc.uuid, record.info)
        serving = None if is_builtin(svc.config) else await asyncio.to_thread(serving_member, svc, group)
        if serving is not None:  # a member of the launch: started by the recorded server
            proc = ProcessHandle.adopt(serving, record.info, group)
            if proc is not None:
                log.warning(
                    "%s: its server (pid %d) is gone; pid %d, which it started, serves: following it",
                    svc.uuid,
                    record.ident.pid,
                    proc.pid,
                )
                self.launcher.save_pid(svc.uuid, proc, step="restore.follow-pid")
                return proc
        await asyncio.to_thread(_kill_and_remove, group)
        return None

    async def _restore(self, svc: BaseService, record: PidRecord | None, untracked: list[TaggedProcess]) -> None:
        """``record``: its service.pid as read at the start of the rebuild (nothing writes it before this)."""
        m = ServiceRuntime(svc)
        self.services[svc.uuid] = m
        if record is not None and record.previous is not None:
            record = await self._settle_replace(svc, record)
        proc = self._adopt_recorded(svc.uuid, record.ident, record.info) if record else None
        if record and proc is None:
            proc = await self._follow_recorded(svc, record)
            if proc is None:
                self.store.clear_pid(svc.uuid)
        if proc is None:
            proc = await self._adopt_untracked(svc, untracked)
        else:
            # A second server for one service: the tracked one stays. (What its own launch started,
            # a helper in a session of its own, is not a second server: it goes when it goes.)
            launch = proc.info.launch
            for p in untracked:
                if launch is None or launch_of(p.info) != launch:
                    await self._kill_untracked(p)
        async with m.lock:
            if proc is not None and svc.desired_state == DesiredState.STOPPED:
                log.info("%s should be stopped; stopping the server left running (pid %d)", svc.uuid, proc.pid)
                m.proc = proc
                await self._stop_locked(m, svc.config.stop_timeout, force=False)
                return
            if proc is not None:
                m.proc = proc
                # (the services restored at once are probed in one batch; their listening
                # sockets are fetched after the rebuild: _fetch_adopted_listeners)
                healthy, seen = await self._probe_batch(self.launcher.target(m, proc))
                recorded = (svc.status.state, svc.status.pid)
                svc.status.pid = proc.pid
                svc.status.moved_to(ServiceState.ACTIVE if healthy else ServiceState.PENDING_STARTUP)
                log.info("re-adopted %s (pid %d): %s", svc.uuid, proc.pid, "healthy" if healthy else seen)
                self.supervisor.supervise(m)
                if (svc.status.state, svc.status.pid) != recorded:  # (as recorded: no write, no fsync)
                    self.supervisor.save_if_possible(svc, step="restore.adopted")
            elif svc.desired_state == DesiredState.RUNNING and svc.status.state != ServiceState.ERROR:
                log.info("%s should run but its server is gone; starting it", svc.uuid)
                try:
                    self.launcher.launch(m, svc.config, "restore")
                except ModeldError as exc:
                    await self.supervisor.abandon_launch(m)
                    svc.status.moved_to(ServiceState.ERROR, f"could not be restarted: {exc}")
                    svc.status.pid = None
                    self.supervisor.save_if_possible(svc, step="restore.failed")
                    return
                svc.status.moved_to(ServiceState.PENDING_STARTUP)
                self.supervisor.supervise(m)
                self.supervisor.save_if_possible(svc, step="restore.pending")
            else:
                # An error (a crash loop, a failed start) stays until someone acts on it: a
                # restart of the daemon is no reason to run a crash loop again.
                svc.status.pid = None
                if svc.status.state != ServiceState.ERROR:
                    svc.status.moved_to(ServiceState.INACTIVE)
                self.store.save(svc)

    # ------------------------------------------------------------- internals

    def _replace_target(self, config: ServiceConfig, replace: bool, uuid: UUID | None) -> ServiceRuntime | None:
        if uuid is not None and uuid in self.services:
            if not replace:
                raise Conflict(f"a service with uuid {uuid} exists already; deploy with replace to update it")
            return self.services[uuid]
        if not replace or uuid is not None:
            return None
        same = [
            m
            for m in self.services.values()
            if (m.svc.config.pipeline_name, m.svc.config.pipeline_step_name, m.svc.config.model_name)
            == (config.pipeline_name, config.pipeline_step_name, config.model_name)
        ]
        if len(same) > 1:
            log.warning(
                "%d services match %s/%s/%s; replacing the newest",
                len(same),
                config.pipeline_name,
                config.pipeline_step_name,
                config.model_name,
            )
        return max(same, key=lambda m: m.svc.created_at) if same else None

    async def _start_locked(self, m: ServiceRuntime, timeout: float, failing_state: DesiredState, op: str = "start") -> None:
        await self.supervisor.cancel_supervision(m)
        svc = m.svc
        svc.desired_state = DesiredState.RUNNING
        svc.desired_reason = ""
        if m.proc is not None and m.proc.alive and (m.proc.info.version or str(svc.version)) != str(svc.version):
            # Another version's server (a replace that is being undone): never taken over as this one.
            stale = m.proc
            log.warning(
                "%s: stopping pid %d, which runs version %s, not %d", svc.uuid, stale.pid, stale.info.version, svc.version
            )
            await stale.terminate(0, force=True)
            self.launcher.forget_process(m, stale)
        if m.proc is not None and m.proc.alive and svc.status.state in (ServiceState.ACTIVE, ServiceState.ERROR):
            # Alive: if it answers, there is nothing to start; if it does not (it hangs, or was
            # reported failing its health check), it is restarted, as a start is asked to.
            healthy, seen = (
                (False, "")
                if svc.status.state == ServiceState.ERROR
                else await probe(self.launcher.target(m, m.proc), timeout=1.0)
            )
            if healthy or healthy is None:  # (None: the daemon could not probe; no reason to restart it)
                self.supervisor.supervise(m)  # first: a write that fails must not leave it unsupervised
                self.store.save(svc, step=f"{op}.json")
                return
            log.warning(
                "%s: its server (pid %d) is alive but unhealthy%s; restarting it",
                svc.uuid,
                m.proc.pid,
                f" ({seen})" if seen else "",
            )
            hung = m.proc
            await self.supervisor.terminate(m, hung, svc.config.stop_timeout)
            self.launcher.forget_process(m, hung)
        try:
            proc = m.proc if m.proc is not None and m.proc.alive else None
            svc.status.moved_to(ServiceState.PENDING_STARTUP, "")
            if proc is None:
                svc.status.pid = None
            # The intent is on disk before any process exists: a daemon killed from here on
            # finds the service (desired running) and adopts or starts its server.
            self.store.save(svc, step=f"{op}.json")
            if proc is None:
                killpoints.reached(f"{op}.after-json")
                proc = self.launcher.launch(m, svc.config, op)
            proc = await self.supervisor.wait_healthy(m, proc, min(timeout, svc.config.startup_timeout))
        except StillStarting as exc:
            # The caller stopped waiting, the server may still load (startup_timeout is longer):
            # leave it starting under supervision, as a loading vLLM or llama-server needs.
            svc.status.last_error = str(exc)
            self.supervisor.supervise(m)
            self.supervisor.save_if_possible(svc, step=f"{op}.still-starting")  # desired running and pid are on disk already
            raise DeployError(
                f"service {svc.uuid} is not healthy after {timeout:g}s and keeps starting "
                f"(its startup_timeout is {svc.config.startup_timeout:g}s); watch it with `modeld ls` or `modeld logs`"
            ) from exc
        except ModeldError as exc:  # a write that failed (disk full), a bad socket path: the server is stopped too
            await self.supervisor.abandon_launch(m)
            m.close_listener()
            svc.desired_state = failing_state
            svc.status.moved_to(ServiceState.ERROR, str(exc))
            self.supervisor.save_if_possible(svc)
            raise type(exc)(f"service {svc.uuid}: {exc}", log_excerpt=exc.log_excerpt) from exc
        svc.status.moved_to(ServiceState.ACTIVE, "")
        # Best effort: service.json (desired running) and service.pid name the server already, so a
        # failed write here costs only a stale "pending" on disk, which supervision or the next
        # daemon corrects; failing the start would leave a healthy server that no record names.
        self.supervisor.save_if_possible(svc, step=f"{op}.active")
        killpoints.reached(f"{op}.after-healthy")
        self.supervisor.supervise(m)

    async def _stop_locked(self, m: ServiceRuntime, timeout: float, force: bool) -> None:
        """Stop the process: SIGTERM, then SIGKILL after the service's stop_timeout (or the call's timeout, if shorter)."""
        await self.supervisor.cancel_supervision(m)
        svc = m.svc
        svc.desired_state = DesiredState.STOPPED
        svc.desired_reason = ""
        if m.proc is not None:
            proc = m.proc
            if proc.alive:
                svc.status.moved_to(ServiceState.PENDING_SHUTDOWN)
                # Best effort: on a full disk the server is stopped all the same (supervision is
                # cancelled already); the final write below says whether the stop is recorded.
                self.supervisor.save_if_possible(svc, step="stop.json")
                killpoints.reached("stop.after-json")
                await self.supervisor.terminate(m, proc, min(timeout, svc.config.stop_timeout), force)
            if proc.exited.done() and not proc.exited.cancelled():
                svc.status.exit_code = proc.exited.result()
            self.launcher.forget_process(m, proc)
            killpoints.reached("stop.after-exit")
        m.close_listener()
        svc.status.pid = None
        svc.status.moved_to(ServiceState.INACTIVE)
        try:
            self.store.save(svc, step="stop.stopped")
        except StorageError as exc:
            raise StorageError(
                f"service {svc.uuid} was stopped, but that could not be recorded (a restarted daemon may start it again): {exc}"
            ) from exc
        log.info("stopped %s", svc.uuid)

    async def _replace_locked(self, m: ServiceRuntime, config: ServiceConfig, timeout: float) -> None:
        """Update a service in place: same uuid, same port; the old version serves until the new one is healthy."""
        svc = m.svc
        if config.port == 0 or config.port == svc.endpoint.port:
            config = config.model_copy(update={"port": svc.endpoint.port})
        elif svc.endpoint.port:
            raise Conflict(
                f"service {svc.uuid} keeps port {svc.endpoint.port} for life; cannot replace it with port {config.port}"
            )
        if config.bind_unix != svc.config.bind_unix:
            raise Conflict(
                f"service {svc.uuid} keeps its endpoint for life; bind_unix cannot change on replace (deploy a new service)"
            )
        await self.supervisor.cancel_supervision(m)
        previous = svc.config
        m.previous_config = previous
        try:
            await self._replace_unsupervised(m, config, timeout)
        except Exception:
            if m.task is None and m.proc is not None and m.proc.alive:
                if svc.config is not previous and m.proc.info.version == str(svc.version):
                    svc.config = previous  # the running process is still the previous version
                self.supervisor.supervise(m)
            raise

    async def _replace_unsupervised(self, m: ServiceRuntime, config: ServiceConfig, timeout: float) -> None:
        svc = m.svc
        old = m.proc if m.proc is not None and m.proc.alive else None
        handover = old is not None and is_builtin(svc.config) and is_builtin(config) and config.host == svc.config.host
        if handover and m.listener is None and old is not None and old.info.fd_socket:
            m.listener = await asyncio.to_thread(fetch_listener, old.info.fd_socket)
        if handover and m.listener is not None and old is not None:
            log.info("replacing %s: hand-over on the listening socket", svc.uuid)
            await self._replace_handover(m, old, config, timeout)
        else:
            log.info("replacing %s: stop, then start", svc.uuid)
            await self._replace_stop_start(m, old, config, timeout)

    async def _replace_handover(self, m: ServiceRuntime, old: ProcessHandle, config: ServiceConfig, timeout: float) -> None:
        svc = m.svc
        previous = svc.config
        previous_status = svc.status.model_copy()
        svc.config = config
        m.replacing = old
        previous_version = svc.version
        try:
            new = self.launcher.launch(m, config, "replace", version=svc.version + 1, previous=old)
            await self.supervisor.wait_healthy(m, new, min(timeout, config.startup_timeout))
            svc.version += 1
            svc.status.moved_to(ServiceState.ACTIVE, "")
            self.store.save(svc, step="replace.commit")  # the commit point: a daemon restarted after it keeps the new version
        except ModeldError as exc:
            m.replacing = None
            failed = m.proc if m.proc is not old else None
            if failed is not None:
                await failed.terminate(0, force=True)
                # Not _forget_process: that would unlink service.pid, which names the old server
                # (as ``prev``) until the write below replaces it in one rename.
                self.launcher.unlink_sockets(failed)
            svc.config = previous
            svc.version = previous_version
            m.proc = old
            svc.status = previous_status
            svc.status.last_error = f"replace failed: {exc}"
            try:
                self.store.write_pid(m.uuid, PidRecord(old.ident, old.info), step="replace.restore-pid")
            except StorageError as pid_exc:
                # service.pid still names the old server as ``prev`` (or only it, if the new one was
                # never recorded); a restarted daemon keeps it, as service.json has its version.
                log.error("%s: %s", svc.uuid, pid_exc)
            self.supervisor.save_if_possible(svc, step="replace.failed")
            self.supervisor.supervise(m)
            what = "could not be recorded" if isinstance(exc, StorageError) else "failed"
            raise (StorageError if isinstance(exc, StorageError) else DeployError)(
                f"service {svc.uuid}: the new version {what} and the previous version keeps serving: {exc}"
            ) from exc
        killpoints.reached("replace.after-json")
        # The old version stops accepting at once and drains; wait for it, so that when the
        # caller gets the answer new connections reach only the new version.
        await old.terminate(previous.stop_timeout)
        m.replacing = None
        self.launcher.forget_process(m, old)
        killpoints.reached("replace.after-old-stopped")
        self.store.write_pid(m.uuid, PidRecord(new.ident, new.info))  # the old one is gone: forget it here too
        m.failures = 0
        self.supervisor.supervise(m)

    async def _replace_stop_start(
        self, m: ServiceRuntime, old: ProcessHandle | None, config: ServiceConfig, timeout: float
    ) -> None:
        svc = m.svc
        previous, previous_version = svc.config, svc.version
        if old is not None:
            await self.supervisor.terminate(m, old, previous.stop_timeout, config=previous)
            self.launcher.forget_process(m, old)
            killpoints.reached("replace-restart.after-old-stopped")
        if is_builtin(previous) != is_builtin(config) or previous.host != config.host:
            m.close_listener()
        # The new config and version are written together, before the new server is spawned:
        # a daemon killed from here on starts (or adopts) the new version, never a mix.
        svc.config = config
        svc.version += 1
        try:
            await self._start_locked(m, timeout, failing_state=DesiredState.STOPPED, op="replace-restart")
        except (DeployError, StorageError) as exc:
            if old is None or isinstance(exc.__cause__, StillStarting):
                raise  # nothing to restore, or the new version is still starting under supervision
            svc.config, svc.version = previous, previous_version
            try:
                await self._start_locked(m, previous.startup_timeout, failing_state=DesiredState.RUNNING)
                note = "the previous version was started again"
            except (DeployError, StorageError) as restore_exc:
                note = f"the previous version could not be started again either: {restore_exc}"
            raise type(exc)(f"{exc}; {note}", log_excerpt=exc.log_excerpt) from exc

    # -------------------------------------------------------------- supervision

    def describe(self) -> dict[str, Any]:
        return {
            "counts": self.counts(),
            "problems": [vars(p) for p in self.problems],
            "containment": self.containment.kind,
            **({"containment_note": self.containment.reason} if self.containment.reason else {}),
            "log_writer": writer.pid if (writer := self.logs.pid()) else None,
        }


def _probe_list(targets: list[ProbeTarget]) -> list[tuple[bool | None, str]]:
    """Probe every target at once (in a thread), 1 s at most; the results in the same order."""
    results = probe_all(dict(enumerate(targets)), 1.0)
    return [results[i] for i in range(len(targets))]


def _log_failures(doing: str, results: list[object]) -> None:
    """Log what failed in a gather(return_exceptions=True) of the rebuild: one stray that cannot
    be reached (a cgroup removed under us, a process gone) never stops the daemon from starting."""
    for result in results:
        if isinstance(result, Exception):
            log.error("%s failed: %s: %s", doing, type(result).__name__, result, exc_info=result)


def _kill_and_remove(group: Group, timeout: float = 10.0) -> None:
    """SIGKILL every process of a group, wait until they are gone, and remove the group (in a thread)."""
    group.kill()
    deadline = time.monotonic() + timeout
    while not group.empty() and time.monotonic() < deadline:
        time.sleep(0.005)
    with contextlib.suppress(OSError):
        group.remove()
