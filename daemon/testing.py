"""The test harness: what tests/ and scripts/{bench,chaos,fuzz}.py share to start, watch, check and
clean up real daemons and servers in temp homes. Not used by the daemon itself.

It holds: ``wait_for`` (poll with a deadline; never a fixed sleep), the pid files read with the
store's own parser, the processes of a home (tagged, forked or in its cgroups), the reaper, the
daemon process handle, the home's invariants (``snapshot``/``check``/``wait_settled``), one
Unix-socket HTTP connection, and the tiny HTTP server scripts the tests deploy.

Invariants:

- A process is signalled only by pid checked against its start ticks (through a pidfd, so the pid
  cannot be reused in between: ``kill_verified``), or by the process group a checked leader leads,
  or through the home's own cgroups: never by name, never by psutil's float create time.
- ``reap_home`` leaves nothing of a home running and removes its cgroups, whatever state the test
  left; it may run any number of times.
- Nothing here imports from scripts/ or tests/; both import this (it is in the installed package).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

from daemon.client import DaemonClient
from daemon.client.transport import UnixConnection
from daemon.exceptions import DaemonError
from daemon.linux import ProcessIdentity, boot_id, cgroup2_mount, signal_verified, start_ticks
from daemon.models import BaseService, DesiredState, ServiceState
from daemon.paths import Paths
from daemon.runtime._serve import forkserver
from daemon.store import PidRecord

REPO = Path(__file__).resolve().parent.parent
IRIS = str(REPO / "examples" / "iris.py") + ":model"
CONVERGE_TIMEOUT = 15.0
HELPERS = "helpers.log"  # in the models folder (the command servers' working directory)
LOG_SLACK = 64 * 1024  # a log file may pass log_max_bytes by one chunk of the log writer
T = TypeVar("T")


class WaitTimeout(AssertionError, TimeoutError):
    """``wait_for`` ran out of time: a failed assertion in a test, a TimeoutError in a script."""


def wait_for(condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.01, what: str = "condition") -> T:
    """Poll ``condition`` until it returns something truthy (returned); WaitTimeout after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# ------------------------------------------------------------------ identities


def read_pid(path: Path) -> list[ProcessIdentity]:
    """The processes a pid file names (``daemon.pid``, or ``service.pid`` with a hand-over's previous
    server), read with the store's parser; [] if it is missing or unreadable."""
    try:
        main, prev = PidRecord.loads(path.read_text()).split_previous()
    except (OSError, ValueError, IndexError):
        return []
    return [main.ident] + ([prev.ident] if prev else [])


def recorded(home: Path) -> set[ProcessIdentity]:
    """Every process ``home``'s pid files name (alive or not)."""
    return {i for f in [home / "daemon.pid", *home.glob("services/*/service.pid")] for i in read_pid(f)}


