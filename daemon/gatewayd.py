"""The daemon's end of the gateway (``daemon/gateway/``): one process per home serving every model on one port.

Invariants, and why:

* **The port is the daemon's for life.** The daemon binds it (``sockets.bind_listener``) and keeps
  its own copy; each gateway process inherits it (``--fd``). While a killed gateway is replaced,
  clients wait in the backlog instead of being refused, and the port never changes. With ``:0``
  the port picked the first time is recorded in ``run/gateway.json`` and asked for ever after.
* **The gateway outlives the daemon** (``detached.start_detached``: its own session), so a daemon
  restart or kill -9 drops no traffic, and it routes from the records on disk, not from the
  daemon. A plain ``daemon stop`` leaves it serving, like the model servers; ``daemon stop --all``
  stops it. The next daemon re-adopts a live one: it asks the gateway's control socket
  (``run/gateway.sock``) for the listener (SCM_RIGHTS, as ``sockets.fetch_listener`` takes a
  built-in server's), learns its pid from the socket's peer credentials, and watches that pid.
* **Never part of a service.** It is spawned on the event loop's thread (no server spawn is in
  flight there, see ``containment.py``), and carries ``MODELD_HOME`` and ``MODELD_PROCESS``
  (role ``gateway``) but no ``MODELD_SERVICE_UUID``, so no stop, stray sweep or cgroup of a
  service ever reaches it.
* **A port that cannot be had never stops the daemon**: ``gateway_error`` says why (GET
  /v1/daemon, ``modeld daemon status``); the daemon tries again when it starts again.
* **No data-plane byte passes through the daemon**: it holds a listener and a pidfd, nothing more.

Files: ``run/gateway.pid`` (pid, start ticks, boot id, as the other records), ``run/gateway.json``
(what the live gateway was started with: host, port, timeout, max_body), ``run/gateway.sock``
(the gateway's control socket), ``gateway.log`` (its output).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from subprocess import Popen
from typing import Any

from .detached import start_detached
from .linux import ProcessIdentity, reap
from .paths import Paths
from .settings import DaemonSettings
from .sockets import SocketError, bind_listener
from .store import atomic_write

log = logging.getLogger("modeld.gateway")

BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 5.0
HEALTHY_RESET = 10.0  # a gateway that ran this long restarts at once when it exits
STOP_TIMEOUT = 5.0
DRAIN_TIMEOUT = 35.0  # a gateway replaced by one with other settings drains for up to 30 s (gateway/__main__.py)


class GatewaySupervisor:
    """Binds the gateway's port, starts, watches, restarts, re-adopts and stops the gateway process."""

    def __init__(self, paths: Paths, settings: DaemonSettings):
        self.paths = paths
        self.address = settings.gateway_address  # None: off
        self.timeout = settings.gateway_timeout
        self.max_body = settings.gateway_max_body
        # Seconds a request waits for its service to wake (0: each service's startup_timeout).
        self.wake_timeout: float = settings.wake_timeout or 0.0
        self.record = paths.run / "gateway.pid"
        self.state_file = paths.run / "gateway.json"
        self.control = paths.run / "gateway.sock"
        self.listener: socket.socket | None = None
        self.ident: ProcessIdentity | None = None
        self.error = ""
        self.restarts = 0
        self._popen: Popen[bytes] | None = None
        self._pidfd: int | None = None
        self._started = 0.0
        self._backoff = BACKOFF_INITIAL
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        """Re-adopt the live gateway of this home, or bind the port and start one. On the event loop's thread."""
        adopted = self._adopt()
        if self.address is None:
            if adopted:
                log.info("gateway: off; stopping the one still running (pid %d)", self.ident.pid if self.ident else 0)
                self._kill_now()
                self.let_go()
            self._stop_unanswering()
            return
        if adopted:
            return
        self._stop_unanswering()
        host, port = self.address
        if port == 0:
            port = self._recorded_port(host)
        try:
            self.listener = bind_listener(host, port)
        except SocketError as exc:
            self.error = f"no gateway: {exc}; the daemon runs without one and tries again when it starts again"
            log.error("%s", self.error)
            return
        self.listener.set_inheritable(False)
        self._write_state()
        self._spawn()

    def _adopt(self) -> bool:
        """Take over a live gateway: its listener and pid, over its control socket. True if adopted.

        One started with other settings (an address, timeout or body cap changed since) is
        adopted only to be replaced: on the same listener if the address is the same.
        """
        answer = _ask(str(self.control))
        if answer is None:
            return False
        listener, pid, started_with = answer
        ident = ProcessIdentity.of(pid)
        if ident is None:
            listener.close()
            return False
        self.ident, self.listener = ident, listener
        self._watch(ident.pid)
        if self.address is None:
            return True
        host, port = listener.getsockname()[:2]
        same_place = host == self.address[0] and (port == self.address[1] or self.address[1] == 0)
        wanted = {"timeout": self.timeout, "max_body": self.max_body, "wake_timeout": self.wake_timeout}
        if same_place and {k: started_with.get(k) for k in wanted} == wanted:
            log.info("gateway: re-adopted pid %d on %s:%d", pid, host, port)
            self._write_record()
            return True
        log.info("gateway: pid %d was started with other settings (%s); replacing it", pid, started_with)
        old = self.ident
        self._unwatch()
        self.ident = None
        if same_place:
            self._write_state()
            self._spawn()  # the new one first, on the same socket: it takes the next connections
        else:
            listener.close()
            self.listener = None
        # The old one finishes the responses in flight (it drains on SIGTERM), then exits; it is
        # killed if it has not after DRAIN_TIMEOUT. In a thread: the daemon does not wait for it.
        threading.Thread(target=_terminate, args=(old, DRAIN_TIMEOUT), name="gateway-drain", daemon=True).start()
        return same_place

    def _recorded_port(self, host: str) -> int:
        """The port ``:0`` picked before (run/gateway.json), if it was on this host; else 0."""
        try:
            state = json.loads(self.state_file.read_text())
            return int(state["port"]) if state.get("host") == host and state.get("picked") else 0
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return 0

    def _stop_unanswering(self) -> None:
        """A recorded gateway that lives but does not answer (it may hold the port) is killed."""
        ident = self._read_record()
        if ident is not None and ident.is_alive() and _is_gateway_of(ident.pid, str(self.paths.home)):
            log.warning("gateway: pid %d does not answer on %s; killing it", ident.pid, self.control)
            with contextlib.suppress(OSError):
                fd = os.pidfd_open(ident.pid)
                try:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                    _wait_exit(fd, STOP_TIMEOUT)
                finally:
                    os.close(fd)

    # ------------------------------------------------------------------ the process

    def _spawn(self) -> None:
        assert self.listener is not None and self.address is not None
        self._timer = None
        if self._closing:
            return
        env = {**os.environ, "MODELD_HOME": str(self.paths.home), "MODELD_PROCESS": json.dumps({"role": "gateway"})}
        env.pop("MODELD_SERVICE_UUID", None)
        fd = self.listener.fileno()
        argv = [sys.executable, "-m", "daemon.gateway", "--home", str(self.paths.home), "--fd", str(fd)]
        argv += ["--control", str(self.control), "--timeout", repr(self.timeout), "--max-body", str(self.max_body)]
        argv += ["--wake-timeout", repr(self.wake_timeout)]
        try:
            self._popen = start_detached(argv, env=env, log_path=self.paths.home / "gateway.log", pass_fds=(fd,))
        except OSError as exc:
            self.error = f"cannot start the gateway: {exc}"
            log.error("%s", self.error)
            self._schedule_restart()
            return
        self.ident = ProcessIdentity.of(self._popen.pid)
        if self.ident is None:  # exited already: its pidfd would name nothing
            self._popen.poll()
            self._schedule_restart()
            return
        self.error = ""
        self._started = time.monotonic()
        self._write_record()
        self._watch(self.ident.pid)
        log.info("gateway: pid %d serving %s", self.ident.pid, self.url)

    def _watch(self, pid: int) -> None:
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError:
            self._pidfd = None
            return
        with contextlib.suppress(RuntimeError):  # no loop (a test of start alone): not supervised
            asyncio.get_running_loop().add_reader(self._pidfd, self._exited)

    def _unwatch(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(RuntimeError, ValueError):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def _exited(self) -> None:
        code = reap(self._pidfd) if self._pidfd is not None else None
        if self._popen is not None:
            self._popen.poll()
        self._unwatch()
        pid = self.ident.pid if self.ident else 0
        self.ident = None
        if self._closing:
            return
        log.warning(
            "gateway: pid %d exited (%s); starting another on the same port", pid, "code unknown" if code is None else code
        )
        self.restarts += 1
        self._schedule_restart()

    def _schedule_restart(self) -> None:
        if self._closing or self.listener is None:
            return
        ran = time.monotonic() - self._started
        delay = 0.0 if ran >= HEALTHY_RESET else self._backoff
        self._backoff = BACKOFF_INITIAL if ran >= HEALTHY_RESET else min(self._backoff * 2, BACKOFF_MAX)
        self._timer = asyncio.get_running_loop().call_later(delay, self._spawn)

    # ------------------------------------------------------------------ stop

    def let_go(self) -> None:
        """A plain ``daemon stop``: the gateway keeps serving; the daemon drops its watch and its copy of the port."""
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        self._unwatch()
        if self._popen is not None:
            self._popen.poll()
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    async def stop(self) -> None:
        """``daemon stop --all``: SIGTERM, then SIGKILL after STOP_TIMEOUT; the records go."""
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        ident = self.ident
        self._unwatch()
        if ident is not None:
            await asyncio.to_thread(_terminate, ident)
        if self._popen is not None:
            self._popen.poll()
        self.ident = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.record)  # (run/gateway.json stays: a port :0 picked is kept for the next daemon)
        self.let_go()

    def _kill_now(self) -> None:
        ident = self.ident
        self._unwatch()
        self.ident = None
        if ident is not None:
            _terminate(ident)

    # ------------------------------------------------------------------ records

    @property
    def url(self) -> str | None:
        if self.listener is None:
            return None
        host, port = self.listener.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def describe(self) -> dict[str, Any]:
        """For GET /v1/daemon: ``gateway_url``, ``gateway_pid``, ``gateway_error``."""
        alive = self.ident is not None and self.ident.is_alive()
        return {
            "gateway_url": self.url,
            "gateway_pid": self.ident.pid if alive and self.ident else None,
            "gateway_error": self.error or None,
        }

    def _write_record(self) -> None:
        if self.ident is not None:
            i = self.ident
            with contextlib.suppress(OSError):
                atomic_write(self.record, f"{i.pid}\n{i.start_ticks}\n{i.boot_id}\n".encode())

    def _read_record(self) -> ProcessIdentity | None:
        try:
            lines = self.record.read_text().split()
            return ProcessIdentity(int(lines[0]), int(lines[1]), lines[2])
        except (OSError, ValueError, IndexError):
            return None

    def _write_state(self) -> None:
        assert self.listener is not None and self.address is not None
        host, port = self.listener.getsockname()[:2]
        state = {"host": host, "port": port, "picked": self.address[1] == 0}
        with contextlib.suppress(OSError):
            atomic_write(self.state_file, json.dumps(state).encode())


