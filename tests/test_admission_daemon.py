"""Admission on a real daemon (issue 12): ``max_active`` caps the built-in servers of on-demand
services alive at once; loading one more scales the least recently used to zero first, and when
nothing can go, the request waits up to ``wake_timeout`` and gets a 503 naming the cap. Real
daemons, real servers, real sockets; servers are counted by their pids."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from conftest import iris_config
from test_ondemand import ask, write_model

from daemon import ServiceState
from daemon.config import RestartPolicy
from daemon.testing import pid_alive, wait_for

S0 = ServiceState.SCALED_TO_ZERO


def alive(client, services) -> list[str]:
    """The model names of the services whose recorded server is alive."""
    out = []
    for svc in services:
        pid = client.get(svc.uuid).status.pid
        if pid and pid_alive(pid):
            out.append(svc.config.model_name)
    return out


def test_max_active_unloads_the_least_recently_used_to_load_another(client, monkeypatch):
    monkeypatch.setenv("MODELD_MAX_ACTIVE", "2")
    a, b, c = (client.deploy(iris_config(model_name=n, pipeline_step_name=n, idle_timeout=3600), timeout=60) for n in "abc")
    # c's deploy made room by scaling a, the least recently used, to zero.
    assert client.get(a.uuid).status.state == S0 and sorted(alive(client, [a, b, c])) == ["b", "c"]
    assert ask(b)[0] == 200  # b is used now: c is the least recently used
    assert ask(a) == (200, {"predictions": ["setosa"]})  # a wakes on its URL; c goes
    assert client.get(c.uuid).status.state == S0 and sorted(alive(client, [a, b, c])) == ["a", "b"]
    assert client.start(c.uuid, timeout=60).status.state == ServiceState.ACTIVE  # a start makes room too
    assert client.get(b.uuid).status.state == S0 and sorted(alive(client, [a, b, c])) == ["a", "c"]
    assert client.daemon_info()["on_demand"]["max_active"] == 2
    assert {e["model_name"] for e in client.daemon_info()["on_demand"]["loaded"]} == {"a", "c"}


def test_a_service_without_idle_timeout_is_never_unloaded_nor_counted(client, monkeypatch):
    monkeypatch.setenv("MODELD_MAX_ACTIVE", "1")
    always = client.deploy(iris_config(model_name="always", pipeline_step_name="always"), timeout=60)
    a = client.deploy(iris_config(model_name="a", pipeline_step_name="a", idle_timeout=3600), timeout=60)
    b = client.deploy(iris_config(model_name="b", pipeline_step_name="b", idle_timeout=3600), timeout=60)
    assert client.get(always.uuid).status.state == ServiceState.ACTIVE
    assert client.get(a.uuid).status.state == S0 and client.get(b.uuid).status.state == ServiceState.ACTIVE


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_with_nothing_to_unload_a_wake_waits_wake_timeout_then_gets_a_503_naming_the_cap(client, monkeypatch, tmp_path: Path):
    monkeypatch.setenv("MODELD_MAX_ACTIVE", "1")
    monkeypatch.setenv("MODELD_WAKE_TIMEOUT", "1")
    slow = write_model(tmp_path, "import time\ndef model(instances):\n    time.sleep(4)\n    return instances\n")
    busy = client.deploy(iris_config(model_name="busy", pipeline_step_name="busy", model_uri=slow, idle_timeout=3600), timeout=60)
    other = client.deploy(iris_config(model_name="other", pipeline_step_name="other", idle_timeout=3600), timeout=60)
    assert client.get(busy.uuid).status.state == S0  # other's deploy made room
    client.unload(other.uuid)
    wait_for(lambda: client.get(other.uuid).status.state == S0, 15, what="other scaled to zero")
    answers: list[tuple[int, object]] = []
    in_flight = threading.Thread(target=lambda: answers.append(ask(busy)))
    in_flight.start()  # busy wakes and holds its one slot with a 4 s request
    try:
        wait_for(lambda: client.daemon_info()["on_demand"]["loaded"], 15, what="busy loaded")
        status, body = ask(other)
        assert status == 503, body
        message = body["error"]["message"]  # type: ignore[index]
        assert "max_active=1" in message and "busy" in message, message
        assert client.get(other.uuid).status.state == S0  # nothing started; it wakes on a later request
        # The events say so: woken, then back to scaled_to_zero with why (not a bare woken, then nothing).
        mine = [e for e in client.events(since=0, follow=False) if e["uuid"] == str(other.uuid)]
        assert [e["type"] for e in mine[-2:]] == ["woken", "scaled_to_zero"], mine
        assert "its wake was refused" in mine[-1]["detail"] and "max_active=1" in mine[-1]["detail"], mine[-1]
    finally:
        in_flight.join(30)
    assert answers and answers[0][0] == 200  # the request in flight was never cut
    assert ask(other)[0] == 200  # busy is idle now: it goes, other loads
    assert client.get(busy.uuid).status.state == S0


def _kill_daemon(client) -> None:
    daemon_pid = client.daemon_info()["pid"]
    os.kill(daemon_pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(daemon_pid), 10, what="daemon gone")


@pytest.mark.slow
def test_a_restarted_daemon_starts_on_demand_services_whose_server_is_gone_only_within_the_cap(client, monkeypatch):
    """Chaos's seeds 101 and 202: a daemon's rebuild started every service that should run but whose
    server was gone, past max_active. Now an on-demand one is started only if it fits beside what is
    re-adopted; the others stay scaled to zero, still wanted running, and wake on their URL."""
    a, b, c = (client.deploy(iris_config(model_name=n, pipeline_step_name=n, idle_timeout=3600), timeout=60) for n in "abc")
    _kill_daemon(client)
    for svc in (a, b):  # their servers die while no daemon runs; c's lives on
        pid = svc.status.pid
        assert pid and pid_alive(pid)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda pid=pid: not pid_alive(pid), 10, what="server gone")
    monkeypatch.setenv("MODELD_MAX_ACTIVE", "1")
    found = {s.config.model_name: s for s in client.find()}  # (a new daemon, with the cap)
    assert found["c"].status.state == ServiceState.ACTIVE and alive(client, [a, b, c]) == ["c"]
    for name in "ab":
        assert found[name].status.state == S0 and found[name].desired_state.value == "running", found[name]
    assert ask(a) == (200, {"predictions": ["setosa"]})  # a wakes (c, least recently used, goes)
    assert alive(client, [a, b, c]) == ["a"] and client.get(c.uuid).status.state == S0


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_a_restarted_daemon_scales_to_zero_the_adopted_servers_beyond_the_cap(client, monkeypatch):
    a, b, c = (client.deploy(iris_config(model_name=n, pipeline_step_name=n, idle_timeout=3600), timeout=60) for n in "abc")
    assert ask(c)[0] == 200  # c is the most recently used
    _kill_daemon(client)
    monkeypatch.setenv("MODELD_MAX_ACTIVE", "1")
    wait_for(lambda: alive(client, [a, b, c]) == ["c"], 15, what="only c left loaded")
    for svc in (a, b):
        got = client.get(svc.uuid)
        assert got.status.state == S0 and got.desired_state.value == "running", got
    assert ask(b) == (200, {"predictions": ["setosa"]})
    assert alive(client, [a, b, c]) == ["b"]


@pytest.mark.slow
def test_a_replace_that_gives_a_service_an_idle_timeout_makes_room_for_it(client, monkeypatch):
    """Chaos's seed 202: a replace's room was asked for the service's old config; a service replaced
    from no idle_timeout to one skipped the cap (and one replaced the other way unloaded another for nothing)."""
    monkeypatch.setenv("MODELD_MAX_ACTIVE", "1")
    a = client.deploy(iris_config(model_name="a", pipeline_step_name="a", idle_timeout=3600), timeout=60)
    b = client.deploy(iris_config(model_name="b", pipeline_step_name="b"), timeout=60)
    assert alive(client, [a, b]) == ["a", "b"]  # b does not count
    b = client.deploy(
        iris_config(model_name="b", pipeline_step_name="b", idle_timeout=3600), replace=True, uuid=b.uuid, timeout=60
    )
    assert client.get(a.uuid).status.state == S0 and alive(client, [a, b]) == ["b"]
    # And back: a replace that drops the idle_timeout unloads nobody.
    assert ask(a)[0] == 200 and alive(client, [a, b]) == ["a"]
    client.deploy(iris_config(model_name="b", pipeline_step_name="b"), replace=True, uuid=b.uuid, timeout=60)
    assert sorted(alive(client, [a, b])) == ["a", "b"]


@pytest.mark.slow
@pytest.mark.long
def test_a_crashed_server_being_restarted_holds_its_room(client, monkeypatch):
    """A crashed on-demand server that supervision restarts after a backoff keeps its room meanwhile:
    a wake of another waits (and, past wake_timeout, gets the 503 naming it) instead of taking the
    slot, which the restart would then take too, past max_active."""
    monkeypatch.setenv("MODELD_MAX_ACTIVE", "1")
    monkeypatch.setenv("MODELD_WAKE_TIMEOUT", "1")
    b = client.deploy(iris_config(model_name="b", pipeline_step_name="b", idle_timeout=3600), timeout=60)
    restart = RestartPolicy(backoff_initial=5.0, backoff_max=5.0)
    a = client.deploy(iris_config(model_name="a", pipeline_step_name="a", idle_timeout=3600, restart=restart), timeout=60)
    assert client.get(b.uuid).status.state == S0
    first = client.get(a.uuid).status.pid
    assert first
    os.kill(first, signal.SIGKILL)  # the first crash after a healthy run restarts at once
    second = wait_for(
        lambda: (p := client.get(a.uuid).status.pid) not in (None, first) and pid_alive(p) and p, 15, what="a restarted"
    )
    os.kill(second, signal.SIGKILL)  # the second in a row: 5 s of backoff
    wait_for(lambda: client.get(a.uuid).status.pid is None, 15, what="a in its backoff")
    status, body = ask(b)
    assert status == 503 and "restarting" in body["error"]["message"], body  # type: ignore[index]
    wait_for(lambda: client.get(a.uuid).status.state == ServiceState.ACTIVE, 20, what="a restarted again")
    assert alive(client, [a, b]) == ["a"]
