"""Kill points: the named durable steps of each operation, where a test can make the daemon die.

With ``MODELD_DIE_AT=<name>`` in its environment the daemon sends itself
SIGKILL the first time it reaches that step, exactly as a ``kill -9`` from
outside landing at the worst moment would (``<name>@<n>``: the n-th time). Used only by tests and
``scripts/chaos.py``, which restart the daemon afterwards and check that it
converges: no half-written file, the operation done or not done, one server
per service, none that no service tracks.

Each step is named ``<operation>.<what is on disk and alive when it dies>``;
the operations are ``deploy`` (a new service), ``start``, ``stop``,
``replace`` (hand-over on the listening socket, built-in servers),
``replace-restart`` (stop, then start: command servers), ``delete``,
``restart`` (supervision restarting a crashed server) and ``restore`` (a
daemon starting a server that died while no daemon ran). The list below is
what the tests go through, one by one; a step added here is tested.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("modeld.killpoints")

ENV = "MODELD_DIE_AT"

_LAUNCH = ("after-json", "after-spawn", "after-pid", "after-healthy")

KILL_POINTS: tuple[str, ...] = (
    # A new service, and a start: service.json (desired running) is written before anything runs,
    # then the server is spawned, then service.pid names it, then it is healthy.
    *(f"deploy.{step}" for step in _LAUNCH),
    *(f"start.{step}" for step in _LAUNCH),
    # service.json says stopped (desired), then the server has exited.
    "stop.after-json",
    "stop.after-exit",
    # A scale to zero (an unload, an idle stop): service.json says pending_shutdown while the
    # service should run, then the server has exited.
    "unload.after-json",
    "unload.after-exit",
    # Hand-over: the new version runs beside the old (untracked), then service.pid names both,
    # then service.json has the new version, then the old one has exited.
    "replace.after-spawn",
    "replace.after-pid",
    "replace.after-json",
    "replace.after-old-stopped",
    # Stop, then start (command servers): the old version has exited, then as a start.
    "replace-restart.after-old-stopped",
    *(f"replace-restart.{step}" for step in _LAUNCH),
    # The service's folder is renamed away (the delete is decided), then its server has exited,
    # then its files are half removed.
    "delete.after-rename",
    "delete.after-stop",
    "delete.mid-unlink",
    # Supervision restarting a crashed server, and a daemon starting a server that died while no
    # daemon ran: spawned, then recorded in service.pid.
    "restart.after-spawn",
    "restart.after-pid",
    "restore.after-spawn",
    "restore.after-pid",
)


_hits: dict[str, int] = {}


def reached(name: str) -> None:
    """Die here (SIGKILL, no cleanup of any kind) if ``MODELD_DIE_AT`` names this step.

    ``MODELD_DIE_AT=<name>@<n>`` dies the n-th time the step is reached instead of the first.
    """
    wanted, _, nth = os.environ.get(ENV, "").partition("@")
    if wanted != name:
        return
    assert name in KILL_POINTS, f"unknown kill point {name!r}"
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(nth or 1):
        log.warning("kill point %s reached: dying (SIGKILL)", name)
        os.kill(os.getpid(), signal.SIGKILL)
