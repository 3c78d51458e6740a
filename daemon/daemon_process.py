"""The daemon process: read the settings, take the lock, bind the socket, rebuild, serve, shut down.

Order matters. The settings are read first, once (``settings.py``): a bad one stops the daemon
before it touches anything, with exit code 3 and one line naming the key, which the client's
auto-start reports as it is (:data:`CANNOT_START`). The lock on ``daemon.lock`` is taken before the socket is
touched (asyncio would delete a live daemon's socket file when binding).
The socket is bound under ``umask 077`` and listens before the rebuild, so a
client that connects meanwhile waits in the backlog and is answered only
once every service has been re-adopted and probed: what it reads is true.
SIGTERM and SIGINT stop the daemon and leave the model servers running.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ._version import __version__
from .api import TRANSPORT, Api
from .exceptions import DaemonAlreadyRunning, DaemonStartError, Forbidden, InvalidRequest, ModeldError, StorageError
from .linux import ProcessIdentity, peer_uid, raise_nofile_limit, trim_heap
from .manager import Manager
from .notify import Notifier, started_by
from .paths import HomeError, Paths
from .process import keep_server_umask
from .runtime._serve.ticks import SecondTicks
from .settings import DaemonSettings, load_settings
from .sockets import SocketError, bind_private_socket
from .store import atomic_write

log = logging.getLogger("modeld.daemon")

# A daemon that cannot start because of its settings says so on its last line of stderr, and exits 3.
CANNOT_START = "modeld: cannot start the daemon: "
CANNOT_START_EXIT = 3

_FORBIDDEN_BODY = json.dumps({"error": Forbidden("this daemon serves only its own user").to_dict()}).encode()
_BAD_HTTP_MESSAGE = (
    "not a valid HTTP/1.1 request (request line, header or body framing); send e.g. GET /v1/services HTTP/1.1 with a Host header"
)


class PeerCheckedProtocol(H11Protocol):
    """uvicorn's h11 protocol, refusing peers of another uid (SO_PEERCRED)."""

    # uvicorn types the parameter as BaseTransport; a stream connection always gets a Transport here
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # see above
        super().connection_made(transport)
        # The connection, for a stream that must be cut (an events client that reads too slowly):
        # uvicorn copies this state into each request's scope.
        self.app_state = {**self.app_state, TRANSPORT: transport}
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX and peer_uid(sock) != os.getuid():
            log.warning("refused a connection from uid %d", peer_uid(sock))
            transport.write(
                b"HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\nconnection: close\r\n"
                + f"content-length: {len(_FORBIDDEN_BODY)}\r\n\r\n".encode()
                + _FORBIDDEN_BODY
            )
            transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn answers a request h11 cannot parse in plain text; answer in JSON, as every error."""
        body = json.dumps({"error": InvalidRequest(_BAD_HTTP_MESSAGE).to_dict()}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-modeld-version", __version__.encode()),
            (b"connection", b"close"),
        ]
        try:
            self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")) or b"")
            self.transport.write(self.conn.send(h11.Data(data=body)) or b"")
            self.transport.write(self.conn.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError:
            pass  # a response had already begun: closing is all that is left
        self.transport.close()


def daemon_pid(paths: Paths) -> int | None:
    """The pid of the live daemon of this home, checked against its start time and boot id."""
    found = running_daemon(paths)
    return found[0] if found else None


def running_daemon(paths: Paths) -> tuple[int, str] | None:
    """(pid, who started it) of the live daemon of this home, from ``daemon.pid``: its first three lines
    name the process (pid, start ticks, boot id), then ``started_by=`` (see notify.py; "" if not recorded)."""
    try:
        lines = paths.daemon_pid.read_text().splitlines()
        ident = ProcessIdentity(int(lines[0]), int(lines[1]), lines[2].strip())
    except (OSError, ValueError, IndexError):
        return None
    by = next((line.partition("=")[2] for line in lines[3:] if line.startswith("started_by=")), "")
    return (ident.pid, by) if ident.is_alive() else None


def take_lock(paths: Paths) -> int:
    """Hold ``daemon.lock`` for the daemon's life: an exclusive flock, as filelock (used by clients) takes it.

    Plain fcntl rather than filelock here: the daemon stays small (filelock adds ~1 MiB to its RSS).
    The lock goes with the returned fd, also when the daemon is killed. A daemon refused says which
    one runs: its pid, and whether systemd or a client started it.
    """
    fd = os.open(paths.daemon_lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DaemonAlreadyRunning(already_running(paths)) from None
    return fd


def already_running(paths: Paths) -> str:
    """The sentence for a daemon refused by the lock (or a client refused by its daemon's exit)."""
    found = running_daemon(paths)
    for _ in range(100):  # the other one may hold the lock and not have written its record yet
        if found is not None:
            break
        time.sleep(0.01)
        found = running_daemon(paths)
    if found is None:
        return f"a modeld daemon is already running for {paths.home}; stop it with `modeld daemon stop`"
    pid, by = found
    unit = by.partition("(")[2].rstrip(")") if by.startswith("systemd (") else ""
    stop = f"`systemctl --user stop {unit}`" if unit else "`modeld daemon stop`"
    return f"a modeld daemon is already running for {paths.home} (pid {pid}, started by {by or 'an older modeld'}); stop it with {stop}"


def bind_socket(paths: Paths) -> socket.socket:
    # Safe only because we hold the lock: a socket file left here belongs to a dead daemon.
    # Anything else at that path is not ours to delete.
    try:
        return bind_private_socket(paths.socket, hint="; set MODELD_SOCKET to another path")
    except SocketError as exc:
        raise StorageError(str(exc)) from exc


class _UvicornWithoutSignals(SecondTicks):
    """uvicorn's server without its own signal handling (the daemon's loop handles signals), ticking once a second."""

    # uvicorn's is a generator-based contextmanager; a nullcontext is the same to its one caller
    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]  # see above
        return contextlib.nullcontext()


