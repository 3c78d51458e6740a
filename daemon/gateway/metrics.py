"""The gateway's part of ``GET /metrics`` (the daemon's metrics.py makes the text).

* ``Counted``: the request counters (``runtime/_serve/counters.py``) of the services the gateway
  forwards to, as ``run/requests/<uuid>.gateway``, one map per service, opened at its first request.
  ``Exchange`` calls ``observe`` once per forwarded request, as it ends (status: the response head's,
  or the gateway's own error answer; 499 if the client went away before either).
* ``serve``: ``GET /metrics`` on the gateway's port is the daemon's, fetched over its control socket
  (one request per scrape, ``connection: close``), so it holds the gateway's counts too. The daemon
  only makes the text: no request to a model passes through it.

Standard library only (it runs as its own process).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from ..runtime._serve.counters import CLIENT_GONE, RequestCounters
from .routes import Answer, error

__all__ = ["CLIENT_GONE", "Counted", "fetch", "response"]
SCRAPE_TIMEOUT = 10.0


class Counted:
    """The gateway's request counter files, by service uuid (None folder: no home, nothing counted)."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.open: dict[str, RequestCounters] = {}
        self.failed: set[str] = set()

    def observe(self, uuid: str, status: int, seconds: float) -> None:
        counters = self.open.get(uuid)
        if counters is None:
            if self.folder is None or uuid in self.failed:
                return
            try:
                counters = self.open[uuid] = RequestCounters(str(self.folder / f"{uuid}.gateway"))
            except (OSError, ValueError) as exc:
                self.failed.add(uuid)
                print(
                    f"gateway: cannot write the request counters of service {uuid} ({exc}); /metrics will miss them", flush=True
                )
                return
        counters.observe(status, seconds)

    def keep(self, uuids: set[str]) -> None:
        """A new table: the maps of services no longer in it are closed (a deleted service's file is gone)."""
        self.failed.clear()
        for uuid in [u for u in self.open if u not in uuids]:
            self.open.pop(uuid).close()

    def close(self) -> None:
        for counters in self.open.values():
            counters.close()
        self.open.clear()


async def fetch(daemon_socket: Path | None, target: bytes = b"/metrics") -> tuple[int, bytes, bytes]:
    """The daemon's ``GET <target>`` (``/metrics``, with the client's query if it gave one: the daemon
    answers it as on its socket): (status, content type, body); an error answer's if it cannot be had."""
    if daemon_socket is None:
        return _error(error(503, "ServiceUnavailable", "the gateway has no daemon to ask for metrics"))
    request = b"GET %s HTTP/1.1\r\nhost: modeld\r\nconnection: close\r\n\r\n" % target
    try:
        async with asyncio.timeout(SCRAPE_TIMEOUT):
            reader, writer = await asyncio.open_unix_connection(str(daemon_socket))
            try:
                writer.write(request)
                data = await reader.read()
            finally:
                writer.close()
    except TimeoutError:
        return _error(error(504, "GatewayTimeout", f"the daemon did not answer /metrics within {SCRAPE_TIMEOUT:g} s"))
    except OSError as exc:
        return _error(error(503, "ServiceUnavailable", f"the daemon is not running ({daemon_socket}: {exc.strerror or exc})"))
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split(b" ", 2)[1])
    except (IndexError, ValueError):
        return _error(error(502, "BadGateway", f"the daemon's answer to /metrics cannot be read: {head[:80]!r}"))
    kind = b"text/plain"
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-type":
            kind = value.strip()
    return status, kind, body


def _error(answer: Answer) -> tuple[int, bytes, bytes]:
    whole = answer.encode()
    return answer.status, b"application/json", whole.partition(b"\r\n\r\n")[2]


def response(status: int, kind: bytes, body: bytes, close: bool, head: bool) -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout"}.get(
        status, b""
    )
    return b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n%s" % (
        status,
        reason,
        kind,
        len(body),
        b"connection: close\r\n" if close else b"",
        b"" if head else body,
    )
