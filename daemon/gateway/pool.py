"""The gateway's backend side: ``Gateway`` (the routing table, the keep-alive pool of backend
connections, one spare kept warm per backend) and ``Upstream`` (one backend connection, handing
what it reads to the ``Exchange`` it serves). See ``proxy.py`` for the whole data plane.

Standard library only (it runs as its own process; the daemon never carries these bytes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .activity import Activities
from .metrics import Counted
from .routes import Entry, Table
from .wake import Waker

if TYPE_CHECKING:  # for annotations only: an Upstream is handed its Exchange
    from .exchange import Exchange


class Gateway:
    """What every connection shares: the table, the backend pool, the limits."""

    def __init__(
        self,
        table: Table,
        timeout: float = 60.0,
        max_body: int = 64 * 1024 * 1024,
        max_idle: int = 64,
        spare: bool = True,
        wake_timeout: float = 0.0,
        daemon_socket: Path | None = None,
        activity_folder: Path | None = None,
        requests_folder: Path | None = None,
    ):
        self.table = table
        self.timeout = timeout  # seconds to the backend's response head (504 after)
        self.max_body = max_body
        self.max_idle = max_idle  # idle connections kept per backend
        self.spare = spare  # keep one connection open ahead of need per backend in use (keep_spare)
        self.clients: set[Any] = set()  # the Downstream connections open now (proxy.py)
        self.draining = False  # stopping: no new request on a kept-alive connection (see drain)
        self.idle: dict[tuple[str, int], list[Upstream]] = {}
        self.warming: set[tuple[str, int]] = set()  # backends a spare connection is being opened to
        self.daemon_alive: Callable[[], bool] = lambda: True  # (__main__ reads the home's daemon.pid)
        # Read the records again now, before an answer that may be stale; True if the table changed
        # (home.HomeTable.refresh: a deploy that has just returned may not have reached the table yet).
        self.refresh: Callable[[], bool] = lambda: False
        self.waker = Waker(self, daemon_socket, wake_timeout)  # requests waiting for a service to wake
        self.activities = Activities(activity_folder)  # the activity files of counted command services
        self.counted = Counted(requests_folder)  # the request counters of /metrics (metrics.py)

    def set_table(self, table: Table) -> None:
        """A new routing table (home.HomeTable): waiting requests and activity files follow it."""
        self.table = table
        self.activities.keep({uuid for uuid, e in table.by_uuid.items() if e.counted})
        self.counted.keep(set(table.by_uuid))
        self.waker.table_changed()

    async def drain(self, seconds: float) -> None:
        """Stopping (SIGTERM: the daemon replaces or stops the gateway): the listener is closed by
        the caller; idle client connections close now, the others after the response in flight
        (``connection: close``), for up to ``seconds``. A new gateway on the same port takes the
        next requests."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        for client in list(self.clients):
            client.close_after = True
            if client.exchange is None and not client.buf:
                client.transport.close()
        while any(c.exchange is not None for c in self.clients) and loop.time() < deadline:
            await asyncio.sleep(0.02)

    def stopping(self, uuid: str) -> Entry | None:
        """After a backend connection failed unanswered: the service's entry if it is (the records read
        again) on its way to zero, scaled to zero or waking, so the request waits for it; else None."""
        self.refresh()
        entry = self.table.by_uuid.get(uuid)
        return entry if entry is not None and entry.state != "active" and entry.waits else None

    def take(self, key: tuple[str, int]) -> Upstream | None:
        idle = self.idle.get(key)
        while idle:
            up = idle.pop()  # LIFO: the warmest connection, least likely closed by the server's idle timeout
            if not up.transport.is_closing():
                return up
        return None

    def give(self, up: Upstream) -> None:
        idle = self.idle.setdefault(up.key, [])
        if len(idle) >= self.max_idle or up.transport.is_closing():
            up.transport.close()
            return
        up.reused = True
        idle.append(up)

    def forget(self, up: Upstream) -> None:
        idle = self.idle.get(up.key)
        if idle and up in idle:
            idle.remove(up)

    def keep_spare(self, key: tuple[str, int]) -> None:
        """Open one idle connection ahead of need when a backend's pool is empty, so the next request
        (a new client's stream, the one after a disconnect closed its connection) skips the connect."""
        if self.idle.get(key) or key in self.warming:
            return
        self.warming.add(key)

        async def spare() -> None:
            try:
                up = await self.connect(key)
            except OSError:
                return
            finally:
                self.warming.discard(key)
            self.give(up)

        asyncio.get_running_loop().create_task(spare())

    async def connect(self, key: tuple[str, int]) -> Upstream:
        loop = asyncio.get_running_loop()
        _transport, up = await loop.create_connection(lambda: Upstream(self, key), key[0], key[1])
        return up

    def unanswered(self) -> str:
        """Said after a 502: why no one will restart the server, when the daemon is not running."""
        return "" if self.daemon_alive() else "; the daemon is not running to restart it"


class Upstream(asyncio.Protocol):
    """One backend connection; idle in the pool or serving one Exchange."""

    def __init__(self, gw: Gateway, key: tuple[str, int]):
        self.gw = gw
        self.key = key
        self.exchange: Exchange | None = None
        self.reused = False  # it sat idle in the pool: the server may have closed it meanwhile (retryable)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.exchange is None:
            self.transport.close()  # bytes on an idle connection: not ours to guess about
            return
        self.exchange.response_data(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.gw.forget(self)
        if self.exchange is not None:
            self.exchange.upstream_lost(self)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.down.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.down.transport.resume_reading()
