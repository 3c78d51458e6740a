"""Transports: how a client's request reaches the daemon and its answer comes back.

A :class:`Transport` takes a :class:`Request` and returns a :class:`Response`
(``handle``), or the chunks of a streamed body (``stream``). It knows nothing
of the calls (``DaemonClient`` does) nor of how a daemon is started
(``autostart``): :class:`UnixSocketTransport` is handed a ``start_daemon``
callable, or none when auto-start is off.

Invariants of :class:`UnixSocketTransport`:

* one keep-alive connection, re-opened when the daemon closed it; a
  connection the daemon closed while idle is dropped before a request is
  written on it, so no request needs sending twice;
* a read (``GET``) that meets a closed connection is sent again on a new one,
  backing off, for up to ``READ_RETRY_SECONDS``; a deploy, stop or delete is
  never sent twice (it may have been done): the caller is told instead;
* whether a call may start a daemon is decided per request
  (``Request.start`` and the transport's ``start_daemon``), never by
  changing the transport's state around a call;
* every OS or ``http.client`` error leaves as a class of
  ``daemon.exceptions`` (``raise … from exc``), and an error answer (status
  >= 400) as the class its JSON ``type`` names (:func:`raise_for_status`).

The asyncio transport (``async_transport.py``) keeps the same invariants with the
same code: the :class:`Request` and :class:`Response`, the headers sent
(:func:`request_headers`), the check of the socket's path (:func:`socket_path`),
when a read is sent again (:func:`read_retry_delay`) and the error each failure
becomes (:func:`no_daemon`, :func:`closed_during`, :func:`timed_out`,
:func:`cannot_talk`) are defined here once; only the I/O is its own.
"""

from __future__ import annotations

import http.client
import itertools
import json
import select
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from ..exceptions import DaemonError, DaemonNotRunning, ProtocolError, StorageError, error_from_dict
from ..paths import HomeError, Paths

READ_RETRY_SECONDS = 5.0  # how long a read is retried while a killed daemon resets connections in its backlog


# Seconds a stream that ends by itself (logs or events without follow) waits for the answer and for each
# read: a daemon that stopped answering (SIGSTOP, hung) is then an error, as for any other call (60 s of
# QUICK and 30 of MARGIN in operations.py), never a wait for ever. A followed stream waits as long as it lasts.
UNFOLLOWED_STREAM_TIMEOUT = 90.0


@dataclass
class Request:
    """One call to the daemon's API."""

    method: str
    path: str  # without the query string; it names the call in error messages
    query: dict[str, Any] | None = None  # items that are None are left out
    body: Any = None  # JSON-able; None: no body
    timeout: float | None = None  # seconds the socket waits for the answer; None: as long as it takes
    start: bool = True  # this call may start a daemon (if the transport may)

    @property
    def target(self) -> str:
        items = {k: v for k, v in (self.query or {}).items() if v is not None}
        return f"{self.path}?{urlencode(items)}" if items else self.path

    @property
    def content(self) -> bytes | None:
        return json.dumps(self.body).encode() if self.body is not None else None


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)  # names in lower case

    def json(self) -> Any:
        return decode_json(self.body)


def decode_json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else {}
    except ValueError as exc:
        raise ProtocolError(f"the daemon answered something that is not JSON: {raw[:200]!r}") from exc


def raise_for_status(status: int, raw: bytes) -> None:
    """Raise the daemon's error answer as the class of ``daemon.exceptions`` its ``type`` names."""
    if status >= 400:
        raise error_from_dict(status, decode_json(raw))


# ------------------------------------------------------------------ what every transport does alike


def request_headers(request: Request) -> dict[str, str]:
    """The headers of a request besides those of its framing (host, content-length)."""
    return {"content-type": "application/json"} if request.body is not None else {}


def socket_path(paths: Paths) -> str:
    """The daemon's socket, once its path is checked (a path too long for a socket is the caller's setting, not the daemon's absence)."""
    try:
        paths.check_socket()
    except HomeError as exc:
        raise StorageError(str(exc)) from exc
    return str(paths.socket)


NOT_CONNECTED = (FileNotFoundError, ConnectionRefusedError, NotADirectoryError)  # no daemon listens: start one, or say so
CLOSED = (BrokenPipeError, ConnectionResetError)  # the daemon closed the connection (with http.client's RemoteDisconnected)


def no_daemon(paths: Paths, hint: bool = True) -> DaemonNotRunning:
    return DaemonNotRunning(
        f"no modeld daemon answers on {paths.socket}" + ("; start one with `modeld daemon start`" if hint else "")
    )


