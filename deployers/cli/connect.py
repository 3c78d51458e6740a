"""How a command reaches the daemon: the one place it makes its client (tests replace :func:`client`
with one on an in-memory transport, so the commands call it through this module), and a service the
user named resolved to its uuid."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from uuid import UUID

from daemon import exceptions as exc
from daemon.client import DaemonClient
from daemon.models import BaseService
from deployers.cli.errors import UsageError


def client(args: argparse.Namespace, auto_start: bool = True, timeout: float | None = None) -> DaemonClient:
    """Every client the command makes comes from here (tests replace it with one on an in-memory transport)."""
    return DaemonClient(home=args.home, auto_start=auto_start, timeout=timeout)


def resolve(client: DaemonClient, ref: str) -> UUID:
    """A full uuid, a unique name, or a unique prefix of a uuid (as docker accepts short ids)."""
    return resolve_among(client.find, ref)


def resolve_among(find: Callable[[], list[BaseService]], ref: str) -> UUID:
    """:func:`resolve` among the services ``find()`` gives (a deployer's ``find_model_server``)."""
    try:
        return UUID(ref)
    except ValueError:
        pass
    services = find()
    # As docker does: an exact name first, then a uuid prefix.
    matches = [s.uuid for s in services if ref in (s.config.name, s.config.model_name)]
    if not matches:
        matches = [s.uuid for s in services if str(s.uuid).startswith(ref.lower())]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise exc.ServiceNotFound(f"no service whose uuid starts with {ref!r} or whose name is {ref!r}; see `modeld ls`")
    raise UsageError(f"{ref!r} matches {len(matches)} services; give the uuid (see `modeld ls`)")
