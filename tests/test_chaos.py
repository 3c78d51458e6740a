"""A short run of scripts/chaos.py: random operations, server kills and daemon kills (some in the
middle of an operation or at an armed kill point) against a real daemon, with every invariant
checked after each step, over every kind of server (built-in, a leader that forks its worker,
servers with a detached helper, with or without an environment, and one that floods its log).
The long run (200 operations) is the script itself.

Also: the checker itself sees what it must (a process of a launch no service tracks, by its tag
or, with cgroups, by its cgroup alone; a helper containment cannot find; a log file over its cap),
so that a run with every bad count at 0 means something."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import DaemonClient, ServiceConfig
from daemon import testing as harness
from daemon.linux import cgroup2_mount, start_ticks
from daemon.testing import REPO, pid_alive, wait_for

SEED = int(os.environ.get("MODELD_CHAOS_SEED", 20261123))  # replay another run with its seed


@pytest.mark.slow
@pytest.mark.long
def test_short_chaos_run_loses_nothing_and_signals_no_stranger(home):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "chaos.py"), "--ops", "40", "--seed", str(SEED),
                           "--home", str(home), "--keep"], capture_output=True, text=True, timeout=900)
    assert proc.stdout, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert proc.returncode == 0, result  # 1 when any of its bad counts is not 0
    assert result["services_lost"] == result["untracked_servers"] == result["strangers_signalled"] == 0, result
    assert result["operations"] == 40
    assert result["daemon_kills"] > 0, result
    assert result["failed_calls"] == 0, result
    # The first deploys go through every kind in turn (how many deploys a run makes depends on the states
    # it meets: a CI run made 4 of its 40 operations deploys, and so met 4 of the 5 kinds).
    kinds = {"python", "command", "helper", "envless", "flood"}
    assert set(result["by_kind"]) <= kinds, result
    assert len(result["by_kind"]) >= min(len(kinds), result["by_operation"].get("deploy", 0)), result
    assert result["helpers_started"] > 0 and result["daemon_kills_with_helpers"] > 0, result


@pytest.fixture(params=["default", "tag"])
def containment(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "tag":
        monkeypatch.setenv("MODELD_CGROUP", "off")
    else:
        monkeypatch.delenv("MODELD_CGROUP", raising=False)
    return str(request.param)


def sleeper(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "1000"], env=env, start_new_session=True)


def test_the_checker_sees_untracked_launches_hidden_helpers_and_logs_over_cap(home: Path, containment: str) -> None:
    models = home / "models"
    models.mkdir()
    (models / "helper.py").write_text(harness.HELPER_SERVER)
    daemon = harness.DaemonProcess(home)
    planted: list[subprocess.Popen[bytes]] = []
    assert daemon.start()
    try:
        with DaemonClient(home, auto_start=False) as client:
            config = ServiceConfig(model_type="command", model_name="m", command=[sys.executable, "helper.py", "{port}", harness.HELPERS, "a"],
                                   health_path="/", working_dir=str(models), stop_timeout=3)
            svc = client.deploy(config, timeout=60)
            uuid = str(svc.uuid)
            snap, settled = harness.wait_settled(client, home)
            assert settled, harness.describe(snap)
            assert not any(harness.check(snap).values()) and not harness.log_faults(home, snap.services)
            cgroup = snap.containment == "cgroup"
            assert snap.containment == ("cgroup" if containment == "default" and os.geteuid() == 0 and cgroup2_mount() else "tag")
            tracked = snap.tracked()[uuid]
            assert tracked and [h.launch for h in snap.helpers] == [tracked]
            assert {p.launch for p in snap.procs} == {tracked}  # the leader, its worker, its helper

            # A process tagged with the service and another launch: a second launch (a duplicate);
            # tagged for a service that does not exist: untracked.
            base = {k: v for k, v in os.environ.items() if not k.startswith("MODELD_")}
            tag = {**base, "MODELD_HOME": str(home), "MODELD_SERVICE_UUID": uuid, "MODELD_PROCESS": json.dumps({"launch": "0dd1aunc"})}
            planted.append(sleeper(tag))
            planted.append(sleeper({**tag, "MODELD_SERVICE_UUID": "5ea1ed00-0000-4000-8000-000000000000"}))
            faults = harness.check(harness.snapshot(client, home, snap.containment))
            assert faults["duplicates"] == {(uuid, "0dd1aunc")}
            assert faults["untracked_servers"] == {("5ea1ed00-0000-4000-8000-000000000000", "0dd1aunc")}

            # A helper that recorded itself and that containment cannot find (no tag, no cgroup):
            # untracked, but an envless one in tag mode (its documented limit) is only "escaped".
            for kind in ("tagged", "envless"):
                hidden = sleeper({})
                planted.append(hidden)
                wait_for(lambda: start_ticks(hidden.pid) is not None, 5, what="the hidden helper")
                with open(home / "models" / harness.HELPERS, "a") as f:
                    f.write(f"{hidden.pid} {start_ticks(hidden.pid)} {uuid} 0ffba5e1 {kind}\n")
                later = harness.snapshot(client, home, snap.containment)
                untracked = harness.check(later)["untracked_servers"]
                if kind == "tagged" or cgroup:
                    assert ("helper", hidden.pid, start_ticks(hidden.pid)) in untracked
                else:
                    assert ("helper", hidden.pid, start_ticks(hidden.pid)) not in untracked
                    assert [h.pid for h in later.escaped_envless()] == [hidden.pid]

            if cgroup:
                # A process with no tag at all, in a cgroup of the home that no launch keeps.
                (parent,) = harness.home_cgroups(home)
                leaf = parent / uuid / "c0ffee00"
                leaf.mkdir()
                stray = sleeper({})
                planted.append(stray)
                (leaf / "cgroup.procs").write_text(str(stray.pid))
                members = {p.pid: p.key for p in harness.server_processes(home)}
                assert members[stray.pid] == (uuid, "c0ffee00")
                assert (uuid, "c0ffee00") in harness.check(harness.snapshot(client, home, "cgroup"))["duplicates"]

            # Log files: a name past log_backups, a file past log_max_bytes + 64 KiB.
            folder = home / "services" / uuid
            (folder / f"service.log.{svc.config.log_backups + 1}").write_bytes(b"x\n")
            with open(folder / "service.log.1", "wb") as f:
                f.truncate(svc.config.log_max_bytes + harness.LOG_SLACK + 1)
            names = {name for _, name, _, _ in harness.log_faults(home, snap.services)}
            assert names == {f"service.log.{svc.config.log_backups + 1}", "service.log.1"}
    finally:
        daemon.kill9()
        for proc in planted:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        helpers = [h for h in harness.helpers(home) if h.alive()]
        harness.reap_home(home)  # every server process, helper and cgroup of the home, by pid or cgroup
        for h in helpers:
            wait_for(lambda: not pid_alive(h.pid), 5, what=f"helper {h.pid} to be killed")
        assert not harness.server_processes(home) and not harness.home_cgroups(home)
