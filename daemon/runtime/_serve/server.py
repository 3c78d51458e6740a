"""The draining uvicorn server, and the hand-over of its listening socket to the next version.

A stop must fail no request, also while a new version takes over the same TCP
socket: ``Server`` first stops accepting (the kernel backlog stays with any other
process holding the socket), then drains, then exits (see its docstring).
``FdHandoff`` gives the listening fd to a same-uid peer over a private Unix
socket (SCM_RIGHTS), so a restarted daemon can take it back from a live server.

``Server`` subclasses uvicorn's ``Server`` and replaces its ``main_loop``,
``shutdown`` and ``handle_exit``, reading its internals (``servers``,
``server_state``, ``started``, ``force_exit``, ``lifespan``): pyproject.toml
bounds uvicorn to the versions this was tested with.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import TYPE_CHECKING

import uvicorn

from .identity import log
from .ticks import SecondTicks

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType

    from .app import App


class Server(SecondTicks):
    """uvicorn server whose first SIGTERM/SIGINT stops accepting, drains, then exits promptly.

    Stock uvicorn resets connections it accepted but has not parsed yet when
    the signal arrives. Here the listening sockets are closed first (the kernel
    backlog stays with any other process sharing the TCP fd, e.g. the next
    version during a hand-over), and uvicorn's shutdown starts once no
    connection has been open for ``QUIET`` seconds, or after ``drain`` seconds
    at most (idle keep-alive clients). A stop with no request in flight thus
    takes a few ms, not the whole drain. uvicorn's shutdown polls every 0.1 s;
    it is replaced, as its loop is (``SecondTicks``), so the exit follows
    at once. A second signal forces the exit. Captured signals are not
    re-raised, so a graceful stop exits 0.
    """

    QUIET = 0.02  # seconds with no open connection that end a drain early
    POLL = 0.005

    def __init__(
        self,
        config: uvicorn.Config,
        app: App,
        drain: float,
        on_drain: Callable[[], None] | None = None,
        on_started: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config)
        self.app = app
        self.drain = drain
        self.on_drain = on_drain
        self.on_started = on_started
        self.loop: asyncio.AbstractEventLoop | None = None  # set by serve()
        self.draining = False
        self._drain_deadline = 0.0
        self._quiet_since: float | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn's shutdown without its fixed 0.1 s sleep and 0.1 s polls.
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        assert self.loop is not None  # set by serve(), which runs this
        timeout = self.config.timeout_graceful_shutdown
        assert timeout is not None  # cli.main sets it (None, uvicorn's 'wait for ever', is not supported here)
        deadline = self.loop.time() + timeout
        state = self.server_state
        while (state.connections or state.tasks) and not self.force_exit and self.loop.time() < deadline:
            await asyncio.sleep(self.POLL)
        for task in state.tasks:
            task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")
        if not self.force_exit:
            await self.lifespan.shutdown()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Never appended to self._captured_signals: nothing is re-raised later.
        if self.draining or self.should_exit:
            self.should_exit = True
            self.force_exit = True
            if self.loop is not None:
                self.loop.call_soon_threadsafe(self.exit_now)
            return
        self.draining = True
        if self.loop is None or not self.started:
            self.should_exit = True
            return
        self.loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        assert self.loop is not None  # called by the loop
        self.app.draining = True
        servers = list(getattr(self, "servers", ()))
        # Stop accepting now, but close the listening sockets one loop iteration
        # later: connections accepted just before still have their transport-
        # creation tasks queued, and asyncio (3.11) silently drops them (leaking
        # the socket until exit, when the client sees a reset) if the server is
        # already closed when those tasks run. The ready queue is FIFO, so a
        # call_soon here runs after them.
        for server in servers:
            for sock in server.sockets:
                self.loop.remove_reader(sock.fileno())
        self.loop.call_soon(self._close_servers, servers)
        if self.on_drain is not None:
            self.on_drain()
        self._drain_deadline = self.loop.time() + self.drain
        self.loop.call_later(self.POLL, self._check_drain)

    def _close_servers(self, servers: list[asyncio.Server]) -> None:
        for server in servers:
            server.close()

    def _check_drain(self) -> None:
        assert self.loop is not None  # called by the loop
        # An accepted connection reaches server_state.connections a few loop iterations
        # after its accept; QUIET (many iterations) covers that gap.
        now = self.loop.time()
        if self.server_state.connections:
            self._quiet_since = None
        elif self._quiet_since is None:
            self._quiet_since = now
        if now >= self._drain_deadline or (self._quiet_since is not None and now - self._quiet_since >= self.QUIET):
            self.exit_now()
        else:
            self.loop.call_later(self.POLL, self._check_drain)


class FdHandoff:
    """Unix socket that hands our TCP listening fd to a same-uid peer (SCM_RIGHTS)."""

    def __init__(self, path: str, tcp_sock: socket.socket) -> None:
        self.path = path
        self.tcp_sock = tcp_sock
        self.sock = bind_unix(path)
        self.sock.setblocking(False)
        self.ino = os.stat(path).st_ino
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        loop.add_reader(self.sock.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            log(f"fd handoff: accept failed: {exc}")
            return
        with conn:
            try:
                if hasattr(socket, "SO_PEERCRED"):
                    import struct

                    size = struct.calcsize("3i")
                    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, size))
                    if uid != os.getuid():
                        return
                fd = self.tcp_sock.fileno()
                if fd < 0:  # already closed while draining: nothing to hand over
                    return
                conn.settimeout(1.0)
                socket.send_fds(conn, [b"fd"], [fd])
            except OSError as exc:
                log(f"fd handoff failed: {exc}")

    def close(self) -> None:
        if self.loop is not None and self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        unlink_if_ours(self.path, self.ino)


def bind_unix(path: str) -> socket.socket:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    sock.listen(128)
    return sock


def unlink_if_ours(path: str, ino: int) -> None:
    # A newer process may have re-created the path already; leave that alone.
    try:
        if os.stat(path).st_ino == ino:
            os.unlink(path)
    except OSError:
        pass


def listening_socket(fd: int | None, host: str | None, port: int | None) -> socket.socket:
    """The TCP listening socket: the inherited ``fd`` (listening, or made so), else ``host``:``port`` bound here."""
    if fd is not None:
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM:
            raise OSError(f"fd {fd} is not a stream socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.listen(2048)
        return sock
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return socket.create_server(info[0][4][:2], family=info[0][0], backlog=2048)
