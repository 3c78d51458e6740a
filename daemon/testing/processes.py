"""The processes of a home, found independently of the daemon's own scan: every one whose
environment names the home, the model servers (tagged, forked by the fork server, or in the
home's cgroups) with their leaders and launches, and the helpers a HELPER_SERVER recorded."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import psutil

from daemon.linux import start_ticks
from daemon.runtime._serve import forkserver
from daemon.testing.cgroups import cgroup_members
from daemon.testing.identities import read_pid, ticks_alive

HELPERS = "helpers.log"  # in the models folder (the command servers' working directory)


def processes_of(home: Path) -> list[psutil.Process]:
    """Every live process whose environment names this home (daemon, servers and their children)."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.pid != os.getpid() and proc.environ().get("MODELD_HOME") == str(home):
                found.append(proc)
    return found


@dataclass(frozen=True)
class ServerProcess:
    """A live process of a model server of one home: tagged as such in its environment (or in the
    record its fork server wrote), or found in one of the home's cgroups. ``uuid`` and ``launch``
    are what its cgroup says when it is in one (the kernel's word), else what its tag says."""

    pid: int
    pgid: int
    ppid: int
    uuid: str
    ticks: int  # its start time in clock ticks: with the pid, what names this very process
    launch: str | None = None
    tagged: bool = True
    in_cgroup: bool = False

    @property
    def key(self) -> tuple[str, str | None]:
        return self.uuid, self.launch


def forked_tags(home: Path, pid: int) -> dict[str, str]:
    """The tags a fork server recorded for a server it forked (whose own environ is the fork
    server's), if the record is about this very process (same start ticks)."""
    try:
        ticks, tags = forkserver.read_record(forkserver.record_path(home / "run", pid))
    except (OSError, ValueError):
        return {}
    if ticks != start_ticks(pid):
        return {}
    return dict(item.decode().partition("=")[::2] for item in tags if item)


def tag_field(info: str | None, key: str) -> str | None:
    """A field of a MODELD_PROCESS tag: ``launch``, or ``role`` (``logd`` for the log writer)."""
    try:
        value = json.loads(info or "").get(key)
    except (ValueError, AttributeError):
        return None
    return str(value) if value else None


def daemon_side(home: Path, pid: int, env: dict[str, str]) -> bool:
    """The daemon (which steps into a launch's cgroup for the instant of a spawn), its fork server,
    its log writer or its gateway: never a server, wherever it is."""
    if any(i.pid == pid for i in read_pid(home / "daemon.pid")) or tag_field(env.get("MODELD_PROCESS"), "role") in (
        "logd",
        "gateway",
    ):
        return True
    with contextlib.suppress(psutil.Error):
        return "--fork-server" in psutil.Process(pid).cmdline()
    return False


def server_processes(home: Path) -> list[ServerProcess]:
    """Every live process of ``home``'s model servers: carrying ``MODELD_HOME=home`` and a
    ``MODELD_SERVICE_UUID`` in its environment (or in the record a fork server wrote for it), or in
    one of the home's cgroups (then whatever its environment). Read here with psutil and the
    cgroup files, independently of the daemon's own scan."""
    members = cgroup_members(home)
    found = []
    for proc in psutil.process_iter():
        try:
            where = members.get(proc.pid)
            if proc.pid == os.getpid() or (where is None and proc.uids().real != os.getuid()):
                continue
            ticks = start_ticks(proc.pid)
            if ticks is None or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            env = proc.environ()
            if not env.get("MODELD_SERVICE_UUID"):
                env = forked_tags(home, proc.pid) or env
            tagged = env.get("MODELD_HOME") == str(home) and bool(env.get("MODELD_SERVICE_UUID"))
            if (where is not None and not tagged and daemon_side(home, proc.pid, env)) or (where is None and not tagged):
                continue
            uuid, launch = (
                where if where is not None else (env["MODELD_SERVICE_UUID"], tag_field(env.get("MODELD_PROCESS"), "launch"))
            )
            if start_ticks(proc.pid) != ticks:  # the pid was reused while it was read
                continue
            found.append(
                ServerProcess(
                    proc.pid, os.getpgid(proc.pid), proc.ppid(), uuid, ticks, launch, tagged=tagged, in_cgroup=where is not None
                )
            )
        except (psutil.Error, ProcessLookupError):
            continue
    return found


def server_leaders(procs: list[ServerProcess]) -> dict[str, list[int]]:
    """The servers themselves (group leaders), by service uuid, without their workers and helpers
    (a process whose parent is a process of the same service)."""
    by_pid = {p.pid: p for p in procs}
    leaders: dict[str, list[int]] = {}
    for p in procs:
        parent = by_pid.get(p.ppid)
        if p.pid == p.pgid and not (parent is not None and parent.uuid == p.uuid):
            leaders.setdefault(p.uuid, []).append(p.pid)
    return leaders


def launches(procs: list[ServerProcess]) -> dict[str, dict[str | None, list[ServerProcess]]]:
    """The live launches, by service uuid: launch -> its processes."""
    found: dict[str, dict[str | None, list[ServerProcess]]] = {}
    for p in procs:
        found.setdefault(p.uuid, {}).setdefault(p.launch, []).append(p)
    return found


@dataclass(frozen=True)
class Helper:
    """A helper a HELPER_SERVER started, as it recorded itself in ``models/helpers.log``."""

    pid: int
    ticks: int
    uuid: str
    launch: str
    kind: str  # "tagged" or "envless"

    def alive(self) -> bool:
        return ticks_alive(self.pid, self.ticks)


def helpers(home: Path) -> list[Helper]:
    """Every helper recorded in ``home``'s models folder (alive or not)."""
    try:
        text = (home / "models" / HELPERS).read_text()
    except OSError:
        return []
    found = []
    for line in text.splitlines(keepends=True):
        parts = line.split()
        if line.endswith("\n") and len(parts) == 5:
            with contextlib.suppress(ValueError):
                found.append(Helper(int(parts[0]), int(parts[1]), *parts[2:]))
    return found
