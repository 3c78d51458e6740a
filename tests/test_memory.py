"""The size of a loaded server (``daemon/memory.py``): real processes that allocate known amounts.

A child allocates and touches N MiB (so the pages are resident, not just reserved), and reports
it is ready on its stdout; the tests measure it the ways the daemon does (its launch's group by
tag, or a pid and its descendants, or a cgroup leaf's memory.peak) and kill it in its own session.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.groups import CgroupGroup, Forked, TagGroup
from daemon.memory import Sizes, cgroup_peak, launch_size, pss
from daemon.testing import server_script

MiB = 1024 * 1024

# Allocates and touches $1 MiB, then (if $2 > 0) starts a grandchild that does the same with $2 MiB.
HOG = r"""
import os, subprocess, sys, time
size, child = int(sys.argv[1]), int(sys.argv[2])
block = bytearray(size * 1024 * 1024)
for i in range(0, len(block), 4096):
    block[i] = 1
if child:
    sub = subprocess.Popen([sys.executable, "-c", sys.argv[3], str(child), "0", sys.argv[3]], stdout=subprocess.PIPE)
    sub.stdout.readline()
print("ready", flush=True)
time.sleep(600)
"""


@pytest.fixture
def hog(tmp_path: Path) -> Iterator[object]:
    """Start a tagged process that holds ``size`` MiB (and a grandchild holding ``child`` MiB)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(size: int, child: int = 0, launch: str = "L1") -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "MODELD_HOME": str(tmp_path),
            "MODELD_SERVICE_UUID": "u-hog",
            "MODELD_PROCESS": json.dumps({"launch": launch}),  # as the daemon tags a launch (store.LaunchInfo)
        }
        proc = subprocess.Popen(
            [sys.executable, "-c", HOG, str(size), str(child), HOG], stdout=subprocess.PIPE, env=env, start_new_session=True
        )
        started.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        return proc

    yield start
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def test_pss_of_a_process_that_touched_50_mib(hog):
    proc = hog(50)
    assert 50 * MiB <= pss(proc.pid) < 50 * MiB + 40 * MiB  # plus the interpreter itself


def test_a_pid_and_its_descendants_include_the_grandchilds_memory(hog):
    proc = hog(50, child=30)
    size = launch_size(None, proc.pid)
    assert size >= 80 * MiB, size


def test_a_tag_group_includes_the_grandchild(hog, tmp_path):
    proc = hog(40, child=20, launch="L7")
    group = TagGroup("u-hog", "L7", str(tmp_path), Forked(tmp_path))
    assert proc.pid in {ident.pid for ident in group.members()}
    assert len(group.members()) == 2
    assert launch_size(group, proc.pid) >= 60 * MiB
    assert launch_size(TagGroup("u-hog", "other", str(tmp_path), Forked(tmp_path)), None) == 0  # another launch's


def test_a_vanished_process_counts_zero_and_never_raises(hog):
    proc = hog(10)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert pss(proc.pid) == 0
    assert launch_size(None, proc.pid) == 0
    assert pss(2**22 + 12345) == 0  # a pid that never was


def test_a_cgroup_leaf_is_read_from_memory_peak(tmp_path):
    """The cgroup route, on a leaf laid out as the kernel lays it out (this host's may have no memory controller)."""
    leaf = tmp_path / "leaf"
    leaf.mkdir()
    (leaf / "cgroup.procs").write_text("")
    (leaf / "memory.peak").write_text("73400320\n")
    (leaf / "memory.current").write_text("1000\n")
    group = CgroupGroup("u", "L1", leaf, "/leaf")
    assert cgroup_peak(leaf) == launch_size(group, None) == 70 * MiB
    (leaf / "memory.peak").unlink()  # a kernel before 5.19: memory.current, the highest of it kept by Sizes
    assert launch_size(group, None) == 1000
    (leaf / "memory.current").unlink()  # no memory controller in this tree: PSS of the members (none here)
    assert cgroup_peak(leaf) is None and launch_size(group, None) == 0
    assert cgroup_peak(tmp_path / "removed") is None


