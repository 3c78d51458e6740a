"""Admission (``daemon/admission.py``): the pure decision, and the gate a wake awaits (real asyncio, injected unload).

No daemon: the decision is a function of what is loaded, and the gate is given the loaded list and
the unload coroutine as a wake path would give them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from daemon.admission import Admission, Decision, Gate, Loaded, Loading, describe
from daemon.exceptions import AdmissionRefused, ServiceError
from daemon.settings import format_size

MiB = 1024 * 1024
NOW = 1_000_000.0


def in_loop(scenario: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """A test that runs ``scenario`` on a fresh event loop (the suite has no asyncio plugin)."""

    def test() -> None:
        asyncio.run(scenario())

    test.__name__ = scenario.__name__
    test.__doc__ = scenario.__doc__
    return test


def loaded(uuid: str, size: int = 0, idle: float = 10.0, busy: str = "", on_demand: bool = True) -> Loaded:
    """A loaded service, last used ``idle`` seconds before NOW (uuids are 8+ characters so messages name them)."""
    return Loaded(uuid=f"{uuid:0<8}-0000", model_name=uuid, size=size, last_use=NOW - idle, busy=busy, on_demand=on_demand)


def uid(name: str) -> str:
    return f"{name:0<8}-0000"


# ------------------------------------------------------------------ the decision


def test_no_cap_admits_everything():
    decision = Admission().decide([loaded("a"), loaded("b")], Loading(uid("c"), "c"), NOW)
    assert decision.admitted and decision.victims == ()


def test_count_cap_unloads_the_least_recently_used():
    admission = Admission(max_active=2)
    now = [loaded("a", idle=5), loaded("b", idle=50), loaded("c", idle=1)]
    # Three loaded, one more coming, cap 2: two must go, the two least recently used.
    decision = admission.decide(now, Loading(uid("d"), "d"), NOW)
    assert decision.victims == (uid("b"), uid("a"))
    # Room already: nothing goes.
    assert admission.decide(now[:1], Loading(uid("d"), "d"), NOW).victims == ()


def test_byte_cap_unloads_until_the_bytes_fit():
    admission = Admission(memory_budget=1000 * MiB)
    now = [loaded("a", 300 * MiB, idle=30), loaded("b", 400 * MiB, idle=20), loaded("c", 200 * MiB, idle=10)]
    # 900 loaded + 250 = 1150 > 1000: the oldest (300) is enough.
    assert admission.decide(now, Loading(uid("d"), "d", 250 * MiB), NOW).victims == (uid("a"),)
    # + 600 = 1500: a (300) then b (400).
    assert admission.decide(now, Loading(uid("d"), "d", 600 * MiB), NOW).victims == (uid("a"), uid("b"))
    # + 100 = 1000: fits exactly.
    assert admission.decide(now, Loading(uid("d"), "d", 100 * MiB), NOW).victims == ()


def test_both_caps_the_stricter_decides():
    admission = Admission(max_active=3, memory_budget=1000 * MiB)
    now = [loaded("a", 100 * MiB, idle=30), loaded("b", 700 * MiB, idle=20), loaded("c", 100 * MiB, idle=10)]
    # Count: 4 > 3, one must go (a); bytes: 900 - 100 + 200 = 1000 fit then.
    assert admission.decide(now, Loading(uid("d"), "d", 200 * MiB), NOW).victims == (uid("a"),)
    # Bytes: 900 - 100 + 300 = 1100 > 1000 after a: b goes too, LRU order, not the smallest set.
    assert admission.decide(now, Loading(uid("d"), "d", 300 * MiB), NOW).victims == (uid("a"), uid("b"))


def test_lru_order_skips_the_busy_and_ties_break_by_uuid():
    admission = Admission(max_active=2)
    now = [loaded("a", idle=90, busy="1 in flight"), loaded("b", idle=50), loaded("c", idle=50)]
    assert admission.decide(now, Loading(uid("d"), "d"), NOW).victims == (uid("b"), uid("c"))


def test_a_never_measured_service_counts_zero_bytes_but_one_slot():
    admission = Admission(max_active=2, memory_budget=100 * MiB)
    now = [loaded("a", 0, idle=5)]
    assert admission.decide(now, Loading(uid("new"), "new", 0), NOW).victims == ()  # never loaded: 0 bytes
    assert admission.decide(now, Loading(uid("new"), "new", 100 * MiB), NOW).victims == ()  # a weighs nothing yet
    assert admission.decide([*now, loaded("b", idle=1)], Loading(uid("new"), "new"), NOW).victims == (uid("a"),)


def test_nothing_unloadable_names_the_cap_and_what_holds_it():
    admission = Admission(max_active=2)
    now = [loaded("iris", 120 * MiB, idle=2.1, busy="1 in flight"), loaded("wine", idle=0.5, busy="starting")]
    decision = admission.decide(now, Loading(uid("digits"), "digits"), NOW)
    assert not decision.admitted and decision.victims == () and not decision.final
    assert decision.refused == (
        f"cannot load digits ({uid('digits')[:8]}): max_active=2 is held by "
        f"iris ({uid('iris')[:8]}, 120.0 MiB, last used 2.1 s ago, 1 in flight), "
        f"wine ({uid('wine')[:8]}, 0 B, last used 0.5 s ago, starting)"
    )


def test_unloading_what_may_go_would_not_be_enough_so_nothing_goes():
    admission = Admission(memory_budget=1000 * MiB)
    now = [loaded("a", 100 * MiB, idle=30), loaded("b", 800 * MiB, idle=20, busy="2 in flight")]
    decision = admission.decide(now, Loading(uid("c"), "c", 300 * MiB), NOW)
    assert decision.victims == () and not decision.admitted  # a alone frees too little: a stays
    assert decision.refused.startswith(f"cannot load c ({uid('c')[:8]}): memory_budget=1048576000 (1000.0 MiB) is held by a (")
    assert "(800.0 MiB that cannot be unloaded now, and c (" in decision.refused
    assert decision.refused.endswith("1 that could be unloaded would not be enough")


def test_a_service_larger_than_the_budget_is_refused_at_once():
    decision = Admission(memory_budget=100 * MiB).decide([], Loading(uid("big"), "big", 200 * MiB), NOW)
    assert decision.final and "is less than big (" in decision.refused and "200.0 MiB" in decision.refused


def test_the_loading_service_already_counted_is_admitted_at_once_and_never_chosen():
    admission = Admission(max_active=2, memory_budget=1000 * MiB)
    # A start of a service that is loaded already (or starting): it holds its own slot; nothing goes,
    # even when the others alone are past the caps (reservations of other loads, say).
    now = [loaded("a", 600 * MiB, idle=99), loaded("b", 300 * MiB, idle=1)]
    assert admission.decide(now, Loading(uid("a"), "a", 0), NOW) == Decision()
    crowded = [*now, loaded("c", 900 * MiB, idle=50, busy="loading")]
    assert admission.decide(crowded, Loading(uid("a"), "a", 800 * MiB), NOW) == Decision()
    # One not loaded yet needs room: a and b go, least recently used first (c cannot).
    assert admission.decide(crowded, Loading(uid("d"), "d"), NOW).victims == (uid("a"), uid("b"))


def test_services_without_idle_timeout_never_count_nor_go():
    admission = Admission(max_active=1, memory_budget=100 * MiB)
    now = [loaded("always", 5000 * MiB, idle=999, on_demand=False)]
    assert admission.decide(now, Loading(uid("a"), "a", 50 * MiB), NOW).victims == ()
    assert describe(admission, now) == {"max_active": 1, "memory_budget": 100 * MiB, "loaded": []}


def test_describe_shows_caps_and_loaded_least_recently_used_first():
    now = [loaded("a", 3, idle=1), loaded("b", 4, idle=9)]
    assert describe(Admission(3, None), now) == {
        "max_active": 3,
        "memory_budget": None,
        "loaded": [
            {"uuid": uid("b"), "model_name": "b", "size_bytes": 4, "last_use": NOW - 9},
            {"uuid": uid("a"), "model_name": "a", "size_bytes": 3, "last_use": NOW - 1},
        ],
    }


def test_format_size():
    assert [format_size(n) for n in (0, 1023, 1024, 1536 * MiB, 5 * 1024**4)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 GiB", "5120.0 GiB"
    ]


def test_admission_refused_is_a_503_service_error():
    assert issubclass(AdmissionRefused, ServiceError) and AdmissionRefused.status_code == 503


# ------------------------------------------------------------------ the gate (real asyncio)


class World:
    """What is loaded, as a daemon would report it; ``unload`` scales one to zero after a short while."""

    def __init__(self, *entries: Loaded, unload_takes: float = 0.01):
        self.entries = {e.uuid: e for e in entries}
        self.unloaded: list[str] = []
        self.unload_takes = unload_takes
        self.gate: Gate | None = None

    def loaded(self) -> list[Loaded]:
        return list(self.entries.values())

    async def unload(self, uuid: str) -> None:
        await asyncio.sleep(self.unload_takes)
        self.unloaded.append(uuid)
        self.entries.pop(uuid, None)

    def load(self, loading: Loading) -> None:
        self.entries[loading.uuid] = Loaded(loading.uuid, loading.model_name, loading.size, time.time())


def make_gate(world: World, admission: Admission) -> Gate:
    world.gate = Gate(admission, world.loaded, world.unload)
    return world.gate


def at(idle: float) -> float:
    return time.time() - idle


@in_loop
async def test_gate_unloads_the_victims_then_admits():
    world = World(
        Loaded(uid("a"), "a", 0, at(30)), Loaded(uid("b"), "b", 0, at(20)), Loaded(uid("c"), "c", 0, at(10))
    )
    gate = make_gate(world, Admission(max_active=2))
    async with gate.admit(Loading(uid("d"), "d"), time.monotonic() + 5):
        assert world.unloaded == [uid("a"), uid("b")]
        world.load(Loading(uid("d"), "d"))
    assert sorted(world.entries) == [uid("c"), uid("d")]


@in_loop
async def test_gate_waits_for_a_request_in_flight_then_admits():
    world = World(Loaded(uid("a"), "a", 0, at(1), busy="1 in flight"))
    gate = make_gate(world, Admission(max_active=1))

    async def request_ends() -> None:
        await asyncio.sleep(0.2)
        world.entries[uid("a")] = Loaded(uid("a"), "a", 0, time.time())  # idle now (nobody tells the gate)

    began = time.monotonic()
    ending = asyncio.create_task(request_ends())
    await gate.make_room(Loading(uid("b"), "b"), time.monotonic() + 5)
    waited = time.monotonic() - began
    await ending
    assert world.unloaded == [uid("a")]
    assert 0.2 <= waited < 0.2 + 0.05 + 0.3  # seen at the next poll (every 50 ms; slack for a loaded machine)
    gate.release(uid("b"))


@in_loop
async def test_gate_wakes_at_once_when_told():
    world = World(Loaded(uid("a"), "a", 0, at(1), busy="stopping"))
    gate = make_gate(world, Admission(max_active=1))
    gate.POLL = 10.0  # so only changed() can wake it within the test's bound

    async def stopped() -> None:
        await asyncio.sleep(0.1)
        world.entries.clear()
        gate.changed()

    began = time.monotonic()
    task = asyncio.create_task(stopped())
    await gate.make_room(Loading(uid("b"), "b"), time.monotonic() + 5)
    await task
    assert time.monotonic() - began < 0.5
    assert world.unloaded == []


@in_loop
async def test_gate_gives_up_at_the_deadline_with_the_message():
    world = World(Loaded(uid("iris"), "iris", 120 * MiB, at(2), busy="1 in flight"))
    gate = make_gate(world, Admission(max_active=1))
    began = time.monotonic()
    with pytest.raises(AdmissionRefused) as info:
        await gate.make_room(Loading(uid("wine"), "wine"), time.monotonic() + 0.3)
    assert 0.3 <= time.monotonic() - began < 0.3 + 0.5
    assert str(info.value).startswith(f"cannot load wine ({uid('wine')[:8]}): max_active=1 is held by iris ({uid('iris')[:8]}, ")
    assert "1 in flight" in str(info.value)
    assert AdmissionRefused.status_code == 503


@in_loop
async def test_gate_refuses_at_once_what_waiting_cannot_help():
    gate = make_gate(World(), Admission(memory_budget=MiB))
    began = time.monotonic()
    with pytest.raises(AdmissionRefused, match="is less than big"):
        await gate.make_room(Loading(uid("big"), "big", 2 * MiB), time.monotonic() + 5)
    assert time.monotonic() - began < 0.1


@in_loop
async def test_two_wakes_racing_for_the_last_slot_one_loads_the_other_waits():
    """max_active=2, one loaded and busy: one slot. Two wakes at once: exactly one gets it; the
    other waits while the first holds its reservation (its load takes a while), and gets its turn
    only when a server can go: here when the first load is over and the first becomes idle."""
    world = World(Loaded(uid("busy"), "busy", 0, at(1), busy="1 in flight"))
    gate = make_gate(world, Admission(max_active=2))
    alive_max = 0
    order: list[str] = []

    async def wake(name: str) -> None:
        nonlocal alive_max
        loading = Loading(uid(name), name)
        async with gate.admit(loading, time.monotonic() + 5):
            order.append(name)
            await asyncio.sleep(0.2)  # the server loads
            world.load(loading)
            alive_max = max(alive_max, len(world.entries))
        # Serves one request and goes idle: least recently used but the busy one.

    await asyncio.gather(wake("x"), wake("y"))
    assert len(order) == 2 and alive_max == 2  # never three servers
    first, second = order
    # The second got in only by unloading the first (the busy one never goes).
    assert world.unloaded == [uid(first)]
    assert sorted(world.entries) == sorted([uid("busy"), uid(second)])


@in_loop
async def test_two_wakes_racing_with_nothing_to_unload_one_is_refused():
    world = World(Loaded(uid("busy"), "busy", 0, at(1), busy="1 in flight"))
    gate = make_gate(world, Admission(max_active=2))

    async def wake(name: str) -> str:
        loading = Loading(uid(name), name)
        async with gate.admit(loading, time.monotonic() + 0.3):
            world.entries[loading.uuid] = Loaded(loading.uuid, name, 0, time.time(), busy="1 in flight")
            await asyncio.sleep(0.5)  # keeps serving past the other's deadline
        return name

    results = await asyncio.gather(wake("x"), wake("y"), return_exceptions=True)
    refused = [r for r in results if isinstance(r, AdmissionRefused)]
    assert len(refused) == 1 and len([r for r in results if isinstance(r, str)]) == 1
    # The refused one names the reservation or the loaded server that holds the last slot.
    assert "max_active=2 is held by busy" in str(refused[0])
    assert world.unloaded == []


@in_loop
async def test_a_failed_unload_is_decided_again_not_fatal():
    world = World(Loaded(uid("a"), "a", 0, at(9)))
    calls = []

    async def flaky_unload(uuid: str) -> None:
        calls.append(uuid)
        if len(calls) == 1:
            from daemon.exceptions import StopError

            raise StopError("it would not stop")
        await world.unload(uuid)

    gate = Gate(Admission(max_active=1), world.loaded, flaky_unload)
    await gate.make_room(Loading(uid("b"), "b"), time.monotonic() + 5)
    assert calls == [uid("a"), uid("a")] and world.unloaded == [uid("a")]


@in_loop
async def test_no_cap_no_wait_no_reservation():
    world = World(*(Loaded(uid(str(i)), str(i), 0, at(i)) for i in range(5)))
    gate = make_gate(world, Admission())
    await gate.make_room(Loading(uid("z"), "z"), time.monotonic())
    assert world.unloaded == [] and gate.current() == world.loaded()


# ------------------------------------------------------------------ a real daemon: GET /v1/daemon and `modeld daemon status`


@pytest.mark.slow
def test_the_daemon_shows_the_caps_and_what_is_loaded(home, client, monkeypatch):
    import re

    from conftest import iris_config, modeld

    monkeypatch.setenv("MODELD_MAX_ACTIVE", "2")
    monkeypatch.setenv("MODELD_MEMORY_BUDGET", "1.5GiB")
    on_demand = client.deploy(iris_config(idle_timeout=60), timeout=60)
    client.deploy(iris_config(model_name="always", pipeline_step_name="other"), timeout=60)  # no idle_timeout
    info = client.daemon_info()
    assert info["settings"]["max_active"] == 2 and info["settings"]["memory_budget"] == 1610612736
    shown = info["on_demand"]
    assert (shown["max_active"], shown["memory_budget"]) == (2, 1610612736)
    (entry,) = shown["loaded"]  # the service without idle_timeout is not counted
    assert entry["uuid"] == str(on_demand.uuid) and entry["model_name"] == "iris"
    assert entry["size_bytes"] >= 0 and abs(entry["last_use"] - time.time()) < 60

    status = modeld("daemon", "status", home=home)
    assert status.returncode == 0, status.stderr
    assert re.search(r"^on demand: max_active 2, memory_budget 1\.5 GiB; loaded 1 \(.*\):$", status.stdout, re.M), status.stdout
    assert re.search(rf"^  iris  {str(on_demand.uuid)[:8]}  .+  last use \d+\.\d s ago$", status.stdout, re.M), status.stdout


@in_loop
async def test_an_unload_waiting_for_a_start_of_its_victim_does_not_deadlock():
    """x's load chose z then y; while z unloads, a start of y takes y's lock and asks for room (y is
    loaded: admitted at once), so x's unload of y, which takes y's lock, waits only for that start."""
    locks = {uid(n): asyncio.Lock() for n in ("x", "y", "z")}
    world = World(Loaded(uid("z"), "z", 0, at(30)), Loaded(uid("y"), "y", 0, at(20)), unload_takes=0.2)

    async def unload(uuid: str) -> None:
        async with locks[uuid]:
            await world.unload(uuid)

    gate = Gate(Admission(max_active=1), world.loaded, unload)

    async def start_y() -> str:
        await asyncio.sleep(0.05)  # z is being unloaded by x's load now
        async with locks[uid("y")]:
            async with gate.admit(Loading(uid("y"), "y"), time.monotonic() + 5):
                await asyncio.sleep(0.1)  # y's start works under its lock
        return "started"

    async def wake_x() -> str:
        async with gate.admit(Loading(uid("x"), "x"), time.monotonic() + 5):
            world.load(Loading(uid("x"), "x"))
        return "loaded"

    results = await asyncio.wait_for(asyncio.gather(wake_x(), start_y()), 5)
    assert results == ["loaded", "started"]
    assert world.unloaded == [uid("z"), uid("y")]