def read_retry_delay(request: Request, attempt: int, retry_reads_until: float) -> float | None:
    """Seconds to wait before sending ``request`` again on a new connection, after the daemon closed
    one under it; None: tell the caller (:func:`closed_during`).

    The daemon closed the connection: idle, restarting, or killed. A daemon killed with -9 goes on
    accepting connections into its backlog until its last thread has exited (its main thread
    already shows as a zombie), then resets them all. A read is sent again on a new connection,
    backing off, until it is answered or the socket refuses (then a daemon is auto-started). A
    deploy, stop or delete is not: it may have been done before the daemon went, and sending it
    again could start a second server, so the caller is told instead.
    """
    if request.method == "GET" and time.monotonic() < retry_reads_until:
        return min(0.002 * 2.0**attempt, 0.1)
    return None


def closed_during(request: Request, exc: BaseException) -> ProtocolError:
    return ProtocolError(
        f"the daemon closed the connection during {request.method} {request.path}: {exc}"
        + ("" if request.method == "GET" else "; it may or may not have been done (check with `modeld ls`)")
    )


def timed_out(request: Request) -> ProtocolError:
    return ProtocolError(f"no answer from the daemon to {request.method} {request.path} within {request.timeout:g}s")


def cannot_talk(paths: Paths, exc: BaseException) -> DaemonError:
    return DaemonError(f"cannot talk to the daemon on {paths.socket}: {exc}")


class Transport:
    """Carries requests to a daemon. Subclasses implement ``handle`` and ``stream``."""

    def handle(self, request: Request) -> Response:
        raise NotImplementedError

    def stream(self, request: Request) -> Iterator[bytes]:
        """The body of a 200 answer, chunk by chunk (an error answer is raised); ends when the daemon goes."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None):
        super().__init__("modeld", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class UnixSocketTransport(Transport):
    """HTTP/1.1 on the daemon's Unix socket, with one keep-alive connection."""

    def __init__(self, paths: Paths, start_daemon: Callable[[], None] | None = None):
        self.paths = paths
        self.start_daemon = start_daemon
        self._conn: UnixConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _open(self, timeout: float | None, start: bool) -> UnixConnection:
        conn = UnixConnection(socket_path(self.paths), timeout)
        try:
            conn.connect()
        except NOT_CONNECTED as exc:
            if self.start_daemon is None or not start:
                raise no_daemon(self.paths) from exc
            self.start_daemon()
            conn.connect()
        return conn

    def handle(self, request: Request) -> Response:
        payload = request.content
        retry_reads_until = time.monotonic() + READ_RETRY_SECONDS
        for attempt in itertools.count(1):
            self._drop_if_closed()
            try:
                if self._conn is None:
                    self._conn = self._open(request.timeout, request.start)
                self._conn.timeout = request.timeout
                if self._conn.sock is not None:
                    self._conn.sock.settimeout(request.timeout)
                self._conn.request(request.method, request.target, body=payload, headers=request_headers(request))
                response = self._conn.getresponse()
                raw = response.read()
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                self.close()
                raise no_daemon(self.paths, hint=False) from exc
            except (http.client.RemoteDisconnected, *CLOSED) as exc:
                self.close()
                delay = read_retry_delay(request, attempt, retry_reads_until)
                if delay is not None:
                    time.sleep(delay)
                    continue
                raise closed_during(request, exc) from exc
            except TimeoutError as exc:
                self.close()
                raise timed_out(request) from exc
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise cannot_talk(self.paths, exc) from exc
            return Response(response.status, raw, {k.lower(): v for k, v in response.getheaders()})
        raise AssertionError("unreachable")  # (the loop returns or raises)

    def stream(self, request: Request) -> Iterator[bytes]:
        # its own connection, for as long as the stream lasts; ``timeout`` bounds each wait on it
        conn = self._open(request.timeout, request.start)
        try:
            conn.request(request.method, request.target)
            response = conn.getresponse()
            if response.status != 200:
                raise_for_status(response.status, response.read())
            while chunk := response.read1(65536):
                yield chunk
        except (http.client.IncompleteRead, ConnectionError):
            return  # the daemon went away (stopped or restarted): the stream simply ends
        except TimeoutError as exc:
            raise timed_out(request) from exc
        finally:
            conn.close()

    def _drop_if_closed(self) -> None:
        """Forget a kept-alive connection the daemon has closed meanwhile (idle timeout, restart),
        so that no request is sent on it and none needs sending twice."""
        sock = self._conn.sock if self._conn is not None else None
        if sock is None:
            return
        try:
            poller = select.poll()  # (select() takes no fd past 1023: a client in a busy process may have them)
            poller.register(sock, select.POLLIN)
            readable = bool(poller.poll(0))
        except (OSError, ValueError):
            readable = True
        if readable:  # an idle HTTP connection is readable only once closed (or with bytes nobody asked for)
            self.close()