def test_sizes_keep_the_highest_and_measure_at_most_once_a_second(hog):
    proc = hog(30)
    sizes = Sizes()

    async def scenario() -> list[int]:
        first = await sizes.measure("u1", None, proc.pid, now=100.0)
        sizes.note("u1", 10 * first)  # an earlier peak, higher than now
        again = await sizes.measure("u1", None, proc.pid, now=100.5)  # within a second: no look
        later = await sizes.measure("u1", None, proc.pid, now=101.5)
        sizes.forget("u1")
        forced = await sizes.measure("u1", None, proc.pid, now=101.6, force=True)  # the last look before an unload
        assert forced == first or abs(forced - first) < 5 * MiB
        sizes.note("u1", 10 * first)
        return [first, again, later]

    first, again, later = asyncio.run(scenario())
    assert first >= 30 * MiB
    assert again == later == 10 * first  # the highest seen stays
    assert sizes.size("never") == 0
    sizes.forget("u1")
    assert sizes.size("u1") == 0


def test_one_measurement_is_cheap(hog):
    """A look reads the launch's own processes, not the whole of /proc: bounded in this process's CPU
    time (wall time would measure the machine's load; the speed itself is a benchmark's)."""
    proc = hog(100, child=20)
    began = time.process_time()
    for _ in range(20):
        launch_size(None, proc.pid)
    per_look = (time.process_time() - began) / 20
    print(f"one look (pid + descendants, 2 processes, 120 MiB): {per_look * 1000:.2f} ms of CPU")
    assert per_look < 0.05


# ------------------------------------------------------------------ a real server of the daemon's units

# A command server that touches 50 MiB and starts a helper, in a session of its own, that touches 30 MiB
# (argv: port). Everything it starts is its launch's: the helper's memory is the service's.
HOGGING_SERVER = server_script(
    "PORT, BODY = int(sys.argv[1]), b''\n"
    "block = bytearray(50 * 1024 * 1024)\n"
    "for i in range(0, len(block), 4096): block[i] = 1\n"
    "helper = 'b = bytearray(30 * 1024 * 1024)\\nfor i in range(0, len(b), 4096): b[i] = 1\\nimport time; time.sleep(600)'\n"
    "subprocess.Popen([sys.executable, '-c', helper], start_new_session=True)\n"
)


def test_a_service_of_the_daemon_is_measured_with_its_helper(units, tmp_path):
    """What the idle checker will do each second: ``Sizes.measure_service`` of a live on-demand service,
    then admission's view of it (``loaded_services``), which ``GET /v1/daemon``'s on_demand shows."""
    from daemon.admission import Loading, loaded_services, loading_of
    from daemon.launch import Launcher
    from daemon.models import DesiredState, LocalModelService, ServiceConfig
    from daemon.service import ServiceRuntime
    from daemon.testing import wait_for

    (tmp_path / "s.py").write_text(HOGGING_SERVER)
    config = ServiceConfig(model_type="command", model_name="hog", command=[sys.executable, "s.py", "{port}"],
                           working_dir=str(tmp_path), health_path="/", idle_timeout=60)
    svc = LocalModelService(config=config)
    svc.service_path = str(units.paths.service_dir(svc.uuid))
    svc.endpoint = Launcher.endpoint(config, config.port)
    m = ServiceRuntime(svc)
    units.services[m.uuid] = m
    units.launcher.ensure_port(m, config)

    async def go() -> None:
        async with m.lock:
            await units.startstop.start(m, 60, failing_state=DesiredState.STOPPED, op="deploy")
        sizes = Sizes()
        assert m.proc is not None and m.proc.group is not None
        # The helper may still be touching its pages: wait until its 30 MiB are there.
        await asyncio.to_thread(wait_for, lambda: launch_size(m.proc.group, m.proc.pid) >= 80 * MiB, 20)
        size = await sizes.measure_service(m)
        assert size >= 80 * MiB, size
        assert loading_of(m, sizes) == Loading(str(m.uuid), "hog", size)  # what a wake would ask room for
        (entry,) = loaded_services(units.services.values(), sizes)
        assert (entry.uuid, entry.model_name, entry.size, entry.busy) == (str(m.uuid), "hog", size, "")
        assert entry.last_use == m.svc.status.started_at
        units.services[m.uuid].svc.config = config.model_copy(update={"idle_timeout": None})
        assert loaded_services(units.services.values(), sizes) == []  # not on demand: never counted
        async with m.lock:
            await units.startstop.stop(m, 10, force=True)
        assert await sizes.measure_service(m) == size  # gone: the size known stays
        assert loaded_services(units.services.values(), sizes) == []

    asyncio.run(go())
