#!/usr/bin/env python3
"""Chaos: random operations, kills and restarts against a real modeld daemon; counts what broke.

    python scripts/chaos.py --ops 200 --seed 1     # one JSON line on stdout; exit 1 if a bad count > 0

Each step is one of: deploy, deploy with replace, stop, start, delete (a quarter of them with a
``kill -9`` of the daemon landing while the call is in flight), ``kill -9`` of a model server or
of its whole process group, ``kill -9``, SIGTERM or restart of the daemon. A daemon is sometimes
started with a kill point armed (``MODELD_DIE_AT``, see ``daemon/killpoints.py``) so that it dies
at a named durable step of whatever operation reaches it first. While a daemon is down, pid files
are sometimes overwritten to name a stranger's process (a reused pid). After every step the daemon
is given time to converge, then the invariants are checked. The bad counts:

- ``services_lost``: a service deployed (and not deleted) is missing from ``find``;
- ``resurrected``: a service whose delete returned shows up again;
- ``untracked_servers``: a live model-server process that no service points to;
- ``duplicates``: more than one live server for one service;
- ``stale_states``: a service reported ``active`` whose port does not answer;
- ``version_mismatches``: a server answers for another version than the one its service reports;
- ``unconverged``: the services did not settle within 15 s of a step or a daemon start;
- ``strangers_signalled``: a process modeld did not start (plain, tagged with this home but no
  service, tagged for another home, in a group whose leader died, planted in pid files) was
  killed or stopped.

``converge_ms`` is the time from each daemon start until every service is what it should be
(running ones answering, stopped ones gone); the goal is within 5 s. The seed fixes every random
choice, not the timing of processes, so a replay takes the same steps. The module's functions are
also what ``tests/test_chaos.py`` and ``tests/test_killpoints.py`` use.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psutil  # noqa: E402

from daemon import DaemonClient, ServiceConfig  # noqa: E402
from daemon.exceptions import DaemonError, ModeldError, ServiceNotFound  # noqa: E402
from daemon.killpoints import KILL_POINTS  # noqa: E402
from daemon.linux import ProcessIdentity, boot_id, start_ticks  # noqa: E402
from daemon.models import BaseService, DesiredState, ServiceState  # noqa: E402
from daemon.paths import Paths  # noqa: E402

BAD = (
    "services_lost", "resurrected", "untracked_servers", "duplicates", "stale_states",
    "version_mismatches", "unconverged", "strangers_signalled",
)
CONVERGE_TIMEOUT = 15.0

# A command server whose leader forks the worker that serves (so a kill -9 of the leader alone
# leaves a worker holding the port, as gunicorn or mlflow would); it answers GET with its tag.
TINY_SERVER = '''\
import http.server, os, sys
port, tag = int(sys.argv[1]), sys.argv[2].encode()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", str(len(tag)))
        self.end_headers()
        self.wfile.write(tag)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", port), Handler)
if os.fork() == 0:
    server.serve_forever()
else:
    _, status = os.wait()
    sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
'''


# ---------------------------------------------------------------- processes


@dataclass(frozen=True)
class ServerProcess:
    """A live process whose environment tags it as (part of) a model server of one home."""

    pid: int
    pgid: int
    ppid: int
    uuid: str
    create_time: float


def forked_tags(home: Path, pid: int) -> dict[str, str]:
    """The tags a fork server recorded for a server it forked (whose own environ is the fork
    server's), if the record is about this very process (same start ticks)."""
    try:
        ticks, _, tags = (home / "run" / f"forked-{pid}").read_bytes().partition(b"\n")
    except OSError:
        return {}
    if int(ticks) != start_ticks(pid):
        return {}
    return dict(item.decode().partition("=")[::2] for item in tags.split(b"\0") if item)


def server_processes(home: Path) -> list[ServerProcess]:
    """Every live process carrying ``MODELD_HOME=home`` and a ``MODELD_SERVICE_UUID`` in its
    environment, or in the record a fork server wrote for it (read here with psutil,
    independently of the daemon's own scan)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            env = proc.environ()
            if not env.get("MODELD_SERVICE_UUID"):
                env = forked_tags(home, proc.pid) or env
            if env.get("MODELD_HOME") != str(home) or not env.get("MODELD_SERVICE_UUID"):
                continue
            found.append(ServerProcess(proc.pid, os.getpgid(proc.pid), proc.ppid(), env["MODELD_SERVICE_UUID"], proc.create_time()))
        except (psutil.Error, ProcessLookupError):
            continue
    return found


def server_leaders(procs: list[ServerProcess]) -> dict[str, list[int]]:
    """The servers themselves (group leaders), by service uuid, without their workers."""
    by_pid = {p.pid: p for p in procs}
    leaders: dict[str, list[int]] = {}
    for p in procs:
        parent = by_pid.get(p.ppid)
        if p.pid == p.pgid and not (parent is not None and parent.uuid == p.uuid):
            leaders.setdefault(p.uuid, []).append(p.pid)
    return leaders


def stray_workers(procs: list[ServerProcess]) -> list[int]:
    """Server processes whose group leader is gone (a worker left holding a port)."""
    pids = {p.pid for p in procs}
    return [p.pid for p in procs if p.pid != p.pgid and p.pgid not in pids]


def kill_servers(home: Path) -> None:
    """Kill every server process of ``home`` (by pid, checked against its start time)."""
    for p in server_processes(home):
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(p.pid)
            if proc.create_time() == p.create_time:
                proc.kill()


class DaemonProcess:
    """The daemon of one home, started in its own session; its identity comes from daemon.pid."""

    def __init__(self, home: Path):
        self.home = home
        self.paths = Paths(home)
        self.popen: subprocess.Popen[bytes] | None = None
        self.ident: ProcessIdentity | None = None
        self.die_at: str | None = None
        self.started_at = 0.0

    def env(self, die_at: str | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELD_")}
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
                env=self.env(die_at), cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self.wait_answering()

    def adopt_autostarted(self) -> bool:
        """A daemon some client auto-started: track it through daemon.pid."""
        self.popen, self.die_at = None, None
        self.started_at = time.monotonic()
        return self.wait_answering()

    def wait_answering(self, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        with DaemonClient(self.home, auto_start=False, timeout=timeout) as client:
            while time.monotonic() < deadline:
                if self.popen is not None and self.popen.poll() is not None:
                    return False
                try:
                    info = client.daemon_info()
                except DaemonError:
                    time.sleep(0.005)
                    continue
                self.ident = ProcessIdentity.of(int(info["pid"]))
                return self.ident is not None
        raise RuntimeError(f"the daemon of {self.home} did not answer within {timeout}s")

    def alive(self) -> bool:
        if self.popen is not None and self.popen.poll() is not None:
            return False
        return self.ident is not None and self.ident.is_alive()

    def gone_after_error(self, grace: float = 1.0) -> bool:
        """After a failed call: did the daemon die? A dying process closes its sockets before
        /proc shows it dead, so give it a moment."""
        deadline = time.monotonic() + grace
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def signal(self, sig: int) -> None:
        if self.ident is not None and self.ident.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.ident.pid, sig)

    def wait_dead(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon {self.ident} still alive after {timeout}s")
            time.sleep(0.005)
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


class Strangers:
    """Processes of this uid that modeld never started and must never signal."""

    def __init__(self, home: Path, other_home: Path):
        base = {k: v for k, v in os.environ.items() if not k.startswith("MODELD_")}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.watched: list[tuple[int, float]] = []
        self.plants: list[tuple[int, int]] = []  # (pid, start ticks) to write into pid files
        envs = [
            base,                                                      # a plain process
            {**base, "MODELD_HOME": str(home)},                        # a client-like process of this home
            {**base, "MODELD_HOME": str(other_home), "MODELD_SERVICE_UUID": str(uuidlib.uuid4())},  # another home's server
        ]
        for env in envs:
            proc = subprocess.Popen(["sleep", "100000"], env=env, start_new_session=True)
            self.procs.append(proc)
            self.watch(proc.pid)
        plain = self.procs[0].pid
        ticks = start_ticks(plain)
        assert ticks is not None
        self.plants.append((plain, ticks + 3))  # its pid, another start time: a reused pid
        # A group whose leader has exited: the sleep keeps pgid == the dead leader's pid. A pid
        # file naming that leader must not lead anyone to kill the group's survivors.
        leader = subprocess.Popen(["sh", "-c", "sleep 100000 >/dev/null & echo $!"], env=base, stdout=subprocess.PIPE, start_new_session=True)
        member = int(leader.communicate()[0].split()[0])
        self.watch(member)
        member_ticks = start_ticks(member)
        assert member_ticks is not None
        self.orphan_member = member
        self.plants.append((leader.pid, member_ticks - 1))

    def watch(self, pid: int) -> None:
        self.watched.append((pid, psutil.Process(pid).create_time()))

    def signalled(self) -> int:
        """How many were killed or stopped."""
        count = 0
        for pid, created in self.watched:
            try:
                proc = psutil.Process(pid)
                if proc.create_time() != created or proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_STOPPED, psutil.STATUS_DEAD):
                    count += 1
            except psutil.NoSuchProcess:
                count += 1
        return count

    def close(self) -> None:
        for pid, created in self.watched:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if proc.create_time() == created:
                    proc.kill()
        for proc in self.procs:
            proc.wait()


# ------------------------------------------------------------------ checking


def answer_tag(svc: BaseService, timeout: float = 2.0) -> str | None:
    """What the server answers: its tag (command servers: GET /, built-in: one prediction)."""
    conn = http.client.HTTPConnection(svc.endpoint.host, svc.endpoint.port, timeout=timeout)
    try:
        if svc.config.model_type == "command":
            conn.request("GET", "/")
            response = conn.getresponse()
            body = response.read().decode()
        else:
            conn.request("POST", f"/v1/models/{svc.config.model_name}:predict", body=b'{"instances": [1]}',
                         headers={"content-type": "application/json"})
            response = conn.getresponse()
            body = json.loads(response.read())["predictions"][0] if response.status == 200 else ""
        return body if response.status == 200 else None
    except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError, TypeError):
        return None
    finally:
        conn.close()


def config_tag(svc: BaseService) -> str:
    """The tag the service's config says its server answers with."""
    if svc.config.model_type == "command":
        return svc.config.command[-1]
    return Path(svc.config.model_uri.rsplit(":", 1)[0]).stem


@dataclass
class Snapshot:
    services: dict[str, BaseService]
    procs: list[ServerProcess]

    @property
    def leaders(self) -> dict[str, list[int]]:
        return server_leaders(self.procs)

    def settled(self) -> bool:
        """Every service is what its desired state says, with one server or none, and no stray process."""
        leaders = self.leaders
        if set(leaders) - set(self.services) or stray_workers(self.procs):
            return False
        for uuid, svc in self.services.items():
            mine = leaders.get(uuid, [])
            if svc.status.state == ServiceState.ERROR:
                if mine:
                    return False
            elif svc.desired_state == DesiredState.RUNNING:
                if svc.status.state != ServiceState.ACTIVE or mine != [svc.status.pid]:
                    return False
            elif svc.status.state != ServiceState.INACTIVE or mine:
                return False
        return True


def snapshot(client: DaemonClient, home: Path) -> Snapshot:
    return Snapshot({str(s.uuid): s for s in client.find()}, server_processes(home))


def wait_settled(client: DaemonClient, home: Path, timeout: float = CONVERGE_TIMEOUT) -> tuple[Snapshot, bool]:
    deadline = time.monotonic() + timeout
    while True:
        snap = snapshot(client, home)
        if snap.settled():
            return snap, True
        if time.monotonic() > deadline:
            return snap, False
        time.sleep(0.01)


def check(snap: Snapshot) -> dict[str, set[Any]]:
    """Untracked servers, duplicates, stale states and version mismatches in one snapshot, each as
    a set of what is wrong (processes, or services at a version), so one fault seen by several
    checks counts once."""
    found: dict[str, set[Any]] = {key: set() for key in ("untracked_servers", "duplicates", "stale_states", "version_mismatches")}
    created = {p.pid: p.create_time for p in snap.procs}
    found["untracked_servers"].update((pid, created[pid]) for pid in stray_workers(snap.procs))
    for uuid, pids in snap.leaders.items():
        svc = snap.services.get(uuid)
        if svc is None:
            found["untracked_servers"].update((pid, created[pid]) for pid in pids)
            continue
        if len(pids) > 1:
            found["duplicates"].update((pid, created[pid]) for pid in pids if pid != svc.status.pid)
        elif svc.status.pid not in pids:
            found["untracked_servers"].update((pid, created[pid]) for pid in pids)
    for svc in snap.services.values():
        if svc.status.state != ServiceState.ACTIVE:
            continue
        tag = answer_tag(svc)
        if tag is None:
            found["stale_states"].add((str(svc.uuid), svc.status.pid, svc.status.updated_at))
        elif tag != config_tag(svc):
            found["version_mismatches"].add((str(svc.uuid), svc.status.pid, svc.version))
    return found


# -------------------------------------------------------------------- chaos


@dataclass
class Expect:
    """What chaos asked of one service; ``certain`` False while a call about it had no answer."""

    uuid: str
    kind: str
    name: str
    certain: bool = True
    deleting: bool = False


@dataclass
class Outcome:
    ok: bool
    value: Any = None
    error: Exception | None = None
    daemon_died: bool = False
    in_flight: bool = False  # the daemon died while the call was in flight


@dataclass
class Chaos:
    home: Path
    seed: int
    rng: random.Random = field(init=False)
    counts: dict[str, int] = field(default_factory=dict)
    ops: dict[str, int] = field(default_factory=dict)
    converge_ms: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    max_services: int = 6
    mid_kill_chance: float = 0.45
    arm_chance: float = 0.5
    plant_chance: float = 0.3

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.counts = dict.fromkeys(
            (*BAD, "daemon_kills", "daemon_kills_mid_operation", "daemon_kills_in_rebuild", "kill_points_hit",
             "daemon_terms", "daemon_terms_mid_operation", "daemon_restarts", "pid_files_planted", "servers_killed_while_down", "failed_calls", "services_in_error"), 0)
        self.expect: dict[str, Expect] = {}
        self.seen: dict[str, set[Any]] = {}
        self.deleted: set[str] = set()
        self.models = self.home / "models"
        self.models.mkdir(parents=True, exist_ok=True)
        (self.models / "tiny.py").write_text(TINY_SERVER)
        for tag in ("a", "b"):
            (self.models / f"{tag}.py").write_text(f"def model(instances):\n    return [{tag!r} for _ in instances]\n")
        self.daemon = DaemonProcess(self.home)
        self.client = DaemonClient(self.home, auto_start=False)
        self.counter = 0

    # ----------------------------------------------------------- helpers

    def config(self, kind: str, name: str, tag: str) -> ServiceConfig:
        common: dict[str, Any] = dict(
            pipeline_name="chaos", pipeline_step_name="step", model_name=name, working_dir=str(self.models),
            restart={"max_restarts": 1000, "backoff_initial": 0.05, "backoff_max": 0.5},
            stop_timeout=3, startup_timeout=30,
        )
        if kind == "command":
            return ServiceConfig(model_type="command", command=[sys.executable, "tiny.py", "{port}", tag], health_path="/", **common)
        return ServiceConfig(model_type="python", model_uri=f"{tag}.py:model", python=sys.executable, **common)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"chaos[{self.seed}]: {text}", file=sys.stderr)

    def live(self) -> list[Expect]:
        return [e for e in self.expect.values() if e.certain and not e.deleting]

    def call(self, fn: Callable[[DaemonClient], Any], mid_kill: bool) -> Outcome:
        """Run one client call; with ``mid_kill``, kill -9 the daemon a random moment after it starts."""
        offset = self.daemon.log_size()
        if not mid_kill:
            try:
                return Outcome(True, fn(self.client))
            except DaemonError as exc:
                if self.daemon.gone_after_error():
                    self.daemon.wait_dead()
                    self.counted_kill(offset, in_flight=True)
                    return Outcome(False, error=exc, daemon_died=True, in_flight=True)
                return Outcome(False, error=exc)
            except ModeldError as exc:
                return Outcome(False, error=exc)
        result: dict[str, Any] = {}

        def run() -> None:
            with DaemonClient(self.home, auto_start=False) as client:
                try:
                    result["value"] = fn(client)
                except ModeldError as exc:
                    result["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        thread.join(self.rng.uniform(0.0, 0.08))
        in_flight = thread.is_alive()
        by_us = self.daemon.alive()  # else it died at an armed kill point
        term = by_us and self.rng.random() < 0.2  # sometimes a SIGTERM: a graceful stop mid-operation
        self.daemon.signal(signal.SIGTERM if term else signal.SIGKILL)
        self.daemon.wait_dead()
        thread.join()
        if term:
            self.counts["daemon_terms"] += 1
            self.counts["daemon_terms_mid_operation"] += in_flight
        else:
            self.counted_kill(offset, in_flight=in_flight, by_us=by_us)
        if "error" in result:
            return Outcome(False, error=result["error"], daemon_died=True, in_flight=in_flight)
        return Outcome(True, result.get("value"), daemon_died=True, in_flight=False)

    def counted_kill(self, offset: int, in_flight: bool, by_us: bool = False, in_rebuild: bool = False) -> None:
        point = None if by_us else self.daemon.died_at_kill_point(offset)
        self.counts["daemon_kills"] += 1
        if point:
            self.counts["kill_points_hit"] += 1
        if in_flight or in_rebuild:
            self.counts["daemon_kills_mid_operation"] += 1
        if in_rebuild:
            self.counts["daemon_kills_in_rebuild"] += 1
        if not by_us and not point:
            self.note(f"the daemon died without a kill point (log offset {offset})")

    # --------------------------------------------------------- daemon life

    def start_daemon(self) -> None:
        """Start a daemon (maybe with a kill point armed), then wait until everything converged."""
        if self.rng.random() < self.plant_chance:
            self.plant()
        if self.rng.random() < 0.3:
            self.kill_while_down()
        while True:
            die_at = self.rng.choice(KILL_POINTS) if self.rng.random() < self.arm_chance else None
            offset = self.daemon.log_size()
            if self.daemon.start(die_at):
                break
            self.daemon.wait_dead()
            self.counted_kill(offset, in_flight=False, in_rebuild=True)
        self.converge(since_start=True)

    def plant(self) -> None:
        """Overwrite a pid file (the daemon is down) so that it names a stranger: a reused pid."""
        targets = sorted(self.expect)
        if not targets:
            return
        uuid = self.rng.choice(targets)
        pid, ticks = self.rng.choice(self.strangers.plants)
        path = Paths(self.home).service_pid(uuid)
        if path.parent.is_dir():
            path.write_text(f"{pid}\n{ticks}\n{boot_id()}\nversion=1\n")
            self.counts["pid_files_planted"] += 1

    def kill_while_down(self) -> None:
        """kill -9 a server's leader while no daemon runs (its worker may keep the port): the next
        daemon must start it again, past whatever the dead one left."""
        leaders = server_leaders(server_processes(self.home))
        if leaders:
            pids = leaders[self.rng.choice(sorted(leaders))]
            with contextlib.suppress(ProcessLookupError):
                os.kill(pids[0], signal.SIGKILL)
            self.counts["servers_killed_while_down"] += 1

    def ensure_daemon(self) -> None:
        if not self.daemon.alive():
            self.daemon.wait_dead()
            self.start_daemon()

    def converge(self, since_start: bool = False) -> None:
        """Wait until the services settle, reconcile what chaos expects, and count what is wrong."""
        self.client.close()
        offset = self.daemon.log_size()
        try:
            snap, settled = wait_settled(self.client, self.home)
        except DaemonError:
            if not self.daemon.gone_after_error():
                raise
            # An armed kill point reached by supervision (a restart) while we waited.
            self.daemon.wait_dead()
            self.counted_kill(offset, in_flight=False, in_rebuild=since_start)
            self.start_daemon()
            return
        if since_start and settled:
            self.converge_ms.append((time.monotonic() - self.daemon.started_at) * 1000)
        if not settled:
            self.counts["unconverged"] += 1
            self.note(f"not settled after {CONVERGE_TIMEOUT}s: {describe(snap)}")
        self.reconcile(snap)
        for key, faults in check(snap).items():
            new = faults - self.seen.setdefault(key, set())
            if new:
                self.note(f"{key} += {len(new)}: {describe(snap)}")
                self.seen[key] |= new
                self.counts[key] += len(new)
        self.counts["services_in_error"] = sum(s.status.state == ServiceState.ERROR for s in snap.services.values())
        signalled = self.strangers.signalled()
        if signalled > self.counts["strangers_signalled"]:
            self.note(f"strangers signalled: {signalled}")
            self.counts["strangers_signalled"] = signalled

    def reconcile(self, snap: Snapshot) -> None:
        for uuid, e in list(self.expect.items()):
            present = uuid in snap.services
            if e.deleting:
                if present:
                    e.deleting = False
                else:
                    self.deleted.add(uuid)
                    del self.expect[uuid]
            elif not e.certain:
                if present:
                    e.certain = True
                else:
                    del self.expect[uuid]
            elif not present:
                self.counts["services_lost"] += 1
                self.note(f"service {uuid} lost")
                del self.expect[uuid]
        for uuid in snap.services:
            if uuid in self.deleted:
                self.counts["resurrected"] += 1
                self.note(f"deleted service {uuid} is back")
                self.deleted.discard(uuid)
            elif uuid not in self.expect:
                self.counts["resurrected"] += 1
                self.note(f"service {uuid} that chaos never deployed")

    # --------------------------------------------------------------- steps

    def step(self) -> None:
        live = self.live()
        choices: list[tuple[str, int]] = [
            ("deploy", 12 if len(live) < self.max_services else 0),
            ("replace", 14 if live else 0), ("stop", 8 if live else 0), ("start", 8 if live else 0),
            ("delete", 6 if live else 0), ("kill_server", 8 if live else 0), ("kill_group", 5 if live else 0),
            ("kill_daemon", 3), ("term_daemon", 4), ("restart_daemon", 4),
        ]
        names, weights = zip(*choices)
        op = self.rng.choices(names, weights)[0]
        self.ops[op] = self.ops.get(op, 0) + 1
        getattr(self, f"op_{op}")()

    def pick(self) -> Expect:
        return self.rng.choice(sorted(self.live(), key=lambda e: e.uuid))

    def service_call(self, fn: Callable[[DaemonClient], Any], e: Expect | None) -> Outcome:
        mid_kill = self.rng.random() < self.mid_kill_chance
        out = self.call(fn, mid_kill)
        if not out.ok and not out.daemon_died and not isinstance(out.error, ServiceNotFound):
            self.counts["failed_calls"] += 1
            self.note(f"call failed with the daemon alive: {type(out.error).__name__}: {out.error}")
        return out

    def op_deploy(self) -> None:
        self.counter += 1
        kind = self.rng.choice(("python", "command"))
        e = Expect(str(uuidlib.uuid4()), kind, f"m{self.counter}", certain=False)
        self.expect[e.uuid] = e
        config = self.config(kind, e.name, "a")
        out = self.service_call(lambda c: c.deploy(config, uuid=e.uuid, timeout=30), e)
        e.certain = out.ok  # else: done or not done, the next reconcile sees which

    def op_replace(self) -> None:
        e = self.pick()
        current = self.client_get(e)
        if current is None:
            return
        tag = "b" if config_tag(current) == "a" else "a"
        kind = self.rng.choice(("python", "command"))
        config = self.config(kind, e.name, tag)
        self.service_call(lambda c: c.deploy(config, replace=True, uuid=e.uuid, timeout=30), e)

    def op_stop(self) -> None:
        e = self.pick()
        self.service_call(lambda c: c.stop(e.uuid, timeout=10), e)

    def op_start(self) -> None:
        e = self.pick()
        self.service_call(lambda c: c.start(e.uuid, timeout=30), e)

    def op_delete(self) -> None:
        e = self.pick()
        out = self.service_call(lambda c: c.delete(e.uuid, timeout=10), e)
        if out.ok:
            self.deleted.add(e.uuid)
            del self.expect[e.uuid]
        elif out.daemon_died:
            e.deleting = True

    def client_get(self, e: Expect) -> BaseService | None:
        try:
            return self.client.get(e.uuid)
        except ServiceNotFound:
            return None

    def op_kill_server(self, group: bool = False) -> None:
        e = self.pick()
        svc = self.client_get(e)
        pids = server_leaders(server_processes(self.home)).get(e.uuid, [])
        if svc is None or not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                (os.killpg if group else os.kill)(pid, signal.SIGKILL)

    def op_kill_group(self) -> None:
        self.op_kill_server(group=True)

    def op_kill_daemon(self) -> None:
        self.daemon.kill9()
        self.counted_kill(0, in_flight=False, by_us=True)

    def op_term_daemon(self) -> None:
        self.daemon.signal(signal.SIGTERM)
        self.daemon.wait_dead()
        self.counts["daemon_terms"] += 1

    def op_restart_daemon(self) -> None:
        with contextlib.suppress(DaemonError):
            self.client.shutdown()
        self.daemon.wait_dead()
        self.counts["daemon_restarts"] += 1
        if self.rng.random() < 0.5:
            # Let a client auto-start it, as a user's next call would.
            with DaemonClient(self.home) as auto:
                auto.daemon_info()
            self.daemon.adopt_autostarted()
            self.converge(since_start=True)

    # ---------------------------------------------------------------- run

    def run(self, n_ops: int) -> dict[str, Any]:
        started = time.monotonic()
        other = Path(tempfile.mkdtemp(prefix="mdo", dir="/tmp"))
        self.strangers = Strangers(self.home, other)
        try:
            self.start_daemon()
            for _ in range(n_ops):
                self.step()
                self.ensure_daemon()
                self.converge()
            with contextlib.suppress(DaemonError):
                self.client.shutdown(stop_services=True)
            self.daemon.wait_dead()
            leftover = server_processes(self.home)
            if leftover:
                self.note(f"servers left after `daemon stop --all`: {leftover}")
                self.counts["untracked_servers"] += len(server_leaders(leftover))
            self.counts["strangers_signalled"] = self.strangers.signalled()
        finally:
            self.client.close()
            with contextlib.suppress(Exception):
                self.daemon.kill9()
            kill_servers(self.home)
            self.strangers.close()
            shutil.rmtree(other, ignore_errors=True)
        ms = sorted(self.converge_ms)
        return {
            "seed": self.seed,
            "operations": sum(self.ops.values()),
            "by_operation": dict(sorted(self.ops.items())),
            **self.counts,
            "converge_ms": {
                "n": len(ms),
                "p50": round(statistics.median(ms)) if ms else None,
                "max": round(ms[-1]) if ms else None,
                "over_5s": sum(v > 5000 for v in ms),
            },
            "elapsed_s": round(time.monotonic() - started, 1),
        }


def describe(snap: Snapshot) -> str:
    services = {u[:8]: (s.status.state.value, s.desired_state.value, s.status.pid) for u, s in snap.services.items()}
    leaders = {u[:8]: pids for u, pids in snap.leaders.items()}
    return f"services={services} servers={leaders} strays={stray_workers(snap.procs)}"


def run(ops: int, seed: int, home: Path | None = None, keep: bool = False) -> dict[str, Any]:
    """Run chaos in ``home`` (a new temp folder if None); the JSON-able result."""
    home = home or Path(tempfile.mkdtemp(prefix="mdc", dir="/tmp"))
    try:
        result = Chaos(home, seed).run(ops)
        if keep:
            result["home"] = str(home)
        return result
    finally:
        if keep:
            print(f"chaos: kept {home} (daemon.log, services/*/service.log)", file=sys.stderr)
        else:
            shutil.rmtree(home, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=200, help="number of random steps (default 200)")
    parser.add_argument("--seed", type=int, default=None, help="seed of every random choice (default: random, printed)")
    parser.add_argument("--home", type=Path, default=None, help="MODELD_HOME to use (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the home (its daemon.log and service logs) afterwards")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up (finally blocks) on SIGTERM too
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    result = run(args.ops, seed, args.home, args.keep)
    print(json.dumps(result))
    return 1 if any(result[key] for key in BAD) else 0


if __name__ == "__main__":
    sys.exit(main())
