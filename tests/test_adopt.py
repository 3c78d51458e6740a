"""Adoption's decisions (daemon/adopt.py), as a pure function: every case without a process."""

from __future__ import annotations

import json
from uuid import UUID

from daemon.adopt import classify_untracked
from daemon.linux import ProcessIdentity, TaggedProcess
from daemon.store import LaunchInfo, PidRecord

A = UUID("aaaaaaaa-0000-4000-8000-000000000001")
B = UUID("bbbbbbbb-0000-4000-8000-000000000002")


def proc(pid: int, uuid: UUID, launch: str, pgid: int | None = None, ppid: int = 1) -> TaggedProcess:
    return TaggedProcess(ProcessIdentity(pid, pid * 10, "boot"), pgid if pgid is not None else pid, ppid, str(uuid),
                         json.dumps({"launch": launch, "version": "1"}))


def record(pid: int, launch: str, previous: PidRecord | None = None) -> PidRecord:
    return PidRecord(ProcessIdentity(pid, pid * 10, "boot"), LaunchInfo(version="1", launch=launch), previous)


def test_a_process_a_pid_file_names_and_its_launch_are_left_alone():
    server, worker = proc(100, A, "l1"), proc(101, A, "l1", pgid=100, ppid=100)
    found = classify_untracked({str(A)}, [server, worker], {A: record(100, "l1")})
    assert found.candidates == {} and found.doomed == []


def test_the_previous_server_of_a_hand_over_is_tracked_too():
    old, new = proc(90, A, "l0"), proc(100, A, "l1")
    found = classify_untracked({str(A)}, [old, new], {A: record(100, "l1", previous=record(90, "l0"))})
    assert found.candidates == {} and found.doomed == []


def test_processes_of_a_service_that_is_gone_are_stopped():
    found = classify_untracked({str(A)}, [proc(200, B, "x")], {A: None})
    assert [p.ident.pid for p in found.doomed] == [200] and found.candidates == {}


def test_a_server_spawned_before_its_pid_file_was_written_is_a_candidate():
    server = proc(300, A, "new")
    found = classify_untracked({str(A)}, [server], {A: None})
    assert found.candidates == {str(A): [server]} and found.doomed == []


def test_a_worker_whose_leader_is_gone_is_stopped_and_one_whose_leader_lives_goes_with_it():
    orphan = proc(401, A, "w", pgid=400)  # its leader, 400, is not among the live processes
    leader, worker = proc(500, A, "v"), proc(501, A, "v", pgid=500, ppid=500)
    found = classify_untracked({str(A)}, [orphan, leader, worker], {A: None})
    assert [p.ident.pid for p in found.doomed] == [401]
    assert found.candidates == {str(A): [leader]}


def test_a_helper_in_a_session_of_its_own_is_never_a_candidate_for_its_servers_service():
    server = proc(600, A, "h")
    helper = proc(610, A, "h", ppid=600)  # leads its own group (setsid), its parent is the server
    found = classify_untracked({str(A)}, [server, helper], {A: None})
    assert found.candidates == {str(A): [server]}  # the helper goes with its server, never adopted as one
    found = classify_untracked({str(A)}, [server, helper], {A: record(600, "h")})
    assert found.candidates == {} and found.doomed == []  # its launch is recorded: it goes with that launch


def test_a_service_found_without_its_server_stays_scaled_to_zero_if_it_was_or_was_waking():
    from daemon.adopt import stays_scaled_to_zero
    from daemon.models import DesiredState, ServiceState as S

    running, stopped = DesiredState.RUNNING, DesiredState.STOPPED
    assert stays_scaled_to_zero(S.SCALED_TO_ZERO, S.ACTIVE, running)
    assert stays_scaled_to_zero(S.PENDING_STARTUP, S.SCALED_TO_ZERO, running)  # a wake cut short
    assert stays_scaled_to_zero(S.PENDING_SHUTDOWN, S.ACTIVE, running)  # a scale to zero cut short
    assert not stays_scaled_to_zero(S.PENDING_SHUTDOWN, S.ACTIVE, stopped)  # a stop cut short: stopped
    assert not stays_scaled_to_zero(S.PENDING_STARTUP, S.INACTIVE, running)  # a start cut short: started
    assert not stays_scaled_to_zero(S.ACTIVE, S.SCALED_TO_ZERO, running)  # it was loaded: started again
    assert not stays_scaled_to_zero(S.SCALED_TO_ZERO, S.ACTIVE, stopped)  # a stop asked for wins
    assert not stays_scaled_to_zero(S.ERROR, S.SCALED_TO_ZERO, running)
