"""The rebuild: a daemon starting over a home loads every service from disk, re-adopts the
servers still running (without restarting them), starts those that should run but died while no
daemon watched, and stops whatever no service keeps.

The decisions over what was found are pure functions in ``adopt.py``; this module gathers the
facts (service.json and service.pid, the processes tagged with this home in /proc, the launch
groups) and acts on them. Invariants:
- A process is signalled only if it carries this home's tag (``scan_tagged_processes``): a pid
  file alone, whose pid and start time may match a stranger by chance, is never enough.
- Each service ends with one server or none: the one its pid file names (or, for a replace cut
  short, the version service.json has), else the one spawned before its pid file was written,
  else a process its dead server left serving (it daemonized); any other is stopped.
- What no service keeps (launches of deleted services, what a dead server left behind) is
  stopped once every service is restored (``strays.sweep_leftovers``), before a new server needs its port.
- One service that cannot be restored is a problem reported, never a daemon that does not start.
- Admission's caps hold from the rebuild on: an on-demand service (``idle_timeout``) that should run
  but whose server is gone is started only if it fits beside what was re-adopted (``fits``, set by
  the manager; nothing is unloaded for it), most recently started first; the others stay scaled to
  zero (their desired state running), as a service that may sleep always can. (Re-adopted servers
  beyond the caps are scaled to zero by the manager once the rebuild is over.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from uuid import UUID

from .adopt import classify_untracked, stays_scaled_to_zero
from .containment import Containment
from .exceptions import ModeldError, StorageError
from .groups import Group
from .health import Batch, ProbeTarget, probe_all
from .launch import Launcher
from .linux import ProcessIdentity, TaggedProcess, tagged_processes
from .logwriter import LogWriterClient
from .models import BaseService, DesiredState, ServiceState
from .ondemand import OnDemand
from .paths import Paths
from .process import ProcessHandle
from .runtime._serve import forkserver
from .service import ServiceRuntime, is_builtin, serves, serving_member
from .sockets import fetch_listeners
from .startstop import StartStop
from .store import LaunchInfo, PidRecord, Problem, Store
from .strays import kill_and_remove, kill_untracked, log_failures, sweep_leftovers
from .supervise import Supervisor
from .transitions import change_state, save

log = logging.getLogger("modeld.manager")


class Rebuilder:
    """Rebuilds the registry of one home's services from disk (see the module docstring)."""

    def __init__(
        self,
        paths: Paths,
        store: Store,
        containment: Containment,
        logs: LogWriterClient,
        launcher: Launcher,
        supervisor: Supervisor,
        startstop: StartStop,
        ondemand: OnDemand,
        services: dict[UUID, ServiceRuntime],
    ):
        self.paths = paths
        self.store = store
        self.containment = containment
        self.logs = logs
        self.launcher = launcher
        self.supervisor = supervisor
        self.startstop = startstop
        self.ondemand = ondemand
        self.services = services  # the manager's registry: each restored service is added to it
        self.problems: list[Problem] = []
        self.tagged_as_ours: set[tuple[str, ProcessIdentity]] = set()  # (service uuid, process) tagged as ours, found at rebuild
        self.probe_batch = Batch(_probe_list)  # re-adoption: all servers probed in one job
        self.listeners_task: asyncio.Future[None] | None = None
        # Whether an on-demand service's server may be loaded now under admission's caps, with nothing
        # unloaded for it (the manager's Manager.fits_now); no cap by default.
        self.fits: Callable[[ServiceRuntime], bool] = lambda m: True
        self.deferred: list[ServiceRuntime] = []  # on-demand services to start once every server is adopted

    def close(self) -> None:
        """Stop fetching the re-adopted servers' listening sockets (at shutdown)."""
        if self.listeners_task is not None:
            self.listeners_task.cancel()

    async def rebuild(self) -> tuple[list[Problem], dict[str, float]]:
        """Load every service from disk into the registry, re-adopt live servers, start those that
        should run. (the services set aside or not restored, the seconds each step took)"""
        clock = [time.monotonic()]
        spent: dict[str, float] = {}

        def took(step: str) -> None:
            clock.append(time.monotonic())
            spent[step] = clock[-1] - clock[-2]

        scan = asyncio.ensure_future(self.scan_tagged_processes())  # /proc is read in a thread meanwhile
        services, self.problems = self.store.load_all()
        took("load")
        await asyncio.to_thread(self.logs.ensure)  # this home's log writer: the one still running, or a new one
        took("log writer")
        tagged = await scan
        took("scan")
        # A pid file is trusted only for a process that carries its service's tag: one whose pid
        # and start time match by chance (a pid file copied from elsewhere, edited by hand) is a
        # stranger, never signalled.
        self.tagged_as_ours = {(p.service_uuid, p.ident) for p in tagged}
        await asyncio.gather(*(self.stop_server_of_set_aside(problem) for problem in self.problems))
        await self.launcher.resolve_hosts([svc.config.host for svc in services])  # before anything binds or claims
        records = {svc.uuid: self.store.read_pid(svc.uuid) for svc in services}  # read once, for both steps
        untracked = await self.untracked_candidates(services, tagged, records)
        took("untracked")
        results = await asyncio.gather(
            *(self.restore(svc, records[svc.uuid], untracked.get(str(svc.uuid), [])) for svc in services),
            return_exceptions=True,
        )
        for svc, result in zip(services, results, strict=True):
            if isinstance(result, Exception):
                log.error("could not restore %s: %s", svc.uuid, result, exc_info=result)
                self.problems.append(Problem(svc.service_path, f"could not be restored: {type(result).__name__}: {result}"))
        took("restore")
        await sweep_leftovers(self.containment, self.services.values(), tagged)
        took("sweep")
        await self.start_deferred()
        took("on demand")
        self.listeners_task = asyncio.ensure_future(self.fetch_adopted_listeners())
        return self.problems, spent

    async def fetch_adopted_listeners(self) -> None:
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

    async def scan_tagged_processes(self) -> list[TaggedProcess]:
        """Every live process tagged as a server (or a server's child) of this home."""
        forked = self.containment.forked()
        tagged = await asyncio.to_thread(tagged_processes, str(self.paths.home), forked)
        for pid in set(forked) - {p.ident.pid for p in tagged}:
            with contextlib.suppress(OSError):  # the record of a forked server that is gone
                os.unlink(forkserver.record_path(self.paths.run, pid))
        return tagged

    def launch_group(self, uuid: UUID | str, info: LaunchInfo) -> Group:
        return self.containment.group(str(uuid), info.launch)

    def adopt_recorded(self, uuid: UUID | str, ident: ProcessIdentity, info: LaunchInfo | None = None) -> ProcessHandle | None:
        """Adopt the process a pid file names, if it is alive and tagged as this service's (see rebuild)."""
        if (str(uuid), ident) not in self.tagged_as_ours:
            if ident.is_alive():
                log.warning(
                    "%s: pid %d named by its pid file is not its server (no tag of the service); leaving it alone",
                    uuid,
                    ident.pid,
                )
            return None
        info = info or LaunchInfo()
        return ProcessHandle.adopt(ident, info, self.launch_group(uuid, info))

    async def untracked_candidates(
        self, services: list[BaseService], tagged: list[TaggedProcess], records: dict[UUID, PidRecord | None]
    ) -> dict[str, list[TaggedProcess]]:
        """Candidates for adoption: processes of this home's servers that no pid file names, by service uuid.

        A daemon killed between spawning a server and writing its pid file leaves one, as does
        a delete or a replace cut short. Each server carries this home, its service's uuid and its
        launch in its environment, and its children inherit them, so they are found in /proc: a
        stranger has none of these tags and is never touched. Processes of a launch a pid file
        names go with that launch; those of services that are gone are stopped here, before any
        server starts (they may hold its port); what else no service keeps is stopped by sweep_leftovers.
        """
        known = {str(svc.uuid) for svc in services}
        found = classify_untracked(known, tagged, records)
        gone = [uuid for uuid in self.containment.services() if uuid not in known]
        log_failures(
            "stopping an untracked process",
            await asyncio.gather(
                *(kill_untracked(self.containment, p) for p in found.doomed),
                *(asyncio.to_thread(self.containment.remove_service, uuid) for uuid in gone),
                return_exceptions=True,
            ),
        )
        return found.candidates

    async def adopt_untracked(self, svc: BaseService, candidates: list[TaggedProcess]) -> ProcessHandle | None:
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
                keep = ProcessHandle.adopt(p.ident, info, self.launch_group(svc.uuid, info))
        for p in candidates:
            if keep is None or p.ident != keep.ident:
                await kill_untracked(self.containment, p)
        if keep is not None:
            log.warning("%s: adopting pid %d, spawned before its pid file was written", svc.uuid, keep.pid)
            try:
                self.store.write_pid(svc.uuid, PidRecord(keep.ident, keep.info), step="restore.adopt-pid")
            except StorageError as exc:  # it is adopted all the same; its tags let the next daemon find it again
                log.error("%s: %s", svc.uuid, exc)
        return keep

    async def settle_replace(self, svc: BaseService, record: PidRecord) -> PidRecord:
        """A daemon died in the middle of a hand-over: keep the process whose version service.json
        has, stop the other, so one server, and only one, serves the service."""
        main, prev = record.split_previous()
        if prev is None:  # an unreadable prev= line: nothing to settle but the recorded server
            return main
        keep, drop = (main, prev) if main.info.version == str(svc.version) else (prev, main)
        loser = self.adopt_recorded(svc.uuid, drop.ident, drop.info)
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

    async def stop_server_of_set_aside(self, problem: Problem) -> None:
        """A set-aside service's server would hold its port untracked: stop it (its service.pid says which)."""
        uuid = Path(problem.path).parent.name
        record = self.store.read_pid(uuid)
        proc = self.adopt_recorded(uuid, record.ident, record.info) if record else None
        if proc is None:
            return
        log.warning("stopping the server (pid %d) of the set-aside %s", proc.pid, problem.path)
        await proc.terminate(10.0)
        self.store.clear_pid(uuid)
        problem.message += f"; its server (pid {proc.pid}) was stopped"

    async def follow_daemonized(self, svc: BaseService, record: PidRecord) -> ProcessHandle | None:
        """The recorded server died while no daemon watched. If a process it started serves the
        service (a server that daemonized), that is the server now; else what is left of its
        launch is stopped, so that a new server finds its port free."""
        group = self.launch_group(svc.uuid, record.info)
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
        await asyncio.to_thread(kill_and_remove, group)
        return None

    async def restore(self, svc: BaseService, record: PidRecord | None, untracked: list[TaggedProcess]) -> None:
        """``record``: its service.pid as read at the start of the rebuild (nothing writes it before this)."""
        m = ServiceRuntime(svc)
        self.services[svc.uuid] = m
        if record is not None and record.previous is not None:
            record = await self.settle_replace(svc, record)
        proc = self.adopt_recorded(svc.uuid, record.ident, record.info) if record else None
        if record and proc is None:
            proc = await self.follow_daemonized(svc, record)
            if proc is None:
                self.store.clear_pid(svc.uuid)
        if proc is None:
            proc = await self.adopt_untracked(svc, untracked)
        else:
            # A second server for one service: the tracked one stays. (What its own launch started,
            # a helper in a session of its own, is not a second server: it goes when it goes.)
            launch = proc.info.launch
            for p in untracked:
                if launch is None or LaunchInfo.from_tag(p.info).launch != launch:
                    await kill_untracked(self.containment, p)
        async with m.lock:
            if proc is not None and svc.desired_state == DesiredState.STOPPED:
                log.info("%s should be stopped; stopping the server left running (pid %d)", svc.uuid, proc.pid)
                m.proc = proc
                await self.startstop.stop(m, svc.config.stop_timeout, force=False)
                return
            if proc is not None and svc.status.state == ServiceState.PENDING_SHUTDOWN:
                # Should run, yet recorded stopping: a scale to zero (an idle stop, an unload) cut
                # short (a stop records stopped first). It is finished: the server goes, as asked.
                log.info("%s was being scaled to zero; finishing it (pid %d)", svc.uuid, proc.pid)
                m.proc = proc
                await self.ondemand.scale_to_zero(m)
                return
            if proc is not None:
                m.proc = proc
                # (the services restored at once are probed in one batch; their listening
                # sockets are fetched after the rebuild: fetch_adopted_listeners)
                healthy, seen = await self.probe_batch(self.launcher.probe_target(m, proc))
                recorded = (svc.status.state, svc.status.pid)
                svc.status.pid = proc.pid
                state = ServiceState.ACTIVE if healthy else ServiceState.PENDING_STARTUP
                log.info("re-adopted %s (pid %d): %s", svc.uuid, proc.pid, "healthy" if healthy else seen)
                self.supervisor.supervise(m)  # (its task runs at the next await: after the move)
                change_state(  # (as recorded: no write, no fsync)
                    self.store, svc, state, step="restore.adopted", strict=False, write=(state, proc.pid) != recorded
                )
            elif stays_scaled_to_zero(svc.status.state, svc.status.last_state, svc.desired_state):
                log.info("%s is scaled to zero; watching its socket", svc.uuid)
                self.ondemand.restore_scaled(m)
            elif svc.desired_state == DesiredState.RUNNING and svc.status.state != ServiceState.ERROR:
                if svc.config.idle_timeout is not None:
                    svc.status.pid = None
                    self.deferred.append(m)  # started (or left scaled to zero) once every server is adopted
                    return
                log.info("%s should run but its server is gone; starting it", svc.uuid)
                await self.start_or_error(m)
            else:
                # An error (a crash loop, a failed start) stays until someone acts on it: a
                # restart of the daemon is no reason to run a crash loop again.
                svc.status.pid = None
                if svc.status.state == ServiceState.ERROR:
                    save(self.store, svc, strict=True)
                else:
                    change_state(self.store, svc, ServiceState.INACTIVE, strict=True)

    async def start_or_error(self, m: ServiceRuntime) -> None:
        """Start the server of a service that should run but whose server is gone (under supervision);
        one that cannot be spawned is recorded in error."""
        svc = m.svc
        try:
            self.launcher.launch(m, svc.config, "restore")
        except ModeldError as exc:
            await self.supervisor.abandon_launch(m)
            svc.status.pid = None
            change_state(
                self.store, svc, ServiceState.ERROR, f"could not be restarted: {exc}", step="restore.failed", strict=False
            )
            return
        change_state(self.store, svc, ServiceState.PENDING_STARTUP, step="restore.pending", strict=False)
        self.supervisor.supervise(m)

    async def start_deferred(self) -> None:
        """The on-demand services that should run but whose server is gone: started within the caps
        (most recently started first), the others left scaled to zero (see the module docstring)."""
        deferred, self.deferred = self.deferred, []
        for m in sorted(deferred, key=lambda m: (-(m.svc.status.started_at or 0.0), str(m.uuid))):
            try:
                async with m.lock:
                    if self.services.get(m.uuid) is not m:
                        continue
                    if self.fits(m):
                        log.info("%s should run but its server is gone; starting it", m.uuid)
                        await self.start_or_error(m)
                    else:
                        log.info(
                            "%s should run but its server is gone; admission's caps are held: it stays scaled to zero", m.uuid
                        )
                        self.ondemand.restore_scaled(m)
            except Exception as exc:  # one service that cannot be restored is a problem, not a daemon that does not start
                log.error("could not restore %s: %s", m.uuid, exc, exc_info=exc)
                self.problems.append(Problem(m.svc.service_path, f"could not be restored: {type(exc).__name__}: {exc}"))


def _probe_list(targets: list[ProbeTarget]) -> list[tuple[bool | None, str]]:
    """Probe every target at once (in a thread), 1 s at most; the results in the same order."""
    results = probe_all(dict(enumerate(targets)), 1.0)
    return [results[i] for i in range(len(targets))]
