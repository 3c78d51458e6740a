"""HTTP health probes: one now (``probe``), or every watched server on one shared beat (``Prober``).

A probe is one ``GET`` with ``Connection: close`` and ``x-modeld-probe: 1`` (so an on-demand
server does not count it as a request: probes never keep a server loaded); any 2xx is healthy. It
goes to a built-in server's private Unix socket (so the new version of a
service can be checked while the old one still shares the TCP port), or to
``host:port`` for ``command`` servers.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import metrics
from .addresses import ip_literal

log = logging.getLogger("modeld.health")


@dataclass(frozen=True)
class ProbeTarget:
    path: str  # the HTTP path, e.g. /health
    unix: str = ""  # a Unix socket, or
    host: str = "127.0.0.1"
    port: int = 0

    def __str__(self) -> str:
        return f"unix:{self.unix}{self.path}" if self.unix else f"http://{self.host}:{self.port}{self.path}"


# The daemon could not make the probe (out of fds or memory): that says nothing about the server.
_OWN_FAILURES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


async def probe(target: ProbeTarget, timeout: float = 2.0) -> tuple[bool | None, str]:
    """One health probe: (healthy, what was seen); healthy is None when the daemon could not probe.

    Plain non-blocking socket calls, one future and one timer, rather than asyncio streams:
    a daemon with a hundred servers makes ten or twenty of these a second, and they are most
    of what it does when idle. A Unix socket connects (or fails) at once; TCP may wait.
    """
    loop = asyncio.get_running_loop()
    if not target.unix:
        host = "127.0.0.1" if target.host in ("0.0.0.0", "") else ("::1" if target.host == "::" else target.host)
        if ip_literal(host) is None:  # a name would be looked up here, on the event loop: never
            return False, f"{target}: {host!r} is not an IP address (a name is probed at the address it resolved to)"
    address: str | tuple[str, int]
    try:
        if target.unix:
            sock, address = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK), target.unix
        else:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock, address = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK), (host, target.port)
    except OSError as exc:
        return (None if exc.errno in _OWN_FAILURES else False), f"{target}: cannot probe: {exc.strerror or exc}"
    try:
        async with asyncio.timeout(timeout):
            try:
                sock.connect(address)
            except (BlockingIOError, InterruptedError):
                await loop.sock_connect(sock, address)  # TCP in progress, or a full Unix backlog
            request = f"GET {target.path} HTTP/1.1\r\nHost: modeld\r\nx-modeld-probe: 1\r\nConnection: close\r\n\r\n".encode()
            await loop.sock_sendall(sock, request)
            status_line = await _read_status_line(loop, sock)
    except (OSError, TimeoutError) as exc:
        return False, f"{target}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__}"
    finally:
        sock.close()
    return _verdict_of_status_line(target, status_line)


def _resolve_ready(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


async def _read_status_line(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """The first line the peer sends (up to 4 KiB), read as it becomes readable."""
    data = b""
    while b"\n" not in data and len(data) < 4096:
        try:
            chunk = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            ready = loop.create_future()
            loop.add_reader(sock.fileno(), _resolve_ready, ready)
            try:
                await ready
            finally:
                loop.remove_reader(sock.fileno())
            continue
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


# ------------------------------------------------------------------ the shared beat


class Batch:
    """Calls made in the same turn of the event loop, done together in one thread job.

    A daemon re-adopting a thousand servers fetches a thousand listening sockets and probes a
    thousand servers at once: a thread hop (and, for probes, a timer and an epoll registration)
    each cost seconds in all; one job for all of them costs the socket calls alone.
    """

    def __init__(self, work: Callable[[list[Any]], list[Any]]):
        self.work = work
        self._items: list[tuple[Any, asyncio.Future[Any]]] = []

    async def __call__(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._items:
            loop.call_soon(lambda: loop.create_task(self._run_batch()))  # after the tasks ready now have run
        self._items.append((item, future))
        return await future

    async def _run_batch(self) -> None:
        items, self._items = self._items, []
        try:
            results = await asyncio.to_thread(self.work, [item for item, _ in items])
        except BaseException as exc:
            for _, future in items:
                if not future.done():
                    future.set_exception(exc)
            raise
        for (_, future), result in zip(items, results, strict=False):
            if not future.done():
                future.set_result(result)


class Prober:
    """Probes every watched server on one shared beat, all at once, from one thread with ``poll()``.

    A healthy server is probed every ``interval`` seconds for its whole life, so with a thousand
    of them this is most of what an idle daemon does. Done as one coroutine per service it cost a
    timer, a task wake-up, an epoll registration and a future per probe (about 8 % of a core for
    1,000 servers here); done here it costs, per beat, one timer, one thread hop and, per server,
    the socket calls and one small callback on the loop.
    """

    def __init__(self, interval: float, timeout: float = 2.0):
        self.interval = interval
        self.timeout = timeout
        self._watched: dict[object, tuple[ProbeTarget, Callable[[bool | None, str], None]]] = {}
        self._task: asyncio.Task[None] | None = None

    def watch(self, key: object, target: ProbeTarget, on_result: Callable[[bool | None, str], None]) -> None:
        """Probe ``target`` on every beat from now on; ``on_result(healthy, seen)`` runs on the loop."""
        self._watched[key] = (target, on_result)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._beat(), name="probe-beat")

    def unwatch(self, key: object) -> None:
        self._watched.pop(key, None)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _beat(self) -> None:
        while self._watched:
            await asyncio.sleep(self.interval - time.monotonic() % self.interval)  # multiples of it: one burst
            batch = dict(self._watched)
            took: dict[Any, float] = {}
            results = await asyncio.to_thread(probe_all, {key: target for key, (target, _) in batch.items()}, self.timeout, took)
            for key, result in results.items():
                metrics.probed(key, took.get(key, 0.0))  # metrics
                entry = self._watched.get(key)
                if entry is not None and entry[0] is batch[key][0]:  # still watched, the same target
                    try:
                        entry[1](*result)
                    except Exception:  # one service's bookkeeping must not stop the others' probes
                        log.exception("probe result of %s", key)


def probe_all(
    targets: dict[Any, ProbeTarget], timeout: float, took: dict[Any, float] | None = None
) -> dict[Any, tuple[bool | None, str]]:
    """Probe every target at once (in a thread): ``GET path`` on each, first line of each answer;
    each one's time in seconds in ``took``, if given."""
    began = time.monotonic()
    poller = select.poll()
    pending: dict[int, _ProbeExchange] = {}
    results: dict[Any, tuple[bool | None, str]] = {}
    for key, target in targets.items():
        exchange = _ProbeExchange(key, target)
        failure = exchange.start()
        if failure is not None:
            results[key] = failure
            continue
        pending[exchange.sock.fileno()] = exchange
        poller.register(exchange.sock, select.POLLOUT if exchange.connecting else select.POLLIN)
    deadline = time.monotonic() + timeout
    try:
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for fd, _events in poller.poll(remaining * 1000):
                exchange = pending[fd]
                result = exchange.step()
                if result is None:
                    poller.modify(fd, select.POLLIN)
                    continue
                results[exchange.key] = result
                if took is not None:
                    took[exchange.key] = time.monotonic() - began
                poller.unregister(fd)
                exchange.sock.close()
                del pending[fd]
    finally:
        for exchange in pending.values():
            results[exchange.key] = (False, f"{exchange.target}: TimeoutError")
            exchange.sock.close()
            if took is not None:
                took[exchange.key] = time.monotonic() - began
    return results