def _ask(control: str, timeout: float = 1.0) -> tuple[socket.socket, int, dict[str, Any]] | None:
    """(listener, pid, what it was started with) from a live gateway's control socket; None if none answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(control)
            pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
            msg, fds, _flags, _addr = socket.recv_fds(conn, 4096, 1)
            while chunk := conn.recv(4096):
                msg += chunk
    except OSError:
        return None
    if not fds:
        return None
    listener = socket.socket(fileno=fds[0])
    listener.set_inheritable(False)
    try:
        started_with = json.loads(msg)
        return listener, int(started_with.get("pid", pid)), started_with
    except (ValueError, TypeError, AttributeError):
        listener.close()
        return None


def _is_gateway_of(pid: int, home: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return False
    return f"MODELD_HOME={home}".encode() in env and any(e.startswith(b"MODELD_PROCESS=") and b"gateway" in e for e in env)


def _wait_exit(pidfd: int, timeout: float) -> bool:
    import select

    return bool(select.select([pidfd], [], [], timeout)[0])


def _terminate(ident: ProcessIdentity, grace: float = 0.0) -> None:
    """SIGTERM, the grace period (STOP_TIMEOUT by default), SIGKILL; through a pidfd checked against the start ticks."""
    grace = grace or STOP_TIMEOUT
    try:
        fd = os.pidfd_open(ident.pid)
    except OSError:
        return
    try:
        if not ident.is_alive():
            return
        signal.pidfd_send_signal(fd, signal.SIGTERM)
        if not _wait_exit(fd, grace):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            _wait_exit(fd, STOP_TIMEOUT)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
    except OSError:
        pass
    finally:
        os.close(fd)
