"""HTTP health probes and the listening sockets of model servers.

A probe is one ``GET`` with ``Connection: close``; any 2xx is healthy. It
goes to a built-in server's private Unix socket (so the new version of a
service can be checked while the old one still shares the TCP port), or to
``host:port`` for ``command`` servers.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from dataclasses import dataclass

from .exceptions import DeployError


@dataclass(frozen=True)
class ProbeTarget:
    path: str  # the HTTP path, e.g. /health
    unix: str = ""  # a Unix socket, or
    host: str = "127.0.0.1"
    port: int = 0

    def __str__(self) -> str:
        return f"unix:{self.unix}{self.path}" if self.unix else f"http://{self.host}:{self.port}{self.path}"


async def probe(target: ProbeTarget, timeout: float = 2.0) -> tuple[bool, str]:
    """One health probe: (healthy, what was seen).

    Plain non-blocking socket calls on the loop rather than asyncio streams: a daemon with
    a hundred servers probes twenty times a second, and this is what its idle CPU is made of.
    """
    loop = asyncio.get_running_loop()
    if target.unix:
        sock, address = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), target.unix
    else:
        host = "127.0.0.1" if target.host in ("0.0.0.0", "") else ("::1" if target.host == "::" else target.host)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock, address = socket.socket(family, socket.SOCK_STREAM), (host, target.port)
    sock.setblocking(False)
    status_line = b""
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, address)
            await loop.sock_sendall(sock, f"GET {target.path} HTTP/1.1\r\nHost: modeld\r\nConnection: close\r\n\r\n".encode())
            while b"\n" not in status_line and len(status_line) < 4096:
                chunk = await loop.sock_recv(sock, 1024)
                if not chunk:
                    break
                status_line += chunk
    except (OSError, TimeoutError) as exc:
        return False, f"{target}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__}"
    finally:
        sock.close()
    status_line = status_line.split(b"\n", 1)[0]
    parts = status_line.split()
    if len(parts) >= 2 and parts[1].startswith(b"2"):
        return True, "ok"
    return False, f"{target} answered {status_line.decode(errors='replace').strip() or 'nothing'}"


def bind_listener(host: str, port: int) -> socket.socket:
    """Bind and listen on ``host:port`` (0: a free port); the daemon holds it for the service's life."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise DeployError(f"port {port} on {host} is already in use by another process") from exc
        raise DeployError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def free_port(host: str) -> int:
    sock = bind_listener(host, 0)
    try:
        return int(sock.getsockname()[1])
    finally:
        sock.close()


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
