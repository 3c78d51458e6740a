"""Adoption at a rebuild, as pure functions over what was found: which processes tagged as this
home's servers a new daemon adopts, leaves to the launch they belong to, or stops.

The rebuild gathers the facts (the pid files, the services on disk, the tagged processes in
/proc); these functions decide, with no I/O, so every case has a unit test
(tests/test_adopt.py). Invariants:
- A process a pid file names (or the previous server of a hand-over it names) is tracked: never
  a candidate, never doomed here.
- A process of a service that is gone is stopped; so is a worker whose group leader is gone.
- A process of a launch a pid file names goes with that launch (adopted, followed or stopped with it).
- A group leader whose parent is a server of the same service (a helper in a session of its
  own) goes with its server: it is never a candidate for adoption.
- What is left, by service, are the candidates: a server spawned before its pid file was written.
- A service found with no server that was scaled to zero, or whose wake was cut short (a start
  from scaled_to_zero), stays scaled to zero: it wakes again on its next request
  (``stays_scaled_to_zero``); one found with its server is adopted as any other.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from uuid import UUID

from .linux import ProcessIdentity, TaggedProcess
from .models import DesiredState, ServiceState
from .store import LaunchInfo, PidRecord


@dataclass
class Untracked:
    """The tagged processes no pid file names, sorted: ``candidates`` by service uuid, ``doomed``."""

    candidates: dict[str, list[TaggedProcess]] = field(default_factory=dict)
    doomed: list[TaggedProcess] = field(default_factory=list)


def classify_untracked(
    known: Iterable[str], tagged: Iterable[TaggedProcess], records: Mapping[UUID, PidRecord | None]
) -> Untracked:
    """Sort the tagged processes of a home (see the module docstring); ``known``: the service uuids on disk."""
    tagged = list(tagged)
    known = set(known)
    tracked: set[ProcessIdentity] = set()
    launches: dict[str, set[str | None]] = {}
    for uuid, record in records.items():
        if record is None:
            continue
        for rec in (record, record.previous):
            if rec is not None:
                tracked.add(rec.ident)
                launches.setdefault(str(uuid), set()).add(rec.info.launch)
    by_pid = {p.ident.pid: p for p in tagged}
    result = Untracked()
    for p in tagged:
        if p.ident in tracked:
            continue
        if p.service_uuid not in known:
            result.doomed.append(p)
            continue
        if LaunchInfo.from_tag(p.info).launch in launches.get(p.service_uuid, set()):
            continue  # part of a launch a pid file names: adopted, followed or stopped with it
        if not p.leads_group:
            if p.pgid not in by_pid:
                result.doomed.append(p)  # a worker whose server is gone
            continue  # else its group goes with its leader
        parent = by_pid.get(p.ppid)
        if parent is not None and parent.service_uuid == p.service_uuid:
            continue  # a server's child in a session of its own: it goes with its server
        result.candidates.setdefault(p.service_uuid, []).append(p)
    return result


def stays_scaled_to_zero(state: ServiceState, last_state: ServiceState, desired: DesiredState) -> bool:
    """Whether a service the rebuild finds without a server stays scaled to zero (and is watched):
    it was recorded so, a scale to zero was cut short (``pending_shutdown`` while it should run: a
    stop records ``stopped`` first), or a wake from there was (``pending_startup`` after
    ``scaled_to_zero``), and it should run. A stop asked for meanwhile wins."""
    if desired != DesiredState.RUNNING:
        return False
    return state in (ServiceState.SCALED_TO_ZERO, ServiceState.PENDING_SHUTDOWN) or (
        state == ServiceState.PENDING_STARTUP and last_state == ServiceState.SCALED_TO_ZERO
    )