class _ProbeExchange:
    """One probe, as a few non-blocking steps: connect, send, read the status line."""

    def __init__(self, key: Any, target: ProbeTarget):
        self.key = key
        self.target = target
        self.connecting = False
        self.data = b""
        self.sock: socket.socket

    def start(self) -> tuple[bool | None, str] | None:
        target = self.target
        address: str | tuple[str, int]
        try:
            if target.unix:
                self.sock, address = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK), target.unix
            else:
                host = "127.0.0.1" if target.host in ("0.0.0.0", "") else ("::1" if target.host == "::" else target.host)
                if ip_literal(host) is None:
                    return False, f"{target}: {host!r} is not an IP address (a name is probed at the address it resolved to)"
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                self.sock, address = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK), (host, target.port)
        except OSError as exc:
            return (None if exc.errno in _OWN_FAILURES else False), f"{target}: cannot probe: {exc.strerror or exc}"
        try:
            self.sock.connect(address)
        except (BlockingIOError, InterruptedError):
            self.connecting = True  # TCP in progress, or a full Unix backlog: wait until writable
            return None
        except OSError as exc:
            self.sock.close()
            return False, f"{target}: {exc.strerror or type(exc).__name__}"
        return self._send()

    def _send(self) -> tuple[bool | None, str] | None:
        request = f"GET {self.target.path} HTTP/1.1\r\nHost: modeld\r\nx-modeld-probe: 1\r\nConnection: close\r\n\r\n".encode()
        try:
            self.sock.send(request)  # small: one send on a fresh connection takes it whole
        except OSError as exc:
            self.sock.close()
            return False, f"{self.target}: {exc.strerror or type(exc).__name__}"
        return None

    def step(self) -> tuple[bool | None, str] | None:
        """Go on when the socket is ready; the result once there is one, else None (wait for reading)."""
        if self.connecting:
            self.connecting = False
            error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                return False, f"{self.target}: {os.strerror(error)}"
            failure = self._send()
            return failure if failure is not None else None
        try:
            chunk = self.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            return False, f"{self.target}: {exc.strerror or type(exc).__name__}"
        self.data += chunk
        if chunk and b"\n" not in self.data and len(self.data) < 4096:
            return None
        return _verdict_of_status_line(self.target, self.data.split(b"\n", 1)[0])


def _verdict_of_status_line(target: ProbeTarget, status_line: bytes) -> tuple[bool, str]:
    parts = status_line.split()
    if len(parts) >= 2 and parts[1].startswith(b"2"):
        return True, "ok"
    return False, f"{target} answered {status_line.decode(errors='replace').strip() or 'nothing'}"
