"""The asyncio transport: the daemon's Unix socket for ``AsyncDaemonClient``.

The same requests, answers, errors, retry of reads and auto-start as the blocking
:class:`~daemon.client.transport.UnixSocketTransport`, from the same code in ``transport.py``
(see its docstring); this module only does the I/O, with ``asyncio.open_unix_connection`` and
h11 for the HTTP/1.1 framing (the library the daemon's own server frames its answers with).

Invariants of :class:`AsyncUnixSocketTransport`:

* each call holds a connection of its own while it runs, so calls made at once
  (``asyncio.gather``) run at once; a connection whose answer was read whole
  is kept for the next call (up to ``MAX_IDLE``), one the daemon closed while
  idle is dropped before a request is written on it;
* a call cancelled or failed in the middle closes its connection (what is
  left on it cannot be trusted), never hands it to another call;
* auto-start runs the blocking ``autostart.ensure_daemon`` in a thread
  (``asyncio.to_thread``), so the event loop goes on meanwhile, and clients,
  threads and tasks still serialise on its lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncGenerator, Callable

import h11

from ..paths import Paths
from .transport import (
    CLOSED,
    NOT_CONNECTED,
    READ_RETRY_SECONDS,
    Request,
    Response,
    cannot_talk,
    closed_during,
    no_daemon,
    raise_for_status,
    read_retry_delay,
    request_headers,
    socket_path,
    timed_out,
)

MAX_IDLE = 8  # kept-alive connections a client keeps for its next calls
READ_SIZE = 65536


class AsyncTransport:
    """Carries requests to a daemon from asyncio code. Subclasses implement ``handle`` and ``stream``."""

    async def handle(self, request: Request) -> Response:
        raise NotImplementedError

    def stream(self, request: Request) -> AsyncGenerator[bytes, None]:
        """The body of a 200 answer, chunk by chunk (an error answer is raised); ends when the daemon goes."""
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


class Disconnected(ConnectionError):
    """The daemon closed the connection before its answer was whole (http.client's RemoteDisconnected)."""


class _Connection:
    """One HTTP/1.1 connection: the stream pair and h11's state of it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.h11 = h11.Connection(our_role=h11.CLIENT)

    def reusable(self) -> bool:
        """Idle, and the daemon has not closed it meanwhile (an idle connection says nothing until closed)."""
        return self.h11.our_state is h11.IDLE and not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()

    async def send(self, request: Request) -> None:
        content = request.content or b""
        headers = [("host", "modeld"), ("content-length", str(len(content))), *request_headers(request).items()]
        data = self.h11.send(h11.Request(method=request.method, target=request.target, headers=headers))
        if content:
            data = (data or b"") + (self.h11.send(h11.Data(data=content)) or b"")
        data = (data or b"") + (self.h11.send(h11.EndOfMessage()) or b"")
        self.writer.write(data)
        await self.writer.drain()

    async def next_event(self) -> h11.Event:
        """The next event of the answer; ``Disconnected`` if the daemon closed the connection first."""
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise Disconnected(f"the answer was cut short ({exc})") from exc
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.reader.read(READ_SIZE))
                continue
            if isinstance(event, h11.ConnectionClosed):
                raise Disconnected("Remote end closed connection without response")
            assert isinstance(event, h11.Event)  # (not PAUSED: a client sends one request per cycle)
            return event

    async def head(self) -> Response:
        """The status and headers of the answer (informational answers skipped)."""
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Response):
                headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in event.headers}
                return Response(event.status_code, b"", headers)

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The body, as it comes; then the connection is ready for the next request, if the daemon keeps it."""
        while not isinstance(event := await self.next_event(), h11.EndOfMessage):
            if isinstance(event, h11.Data):
                yield bytes(event.data)
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()


class AsyncUnixSocketTransport(AsyncTransport):
    """HTTP/1.1 on the daemon's Unix socket: a connection per call under way, idle ones kept for the next."""

    def __init__(self, paths: Paths, start_daemon: Callable[[], None] | None = None):
        self.paths = paths
        self.start_daemon = start_daemon
        self._idle: list[_Connection] = []

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        for conn in idle:
            with contextlib.suppress(OSError):
                await conn.writer.wait_closed()

    async def _open(self, start: bool) -> _Connection:
        path = socket_path(self.paths)
        try:
            return _Connection(*await asyncio.open_unix_connection(path))
        except NOT_CONNECTED as exc:
            if self.start_daemon is None or not start:
                raise no_daemon(self.paths) from exc
            await asyncio.to_thread(self.start_daemon)
        return _Connection(*await asyncio.open_unix_connection(path))

    async def _connection(self, start: bool) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable():
                return conn
            conn.close()
        return await self._open(start)

    async def handle(self, request: Request) -> Response:
        retry_reads_until = time.monotonic() + READ_RETRY_SECONDS
        for attempt in itertools.count(1):
            conn: _Connection | None = None
            try:
                async with asyncio.timeout(request.timeout):
                    conn = await self._connection(request.start)
                    await conn.send(request)
                    response = await conn.head()
                    response.body = b"".join([chunk async for chunk in conn.chunks()])
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise no_daemon(self.paths, hint=False) from exc
            except (Disconnected, *CLOSED) as exc:
                delay = read_retry_delay(request, attempt, retry_reads_until)
                if delay is not None:
                    await asyncio.sleep(delay)
                    continue
                raise closed_during(request, exc) from exc
            except TimeoutError as exc:
                raise timed_out(request) from exc
            except (OSError, h11.ProtocolError) as exc:
                raise cannot_talk(self.paths, exc) from exc
            finally:
                if conn is not None:
                    self._keep_or_close(conn)
            return response
        raise AssertionError("unreachable")  # (the loop returns or raises)

    async def stream(self, request: Request) -> AsyncGenerator[bytes, None]:
        conn = await self._open(request.start)  # its own connection, for as long as the stream lasts
        try:
            async with asyncio.timeout(request.timeout):  # the head; then each read, below
                await conn.send(request)
                response = await conn.head()
                if response.status != 200:
                    raise_for_status(response.status, b"".join([chunk async for chunk in conn.chunks()]))
            async with contextlib.aclosing(conn.chunks()) as chunks:
                while True:
                    async with asyncio.timeout(request.timeout):
                        chunk = await anext(chunks, None)
                    if chunk is None:
                        return
                    yield chunk
        except (Disconnected, ConnectionError):
            return  # the daemon went away (stopped or restarted): the stream simply ends
        except TimeoutError as exc:
            raise timed_out(request) from exc
        finally:
            conn.close()

    def _keep_or_close(self, conn: _Connection) -> None:
        if conn.reusable() and len(self._idle) < MAX_IDLE:
            self._idle.append(conn)
        else:
            conn.close()
