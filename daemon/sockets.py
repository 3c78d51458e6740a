"""The sockets the daemon binds and takes back: one home for socket code.

* ``bind_private_socket``: a Unix socket only this user can connect to (the daemon's control
  socket, a ``bind_unix`` service's socket), replacing a leftover socket file but nothing else;
* ``bind_listener`` / ``bind_unclaimed``: a service's TCP port (a built-in server's listener is
  held by the daemon for the service's life and inherited by each launch; a command server's
  port is only checked, or picked, free: the server binds it itself);
* ``fetch_listener(s)``: a built-in server's listener taken back over its fd hand-over socket
  (SCM_RIGHTS), so a restarted daemon keeps the port held across a replace.

Where the socket files live is ``paths.py``'s; probing what listens on them is ``health.py``'s.

Errors: these helpers raise ``OSError`` (``SocketError``, whose text is the sentence a client
reads), never a modeld error: the unit that asked for the socket converts it once, to what the
failure means there (the Launcher: a failed deploy or start, a conflict in a precheck; the
daemon process: its state folder cannot be used).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import select
import socket
import stat
import time
from collections.abc import Collection
from pathlib import Path

# A Unix socket path is limited to 108 bytes including the NUL.
MAX_SOCKET_PATH = 107
_TEMPORARY = itertools.count()  # names a socket bound before it is renamed into place


class SocketError(OSError):
    """A socket could not be bound: ``str()`` says why, ``address`` names the path or ``host:port``."""

    def __init__(self, message: str, address: str) -> None:
        super().__init__(message)
        self.address = address


def bind_private_socket(path: Path, hint: str = "") -> socket.socket:
    """Bind and listen on a Unix socket at ``path`` that only this user can connect to (0600).

    A socket file already there is a leftover of a server that is gone (the caller owns the
    path); anything else is not ours to replace.
    """
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise SocketError(
            f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes; set MODELD_HOME to a shorter path", str(path)
        )
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise SocketError(f"{path} exists and is not a socket{hint}", str(path))
        os.unlink(path)
    except FileNotFoundError:
        pass
    # Bound and listening under a temporary name, then renamed into place: a client that sees the
    # socket file can connect (between bind and listen it would be refused).
    temporary = path.with_name(f".{os.getpid():x}.{next(_TEMPORARY)}")
    if len(os.fsencode(temporary)) > MAX_SOCKET_PATH:
        temporary = path
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)
    try:
        with contextlib.suppress(FileNotFoundError):
            if temporary != path and stat.S_ISSOCK(os.lstat(temporary).st_mode):
                os.unlink(temporary)  # (left by a process of our pid that is gone)
        sock.bind(str(temporary))
        os.chmod(temporary, 0o600)
        sock.listen(1024)
        if temporary != path:
            os.rename(temporary, path)
    except OSError as exc:
        sock.close()
        if temporary != path:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        raise SocketError(f"cannot listen on {path}: {exc.strerror or exc}", str(path)) from exc
    finally:
        os.umask(old_umask)
    return sock


def bind_listener(host: str, port: int) -> socket.socket:
    """Bind and listen on ``host:port`` (0: a free port); the daemon holds it for the service's life.

    ``host`` is an IP address (the manager resolves names first, see daemon/addresses.py): a
    name given here would be looked up by ``bind``, blocking the caller.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise SocketError(f"port {port} on {host} is already in use by another process", f"{host}:{port}") from exc
        raise SocketError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", f"{host}:{port}") from exc
    return sock


def bind_unclaimed(host: str, claimed: Collection[int]) -> socket.socket:
    """A listener on a free port that is none of ``claimed``.

    A service keeps its port for life, but a command server's port is free while it is
    down (stopped, restarting, being replaced): the kernel may offer it to a new service
    then. Ports it offers that are claimed are held while another is asked for.
    """
    held: list[socket.socket] = []
    try:
        while True:
            sock = bind_listener(host, 0)
            if int(sock.getsockname()[1]) not in claimed or len(held) >= 64:
                return sock
            held.append(sock)
    finally:
        for other in held:
            other.close()


def fetch_listener(fd_socket: str, timeout: float = 1.0) -> socket.socket | None:
    """Take a built-in server's listening socket back over its hand-over socket (SCM_RIGHTS).

    A restarted daemon uses it to keep the port held across a replace. None if it cannot.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(fd_socket)
            _msg, fds, _flags, _addr = socket.recv_fds(conn, 16, 1)
    except OSError:
        return None
    if not fds:
        return None
    sock = socket.socket(fileno=fds[0])
    sock.set_inheritable(False)
    return sock


def fetch_listeners(fd_sockets: list[str], timeout: float = 1.0) -> list[socket.socket | None]:
    """``fetch_listener`` of each, all at once (a daemon re-adopting many servers), in the same order."""
    poller = select.poll()
    conns: dict[int, tuple[int, socket.socket]] = {}
    results: list[socket.socket | None] = [None] * len(fd_sockets)
    for i, path in enumerate(fd_sockets):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            conn.connect(path)  # (a Unix socket connects at once, or its backlog is full)
        except OSError:
            conn.close()
            continue
        conns[conn.fileno()] = (i, conn)
        poller.register(conn, select.POLLIN)
    deadline = time.monotonic() + timeout
    try:
        while conns and (remaining := deadline - time.monotonic()) > 0:
            for fd, _events in poller.poll(remaining * 1000):
                i, conn = conns.pop(fd)
                poller.unregister(fd)
                with conn:
                    try:
                        _msg, fds, _flags, _addr = socket.recv_fds(conn, 16, 1)
                    except OSError:
                        continue
                if fds:
                    sock = socket.socket(fileno=fds[0])
                    sock.set_inheritable(False)
                    results[i] = sock
    finally:
        for _, conn in conns.values():
            conn.close()
    return results
