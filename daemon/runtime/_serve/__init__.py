"""modeld built-in model server (KServe V1 data plane): everything but the entry point.

Loaded by ``serve.py`` (see there for the command line, exit codes and why the
split), under the user's interpreter: only the standard library and uvicorn are
imported here, since every import adds start-up latency and the daemon's own
package is not importable from the user's interpreter. So every import inside
this package is relative, and the package is loaded under another name there
(``_modeld_serve``) than in the daemon (``daemon.runtime._serve``).

One module per concept:

    identity    the process's name in ps, its stderr lines, its exit codes
    loading     model URI and type -> the predict callable
    app         the KServe V1 HTTP app (raw ASGI)
    ticks       uvicorn's server ticking once a second (the daemon's API server uses it too)
    server      the draining uvicorn server, and the hand-over of its listening fd
    forkserver  warm starts: the fork server, its wire and record formats (the daemon's end uses them too)
    cli         the command line and the entry (main)

The names below are resolved on first use, so the daemon can import the fork
server's formats without loading uvicorn's server and the app, and a cold server
does not load the fork server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what __getattr__ below resolves, named for type checkers (imported on first use at run time)
    from .app import App as App
    from .cli import main as main, parse_args as parse_args
    from .forkserver import fork_server as fork_server
    from .identity import (
        EXIT_LOAD as EXIT_LOAD,
        EXIT_USAGE as EXIT_USAGE,
        FORK_SERVER_NAME as FORK_SERVER_NAME,
        SERVER_NAME as SERVER_NAME,
    )
    from .loading import load_model as load_model
    from .server import FdHandoff as FdHandoff, Server as Server

_EXPORTS = {
    "App": "app",
    "EXIT_LOAD": "identity",
    "EXIT_USAGE": "identity",
    "FORK_SERVER_NAME": "identity",
    "FdHandoff": "server",
    "SERVER_NAME": "identity",
    "Server": "server",
    "fork_server": "forkserver",
    "load_model": "loading",
    "main": "cli",
    "parse_args": "cli",
}

__all__ = sorted(_EXPORTS)  # a list all the same: sorted() returns one; the names above re-export for checkers)


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