class TrimWhenIdle:
    """ASGI wrapper: once the API has been quiet for a second, give freed heap back (see ``trim_heap``)."""

    QUIET = 1.0

    def __init__(self, app: Any):
        self.app = app
        self._timer: asyncio.TimerHandle | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_later(self.QUIET, trim_heap)


class Daemon:
    def __init__(self, paths: Paths, settings: DaemonSettings, notifier: Notifier | None = None):
        self.paths = paths
        self.settings = settings
        self.manager = Manager(paths, settings)
        self.notifier = notifier or Notifier(None)
        self.stop_services = False
        self.server: _UvicornWithoutSignals | None = None
        self.api: Api | None = None

    def request_shutdown(self, stop_services: bool) -> None:
        self.stop_services = self.stop_services or stop_services
        self.notifier.send("STOPPING=1")
        if self.server is not None:
            self.server.exit_now()
        if self.api is not None:
            self.api.closing.set()  # streams (logs -f, events) end now, not at uvicorn's graceful timeout

    async def serve(self, sock: socket.socket) -> None:
        api = self.api = Api(self.manager, self.request_shutdown)
        await self.manager.rebuild()
        # Ready for systemd (Type=notify) once every service is rebuilt: the socket listens already,
        # and what a client reads now is true. Before anything else the daemon starts.
        self.notifier.send("READY=1")
        trim_heap()
        config = uvicorn.Config(
            TrimWhenIdle(api),
            http=PeerCheckedProtocol,
            ws="none",  # (the control API has no WebSocket route; "auto" would import websockets, and OpenSSL with it)
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
            timeout_keep_alive=60,
        )
        self.server = _UvicornWithoutSignals(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_shutdown, False)
        log.info("modeld %s serving on %s (pid %d)", __version__, self.paths.socket, os.getpid())
        path = self.settings.apply_path
        applying = asyncio.create_task(self.apply_at_start(path)) if path is not None else None
        try:
            await self.server.serve(sockets=[sock])
        finally:
            self.notifier.send("STOPPING=1")  # (sent once: a shutdown request has sent it already)
            api.closing.set()
            if applying is not None:  # (its child is killed: it would only meet a closed socket)
                applying.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await applying
            await self.manager.shutdown(self.stop_services)

    async def apply_at_start(self, path: Path) -> None:
        """Apply the ``apply`` setting's file once the API answers (the rebuild is over), in a child
        process that is a client of this daemon (``python -m daemon.client.apply_main``: the daemon serves
        meanwhile, and imports no client). Its report goes to the log; a file that fails to apply
        leaves the daemon running. The child goes with the daemon if it stops first."""
        while self.server is not None and not self.server.started:
            if self.server.should_exit:
                return
            await asyncio.sleep(0.01)
        log.info("applying %s (the apply setting, from %s)", path, self.settings.sources["apply"])
        env = {**os.environ, "MODELD_HOME": str(self.paths.home), "MODELD_SOCKET": str(self.paths.socket)}
        for tag in ("MODELD_SERVICE_UUID", "MODELD_PROCESS", "PYTHONSTARTUP"):
            env.pop(tag, None)
        root = str(Path(__file__).resolve().parent.parent)  # the folder that holds daemon/, installed or not
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        argv = [sys.executable, "-m", "daemon.client.apply_main", "--home", str(self.paths.home)]
        try:
            child = await asyncio.create_subprocess_exec(
                *argv,
                "--socket",
                str(self.paths.socket),
                str(path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
            )
        except OSError as exc:
            log.error("apply %s: cannot start it: %s", path, exc)
            return
        try:
            out, _ = await child.communicate()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            raise
        lines = out.decode(errors="replace").splitlines() or ["(no output)"]
        level = logging.INFO if child.returncode == 0 else logging.ERROR
        if child.returncode not in (0, 1):
            log.error("apply %s failed, nothing applied (exit code %s):", path, child.returncode)
        for line in lines:
            log.log(level, "apply: %s", line)


def run(paths: Paths | None = None, apply: str | None = None) -> int:
    """Run the daemon in the foreground until SIGTERM, SIGINT or a shutdown request.

    Raises ``DaemonStartError`` for a bad setting (before anything else is done), StorageError for
    a home or control socket it cannot use (the OSErrors of paths.py and sockets.py, converted here).
    ``apply``: a file to apply once serving (``--apply``; it wins over the ``apply`` setting).
    """
    paths = paths or Paths()
    # Out of the environment before anything is started (no child inherits them), also on a bad setting.
    notifier = Notifier.from_environ()
    launcher = started_by(notify=notifier.address)
    settings = load_settings(paths, arguments={"apply": apply} if apply else None)
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    keep_server_umask(os.umask(0o077))  # everything the daemon creates (logs, locks, sockets) is private to its user
    old_soft, soft = raise_nofile_limit()
    if soft != old_soft:
        log.info("open files limit raised from %d to %d", old_soft, soft)
    for key, source in settings.sources.items():
        if source != "default" and key not in settings.LOCATION:
            log.info("setting %s = %r (from %s)", key, getattr(settings, key), source)
    try:
        paths.ensure()
    except HomeError as exc:
        raise StorageError(str(exc)) from exc
    with contextlib.suppress(FileNotFoundError):
        os.chmod(paths.daemon_log, 0o600)  # created by the client that started us, under its umask
    lock = take_lock(paths)
    try:
        ident = ProcessIdentity.of(os.getpid())
        assert ident is not None
        record = f"{ident.pid}\n{ident.start_ticks}\n{ident.boot_id}\nstarted_by={launcher}\n"
        atomic_write(paths.daemon_pid, record.encode())
        sock = bind_socket(paths)
        daemon = Daemon(paths, settings, notifier)
        try:
            asyncio.run(daemon.serve(sock))
        finally:
            sock.close()
            for path in (paths.socket, paths.daemon_pid):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        log.info("modeld stopped%s", " with every server" if daemon.stop_services else "; model servers keep running")
        return 0
    finally:
        os.close(lock)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m daemon", description="Run the modeld daemon in the foreground.")
    parser.add_argument("--home", help="state folder (default: $MODELD_HOME or $XDG_STATE_HOME/modeld)")
    parser.add_argument("--socket", help="control socket path (default: $MODELD_HOME/modeld.sock)")
    parser.add_argument("--apply", help="a file `modeld apply` takes, applied once the daemon serves")
    args = parser.parse_args(argv)
    try:
        return run(Paths(args.home, args.socket), apply=os.path.abspath(args.apply) if args.apply else None)
    except DaemonAlreadyRunning as exc:
        print(f"modeld: {exc}", file=sys.stderr)
        return 3
    except DaemonStartError as exc:  # a bad setting: the message starts with "cannot start the daemon: "
        print("modeld: " + " ".join(str(exc).splitlines()), file=sys.stderr)  # one line: auto-start reports it
        return CANNOT_START_EXIT
    except (ModeldError, ValueError, OSError) as exc:
        print(f"modeld: cannot start the daemon: {exc}", file=sys.stderr)
        return 1
