"""The daemon's client, in parts (as httpx splits its own):

* :mod:`~daemon.client.transport`: how a request reaches the daemon (the Unix
  socket, keep-alive, retry of reads, errors mapped to ``daemon.exceptions``);
* :mod:`~daemon.client.autostart`: starting a daemon when none answers;
* :mod:`~daemon.client.operations`: each call of the API once, the request it
  sends and how its answer is read;
* :mod:`~daemon.client.calls`: ``DaemonClient``, the typed calls, blocking;
* :mod:`~daemon.client.async_calls` and :mod:`~daemon.client.async_transport`:
  ``AsyncDaemonClient``, the same calls for asyncio, over the same transport
  code (only the I/O is its own);

and :mod:`~daemon.client.memory`, transports without a daemon for tests.

The asyncio names are imported on first use (PEP 562): every ``modeld`` command
imports this package, and needs no asyncio.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .autostart import START_TIMEOUT, ensure_daemon
from .calls import DEFAULT_TIMEOUT, DaemonClient, VersionMismatchWarning
from .memory import AsgiHandler, InMemoryTransport, error_response, json_response
from .transport import READ_RETRY_SECONDS, Request, Response, Transport, UnixSocketTransport

if TYPE_CHECKING:
    from .async_calls import AsyncDaemonClient as AsyncDaemonClient
    from .async_transport import AsyncTransport as AsyncTransport, AsyncUnixSocketTransport as AsyncUnixSocketTransport

_LAZY = {
    "AsyncDaemonClient": "async_calls",
    "AsyncTransport": "async_transport",
    "AsyncUnixSocketTransport": "async_transport",
}

__all__ = [
    "AsgiHandler",
    "AsyncDaemonClient",
    "AsyncTransport",
    "AsyncUnixSocketTransport",
    "DEFAULT_TIMEOUT",
    "DaemonClient",
    "InMemoryTransport",
    "READ_RETRY_SECONDS",
    "Request",
    "Response",
    "START_TIMEOUT",
    "Transport",
    "UnixSocketTransport",
    "VersionMismatchWarning",
    "ensure_daemon",
    "error_response",
    "json_response",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'daemon.client' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
