"""AsyncDaemonClient: DaemonClient's calls for asyncio, against a real daemon and real servers.

The two clients share their calls (daemon/client/operations.py) and their transport's policy
(daemon/client/transport.py); these tests hold them to the same methods, the same answers, the
same errors and the same auto-start, and check that calls made at once run at once.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import sys
import uuid as uuidlib
from pathlib import Path

import pytest

from conftest import iris_config, predict
from daemon import (
    AsyncDaemonClient,
    DaemonClient,
    DaemonNotRunning,
    DeployError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    ServiceConfig,
    ServiceNotFound,
    ServiceState,
)
from daemon.client.async_transport import MAX_IDLE
from daemon.client.autostart import _answers as answers
from daemon.client.operations import Session
from daemon.daemon_process import daemon_pid
from daemon.paths import Paths
from daemon.testing import TOKEN_SERVER, pid_alive, server_script, wait_for

SETOSA = [[5.1, 3.5, 1.4, 0.2]]
SLOW_SERVER = server_script("import time\ntime.sleep(float(sys.argv[2]))\nPORT, BODY = int(sys.argv[1]), b''\n")
LIFECYCLE = {"close": "aclose", "__enter__": "__aenter__", "__exit__": "__aexit__"}


def test_the_two_clients_have_the_same_calls() -> None:
    """Every public method of DaemonClient has its async twin with the same parameters: a call
    added to one client (apply, events, ...) fails here until the other has it too."""
    def calls(cls: type) -> dict[str, object]:  # (Session's methods are the plumbing both share)
        return {n: f for n, f in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_") and n not in vars(Session)}

    sync = calls(DaemonClient)
    sync.update({name: getattr(DaemonClient, name) for name in ("__enter__", "__exit__")})
    asyn = calls(AsyncDaemonClient)
    asyn.update({name: getattr(AsyncDaemonClient, name) for name in ("__aenter__", "__aexit__")})
    assert sorted(LIFECYCLE.get(name, name) for name in sync) == sorted(asyn)
    for name, func in sync.items():
        twin = asyn[LIFECYCLE.get(name, name)]
        assert inspect.signature(func).parameters.keys() == inspect.signature(twin).parameters.keys(), name
        for p, q in zip(inspect.signature(func).parameters.values(), inspect.signature(twin).parameters.values(), strict=True):
            assert (p.kind, p.default, p.annotation) == (q.kind, q.default, q.annotation), f"{name}({p.name})"
        if inspect.isgeneratorfunction(func):
            assert inspect.isasyncgenfunction(twin), f"{name} streams: its twin is an async iterator"
        else:
            assert inspect.iscoroutinefunction(twin), f"{name} must be awaited"
    assert DaemonClient.auto_start.fget is not None and AsyncDaemonClient.auto_start.fget is not None


def test_deploy_predict_find_logs_stop_delete_from_asyncio(home: Path) -> None:
    """The whole life of a built-in iris server from asyncio, the daemon auto-started by the first call."""
    assert daemon_pid(Paths(home)) is None

    async def main() -> None:
        async with AsyncDaemonClient(home) as client:
            assert await client.is_running() is False  # (never starts one)
            # The first call auto-starts the daemon. (A find with a filter on a daemon that never had a
            # service is answered [], not a 500 from an index not yet made.)
            assert await client.find(model_name="iris-async") == []
            assert daemon_pid(Paths(home)) == (await client.daemon_info())["pid"]
            svc = await client.deploy(iris_config(model_name="iris-async"))
            assert svc.status.state == ServiceState.ACTIVE
            status, answer = await asyncio.to_thread(predict, svc.prediction_url, SETOSA)
            assert (status, answer) == (200, {"predictions": ["setosa"]})

            assert [s.uuid for s in await client.find(model_name="iris-async")] == [svc.uuid]
            assert await client.find(model_name="nobody") == []
            assert (await client.get(svc.uuid)).endpoint.port == svc.endpoint.port
            text = "".join([chunk async for chunk in client.logs(svc.uuid)])
            assert "serving model 'iris-async'" in text

            # follow: the stream goes on until the service goes
            seen: list[str] = []

            async def follow() -> None:
                async for chunk in client.logs(svc.uuid, tail=1, follow=True):
                    seen.append(chunk)

            follower = asyncio.create_task(follow())
            stopped = await client.stop(svc.uuid)
            assert stopped.status.state == ServiceState.INACTIVE
            assert (await client.start(svc.uuid)).status.state == ServiceState.ACTIVE
            await client.delete(svc.uuid)
            await asyncio.wait_for(follower, 30)  # ended by the delete, not by the test
            assert seen
            with pytest.raises(ServiceNotFound):
                await client.get(svc.uuid)
            await client.shutdown()
        wait_for(lambda: daemon_pid(Paths(home)) is None, 30, what="the daemon to exit")

    asyncio.run(main())


def test_events_from_asyncio_replay_and_follow(home: Path) -> None:
    """The async twin of DaemonClient.events: a replay with since, then following a kill -9 to the restart."""

    async def main() -> None:
        async with AsyncDaemonClient(home) as client:
            svc = await client.deploy(iris_config(model_name="iris-events"))
            replay = [e async for e in client.events(since=0, follow=False)]
            mine = [e["type"] for e in replay if e.get("uuid") == str(svc.uuid)]
            assert mine[:1] == ["deployed"] and "healthy" in mine, replay
            last = replay[-1]["seq"]

            seen: list[dict[str, object]] = []

            async def follow() -> None:
                async for event in client.events(since=last):
                    seen.append(event)
                    if event.get("uuid") == str(svc.uuid) and event["type"] == "healthy":
                        return

            follower = asyncio.create_task(follow())
            os.kill(svc.status.pid, signal.SIGKILL)
            await asyncio.wait_for(follower, 60)
            types = [e["type"] for e in seen if e.get("uuid") == str(svc.uuid)]
            assert types[0] == "exited" and "restarting" in types and types[-1] == "healthy", seen
            assert seen[0]["seq"] == last + 1  # nothing missed, nothing repeated
            await client.delete(svc.uuid)

    asyncio.run(main())


def test_apply_and_export_from_asyncio(home: Path) -> None:
    """The async twin of apply: the same plan and requests, awaited; an export applied again is a no-op."""
    iris = str(Path(__file__).resolve().parent.parent / "examples" / "iris.py") + ":model"

    async def main() -> None:
        async with AsyncDaemonClient(home) as client:
            wanted = {"project": "aio", "services": {"a": {"model_uri": iris}, "b": {"model_uri": iris}}}
            report = await client.apply(wanted)
            assert [(s.action, s.status) for s in report.steps] == [("create", "done")] * 2, report
            pids = {s.config.name: s.status.pid for s in await client.find(project="aio")}
            again = await client.apply(wanted)
            assert [s.action for s in again.steps] == ["unchanged"] * 2
            pruned = await client.apply({"project": "aio", "services": {"a": {"model_uri": iris}}}, prune=True)
            assert sorted((s.action, s.status) for s in pruned.steps) == [("delete", "done"), ("unchanged", "done")]
            assert {s.config.name: s.status.pid for s in await client.find(project="aio")} == {"a": pids["a"]}
            text = await client.export(project="aio")
            assert text == DaemonClient(home, auto_start=False).export(project="aio")
            assert "[services.a]" in text and "[services.b]" not in text
            await client.shutdown(stop_services=True)

    asyncio.run(main())


def test_errors_are_the_same_classes_as_the_blocking_clients(home: Path, tmp_path: Path) -> None:
    script = tmp_path / "token.py"
    script.write_text(TOKEN_SERVER)
    failing = ServiceConfig(model_name="fails", model_type="command", command=[sys.executable, str(script), "{port}", "fail"])
    unknown = str(uuidlib.uuid4())
    calls = [
        ("get", (unknown,), {}),
        ("stop", (unknown,), {}),
        ("delete", (unknown,), {}),
        ("_call", ("GET", "/v1/nowhere"), {}),
        ("_call", ("PUT", "/v1/daemon"), {}),
        ("_call", ("GET", "/v1/services"), {"query": {"running": "maybe"}}),
        ("_call", ("GET", "/v1/services"), {"query": {"bogus": "1"}}),
        ("find", (), {"state": "sleeping"}),
    ]
    sync_client = DaemonClient(home)

    def sync_error(name: str, args: tuple[object, ...], kwargs: dict[str, object]) -> Exception:
        with pytest.raises(Exception) as info:
            getattr(sync_client, name)(*args, **kwargs)
        return info.value

    async def main() -> list[tuple[Exception, Exception]]:
        pairs = []
        async with AsyncDaemonClient(home) as client:
            for name, args, kwargs in calls:
                with pytest.raises(Exception) as info:
                    await getattr(client, name)(*args, **kwargs)
                pairs.append((sync_error(name, args, kwargs), info.value))
            with pytest.raises(DeployError) as failed:
                await client.deploy(failing, timeout=30)
            assert failed.value.log_excerpt and "starting with token" in failed.value.log_excerpt
        async with AsyncDaemonClient(home, socket_path=home / "none.sock", auto_start=False) as nobody:
            with pytest.raises(DaemonNotRunning) as absent:
                await nobody.find()
            pairs.append((_sync_absent(home), absent.value))
        return pairs

    try:
        pairs = asyncio.run(main())
    finally:
        sync_client.close()
    kinds = [type(a) for a, _ in pairs]
    assert kinds == [ServiceNotFound] * 3 + [NotFound, MethodNotAllowed] + [InvalidRequest] * 3 + [DaemonNotRunning]
    for sync_exc, async_exc in pairs:
        assert (type(async_exc), str(async_exc)) == (type(sync_exc), str(sync_exc))


def _sync_absent(home: Path) -> Exception:
    with DaemonClient(home, socket_path=home / "none.sock", auto_start=False) as client, pytest.raises(DaemonNotRunning) as info:
        client.find()
    return info.value


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_calls_made_at_once_run_at_once(home: Path, tmp_path: Path) -> None:
    """A find is answered while a deploy is still waiting for its server; many calls gathered at
    once from a client with no daemon yet auto-start exactly one, and all are answered."""
    script = tmp_path / "slow.py"
    script.write_text(SLOW_SERVER)
    slow = ServiceConfig(model_name="slow", model_type="command", command=[sys.executable, str(script), "{port}", "3"])

    async def main() -> None:
        async with AsyncDaemonClient(home) as client:
            infos = await asyncio.gather(*(client.daemon_info() for _ in range(6)))
            assert len({info["pid"] for info in infos}) == 1 == len({daemon_pid(Paths(home))})

            deploying = asyncio.create_task(client.deploy(slow, timeout=60))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while not (found := await client.find(model_name="slow")):
                assert loop.time() < deadline, "the deploy never showed up"
                await asyncio.sleep(0.05)
            assert found[0].status.state == ServiceState.PENDING_STARTUP
            assert not deploying.done()  # the find was answered while the deploy waits for health
            svc, *gets = await asyncio.gather(deploying, *(client.get(found[0].uuid) for _ in range(12)))
            assert svc.status.state == ServiceState.ACTIVE
            assert {g.uuid for g in gets} == {svc.uuid}
            transport = client.transport
            assert len(getattr(transport, "_idle")) <= MAX_IDLE  # connections kept for later calls, no more
            await client.delete(svc.uuid)

    asyncio.run(main())


@pytest.mark.slow
def test_a_cancelled_call_leaves_the_client_usable(home: Path, tmp_path: Path) -> None:
    """A call cancelled in the middle (asyncio.wait_for) closes its connection; the next calls are answered."""
    script = tmp_path / "slow.py"
    script.write_text(SLOW_SERVER)
    slow = ServiceConfig(model_name="slow", model_type="command", command=[sys.executable, str(script), "{port}", "2"])

    async def main() -> None:
        async with AsyncDaemonClient(home) as client:
            await client.daemon_info()  # (the daemon started first: the cancel is to hit the deploy)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.deploy(slow, timeout=60), 0.5)
            # The daemon goes on with the deploy it was sent; this client's next calls are answered.
            (svc,) = await client.find(model_name="slow")
            assert svc.status.state == ServiceState.PENDING_STARTUP
            await client.delete(svc.uuid, force=True)
            assert await client.find() == []
            assert (await client.daemon_info())["counts"]["total"] == 0

    asyncio.run(main())


def test_after_a_kill_9_the_next_calls_start_a_new_daemon(home: Path) -> None:
    """Kept-alive connections to a daemon killed with -9 are dropped before a request is written on
    them, so the next calls, a stop among them, reach the new daemon the client starts, which
    re-adopts the server (as the blocking client's, tests/test_daemon.py)."""

    async def main() -> None:
        async with AsyncDaemonClient(home) as client:
            svc = await client.deploy(iris_config(), timeout=60)
            first = (await client.daemon_info())["pid"]
            await asyncio.gather(*(client.get(svc.uuid) for _ in range(3)))  # several connections kept alive
            assert getattr(client.transport, "_idle")
            os.kill(first, signal.SIGKILL)
            # Gone for good: until its last thread exits, a daemon killed with -9 still holds its
            # connections and accepts new ones into its backlog, which it then resets (a POST sent
            # then is not sent again by either client: it may have been done).
            paths = Paths(home)
            await asyncio.to_thread(wait_for, lambda: not answers(paths), 10, what="the daemon's socket to refuse")
            idle = list(getattr(client.transport, "_idle"))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while not all(conn.reader.at_eof() for conn in idle):  # the event loop has seen them closed
                assert loop.time() < deadline
                await asyncio.sleep(0.01)

            stopped = await client.stop(svc.uuid)  # a POST, first: not written on a closed connection
            assert stopped.status.state == ServiceState.INACTIVE
            assert stopped.status.restarts == 0 and stopped.version == svc.version  # the same service, re-adopted
            assert (await client.daemon_info())["pid"] not in (first, None)
            assert not pid_alive(svc.status.pid)
            await client.delete(svc.uuid)

    asyncio.run(main())
