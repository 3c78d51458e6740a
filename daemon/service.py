"""What the daemon holds for one service while it lives (``ServiceRuntime``), and the small
facts about services that the manager, the launcher and supervision share.

Invariants: a runtime's ``svc`` is never replaced (it is edited, and its config and status
objects are replaced or edited; see ``models.changes``); ``proc`` is the process that serves
the service, or None; ``listener`` is the listening socket the daemon holds for a built-in
server (kept across restarts, so the port is never given up), or None.
"""

from __future__ import annotations

import asyncio
import os
import socket
from uuid import UUID

from .config import ServiceConfig
from .groups import Group
from .linux import ProcessIdentity, holds_socket, listening_inodes, listening_unix_inodes
from .models import BaseService
from .process import ProcessHandle

BUILTIN_TYPES = ("python", "pickle")  # model types run by the built-in server (runtime/serve.py)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exited (its exit code is unknown: it is not the daemon's child)"
    if code < 0:
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


def is_builtin(config: ServiceConfig) -> bool:
    return config.model_type in BUILTIN_TYPES


class ServiceRuntime:
    """A service and what the daemon holds for it while it lives."""

    def __init__(self, svc: BaseService):
        self.svc = svc
        self.lock = asyncio.Lock()
        self.proc: ProcessHandle | None = None
        self.listener: socket.socket | None = None
        self.task: asyncio.Task[None] | None = None
        self.failures = 0  # exits in a row without a healthy run long enough to count
        # The config before the last replace: its secrets may be in the log (printed by the old
        # version), so log excerpts mask them too.
        self.previous_config: ServiceConfig | None = None
        self.replacing: ProcessHandle | None = None  # the old version, while a hand-over is under way
        # The loop watching ``listener`` for a connection that wakes the service, while it is
        # scaled to zero (see ondemand.py), or None.
        self.watching: asyncio.AbstractEventLoop | None = None

    @property
    def uuid(self) -> UUID:
        return self.svc.uuid

    def unwatch(self) -> None:
        """No connection wakes the service any more (see ondemand.py)."""
        loop, self.watching = self.watching, None
        if loop is not None and self.listener is not None and not loop.is_closed():
            loop.remove_reader(self.listener.fileno())

    def close_listener(self) -> None:
        self.unwatch()
        if self.listener is not None:
            self.listener.close()
            self.listener = None


def server_env(config: ServiceConfig) -> dict[str, str]:
    """The environment a service's server, and its stop_command, start with: the daemon's, with the
    PATH of the client that deployed it (``search_path``), then the config's ``env`` (whose PATH wins).
    A command's argv[0] is looked up on this PATH, and its children look theirs up on it too."""
    path = {"PATH": config.search_path} if config.search_path else {}
    return {**os.environ, **path, **config.env}


def fill(arg: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        arg = arg.replace(key, value)
    return arg


def serves(svc: BaseService, pid: int) -> bool:
    """Whether ``pid`` holds the service's listening socket: the serving process of its group (in a thread)."""
    if svc.endpoint.unix_socket:
        inodes = listening_unix_inodes(svc.endpoint.unix_socket)
    else:
        inodes = listening_inodes(svc.endpoint.port) if svc.endpoint.port else set()
    return holds_socket(pid, inodes)


def serving_member(svc: BaseService, group: Group) -> ProcessIdentity | None:
    """The member of ``group`` that serves the service, if one does (in a thread)."""
    if svc.endpoint.unix_socket:
        inodes = listening_unix_inodes(svc.endpoint.unix_socket)
    else:
        inodes = listening_inodes(svc.endpoint.port) if svc.endpoint.port else set()
    if not inodes:
        return None
    for ident in group.members():
        if holds_socket(ident.pid, inodes):
            return ident
    return None
