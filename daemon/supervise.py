"""Supervision of one service's server: waiting until it is healthy, watching it (its exit
through a pidfd, its health on the prober's shared beat), restarting it after an exit or a
hang with backoff, following a server that daemonized to the process that serves, and
stopping it (stop_command first, then TERM, timeout, KILL to its whole group).

Invariants:
- A service whose record says it is supervised is supervised: an exception inside one
  service's supervision is logged and supervision goes on after a backoff (``guarded_supervision``).
- An exit is complete only once the rest of its group is gone (``end_launch``), so the port is
  free for the restart; a process of the group that serves the port is followed, not killed.
- Backoff arithmetic cannot overflow (``backoff_delay``); a restart that fails because the
  daemon is out of fds or memory is tried again, not counted against the server.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import shlex
import time

from . import events, metrics
from .exceptions import DeployError, ModeldError, StillStarting, with_log_excerpt
from .health import Prober, probe
from .launch import Launcher
from .logs import marker, tail_text
from .logwriter import LogWriterClient
from .models import DesiredState, RestartPolicy, ServiceConfig, ServiceState
from .paths import Paths
from .process import ProcessHandle, SpawnError, spawn
from .service import ServiceRuntime, describe_exit, fill, is_builtin, server_env, serving_member
from .store import Store
from .transitions import change_state, move

log = logging.getLogger("modeld.manager")

FAST_PROBING = 1.0  # seconds a starting server is probed every 5 ms before the probes back off
SUPERVISION_RETRY = 0.1  # seconds before supervision goes on after an exception, doubling
SUPERVISION_RETRY_MAX = 30.0


class Supervisor:
    """Supervises the servers of one home's services (see the module docstring)."""

    def __init__(self, paths: Paths, store: Store, logs: LogWriterClient, launcher: Launcher, prober: Prober):
        self.paths = paths
        self.store = store
        self.logs = logs
        self.launcher = launcher
        self.prober = prober

    async def successor(self, m: ServiceRuntime, proc: ProcessHandle, deadline: float) -> ProcessHandle | None:
        """The server's process exited: if a process it started serves the service (it daemonized:
        forked, left its session, serves from a grandchild), that one is the server now.

        While the service starts, the members are watched until ``deadline`` for one that binds
        the port; none serving (or none left) means the exit stands. Built-in servers never hand
        their socket on.
        """
        if is_builtin(m.svc.config) or proc.group is None:
            return None
        delay = 0.01
        while True:
            if not await asyncio.to_thread(proc.group.empty):
                serving = await asyncio.to_thread(serving_member, m.svc, proc.group)
                if serving is not None:
                    successor = ProcessHandle.adopt(serving, proc.info, proc.group)
                    if successor is not None:
                        log.info(
                            "%s: pid %d exited; pid %d, which it started, serves: following it", m.uuid, proc.pid, successor.pid
                        )
                        if m.proc is proc:
                            m.proc = successor
                        self.launcher.save_pid(m.uuid, successor, step="follow.pid")
                        m.svc.status.pid = successor.pid
                        return successor
            else:
                return None
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.2)

    async def end_launch(self, m: ServiceRuntime, proc: ProcessHandle) -> None:
        """After the server's process exited with no successor: stop the rest of its group (workers,
        helpers), so that nothing of it is left and its port is free for a restart."""
        if proc.group is not None and not await asyncio.to_thread(proc.group.empty):
            log.info("%s: stopping what pid %d left running", m.uuid, proc.pid)
            await proc.kill()

    async def wait_healthy(self, m: ServiceRuntime, proc: ProcessHandle, timeout: float) -> ProcessHandle:
        """Probe every few ms (backing off) until healthy; DeployError if it exits or times out.

        A server that daemonizes is followed to the process that serves (see _successor): the
        process returned is the one that answered.
        """
        started = time.monotonic()
        deadline = started + timeout
        target = self.launcher.probe_target(m, proc)
        delay = 0.005
        seen = "no answer yet"
        while True:
            if not proc.alive:
                successor = await self.successor(m, proc, deadline)
                if successor is not None:
                    proc = successor
                    continue
                code = proc.exited.result() if not proc.exited.cancelled() else None
                m.svc.status.exit_code = code
                events.exited(m.svc, proc, code, "before it answered its health check")  # event
                metrics.exited(m.uuid, proc, code, None)  # metrics
                await self.end_launch(m, proc)
                lines = await self.last_log_lines(m)
                raise DeployError(
                    with_log_excerpt(f"the server {describe_exit(code)} before it answered its health check", lines),
                    log_excerpt=lines or None,
                )
            healthy, seen = await probe(target, timeout=max(0.05, min(2.0, deadline - time.monotonic())))
            if healthy:
                return proc
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                lines = await self.last_log_lines(m)
                raise (StillStarting if timeout < m.svc.config.startup_timeout else DeployError)(
                    with_log_excerpt(f"the server did not become healthy within {timeout:g}s (last probe: {seen})", lines),
                    log_excerpt=lines or None,
                )
            await proc.wait(min(delay, remaining))
            if time.monotonic() - started > FAST_PROBING:  # every 5 ms for a second, then backing off
                delay = min(delay * 1.5, 0.25)

    async def last_log_lines(self, m: ServiceRuntime) -> str:
        """The server's last log lines, secrets masked, for an error (its ``log_excerpt``)."""
        also = (m.previous_config,) if m.previous_config is not None else ()
        path = self.paths.service_log(m.uuid)

        def read() -> str:
            self.logs.flush(str(m.uuid))  # what the server wrote before it went is in the file
            return tail_text(path)

        return m.svc.config.scrub(await asyncio.to_thread(read), *also)

    def supervise(self, m: ServiceRuntime) -> None:
        m.task = asyncio.get_running_loop().create_task(self.guarded_supervision(m), name=f"supervise-{m.uuid}")

    async def guarded_supervision(self, m: ServiceRuntime) -> None:
        """Supervision that never dies: an exception (a full fd table, a bug) is logged and supervision
        goes on after a backoff, so a service is never left unsupervised while its record says otherwise."""
        delay = SUPERVISION_RETRY
        while True:
            try:
                await self.supervision(m)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("supervision of %s failed; going on in %gs", m.uuid, delay)
                why = f"supervision failed (going on in {delay:g}s): {type(exc).__name__}: {exc}"
                change_state(self.store, m.svc, m.svc.status.state, why, strict=False)
                await asyncio.sleep(delay)
                delay = min(delay * 2, SUPERVISION_RETRY_MAX)

    async def cancel_supervision(self, m: ServiceRuntime) -> None:
        task, m.task = m.task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait({task})  # unlike `await task`, a cancellation of the caller still propagates

    async def supervision(self, m: ServiceRuntime) -> None:
        svc = m.svc
        while True:
            proc = m.proc
            if proc is None:
                # Only after an exception between an exit and its restart (see _guarded_supervision):
                # the service should still run, so the restart happens now.
                if svc.desired_state != DesiredState.RUNNING or svc.status.state in (ServiceState.ERROR, ServiceState.INACTIVE):
                    return
                if not await self.relaunch(m, "supervision was interrupted"):
                    return
                continue
            if svc.status.state != ServiceState.ACTIVE:
                try:
                    proc = await self.wait_healthy(m, proc, svc.config.startup_timeout)
                except DeployError as exc:
                    log.warning("%s did not come up: %s", svc.uuid, exc)
                    move(svc, svc.status.state, str(exc))  # (not written here: the exit that follows is)
                    proc = m.proc or proc  # (it may have been followed to a process it started)
                    await proc.kill()
                else:
                    change_state(self.store, svc, ServiceState.ACTIVE, "", step="supervise.active", strict=False)
            healthy_since = time.monotonic() if proc.alive else None
            unhealthy = await self.watch(m, proc, healthy_since)
            if unhealthy is None and not proc.alive:
                successor = await self.successor(m, proc, time.monotonic())
                if successor is not None:
                    continue
            code = proc.exited.result() if proc.exited.done() and not proc.exited.cancelled() else None
            events.exited(svc, proc, code, f"stopped as hung: {unhealthy}" if unhealthy else "")  # event
            await self.end_launch(m, proc)
            self.launcher.forget_process(m, proc)
            svc.status.exit_code = code
            svc.status.pid = None
            metrics.exited(m.uuid, proc, code, unhealthy)  # metrics
            if unhealthy is None and svc.config.stop_command:
                await self.run_stop_command(m, svc.config, svc.config.stop_timeout)  # a dead `docker run` leaves its container
            if not await self.restart_after_exit(m, code, unhealthy):
                return

    async def watch(self, m: ServiceRuntime, proc: ProcessHandle, healthy_since: float | None) -> str | None:
        """Wait for the process to exit, its health probed on the shared beat meanwhile (see Prober).

        A server that was healthy and then fails ``restart.liveness_failures`` probes in a row is
        hung (a llama-server after a CUDA OOM, a frozen process): unless ``restart.on_unhealthy`` is
        off or ``restart.mode`` is ``never`` (then it is reported in error and left alone), it is
        stopped here and the reason returned, for supervision to restart it. None: it exited.
        """
        svc = m.svc
        hung: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        failed = 0
        was_healthy = svc.status.state == ServiceState.ACTIVE

        def on_result(healthy: bool | None, seen: str) -> None:  # on the loop, once a beat
            nonlocal failed, was_healthy
            if hung.done() or not proc.alive:
                return
            if healthy is None:  # the daemon could not probe (out of fds): says nothing of the server
                log.warning("%s: cannot probe: %s", svc.uuid, seen)
                return
            policy = svc.config.restart
            if healthy:
                failed, was_healthy = 0, True
                if svc.status.state != ServiceState.ACTIVE:
                    change_state(self.store, svc, ServiceState.ACTIVE, "", step="supervise.active", strict=False)
                if healthy_since is not None and time.monotonic() - healthy_since >= policy.healthy_reset:
                    m.failures = 0
                return
            failed += 1
            if failed < policy.liveness_failures:
                return
            if was_healthy and policy.on_unhealthy and policy.mode != "never":
                hung.set_result(f"it failed {failed} health checks in a row (last: {seen})")
            elif failed == policy.liveness_failures:
                log.warning("%s is failing its health check: %s", svc.uuid, seen)
                change_state(
                    self.store, svc, ServiceState.ERROR, f"health check failing: {seen}", step="supervise.unhealthy", strict=False
                )

        key = (m.uuid, proc.pid)
        self.prober.watch(key, self.launcher.probe_target(m, proc), on_result)
        try:
            await asyncio.wait((proc.exited, hung), return_when=asyncio.FIRST_COMPLETED)  # (cancels neither)
        finally:
            self.prober.unwatch(key)
        if not hung.done():
            hung.cancel()
            return None
        reason = hung.result()
        log.warning("%s is hung: %s; restarting it", svc.uuid, reason)
        change_state(
            self.store, svc, ServiceState.PENDING_STARTUP, f"restarting: {reason}", step="supervise.unhealthy", strict=False
        )
        await self.terminate(m, proc, svc.config.stop_timeout)
        return reason

    async def restart_after_exit(self, m: ServiceRuntime, code: int | None, unhealthy: str | None = None) -> bool:
        """Apply the restart policy after an exit (or a stop for hanging: ``unhealthy``); True if a new process was started."""
        svc = m.svc
        policy = svc.config.restart
        what = f"was stopped: {unhealthy}" if unhealthy else describe_exit(code)
        log.warning("%s: server %s", svc.uuid, what)
        if (
            svc.desired_state != DesiredState.RUNNING
            or policy.mode == "never"
            or (policy.mode == "on-failure" and code == 0 and not unhealthy)
        ):
            if code == 0 and not unhealthy:  # it finished: a stop, which a daemon restart (a reboot) keeps
                svc.desired_state = DesiredState.STOPPED
            change_state(
                self.store,
                svc,
                ServiceState.INACTIVE if code == 0 and not unhealthy else ServiceState.ERROR,
                with_log_excerpt(f"the server {what}", await self.last_log_lines(m)),
                step="restart.exited",
                strict=False,
            )
            return False
        m.failures += 1
        if m.failures > policy.max_restarts:
            change_state(
                self.store,
                svc,
                ServiceState.ERROR,
                with_log_excerpt(
                    f"the server {what}; gave up after {policy.max_restarts} restarts in a row", await self.last_log_lines(m)
                ),
                step="restart.gave-up",
                strict=False,
            )
            m.close_listener()
            return False
        delay = backoff_delay(policy, m.failures)
        change_state(
            self.store,
            svc,
            ServiceState.PENDING_STARTUP,
            f"the server {what}; restarting in {delay:.2g}s",
            step="restart.pending",
            strict=False,
        )
        await asyncio.sleep(delay)
        return await self.relaunch(m, what)

    async def relaunch(self, m: ServiceRuntime, why: str) -> bool:
        """Start the service's server again under supervision (a restart); True if it was started."""
        svc = m.svc
        try:
            self.launcher.launch(m, svc.config, "restart")
        except ModeldError as exc:
            await self.abandon_launch(m)
            if _out_of_resources(exc):  # the daemon's own fds or memory ran out: try again, backing off
                move(svc, ServiceState.PENDING_STARTUP)  # (not written: supervision goes on in a moment)
                raise
            change_state(
                self.store, svc, ServiceState.ERROR, f"could not be restarted ({why}): {exc}", step="restart.failed", strict=False
            )
            return False
        svc.status.restarts += 1
        change_state(self.store, svc, ServiceState.PENDING_STARTUP, step="restart.restarted", strict=False)
        return True

    async def abandon_launch(self, m: ServiceRuntime) -> None:
        """After a _launch that failed: stop the server it may have spawned (its pid file could not be
        written, say), so that no server runs that no record names and no one supervises."""
        proc = m.proc
        if proc is None:
            return
        await proc.kill()
        self.launcher.forget_process(m, proc)
        m.svc.status.pid = None

    async def terminate(
        self, m: ServiceRuntime, proc: ProcessHandle, timeout: float, force: bool = False, config: ServiceConfig | None = None
    ) -> None:
        """Stop a server and everything it started: its ``stop_command`` first (if any), then the
        signals (SIGTERM, SIGCONT, ``timeout``, SIGKILL; ``force``: SIGKILL at once)."""
        config = config or m.svc.config
        if config.stop_command and proc.alive:
            await self.run_stop_command(m, config, timeout)
        await proc.terminate(timeout, force)

    async def run_stop_command(self, m: ServiceRuntime, config: ServiceConfig, timeout: float) -> bool:
        """Run the service's ``stop_command`` (e.g. ``docker stop {name}``) with the service's env, for
        ``timeout`` seconds at most; True if it exited 0. Its output goes to the service's log. It is
        not part of the server's group (stopping the server must not stop it)."""
        argv = [fill(arg, self.launcher.placeholders(m, config)) for arg in config.stop_command]
        env = {**server_env(config), "PYTHONUNBUFFERED": "1"}
        for key in ("MODELD_SERVICE_UUID", "MODELD_PROCESS"):
            env.pop(key, None)
        path = self.paths.service_log(m.uuid)

        def open_log(first_line: bytes) -> int:
            return self.logs.open(
                str(m.uuid), path, config.log_max_bytes, config.log_backups, marker(f"stop command {shlex.join(argv)}")
            )

        try:
            helper = spawn(argv, env=env, cwd=config.working_dir, open_log=open_log)
        except SpawnError as exc:
            log.warning("%s: stop command: %s; the signals follow", m.uuid, exc)
            return False
        if not await helper.wait(timeout):
            log.warning("%s: stop command %s did not finish within %gs; the signals follow", m.uuid, argv[0], timeout)
            await helper.kill()
            return False
        code = helper.exited.result()
        if code != 0:
            log.warning("%s: stop command %s %s; the signals follow", m.uuid, argv[0], describe_exit(code))
        return code == 0


def backoff_delay(policy: RestartPolicy, failures: int) -> float:
    """Seconds before restart number ``failures`` in a row: the first exit after a healthy run
    restarts at once (a one-off crash costs only a spawn); exits in a row back off from
    ``backoff_initial``, doubling, up to ``backoff_max``. The exponent is capped, so no count of
    restarts overflows (2.0 ** 64 times any float is still a float, or inf, which min() caps)."""
    if failures <= 1:
        return 0.0
    return min(policy.backoff_initial * 2.0 ** min(failures - 2, 64), policy.backoff_max)


def _out_of_resources(exc: BaseException) -> bool:
    """An error caused by the daemon running out of fds or memory, not by the server."""
    seen: BaseException | None = exc
    while seen is not None:  # the error, then what caused it
        if isinstance(seen, OSError) and seen.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.ENOBUFS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
