"""A service's observed state changes in one place: ``change_state`` moves its status (state, last
state, error, time), writes service.json, and refuses a move the daemon never makes.

``ALLOWED`` is the table of moves, each with where the daemon makes it. A move outside it is a
bug: ``ImpossibleTransition`` is raised before anything is changed or written (as supervisor's
``change_state`` asserts the state it leaves). A move to the same state is always allowed: it
records a new error. The table has to allow every move made from a state read from disk too:
the rebuild moves a service from whatever the previous daemon recorded. A roll-back that puts a
whole status back (``restore``: a replace that failed) is a move too, checked against the table.
Every edit of a status that is written goes through here; ``move`` alone (in memory) is for the
few edits nothing is written for.

What cannot happen: a service with no server (``inactive``) answers its health check without
being started first (``pending_startup``), and a stop under way (``pending_shutdown``) ends
stopped (``inactive``), or its service is started again (``pending_startup``): it never turns
``active`` or ``error`` on its own.

Two ways to save, as each call site needs (its ``step=`` names the write for tests, see store.py):
- ``strict=True``: a failed write raises StorageError, for a state the caller must not go on
  without (a start's intent, a stop's result, a replace's commit);
- ``strict=False``: a state the daemon acts on anyway; a failed write (disk full) is logged and
  the daemon goes on: the next write, or the next daemon, corrects it.
``change_state(..., write=False)`` makes the move and skips the write (and its fsync), for a caller
that knows service.json says so already (a rebuild re-adopting a server as it was recorded).

Each move that changes the state, and each step named in ``events.BY_STEP``, is an event (events.py).

(The log is "modeld.manager", the name these lines have always had in the daemon's log.)
"""

from __future__ import annotations

import logging
from types import MappingProxyType

from . import events
from .exceptions import StorageError
from .models import BaseService, ServiceState, ServiceStatus
from .store import Store

log = logging.getLogger("modeld.manager")

_ANY = frozenset(ServiceState)

ALLOWED: MappingProxyType[ServiceState, frozenset[ServiceState]] = MappingProxyType(
    {
        # To pending_startup: a start, deploy or restore; to pending_shutdown: a stop or delete; to
        # error: a restore whose launch fails (a service that exited 0 and should run); to
        # scaled_to_zero: an unload (it wakes on its next request).
        ServiceState.INACTIVE: _ANY - {ServiceState.ACTIVE},
        # To active: healthy; to error: it failed to start; to inactive: it exited 0, or it was
        # stopped; to pending_shutdown: a stop or delete; to scaled_to_zero: an unload, or a
        # rebuild that finds a wake cut short (no server).
        ServiceState.PENDING_STARTUP: _ANY,
        # To pending_startup: restarted after an exit or a hang, or a start of one that does not
        # answer; to error: its health check fails, or a crash loop; to inactive: it exited 0,
        # or it was stopped; to scaled_to_zero: an idle stop or an unload.
        ServiceState.ACTIVE: _ANY,
        # To inactive: stopped; to pending_startup: a start after a stop cut short; to
        # scaled_to_zero: an idle stop or an unload, which says pending_shutdown while its server
        # drains (so the gateway holds a request that meets the closing port until the wake).
        ServiceState.PENDING_SHUTDOWN: frozenset(
            {ServiceState.PENDING_SHUTDOWN, ServiceState.INACTIVE, ServiceState.PENDING_STARTUP, ServiceState.SCALED_TO_ZERO}
        ),
        # To active: its health check answers again, a hand-over, or a re-adopted server that
        # answers; to pending_startup: a start or a restart; to inactive: a stop; to
        # scaled_to_zero: an unload.
        ServiceState.ERROR: _ANY,
        # No server, stopped for being idle or unloaded (see ondemand.py): to pending_startup: a
        # wake (a request on its socket, a start, a deploy); to error: a wake whose launch fails;
        # to pending_shutdown or inactive: a stop or delete; to active: a rebuild that finds a
        # server of it that answers (as recorded before a kill -9 of the daemon).
        ServiceState.SCALED_TO_ZERO: _ANY,
    }
)


class ImpossibleTransition(RuntimeError):
    """A move of a service's state that the daemon never makes (see ``ALLOWED``): a bug."""

    def __init__(self, svc: BaseService, state: ServiceState) -> None:
        super().__init__(f"service {svc.uuid}: no move from {svc.status.state} to {state}")
        self.current = svc.status.state
        self.state = state


def move(svc: BaseService, state: ServiceState, error: str | None = None) -> None:
    """Move the service's status to ``state`` (and ``error``, if given) in memory only; ImpossibleTransition
    if the table has no such move, with nothing changed. For the few moves nothing is written for."""
    if state not in ALLOWED[svc.status.state]:
        raise ImpossibleTransition(svc, state)
    svc.status.moved_to(state, error)


def save(store: Store, svc: BaseService, *, step: str = "", strict: bool) -> None:
    """Write service.json: ``strict`` raises StorageError if it fails, else the failure is logged."""
    try:
        store.save(svc, step=step)
    except StorageError as exc:
        if strict:
            raise
        log.error("%s: %s", svc.uuid, exc)


def change_state(
    store: Store,
    svc: BaseService,
    state: ServiceState,
    error: str | None = None,
    *,
    step: str = "",
    strict: bool,
    write: bool = True,
) -> None:
    """Move the service's status to ``state`` (see ``move``) and write service.json (see ``save``);
    ``write=False``: the move only, for a record that says so already (no write, no fsync).
    The move's event (events.py) is sent before the write: a client hears of it at once."""
    before = svc.status.state
    move(svc, state, error)
    events.state_changed(svc, before, state, error, step)  # event
    if write:
        save(store, svc, step=step, strict=strict)


def restore(
    store: Store, svc: BaseService, status: ServiceStatus, error: str | None = None, *, step: str = "", strict: bool
) -> None:
    """Put back a whole ``status`` kept from before (a roll-back), with ``error`` as its last error if
    given, and write service.json (see ``save``). ImpossibleTransition, with nothing changed, if the
    table has no move from the current state to the restored one."""
    if status.state not in ALLOWED[svc.status.state]:
        raise ImpossibleTransition(svc, status.state)
    svc.status = status
    if error is not None:
        status.last_error = error
        events.emit("error", svc, error)  # event
    save(store, svc, step=step, strict=strict)
