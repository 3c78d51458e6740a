"""50 clients at once deploying, replacing, stopping, starting and deleting against one daemon.

Each client has its own connection and they are released together. The final state must be what
was asked, whatever the interleaving: every replace counted (no lost update of a service.json),
one service per model however many deploy it at once, one server per service, none untracked,
and the same state on disk as in memory, also after a kill -9 of the daemon.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import uuid as uuidlib
from pathlib import Path

import pytest


from daemon import DaemonClient, ServiceConfig
from daemon import testing as harness
from daemon.testing import pid_alive, wait_for


OWNERS = 30  # each deploys its own service, replaces it, stops and starts it; every third deletes it
SHARED = 10  # each deploys the same uuid with replace: one creates it, the others replace it in turn
SAME_NAME = 5  # each deploys the same model name with replace and no uuid: one service, replaced
TOGGLERS = 5  # each stops then starts one service


def config(folder: Path, name: str, tag: str, kind: str = "command", **extra: object) -> ServiceConfig:
    common: dict[str, object] = dict(pipeline_name="conc", pipeline_step_name="s", model_name=name,
                                     working_dir=str(folder), stop_timeout=5, **extra)
    if kind == "command":
        return ServiceConfig(model_type="command", command=[sys.executable, "tiny.py", "{port}", tag], health_path="/", **common)
    return ServiceConfig(model_type="python", model_uri=f"{tag}.py:model", **common)


@pytest.mark.slow
@pytest.mark.long
def test_fifty_concurrent_clients(home, tmp_path):
    (tmp_path / "tiny.py").write_text(harness.TINY_SERVER)
    for tag in ("a", "b"):
        (tmp_path / f"{tag}.py").write_text(f"def model(instances):\n    return [{tag!r} for _ in instances]\n")
    owners = [str(uuidlib.uuid4()) for _ in range(OWNERS)]
    shared = str(uuidlib.uuid4())
    with DaemonClient(home) as setup:
        toggled = str(setup.deploy(config(tmp_path, "toggled", "a"), timeout=30).uuid)

    barrier = threading.Barrier(OWNERS + SHARED + SAME_NAME + TOGGLERS)
    errors: list[str] = []
    shared_versions: list[int] = []
    same_versions: list[int] = []

    def owner(i: int) -> None:
        uuid = owners[i]
        with DaemonClient(home) as c:
            barrier.wait()
            c.deploy(config(tmp_path, f"own{i}", "a"), uuid=uuid, timeout=60)
            c.deploy(config(tmp_path, f"own{i}", "b"), uuid=uuid, replace=True, timeout=60)
            c.stop(uuid, timeout=30)
            c.start(uuid, timeout=60)
            if i % 3 == 0:
                c.delete(uuid, timeout=30)

    def shared_replacer(i: int) -> None:
        with DaemonClient(home) as c:
            barrier.wait()
            svc = c.deploy(config(tmp_path, "shared", "ab"[i % 2], kind="python", env={"WHO": str(i)}),
                           uuid=shared, replace=True, timeout=60)
            shared_versions.append(svc.version)

    def same_name(i: int) -> None:
        with DaemonClient(home) as c:
            barrier.wait()
            same_versions.append(c.deploy(config(tmp_path, "same", "a", env={"WHO": str(i)}), replace=True, timeout=60).version)

    def toggler(i: int) -> None:
        with DaemonClient(home) as c:
            barrier.wait()
            c.stop(toggled, timeout=30)
            c.start(toggled, timeout=60)

    def guarded(fn, i: int) -> None:
        try:
            fn(i)
        except Exception as exc:  # reported below, with every other client's
            errors.append(f"{fn.__name__}({i}): {type(exc).__name__}: {exc}")

    jobs = [(owner, i) for i in range(OWNERS)] + [(shared_replacer, i) for i in range(SHARED)]
    jobs += [(same_name, i) for i in range(SAME_NAME)] + [(toggler, i) for i in range(TOGGLERS)]
    threads = [threading.Thread(target=guarded, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads)
    assert errors == []

    # Every replace counted: the shared service went through versions 1..10, each seen once.
    assert sorted(shared_versions) == list(range(1, SHARED + 1))
    assert sorted(same_versions) == list(range(1, SAME_NAME + 1))

    def check_state(client: DaemonClient) -> None:
        snap, settled = harness.wait_settled(client, home, timeout=30)
        assert settled, harness.describe(snap)
        assert not any(harness.check(snap).values()), harness.check(snap)
        services = snap.services
        kept = {owners[i] for i in range(OWNERS) if i % 3}
        assert {owners[i] for i in range(OWNERS)} & set(services) == kept
        for uuid in kept:
            svc = services[uuid]
            assert (svc.status.state.value, svc.version, harness.answer_tag(svc)) == ("active", 2, "b")
        assert services[shared].version == SHARED and services[shared].status.state.value == "active"
        assert harness.answer_tag(services[shared]) == harness.config_tag(services[shared])
        same = [s for s in services.values() if s.config.model_name == "same"]
        assert len(same) == 1 and same[0].version == SAME_NAME
        assert services[toggled].status.state.value == "active"
        assert len(services) == len(kept) + 3
        # What is on disk is what the daemon holds: no update was lost between them.
        for uuid, svc in services.items():
            on_disk = json.loads((home / "services" / uuid / "service.json").read_text())
            assert on_disk["version"] == svc.version
            assert on_disk["desired_state"] == svc.desired_state.value
            assert on_disk["config"]["env"] == svc.config.env
            assert on_disk["config"]["command"] == svc.config.command
            assert on_disk["config"]["model_uri"] == svc.config.model_uri

    with DaemonClient(home) as client:
        check_state(client)
        pid = client.daemon_info()["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(pid), 10, what="the daemon to die")
        check_state(client)  # auto-starts the next daemon: the same state, rebuilt from disk
