"""The daemon's side of a systemd service: readiness notification, and who started the daemon.

``Type=notify`` (see ``login.py`` for the unit): systemd gives the daemon ``$NOTIFY_SOCKET``, a
datagram Unix socket (a path, or an abstract name written with a leading ``@``), and waits for
``READY=1`` on it before it counts the unit as started; ``STOPPING=1`` says the daemon is shutting
down. These are one datagram each (sd_notify(3)'s protocol); no libsystemd.

The variable is taken out of the daemon's environment as it is read (as sd_notify's
``unset_environment`` does), so no model server, log writer or gateway inherits it and no child
can speak for the daemon. ``INVOCATION_ID`` (set by systemd for each run of a unit, and never by
modeld's auto-start, which takes it out of the environment it gives a daemon) tells the daemon that
systemd started it (:func:`started_by`); it records so in ``daemon.pid`` (``started_by=``) so that a
second daemon refused by the lock can say which one runs.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

log = logging.getLogger("modeld.daemon")

# Set by a client's auto-start in the environment of the daemon it spawns (and taken out by that
# daemon): the daemon records how it was started without guessing from its parent.
STARTED_BY_ENV = "MODELD_STARTED_BY"
AUTOSTART = "a client's auto-start"
BY_HAND = "hand (modeld daemon run, or python -m daemon)"


class Notifier:
    """Sends sd_notify datagrams to ``$NOTIFY_SOCKET``; does nothing when there is none."""

    def __init__(self, address: str | None):
        self.address = address
        self.sent: list[str] = []

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] = os.environ) -> Notifier:
        """The notifier of this process, taking ``NOTIFY_SOCKET`` out of ``environ``."""
        return cls(environ.pop("NOTIFY_SOCKET", None) or None)

    def send(self, state: str) -> bool:
        """Send ``state`` (e.g. ``READY=1``) once; False, with a warning logged, if it cannot be sent."""
        if not self.address or state in self.sent:
            return False
        self.sent.append(state)
        if self.address.startswith("@"):
            target: str | bytes = b"\0" + os.fsencode(self.address[1:])
        elif self.address.startswith("/"):
            target = self.address
        else:
            log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract name (@...); not notifying", self.address)
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(state.encode(), target)
        except OSError as exc:
            log.warning("cannot notify systemd of %s on %s: %s", state, self.address, exc)
            return False
        return True


def started_by(environ: MutableMapping[str, str] = os.environ, notify: str | None = None) -> str:
    """Who started this daemon, as ``daemon.pid`` records it; takes MODELD_STARTED_BY out of ``environ``.

    systemd when ``INVOCATION_ID`` is set and the innermost unit of the daemon's cgroup is a service
    (``modeld.service``), or, where no unit shows in the cgroup (no systemd runs the cgroups), when
    ``NOTIFY_SOCKET`` came with it (``notify``). A terminal's shell that inherited its service's
    ``INVOCATION_ID`` runs in a scope: a daemon started from it is not taken for systemd's.
    """
    said = environ.pop(STARTED_BY_ENV, "")
    if environ.get("INVOCATION_ID"):
        unit = _unit_of_self()
        if unit.endswith(".service"):
            return f"systemd ({unit})"
        if not unit and notify:
            return "systemd"
    return said or BY_HAND


def _unit_of_self() -> str:
    """The innermost systemd unit (``x.service``, ``y.scope``) whose cgroup holds this process, or ""."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    for line in sorted(lines, key=lambda line: not line.startswith("0::")):  # the unified hierarchy first
        for part in reversed(line.rpartition(":")[2].split("/")):
            if part.endswith((".service", ".scope")):
                return part
    return ""
