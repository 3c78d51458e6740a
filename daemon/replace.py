"""Replacing a service in place (a deploy with ``replace``): same uuid, same endpoint, a new
version of its config. Two ways:

- hand-over (built-in servers on one host): the new version is spawned beside the old on the
  listening socket the daemon holds, and the old one is stopped (it drains) only once the new one
  is healthy, so no request fails;
- stop, then start (command servers, or a change of host or model type): the old version is
  stopped and the new one started as a start is; if the new one fails, the old one is started again.

Invariants:
- service.pid names both servers (the old as ``prev``) while a hand-over is under way, and
  service.json's version is the commit point (``replace.commit``): a daemon killed at any step
  keeps the version service.json has and stops the other (see ``rebuild.Rebuilder.settle_replace``).
- A replace that fails leaves the previous version serving, under supervision, and says so.
- A service keeps its port and its kind of endpoint (``bind_unix``) for life.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from uuid import UUID

from . import events, killpoints
from .config import replace_key
from .exceptions import Conflict, DeployError, ModeldError, StillStarting, StorageError
from .launch import Launcher
from .models import DesiredState, ServiceConfig, ServiceState
from .process import ProcessHandle
from .service import ServiceRuntime, is_builtin
from .sockets import fetch_listener
from .startstop import StartStop
from .store import PidRecord, Store
from .supervise import Supervisor
from .transitions import change_state, restore

log = logging.getLogger("modeld.manager")


class Replacer:
    """Replaces the services of one home in place (see the module docstring); the caller holds the service's lock."""

    def __init__(
        self,
        services: Mapping[UUID, ServiceRuntime],
        store: Store,
        launcher: Launcher,
        supervisor: Supervisor,
        startstop: StartStop,
    ):
        self.services = services  # the manager's registry, read to find the service a deploy replaces
        self.store = store
        self.launcher = launcher
        self.supervisor = supervisor
        self.startstop = startstop

    def service_to_replace(self, config: ServiceConfig, replace: bool, uuid: UUID | None) -> ServiceRuntime | None:
        """The service a deploy updates in place: the one with ``uuid`` (Conflict without ``replace``),
        else with ``replace`` the newest of the same :func:`replace_key`; None: a new service."""
        if uuid is not None and uuid in self.services:
            if not replace:
                raise Conflict(f"a service with uuid {uuid} exists already; deploy with replace to update it")
            return self.services[uuid]
        if not replace or uuid is not None:
            return None
        same = [m for m in self.services.values() if replace_key(m.svc.config) == replace_key(config)]
        if len(same) > 1:
            log.warning("%d services match %s; replacing the newest", len(same), "/".join(replace_key(config)))
        return max(same, key=lambda m: m.svc.created_at) if same else None

    async def replace(self, m: ServiceRuntime, config: ServiceConfig, timeout: float) -> None:
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
            await self.replace_unsupervised(m, config, timeout)
            events.emit("replaced", svc, f"version {svc.version}")  # event
        except Exception:
            if m.task is None and m.proc is not None and m.proc.alive:
                if svc.config is not previous and m.proc.info.version == str(svc.version):
                    svc.config = previous  # the running process is still the previous version
                self.supervisor.supervise(m)
            raise

    async def replace_unsupervised(self, m: ServiceRuntime, config: ServiceConfig, timeout: float) -> None:
        svc = m.svc
        old = m.proc if m.proc is not None and m.proc.alive else None
        handover = old is not None and is_builtin(svc.config) and is_builtin(config) and config.host == svc.config.host
        if handover and m.listener is None and old is not None and old.info.fd_socket:
            m.listener = await asyncio.to_thread(fetch_listener, old.info.fd_socket)
        if handover and m.listener is not None and old is not None:
            log.info("replacing %s: hand-over on the listening socket", svc.uuid)
            await self.handover(m, old, config, timeout)
        else:
            log.info("replacing %s: stop, then start", svc.uuid)
            await self.stop_then_start(m, old, config, timeout)

    async def handover(self, m: ServiceRuntime, old: ProcessHandle, config: ServiceConfig, timeout: float) -> None:
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
            # The commit point: a daemon restarted after it keeps the new version.
            change_state(self.store, svc, ServiceState.ACTIVE, "", step="replace.commit", strict=True)
        except ModeldError as exc:
            m.replacing = None
            failed = m.proc if m.proc is not old else None
            if failed is not None:
                await failed.terminate(0, force=True)
                # Not Launcher.forget_process: that would unlink service.pid, which names the old server
                # (as ``prev``) until the write below replaces it in one rename.
                self.launcher.unlink_sockets(failed)
            svc.config = previous
            svc.version = previous_version
            m.proc = old
            try:
                self.store.write_pid(m.uuid, PidRecord(old.ident, old.info), step="replace.restore-pid")
            except StorageError as pid_exc:
                # service.pid still names the old server as ``prev`` (or only it, if the new one was
                # never recorded); a restarted daemon keeps it, as service.json has its version.
                log.error("%s: %s", svc.uuid, pid_exc)
            restore(self.store, svc, previous_status, f"replace failed: {exc}", step="replace.failed", strict=False)
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

    async def stop_then_start(self, m: ServiceRuntime, old: ProcessHandle | None, config: ServiceConfig, timeout: float) -> None:
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
            await self.startstop.start(m, timeout, failing_state=DesiredState.STOPPED, op="replace-restart")
        except (DeployError, StorageError) as exc:
            if old is None or isinstance(exc.__cause__, StillStarting):
                raise  # nothing to restore, or the new version is still starting under supervision
            svc.config, svc.version = previous, previous_version
            try:
                await self.startstop.start(m, previous.startup_timeout, failing_state=DesiredState.RUNNING)
                note = "the previous version was started again"
            except (DeployError, StorageError) as restore_exc:
                note = f"the previous version could not be started again either: {restore_exc}"
            raise type(exc)(f"{exc}; {note}", log_excerpt=exc.log_excerpt) from exc
