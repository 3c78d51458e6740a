"""The daemon's client, in three parts (as httpx splits its own):

* :mod:`~daemon.client.transport`: how a request reaches the daemon (the Unix
  socket, keep-alive, retry of reads, errors mapped to ``daemon.exceptions``);
* :mod:`~daemon.client.autostart`: starting a daemon when none answers;
* :mod:`~daemon.client.calls`: ``DaemonClient``, the typed calls;

and :mod:`~daemon.client.memory`, transports without a daemon for tests.
"""

from __future__ import annotations

from .autostart import START_TIMEOUT, ensure_daemon
from .calls import DEFAULT_TIMEOUT, DaemonClient, VersionMismatchWarning
from .memory import AsgiHandler, InMemoryTransport, error_response, json_response
from .transport import READ_RETRY_SECONDS, Request, Response, Transport, UnixSocketTransport

__all__ = [
    "AsgiHandler",
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