def ticks_alive(pid: int, ticks: int) -> bool:
    """``pid`` is alive (not a zombie) and started at ``ticks``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] not in (b"Z", b"X") and int(fields[19]) == ticks


def pid_alive(pid: int) -> bool:
    ticks = start_ticks(pid)
    return ticks is not None and ticks_alive(pid, ticks)


def kill_verified(pid: int, ticks: int, sig: int = signal.SIGKILL) -> bool:
    """Send ``sig`` to ``pid`` if it is still the process that started at ``ticks`` (through a pidfd)."""
    fd = signal_verified(ProcessIdentity(pid, ticks, boot_id()), sig)
    if fd is not None:
        os.close(fd)
    return fd is not None


# --------------------------------------------------------- processes of a home


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


def home_cgroups(home: Path) -> list[Path]:
    """The cgroup folders of ``home``'s services that exist: ``modeld-<sha256(home)[:16]>`` under the
    base a daemon run from here uses (the cgroup2 mount as root, else ``MODELD_CGROUP`` or this
    process's own cgroup). Both the home as given and its real path are tried."""
    mount = cgroup2_mount()
    setting = os.environ.get("MODELD_CGROUP", "").strip()
    if mount is None or setting.lower() in ("off", "tag", "0", "no"):
        return []
    if setting:
        base = setting[len(mount) :] if setting.startswith(mount) else setting
    elif os.geteuid() == 0:
        base = "/"
    else:
        base = next(
            (line[3:].strip() for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::")), "/"
        )
    found = []
    for name in dict.fromkeys((str(Paths(home).home), os.path.realpath(home))):
        path = Path(mount) / base.lstrip("/") / f"modeld-{hashlib.sha256(os.fsencode(name)).hexdigest()[:16]}"
        if path.is_dir():
            found.append(path)
    return found


def _cgroup_tree(parent: Path) -> list[Path]:
    folders = [parent]
    for folder in folders:
        with contextlib.suppress(OSError):
            folders.extend(entry for entry in folder.iterdir() if entry.is_dir())
    return folders


def cgroup_members(home: Path) -> dict[int, tuple[str, str | None]]:
    """Every process in one of ``home``'s cgroups: pid -> (service uuid, launch) as the cgroup's path
    says (``<uuid>/<launch>``; a process higher up has no launch, or no uuid: "")."""
    members: dict[int, tuple[str, str | None]] = {}
    for parent in home_cgroups(home):
        for folder in _cgroup_tree(parent):
            parts = folder.relative_to(parent).parts
            try:
                pids = [int(line) for line in (folder / "cgroup.procs").read_text().split()]
            except (OSError, ValueError):
                continue
            for pid in pids:
                members[pid] = (parts[0] if parts else "", parts[1] if len(parts) > 1 else None)
    return members


def daemon_side(home: Path, pid: int, env: dict[str, str]) -> bool:
    """The daemon (which steps into a launch's cgroup for the instant of a spawn), its fork server
    or its log writer: never a server, wherever it is."""
    if any(i.pid == pid for i in read_pid(home / "daemon.pid")) or tag_field(env.get("MODELD_PROCESS"), "role") == "logd":
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


# ------------------------------------------------------------------ the reaper


def remove_cgroups(home: Path) -> None:
    """Kill what is left in ``home``'s cgroups and remove them, deepest first."""
    for parent in home_cgroups(home):
        for folder in reversed(_cgroup_tree(parent)):
            with contextlib.suppress(OSError):
                (folder / "cgroup.kill").write_text("1")
            with contextlib.suppress(AssertionError, OSError):
                wait_for(lambda: "populated 0" in (folder / "cgroup.events").read_text(), 5, what=f"{folder} to empty")  # noqa: B023 (called in this iteration only)
            with contextlib.suppress(OSError):
                folder.rmdir()


def reap(idents: set[ProcessIdentity]) -> int:
    """Kill each process group a live one of ``idents`` leads, then the process itself by pidfd,
    and wait until they are dead. How many were alive."""
    alive = [i for i in idents if i.is_alive()]
    for ident in alive:
        if ident.is_alive():  # a group is signalled only while its checked leader lives
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(ident.pid, signal.SIGKILL)
        kill_verified(ident.pid, ident.start_ticks)
    for ident in alive:
        # Dead is enough: a zombie whose parent is init may wait a while to be reaped here.
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not ticks_alive(ident.pid, ident.start_ticks), 5, interval=0.005, what=f"pid {ident.pid} to die")  # noqa: B023 (called in this iteration only)
    return len(alive)


def reap_home(home: Path, also: set[ProcessIdentity] | None = None) -> int:
    """Kill the daemon and every server, helper and log writer of ``home`` (and ``also``), found by
    pid file, tag, fork-server record and cgroup (see ``reap``); then remove the home's cgroups.
    How many processes were alive."""
    idents = set(also or ()) | recorded(home)
    idents |= {ProcessIdentity(p.pid, p.ticks, boot_id()) for p in server_processes(home)}
    idents |= {ProcessIdentity(h.pid, h.ticks, boot_id()) for h in helpers(home)}
    idents |= {i for i in (ProcessIdentity.of(p.pid) for p in processes_of(home)) if i is not None}
    killed = reap(idents)
    remove_cgroups(home)
    return killed


# ------------------------------------------------------------------ the daemon


class DaemonProcess:
    """The daemon of one home, started in its own session; its identity comes from GET /v1/daemon."""

    def __init__(self, home: Path):
        self.home = home
        self.paths = Paths(home)
        self.popen: subprocess.Popen[bytes] | None = None
        self.ident: ProcessIdentity | None = None
        self.die_at: str | None = None
        self.started_at = 0.0
        self.containment: str | None = None  # as GET /v1/daemon says: "cgroup" or "tag"

    def env(self, die_at: str | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELD_") or k == "MODELD_CGROUP"}
        env.update(MODELD_HOME=str(self.home), PYTHONPATH=str(REPO))
        if die_at:
            env["MODELD_DIE_AT"] = die_at
        return env

    def start(self, die_at: str | None = None) -> bool:
        """Start it and wait until it answers (its rebuild is done); False if it died first."""
        self.die_at = die_at
        self.started_at = time.monotonic()
        with open(self.paths.daemon_log, "ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "daemon", "--home", str(self.home)],
                env=self.env(die_at),
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self.wait_answering()

    def adopt_autostarted(self) -> bool:
        """A daemon some client auto-started: track it through what it answers."""
        self.popen, self.die_at = None, None
        self.started_at = time.monotonic()
        return self.wait_answering()

    def wait_answering(self, timeout: float = 30) -> bool:
        with DaemonClient(self.home, auto_start=False, timeout=timeout) as client:

            def answered() -> dict[str, Any] | bool | None:
                if self.popen is not None and self.popen.poll() is not None:
                    return True  # died first
                with contextlib.suppress(DaemonError):
                    return client.daemon_info()
                return None

            info = wait_for(answered, timeout, interval=0.005, what=f"the daemon of {self.home} to answer")
        if info is True:
            return False
        self.ident = ProcessIdentity.of(int(info["pid"]))  # type: ignore[index]
        self.containment = info.get("containment")  # type: ignore[union-attr]
        return self.ident is not None

    def alive(self) -> bool:
        if self.popen is not None and self.popen.poll() is not None:
            return False
        return self.ident is not None and self.ident.is_alive()

    def gone_after_error(self, grace: float = 1.0) -> bool:
        """After a failed call: did the daemon die? A dying process closes its sockets before
        /proc shows it dead, so give it a moment."""
        with contextlib.suppress(AssertionError):
            return wait_for(lambda: not self.alive(), grace, interval=0.005)
        return False

    def signal(self, sig: int) -> None:
        if self.ident is not None:
            kill_verified(self.ident.pid, self.ident.start_ticks, sig)

    def wait_dead(self, timeout: float = 15) -> None:
        wait_for(lambda: not self.alive(), timeout, interval=0.005, what=f"daemon {self.ident} to die")
        if self.popen is not None:
            self.popen.wait()

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait_dead()

    def died_at_kill_point(self, offset: int) -> str | None:
        """The kill point named in daemon.log after ``offset``, if the daemon died at one."""
        try:
            with open(self.paths.daemon_log, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return None
        for line in text.splitlines():
            if "kill point " in line and " reached" in line:
                return line.split("kill point ", 1)[1].split()[0]
        return None

    def log_size(self) -> int:
        try:
            return self.paths.daemon_log.stat().st_size
        except FileNotFoundError:
            return 0


# ------------------------------------------------------------- the invariants


def answer_tag(svc: BaseService, timeout: float = 2.0) -> str | None:
    """What the server answers: its tag (command servers: GET /, built-in: one prediction)."""
    conn = http.client.HTTPConnection(svc.endpoint.host, svc.endpoint.port, timeout=timeout)
    try:
        if svc.config.model_type == "command":
            conn.request("GET", "/")
            response = conn.getresponse()
            body = response.read().decode()
        else:
            conn.request(
                "POST",
                f"/v1/models/{svc.config.model_name}:predict",
                body=b'{"instances": [1]}',
                headers={"content-type": "application/json"},
            )
            response = conn.getresponse()
            body = json.loads(response.read())["predictions"][0] if response.status == 200 else ""
        return body if response.status == 200 else None
    except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError, TypeError):
        return None
    finally:
        conn.close()


def config_tag(svc: BaseService) -> str:
    """The tag the service's config says its server answers with (a command's last argument, or
    the built-in model's file name)."""
    if svc.config.model_type == "command":
        return svc.config.command[-1]
    return Path(svc.config.model_uri.rsplit(":", 1)[0]).stem


@dataclass
class Snapshot:
    """The daemon's services beside the server processes found of its home, at one moment."""

    services: dict[str, BaseService]
    procs: list[ServerProcess]
    helpers: list[Helper] = field(default_factory=list)  # as recorded before ``procs`` were read
    containment: str | None = None  # "cgroup" or "tag", as the daemon said

    @property
    def leaders(self) -> dict[str, list[int]]:
        return server_leaders(self.procs)

    @property
    def launches(self) -> dict[str, dict[str | None, list[ServerProcess]]]:
        return launches(self.procs)

    def tracked(self) -> dict[str, str | None]:
        """Each service's tracked launch: the launch of the live process its ``status.pid`` names
        (services whose pid names none of their processes are left out)."""
        by_pid = {p.pid: p for p in self.procs}
        tracked = {}
        for uuid, svc in self.services.items():
            p = by_pid.get(svc.status.pid) if svc.status.pid else None
            if p is not None and p.uuid == uuid:
                tracked[uuid] = p.launch
        return tracked

    def settled(self) -> bool:
        """Every service is what its desired state says: one that should run is active with exactly
        its tracked launch alive; any other has no process; no process belongs to no service.
        (``wait_settled`` also wants the active ones to answer.)"""
        by_service = self.launches
        if set(by_service) - set(self.services):
            return False
        tracked = self.tracked()
        for uuid, svc in self.services.items():
            mine = list(by_service.get(uuid, {}))
            if svc.status.state == ServiceState.ERROR:
                if mine:
                    return False
            elif svc.desired_state == DesiredState.RUNNING:
                if svc.status.state != ServiceState.ACTIVE or uuid not in tracked or mine != [tracked[uuid]]:
                    return False
            elif svc.status.state != ServiceState.INACTIVE or mine:
                return False
        return True

    def answering(self) -> bool:
        return all(answer_tag(svc) is not None for svc in self.services.values() if svc.status.state == ServiceState.ACTIVE)

    def escaped_envless(self) -> list[Helper]:
        """Live envless helpers of a launch that ended, which tag containment cannot find (its
        documented limit; a cgroup finds them: there they count as untracked)."""
        if self.containment == "cgroup":
            return []
        seen, tracked = {p.pid for p in self.procs}, self.tracked()
        return [
            h
            for h in self.helpers
            if h.kind == "envless" and h.pid not in seen and tracked.get(h.uuid, "") != h.launch and h.alive()
        ]


def snapshot(client: DaemonClient, home: Path, containment: str | None = None) -> Snapshot:
    recorded = helpers(home)  # before the scan: a helper recorded and alive after it was alive during it
    return Snapshot({str(s.uuid): s for s in client.find()}, server_processes(home), recorded, containment)


def wait_settled(client: DaemonClient, home: Path, timeout: float = CONVERGE_TIMEOUT) -> tuple[Snapshot, bool]:
    """Poll until the home is settled and every active server answers: (the last snapshot, whether it was)."""
    containment = client.daemon_info().get("containment")
    last: list[Snapshot] = []

    def settled() -> bool:
        last[:] = [snapshot(client, home, containment)]
        return last[0].settled() and last[0].answering()

    with contextlib.suppress(WaitTimeout):
        wait_for(settled, timeout)
        return last[0], True
    return last[0], False


def check(snap: Snapshot) -> dict[str, set[Any]]:
    """Untracked servers, duplicates, stale states and version mismatches in one snapshot, each as
    a set of what is wrong (launches, helpers, or services at a version), so one fault seen by
    several checks counts once."""
    found: dict[str, set[Any]] = {key: set() for key in ("untracked_servers", "duplicates", "stale_states", "version_mismatches")}

    def fault(procs: list[ServerProcess]) -> set[Any]:
        launch = procs[0].launch
        if launch is not None:
            return {(procs[0].uuid, launch)}
        return {(p.uuid, None, p.pid, p.ticks) for p in procs}

    tracked = snap.tracked()
    for uuid, by_launch in snap.launches.items():
        svc = snap.services.get(uuid)
        if svc is None:
            for procs in by_launch.values():
                found["untracked_servers"] |= fault(procs)
        elif len(by_launch) > 1:
            for launch, procs in by_launch.items():
                if uuid not in tracked or launch != tracked[uuid]:
                    found["duplicates"] |= fault(procs)
        elif uuid not in tracked or tracked[uuid] not in by_launch:
            for procs in by_launch.values():
                found["untracked_servers"] |= fault(procs)
    seen = {p.pid for p in snap.procs}
    for h in snap.helpers:
        # A live helper that containment cannot see (in tag mode an envless one may be out of
        # sight; once its launch ended, that is tag mode's limit: see Snapshot.escaped_envless).
        if h.pid in seen or (h.kind == "envless" and snap.containment != "cgroup") or not h.alive():
            continue
        found["untracked_servers"].add(("helper", h.pid, h.ticks))
    for svc in snap.services.values():
        if svc.status.state != ServiceState.ACTIVE:
            continue
        tag = answer_tag(svc)
        if tag is None:
            found["stale_states"].add((str(svc.uuid), svc.status.pid, svc.status.updated_at))
        elif tag != config_tag(svc):
            found["version_mismatches"].add((str(svc.uuid), svc.status.pid, svc.version))
    return found


def log_faults(home: Path, services: dict[str, BaseService]) -> set[Any]:
    """Log files over their cap: in each service's folder, a ``service.log*`` file other than
    ``service.log`` and ``.1`` … ``.N`` (N = its ``log_backups``), or one larger than its
    ``log_max_bytes`` + 64 KiB; each as (uuid, file name, inode, size), so one file counts once."""
    faults: set[Any] = set()
    for uuid, svc in services.items():
        allowed = {"service.log", *(f"service.log.{i}" for i in range(1, svc.config.log_backups + 1))}
        cap = svc.config.log_max_bytes + LOG_SLACK
        try:
            entries = list(os.scandir(home / "services" / uuid))
        except OSError:
            continue
        for entry in entries:
            if not entry.name.startswith("service.log"):
                continue
            with contextlib.suppress(OSError):
                stat = entry.stat()
                if entry.name not in allowed or stat.st_size > cap:
                    faults.add((uuid, entry.name, stat.st_ino, stat.st_size))
    return faults


def describe(snap: Snapshot) -> str:
    services = {
        u[:8]: (s.status.state.value, s.desired_state.value, s.status.pid, (s.config.command or [s.config.model_uri])[-1])
        for u, s in snap.services.items()
    }
    tracked = {u[:8]: launch for u, launch in snap.tracked().items()}
    found = {
        u[:8]: {launch: sorted(p.pid for p in procs) for launch, procs in by_launch.items()}
        for u, by_launch in snap.launches.items()
    }
    alive = [(h.pid, h.uuid[:8], h.launch, h.kind) for h in snap.helpers if h.alive()]
    return f"services={services} tracked={tracked} launches={found} helpers_alive={alive} containment={snap.containment}"


# ------------------------------------------------------------------- the wire


def free_port() -> int:
    """A TCP port of 127.0.0.1 free at this instant."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class UnixHTTP(UnixConnection):
    """A keep-alive HTTP connection over a Unix socket: the client's own, plus ``get`` (a 200's body)
    and ``exchange`` (raw bytes out, one answer read back by content-length, for the fuzzer)."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 30.0):
        super().__init__(os.fspath(path), timeout)

    def get(self, url: str) -> bytes:
        self.request("GET", url)
        response = self.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {url}: {response.status} {body[:200]!r}")
        return body

    def exchange(self, raw: bytes, half_close: bool = False) -> tuple[int, dict[str, str], bytes] | None:
        """Send ``raw``, read one answer: (status, lower-case headers, body); None if the peer
        closed the connection without one."""
        if self.sock is None:
            self.connect()
        sock = self.sock
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(raw)  # else it answered and closed before reading everything (a refused huge body)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        response = http.client.HTTPResponse(sock, method="GET")  # read the body by content-length, whatever was sent
        try:
            response.begin()
            body = response.read()
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected, http.client.IncompleteRead):
            self.close()
            return None
        headers = {k.lower(): v for k, v in response.getheaders()}
        if response.will_close or half_close:
            self.close()
        return response.status, headers, body


# ---------------------------------------------------------- the tiny servers

# Every command server the tests and scripts deploy: http.server answering 200 with BODY on every
# GET. argv[1] is the port; each script's own setup says what else it reads.
_HANDLER = """
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
    def log_message(self, *args):
        pass
class Server(http.server.HTTPServer):
    address_family = socket.AF_INET6 if ":" in HOST else socket.AF_INET
server = Server((HOST, PORT), Handler)
"""
_SERVE = "server.serve_forever()\n"
# The leader forks the worker that serves (so a kill -9 of the leader alone leaves a worker
# holding the port, as gunicorn or mlflow would) and exits as it does.
_FORKED = """worker = os.fork()
if worker == 0:
    server.serve_forever()
else:
    _, status = os.waitpid(worker, 0)
    sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


def server_script(setup: str, forked: bool = False) -> str:
    """A tiny server's source: imports, ``setup`` (which sets PORT and BODY, and HOST if not
    127.0.0.1), the handler, then serve (from a forked worker if ``forked``)."""
    return _server(setup, _FORKED if forked else _SERVE)


def _server(setup: str, main: str = _SERVE) -> str:
    return "import http.server, json, os, socket, subprocess, sys\nHOST = '127.0.0.1'\n" + setup + _HANDLER + main


# argv: {port} {tag}; answers its tag, from a forked worker.
TINY_SERVER = _server("PORT, BODY = int(sys.argv[1]), sys.argv[2].encode()\n", _FORKED)
# TINY_SERVER whose leader first starts a helper in a session of its own (with --envless, with an
# empty environment); argv: {port} {record file} [--envless] {tag}. The helper records itself
# (pid, start ticks, service, launch, kind) in the record file, then becomes a long sleep: no
# record is missing for a helper that runs, whenever its server dies.
HELPER_SERVER = _server(
    """PORT, record, BODY = int(sys.argv[1]), os.path.abspath(sys.argv[2]), sys.argv[-1].encode()
