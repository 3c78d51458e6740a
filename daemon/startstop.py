"""Starting and stopping one service's server, with the service's lock held by the caller:
``start`` (as a deploy, a start or the start half of a stop-then-start replace) and ``stop``.

Invariants:
- The intent is on disk before any process exists: a start writes service.json (desired running,
  ``pending_startup``) before it spawns, a stop writes it (desired stopped) before it signals, so a
  daemon killed at any step converges to what was asked.
- A server that answers is never started twice; one of another version (a replace being
  undone) is never taken over as this one.
- A start that fails stops the server it spawned and records ``error`` with the reason; one the
  caller stopped waiting for (``StillStarting``) keeps starting under supervision.
"""

from __future__ import annotations

import logging

from . import killpoints
from .exceptions import DeployError, ModeldError, StillStarting, StorageError
from .health import probe
from .launch import Launcher
from .models import DesiredState, ServiceState
from .service import ServiceRuntime
from .store import Store
from .supervise import Supervisor
from .transitions import change_state, save

log = logging.getLogger("modeld.manager")


class StartStop:
    """Starts and stops the servers of one home's services (see the module docstring)."""

    def __init__(self, store: Store, launcher: Launcher, supervisor: Supervisor):
        self.store = store
        self.launcher = launcher
        self.supervisor = supervisor

    async def start(self, m: ServiceRuntime, timeout: float, failing_state: DesiredState, op: str = "start") -> None:
        """Start the service's server (or keep the one that answers) and wait until it is healthy.

        ``failing_state``: the desired state recorded if the start fails; ``op``: the operation, as its
        kill points and writes are named (``deploy``, ``start``, ``replace-restart``).
        """
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
                else await probe(self.launcher.probe_target(m, m.proc), timeout=1.0)
            )
            if healthy or healthy is None:  # (None: the daemon could not probe; no reason to restart it)
                self.supervisor.supervise(m)  # first: a write that fails must not leave it unsupervised
                save(self.store, svc, step=f"{op}.json", strict=True)
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
            if proc is None:
                svc.status.pid = None
            # The intent is on disk before any process exists: a daemon killed from here on
            # finds the service (desired running) and adopts or starts its server.
            change_state(self.store, svc, ServiceState.PENDING_STARTUP, "", step=f"{op}.json", strict=True)
            if proc is None:
                killpoints.reached(f"{op}.after-json")
                proc = self.launcher.launch(m, svc.config, op)
            proc = await self.supervisor.wait_healthy(m, proc, min(timeout, svc.config.startup_timeout))
        except StillStarting as exc:
            # The caller stopped waiting, the server may still load (startup_timeout is longer):
            # leave it starting under supervision, as a loading vLLM or llama-server needs.
            self.supervisor.supervise(m)
            # (its state stays; desired running and pid are on disk already)
            change_state(self.store, svc, svc.status.state, str(exc), step=f"{op}.still-starting", strict=False)
            raise DeployError(
                f"service {svc.uuid} is not healthy after {timeout:g}s and keeps starting "
                f"(its startup_timeout is {svc.config.startup_timeout:g}s); watch it with `modeld ls` or `modeld logs`"
            ) from exc
        except ModeldError as exc:  # a write that failed (disk full), a bad socket path: the server is stopped too
            await self.supervisor.abandon_launch(m)
            m.close_listener()
            svc.desired_state = failing_state
            change_state(self.store, svc, ServiceState.ERROR, str(exc), strict=False)
            raise type(exc)(f"service {svc.uuid}: {exc}", log_excerpt=exc.log_excerpt) from exc
        # Best effort: service.json (desired running) and service.pid name the server already, so a
        # failed write here costs only a stale "pending" on disk, which supervision or the next
        # daemon corrects; failing the start would leave a healthy server that no record names.
        change_state(self.store, svc, ServiceState.ACTIVE, "", step=f"{op}.active", strict=False)
        killpoints.reached(f"{op}.after-healthy")
        self.supervisor.supervise(m)

    async def stop(self, m: ServiceRuntime, timeout: float, force: bool) -> None:
        """Stop the process: SIGTERM, then SIGKILL after the service's stop_timeout (or the call's timeout, if shorter)."""
        await self.supervisor.cancel_supervision(m)
        svc = m.svc
        svc.desired_state = DesiredState.STOPPED
        svc.desired_reason = ""
        if m.proc is not None:
            proc = m.proc
            if proc.alive:
                # Best effort: on a full disk the server is stopped all the same (supervision is
                # cancelled already); the final write below says whether the stop is recorded.
                change_state(self.store, svc, ServiceState.PENDING_SHUTDOWN, step="stop.json", strict=False)
                killpoints.reached("stop.after-json")
                await self.supervisor.terminate(m, proc, min(timeout, svc.config.stop_timeout), force)
            if proc.exited.done() and not proc.exited.cancelled():
                svc.status.exit_code = proc.exited.result()
            self.launcher.forget_process(m, proc)
            killpoints.reached("stop.after-exit")
        m.close_listener()
        svc.status.pid = None
        try:
            change_state(self.store, svc, ServiceState.INACTIVE, step="stop.stopped", strict=True)
        except StorageError as exc:
            raise StorageError(
                f"service {svc.uuid} was stopped, but that could not be recorded (a restarted daemon may start it again): {exc}"
            ) from exc
        log.info("stopped %s", svc.uuid)
