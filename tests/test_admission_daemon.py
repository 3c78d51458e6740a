"""Admission on a real daemon (issue 12): ``max_active`` caps the built-in servers of on-demand
services alive at once; loading one more scales the least recently used to zero first, and when
nothing can go, the request waits up to ``wake_timeout`` and gets a 503 naming the cap. Real
daemons, real servers, real sockets; servers are counted by their pids."""

from __future__ import annotations

import threading
from pathlib import Path

from conftest import iris_config
from daemon import ServiceState
from daemon.testing import pid_alive, wait_for
from test_ondemand import ask, write_model

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
    finally:
        in_flight.join(30)
    assert answers and answers[0][0] == 200  # the request in flight was never cut
    assert ask(other)[0] == 200  # busy is idle now: it goes, other loads
    assert client.get(busy.uuid).status.state == S0