envless = "--envless" in sys.argv
launch = json.loads(os.environ.get("MODELD_PROCESS") or "{}").get("launch") or "-"
script = ('read -r f1 f2 f3 f4 f5 f6 f7 f8 f9 f10 f11 f12 f13 f14 f15 f16 f17 f18 f19 f20 f21 ticks rest < /proc/$$/stat; '
          'echo "$$ $ticks $1 $2 $3" >> "$4"; exec /bin/sleep 100000')
subprocess.Popen(["/bin/sh", "-c", script, "helper", os.environ.get("MODELD_SERVICE_UUID") or "-", launch,
                  "envless" if envless else "tagged", record],
                 start_new_session=True, env={} if envless else None, stdin=subprocess.DEVNULL)
""",
    _FORKED,
)
# argv: {port} ... {tag}; a child (forked before the port is bound, so it never serves) writes the
# log as fast as it can: 60 KiB blocks of short lines and, now and then, a line longer than the
# log writer's 64 KiB chunk. Niced, so that it takes the CPU that is idle.
FLOOD_SERVER = _server("""PORT, BODY = int(sys.argv[1]), sys.argv[-1].encode()
if os.fork() == 0:
    os.nice(10)
    block = b"".join(b"flood %06d %s\\n" % (i, b"." * 72) for i in range(720))
    long_line = b"L" * (100 * 1024) + b"\\n"
    n = 0
    try:
        while True:
            os.write(1, block)
            n += 1
            if n % 64 == 0:
                os.write(1, long_line)
    except OSError:
        os._exit(1)
""")
# argv: {port} {host} [anything]; an empty 200. It prints the size of FZ_BIG and of its last
# argument, so a test can see what exec gave it.
COMMAND_SERVER = _server("""PORT, HOST, BODY = int(sys.argv[1]), sys.argv[2], b""
print("env", len(os.environ.get("FZ_BIG", "")), "arg", len(sys.argv[-1]), flush=True)
""")
# argv: {port} ok|fail; prints API_TOKEN (to see it masked in logs), exits 3 at once with "fail".
TOKEN_SERVER = _server("""PORT, BODY = int(sys.argv[1]), b""
print("starting with token", os.environ.get("API_TOKEN", "-"), flush=True)
if sys.argv[2] == "fail":
    sys.exit(3)
""")
