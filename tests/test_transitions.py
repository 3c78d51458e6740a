"""The state changes of a service alone (daemon/transitions.py), on a real store in a temp home:
every move the table allows is made and written, a move it does not allow raises and changes
nothing in memory or on disk, the two ways to save (strict, best effort) on a failing write, a move
that skips the write, and a roll-back (``restore``) that puts a whole status back."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import pytest

from daemon.exceptions import StorageError
from daemon.models import BaseService, LocalModelService, ServiceConfig, ServiceState
from daemon.paths import Paths
from daemon.store import Store
from daemon.transitions import ALLOWED, ImpossibleTransition, change_state, move, restore

PAIRS = list(itertools.product(ServiceState, repeat=2))
ALLOWED_PAIRS = [(a, b) for a, b in PAIRS if b in ALLOWED[a]]
FORBIDDEN_PAIRS = [(a, b) for a, b in PAIRS if b not in ALLOWED[a]]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(Paths(tmp_path / "h"))


def service_in(store: Store, state: ServiceState) -> BaseService:
    """A service recorded on disk in ``state``."""
    svc = LocalModelService(config=ServiceConfig(model_uri="m.py:model"))
    svc.status.state = state
    svc.status.last_error = "before"
    store.save(svc)
    return svc


def test_the_table_names_every_state_and_every_state_may_stay():
    assert set(ALLOWED) == set(ServiceState)
    assert all(state in ALLOWED[state] for state in ServiceState)  # (a new error, same state)
    assert FORBIDDEN_PAIRS, "a table that allows everything refuses nothing"


def test_scaled_to_zero_is_reached_from_a_service_that_may_run_or_whose_server_drains():
    """An idle stop or an unload scales an active (or starting, failed, stopped) service to zero,
    through pending_shutdown while its server drains; it leaves by a wake, a stop, an error, or a
    rebuild that finds a server answering."""
    S = ServiceState
    assert ALLOWED[S.SCALED_TO_ZERO] == set(S)
    assert {s for s in S if S.SCALED_TO_ZERO in ALLOWED[s]} == {
        S.SCALED_TO_ZERO, S.ACTIVE, S.PENDING_STARTUP, S.ERROR, S.INACTIVE, S.PENDING_SHUTDOWN
    }
    assert S.ACTIVE not in ALLOWED[S.PENDING_SHUTDOWN] and S.ERROR not in ALLOWED[S.PENDING_SHUTDOWN]


@pytest.mark.parametrize(("current", "new"), ALLOWED_PAIRS, ids=[f"{a}-to-{b}" for a, b in ALLOWED_PAIRS])
def test_every_allowed_move_is_made_and_written(store, current, new):
    svc = service_in(store, current)
    change_state(store, svc, new, "why", step="test.move", strict=True)
    (recorded,), _ = store.load_all()
    on_disk = recorded.status
    assert (svc.status.state, svc.status.last_error) == (on_disk.state, on_disk.last_error) == (new, "why")
    if new != current:
        assert svc.status.last_state == on_disk.last_state == current


@pytest.mark.parametrize(("current", "new"), FORBIDDEN_PAIRS, ids=[f"{a}-to-{b}" for a, b in FORBIDDEN_PAIRS])
@pytest.mark.parametrize("strict", [True, False])
def test_a_forbidden_move_raises_and_changes_nothing(store, current, new, strict):
    svc = service_in(store, current)
    path = store.paths.service_json(svc.uuid)
    before, status = path.read_bytes(), svc.status.model_copy()
    with pytest.raises(ImpossibleTransition, match=f"no move from {current} to {new}"):
        change_state(store, svc, new, "why", strict=strict)
    with pytest.raises(ImpossibleTransition):
        move(svc, new)
    assert path.read_bytes() == before
    assert svc.status == status


def test_a_failed_write_raises_when_strict_and_is_logged_otherwise(store, caplog):
    svc = LocalModelService(config=ServiceConfig(model_uri="m.py:model"))
    store.paths.service_dir(svc.uuid).parent.mkdir(parents=True)
    store.paths.service_dir(svc.uuid).write_text("a file where the service's folder should be")
    with pytest.raises(StorageError):
        change_state(store, svc, ServiceState.PENDING_STARTUP, step="test.strict", strict=True)
    assert svc.status.state == ServiceState.PENDING_STARTUP  # moved: the caller decides what a failed write undoes
    with caplog.at_level(logging.ERROR, logger="modeld.manager"):
        change_state(store, svc, ServiceState.ACTIVE, step="test.best-effort", strict=False)
    assert svc.status.state == ServiceState.ACTIVE
    assert any(str(svc.uuid) in r.getMessage() for r in caplog.records)


def test_a_move_without_write_changes_memory_only(store):
    svc = service_in(store, ServiceState.PENDING_STARTUP)
    path = store.paths.service_json(svc.uuid)
    before = path.read_bytes()
    change_state(store, svc, ServiceState.ACTIVE, step="test.no-write", strict=True, write=False)
    assert (svc.status.state, svc.status.last_state) == (ServiceState.ACTIVE, ServiceState.PENDING_STARTUP)
    assert path.read_bytes() == before
    stopped = service_in(store, ServiceState.INACTIVE)
    with pytest.raises(ImpossibleTransition):  # the table holds all the same
        change_state(store, stopped, ServiceState.ACTIVE, strict=True, write=False)
    assert stopped.status.state == ServiceState.INACTIVE


@pytest.mark.parametrize("strict", [True, False])
def test_restore_puts_the_whole_status_back_and_writes_it(store, strict):
    svc = service_in(store, ServiceState.ACTIVE)
    svc.status.pid, svc.status.exit_code = 1234, None
    kept = svc.status.model_copy()
    change_state(store, svc, ServiceState.PENDING_STARTUP, "starting the new version", strict=True)
    svc.status.pid = 5678
    restore(store, svc, kept, "replace failed: no", step="test.restore", strict=strict)
    (recorded,), _ = store.load_all()
    for status in (svc.status, recorded.status):
        assert (status.state, status.last_state, status.pid, status.updated_at) == (
            kept.state,
            kept.last_state,
            1234,
            kept.updated_at,
        )
        assert status.last_error == "replace failed: no"


@pytest.mark.parametrize("strict", [True, False])
def test_restore_to_a_state_the_table_forbids_raises_and_changes_nothing(store, strict):
    svc = service_in(store, ServiceState.ACTIVE)
    kept = svc.status.model_copy()
    change_state(store, svc, ServiceState.PENDING_SHUTDOWN, strict=True)  # a stop under way never turns active
    path = store.paths.service_json(svc.uuid)
    before, status = path.read_bytes(), svc.status.model_copy()
    with pytest.raises(ImpossibleTransition, match=f"no move from {ServiceState.PENDING_SHUTDOWN} to {ServiceState.ACTIVE}"):
        restore(store, svc, kept, "replace failed", strict=strict)
    assert path.read_bytes() == before
    assert svc.status == status
    assert kept.last_error == "before"  # what it was handed is left as it was, too
