#!/usr/bin/env python3
"""Chaos: random operations, kills and restarts against a real modeld daemon; counts what broke.

    python scripts/chaos.py --ops 200 --seed 1     # one JSON line on stdout; exit 1 if a bad count > 0
    MODELD_CGROUP=off python scripts/chaos.py ...   # the same with tag containment (see daemon/containment.py)

Each step is one of: deploy, deploy with replace, stop, start, delete, start of every service
(``POST /v1/services/start``) (a share of them with a ``kill -9`` of the daemon landing while the
call is in flight), ``kill -9`` of a service's server process alone, of its process group, or of
every process of its launch, ``kill -9``, SIGTERM or restart of the daemon, and ``daemon stop
--all`` (sometimes cut short by a ``kill -9``), ``unload`` of a service (of any kind, one without
an ``idle_timeout`` too), a request that wakes a scaled-to-zero service (on its own URL if built-in,
and through the gateway), and a burst of 6 requests as an on-demand service is being scaled to zero
for being idle (chaos watches it leave ``active``, then sends them). A daemon is sometimes started with a kill point
armed (``MODELD_DIE_AT``, see ``daemon/killpoints.py``) so that it dies at a named durable step of
whatever operation reaches it first. While a daemon is down, pid files are sometimes overwritten to
name a stranger's process (a reused pid), and a server is sometimes killed (alone or its group).

The servers come in five kinds, the first deploys going through each once:

- ``python``: the built-in server (forked warm by the fork server once it is ready);
- ``command``: ``TINY_SERVER``, whose leader forks the worker that serves: a ``kill -9`` of the
  leader alone leaves the worker serving, which the daemon follows (it becomes the server);
- ``helper``: the same, and its leader first starts a helper (a ``sleep``) in a session of its own;
- ``envless``: the same with a helper that also clears its environment, which only cgroup
  containment can find once its parent is gone (tag mode's documented limit);
- ``flood``: a server with a child that writes its log as fast as it can (niced), deployed with
  ``log_max_bytes`` 65536 and ``log_backups`` 1. At most one runs at a time.

On demand (issue 12): a share of the ``python``, ``command`` and ``helper`` deploys and replaces
get an ``idle_timeout`` of 0.5-2 s, so idle stops happen within the run. Every daemon runs with
the gateway (``MODELD_GATEWAY=:0``: a free port, kept by the home across daemon restarts; the
daemons clients auto-start inherit it). When admission is merged (``DaemonSettings`` has
``max_active``), a run draws one cap (none, 2 or 3) that every daemon it starts gets
(``MODELD_MAX_ACTIVE``); one cap for the run, so that its invariant holds at every convergence.

All through the run a thread sends requests, one connection each, at random gaps (30-250 ms, at
most 3 at once) to the services that should serve them: those the last convergence saw with the
desired state ``running``, ``active`` or ``scaled_to_zero`` (not in error, not being deployed or
deleted). Each goes on the service's own URL or through the gateway (``/v1/services/<uuid>/...``),
at random; a ``command`` service that may be scaled to zero gets them through the gateway only
(its port is closed while it is scaled to zero and only the gateway wakes it). A request succeeds
with a 200.

Helpers record themselves (pid, start ticks, service, launch) in ``models/helpers.log``. Chaos
tells processes apart by *launch* (each spawn of a server, ``MODELD_PROCESS``'s ``launch``): a
process belongs to the launch its environment tag names (or its fork server's ``run/forked-<pid>``
record), and, with cgroup containment, to the launch whose cgroup
``modeld-<sha256(home)[:16]>/<uuid>/<launch>`` holds it, tag or none. A service's tracked launch
is the launch of the process its ``status.pid`` names. After every step the daemon is given time
to converge (each service that should run is ``active`` with exactly its tracked launch alive,
its pid alive and answering, or ``scaled_to_zero`` with no process; each other has no process),
then the invariants are checked. An on-demand service may go from ``active`` to ``scaled_to_zero``
and back on its own at any time (idle stops; wakes by the requests): neither state is a fault. The
bad counts:

- ``services_lost``: a service deployed (and not deleted) is missing from ``find``;
- ``resurrected``: a service whose delete returned shows up again, or one stopped (``stop``,
  ``daemon stop --all``) wants to run again though nobody asked (a start, ``start --all``, a deploy);
- ``stopped_unasked``: a service left running wants to be stopped though nobody asked (a plain
  daemon stop, kill or SIGTERM taken for ``daemon stop --all``), or is scaled to zero though it
  has no ``idle_timeout`` and chaos did not unload it since it last loaded it;
- ``untracked_servers``: a live process of a launch that no service tracks (of a service gone,
  stopped or in error, a launch replaced or crashed: a helper that outlived its server counts),
  or a helper alive that containment cannot find (in tag mode, an envless helper whose launch
  ended is the documented limit: counted apart as ``envless_helpers_escaped`` and killed);
- ``duplicates``: more than one live launch for one service;
- ``stale_states``: a service reported ``active`` whose port does not answer (for a service that
  may be scaled to zero: and the daemon still says ``active`` with the same pid right after; an
  idle stop records ``pending_shutdown`` before it stops the server, so one seen ``active`` then
  gone is counted apart, as ``stale_answers_racing_idle_stop``);
- ``version_mismatches``: a server answers for another version than the one its service reports;
- ``unconverged``: the services did not settle within 15 s of a step or a daemon start;
- ``strangers_signalled``: a process modeld did not start (plain, tagged with this home but no
  service, tagged for another home, in a group whose leader died, planted in pid files) was
  killed or stopped;
- ``logs_over_cap``: a service's folder holds a log file other than ``service.log`` and
  ``service.log.1`` … ``.N`` (N = its ``log_backups``), or one larger than its ``log_max_bytes``
  + 64 KiB;
- ``requests_failed``: a request (of the thread, a wake or a burst) to a service that should serve
  it failed (no 200: refused, reset, timed out after 30 s, a 5xx), except:
    * while no daemon ran (a daemon was down, being stopped or killed, or a new one not answering
      yet, at any moment between the request's start and its end), to a service that may be scaled
      to zero (an ``idle_timeout``, or unloaded by chaos), on any route: its own URL has nobody
      holding its socket then, and the gateway cannot wake a ``command`` server without a daemon
      (its 503) nor reach a built-in one's closed port (its 502). Counted apart as
      ``requests_failed_no_daemon``. A request to a service that cannot be scaled to zero must
      succeed through daemon kills and restarts: its server keeps serving, and so does the gateway;
    * racing a step that chaos itself takes against that service: a ``replace``, ``stop``,
      ``delete``, ``kill_server``/``kill_group``/``kill_launch``, a server killed or a pid file
      planted while the daemon is down, and ``daemon stop --all`` (every service), from the step's
      start until the convergence after it (the steps that stop, swap or crash its server; its
      requests cannot all be served). Counted apart as ``requests_failed_racing_step``. Not
      excluded: ``unload`` (a graceful stop, as an idle stop), ``start``, ``start --all``, deploys of
      other services, daemon kills, SIGTERMs and restarts;
    * on its own URL to a ``command`` service that chaos unloaded in the meantime (only the gateway
      wakes one: counted with ``requests_failed_no_daemon``);
- ``over_max_active``: (with admission) at a convergence, more services with an ``idle_timeout``
  have a server process alive than the run's ``max_active``.

Other counts say what was exercised or seen, and are not faults in themselves: daemon kills
(mid-operation, in a rebuild, at kill points, with helpers alive), SIGTERMs, restarts, ``stop
--all`` (cut short), server kills followed or restarted, servers killed while down, helpers started,
``envless_helpers_escaped`` (tag mode only), ``tagged_outside_cgroup`` (a tagged server process
outside the cgroups, in cgroup mode) and ``stowaways`` (the daemon, its fork server or its log
writer inside a service's cgroup after the services settled, and still there half a second later:
the daemon steps into a launch's cgroup for the instant of a spawn, and a wake may spawn any time), failed calls, services in error,
unloads, wakes, bursts (``bursts_in_idle_stop``: sent once the service had left ``active``),
``requests_sent``, ``idle_stops`` and ``socket_wakes`` (from daemon.log), ``max_active``.

``converge_ms`` is the time from each daemon start until every service is what it should be
(running ones answering, stopped ones gone); the goal is within 5 s. The run ends with ``daemon
stop --all``, checks nothing is left, starts a daemon again (every service must stay stopped) and
stops it with ``--all`` again. The seed fixes every random choice, not the timing of processes, so
a replay takes the same steps. Every process chaos starts is cleaned up by pid (checked against
its start time), group or cgroup, never by name. The module's functions are also what
``tests/test_chaos.py`` and ``tests/test_killpoints.py`` use.
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
from urllib.parse import urlsplit

import psutil

import daemon.settings
from daemon import DaemonClient, ServiceConfig
from daemon.exceptions import DaemonError, ModeldError, ServiceNotFound
from daemon.killpoints import KILL_POINTS
from daemon.linux import ProcessIdentity, boot_id, start_ticks
from daemon.models import BaseService, ServiceState
from daemon.paths import Paths
from daemon.testing import (
    CONVERGE_TIMEOUT, FLOOD_SERVER, HELPER_SERVER, HELPERS, TINY_SERVER, DaemonProcess, Helper, ServerProcess, Snapshot,
    cgroup_members, check, config_tag, daemon_side, describe, forked_tags, helpers, kill_verified, log_faults, read_pid,
    reap_home, server_processes, ticks_alive, wait_for, wait_settled,
)

BAD = (
    "services_lost", "resurrected", "stopped_unasked", "untracked_servers", "duplicates", "stale_states",
    "version_mismatches", "unconverged", "strangers_signalled", "logs_over_cap", "requests_failed", "over_max_active",
)
KINDS = ("python", "command", "helper", "envless", "flood")
ON_DEMAND_KINDS = ("python", "command", "helper")  # the kinds that are sometimes deployed with an idle_timeout
ADMISSION = "max_active" in daemon.settings.DaemonSettings.model_fields  # admission merged: MODELD_MAX_ACTIVE is a setting


# ---------------------------------------------------------------- processes


def stowaways(home: Path) -> set[tuple[int, int, str]]:
    """The daemon, its fork server or its log writer found in a cgroup of ``home``'s services (the
    daemon steps into one for the instant of a spawn; anything longer would be killed with that
    launch): (pid, its start ticks, the cgroup)."""
    found = set()
    for pid, (uuid, launch) in cgroup_members(home).items():
        with contextlib.suppress(psutil.Error):
            env = psutil.Process(pid).environ()
            ticks = start_ticks(pid)
            if ticks is not None and not env.get("MODELD_SERVICE_UUID") and not forked_tags(home, pid) and daemon_side(home, pid, env):
                found.add((pid, ticks, f"{uuid}/{launch}"))
    return found


def lasting_stowaways(home: Path, look: float = 0.5) -> set[tuple[int, int, str]]:
    """The stowaways still in the same cgroup after ``look`` seconds. The daemon steps into a launch's
    cgroup for the instant of a cold spawn, and an on-demand service wakes at any moment (a request
    of the traffic thread), also while chaos looks: seed 303 saw the daemon (its own pid, in the
    cgroup of the launch that the wake of a scaled-to-zero service was spawning) at that instant."""
    found = stowaways(home)
    deadline = time.monotonic() + look
    while found and time.monotonic() < deadline:
        time.sleep(0.05)
        found &= stowaways(home)
    return found


def kill_helper(h: Helper) -> bool:
    return kill_verified(h.pid, h.ticks)


class Strangers:
    """Processes of this uid that modeld never started and must never signal."""

    def __init__(self, home: Path, other_home: Path):
        base = {k: v for k, v in os.environ.items() if not k.startswith("MODELD_")}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.watched: list[tuple[int, int]] = []  # (pid, start ticks)
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
        ticks = wait_for(lambda: start_ticks(pid), 5, what=f"pid {pid} to start")
        self.watched.append((pid, ticks))

    def signalled(self) -> int:
        """How many were killed or stopped (each known by its pid and start ticks)."""
        count = 0
        for pid, ticks in self.watched:
            try:
                proc = psutil.Process(pid)
                if not ticks_alive(pid, ticks) or proc.status() in (psutil.STATUS_STOPPED, psutil.STATUS_DEAD):
                    count += 1
            except psutil.NoSuchProcess:
                count += 1
        return count

    def close(self) -> None:
        for pid, ticks in self.watched:
            kill_verified(pid, ticks)
        for proc in self.procs:
            proc.wait()


# ------------------------------------------------------------------ checking


def kind_of(config: ServiceConfig) -> str:
    """Which of chaos's server kinds a config runs (see KINDS)."""
    if config.model_type != "command":
        return "python"
    script = Path(config.command[1]).name if len(config.command) > 1 else ""
    if script == "helper.py":
        return "envless" if "--envless" in config.command else "helper"
    return "flood" if script == "flood.py" else "command"


# ------------------------------------------------------------------ requests


@dataclass(frozen=True)
class Target:
    """A service that should serve requests, as the last convergence saw it."""

    uuid: str
    name: str
    builtin: bool  # python/pickle: wakes on its own URL; else a command server, woken by the gateway only
    host: str
    port: int
    may_sleep: bool  # it has an idle_timeout, or chaos unloaded it: it may be scaled to zero


def send(host: str, port: int, path_prefix: str, builtin: bool, name: str, timeout: float = 30.0) -> tuple[bool, str]:
    """One request on a new connection: a prediction (built-in) or GET / (command); (200?, what came)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        if builtin:
            conn.request("POST", f"{path_prefix}/v1/models/{name}:predict", body=b'{"instances": [1]}',
                         headers={"content-type": "application/json"})
        else:
            conn.request("GET", f"{path_prefix}/")
        response = conn.getresponse()
        body = response.read()
        return response.status == 200, f"{response.status} {body[:300]!r}"
    except (OSError, http.client.HTTPException) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


class Traffic:
    """Requests to the services that should serve them, sent all through the run by a thread (and by
    the ``wake`` and ``burst`` steps), on their own URL and through the gateway; each failure is
    judged as it ends (``request``): see the module docstring, "requests_failed"."""

    WORKERS = 3

    def __init__(self, chaos: Chaos, seed: int):
        self.chaos = chaos
        self.rng = random.Random(seed * 7919 + 1)  # its own: the steps' choices stay the seed's
        self.lock = threading.Lock()
        self.targets: dict[str, Target] = {}
        self.step = 0
        self.excluded: dict[int, set[str]] = {}  # step: the services a step stops, replaces, deletes or kills
        self.all_excluded: set[int] = set()  # steps that stop every service (daemon stop --all)
        self.paused: set[str] = set()  # not picked by the thread (a burst waits for its idle stop)
        self.epoch = 0  # + 1 at every "daemon going down" and every "a daemon answers"
        self.down = True
        self.gateway: tuple[str, int] | None = None
        self.counts = dict.fromkeys(("requests_sent", "requests_failed", "requests_failed_no_daemon",
                                     "requests_failed_racing_step"), 0)
        self.in_flight = 0
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.workers: list[threading.Thread] = []

    # the main thread's side

    def going_down(self) -> None:
        with self.lock:
            self.down, self.epoch = True, self.epoch + 1

    def up(self, gateway_url: str | None) -> None:
        with self.lock:
            self.down, self.epoch = False, self.epoch + 1
            if gateway_url:
                parts = urlsplit(gateway_url)
                assert parts.hostname is not None and parts.port is not None
                self.gateway = (parts.hostname, parts.port)

    def begin_step(self) -> None:
        with self.lock:
            self.step += 1

    def exclude(self, uuid: str | None = None) -> None:
        """Requests to ``uuid`` (every service if None) that fail from now until the step's convergence
        are not counted (a stop, replace, delete or kill that chaos itself issues)."""
        with self.lock:
            if uuid is None:
                self.all_excluded.add(self.step)
            else:
                self.excluded.setdefault(self.step, set()).add(uuid)

    def may_sleep(self, uuid: str) -> None:
        with self.lock:
            t = self.targets.get(uuid)
            if t is not None and not t.may_sleep:
                self.targets[uuid] = Target(t.uuid, t.name, t.builtin, t.host, t.port, True)

    def publish(self, snap: Snapshot) -> None:
        """After a convergence: the services that should serve (desired running, active or scaled to
        zero, not in error, not being deleted or uncertain)."""
        targets = {}
        live = {e.uuid: e for e in self.chaos.live()}
        for uuid, svc in snap.services.items():
            e = live.get(uuid)
            if (e is None or svc.desired_state.value != "running"
                    or svc.status.state not in (ServiceState.ACTIVE, ServiceState.SCALED_TO_ZERO)
                    or svc.endpoint is None or not svc.endpoint.port):
                continue
            targets[uuid] = Target(uuid, svc.config.model_name, svc.config.model_type != "command", svc.endpoint.host,
                                   svc.endpoint.port, e.may_sleep or svc.config.idle_timeout is not None)
        with self.lock:
            self.targets = targets

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="chaos-traffic", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join()
        for w in list(self.workers):
            w.join()

    # the requests

    def routes(self, t: Target) -> list[str]:
        """Its own URL (not for a command server that may be scaled to zero: its port is then closed,
        and only the gateway wakes it), and the gateway."""
        own = ["own"] if t.builtin or not t.may_sleep else []
        return own + (["gateway"] if self.gateway is not None else [])

    def _run(self) -> None:
        while not self.stopping.wait(self.rng.uniform(0.03, 0.25)):
            with self.lock:
                candidates = sorted(u for u in self.targets if u not in self.paused
                                    and u not in self.excluded.get(self.step, ()) and self.step not in self.all_excluded)
                if not candidates or self.in_flight >= self.WORKERS:
                    continue
                t = self.targets[self.rng.choice(candidates)]
                routes = self.routes(t)
                if not routes:
                    continue
                via = self.rng.choice(routes)
                self.in_flight += 1
            worker = threading.Thread(target=self._one, args=(t, via), daemon=True)
            self.workers = [w for w in self.workers if w.is_alive()] + [worker]
            worker.start()

    def _one(self, t: Target, via: str) -> None:
        try:
            self.request(t, via)
        finally:
            with self.lock:
                self.in_flight -= 1

    def daemon_up(self) -> bool:
        ident = self.chaos.daemon.ident
        if ident is None or not ident.is_alive():
            return False
        with contextlib.suppress(psutil.Error):
            return psutil.Process(ident.pid).status() != psutil.STATUS_ZOMBIE
        return False

    def state(self) -> tuple[int, int, bool, ProcessIdentity | None]:
        with self.lock:
            return self.step, self.epoch, self.down, self.chaos.daemon.ident

    def request(self, t: Target, via: str, timeout: float = 30.0) -> bool:
        """Send one request and judge it; whether it succeeded."""
        step0, epoch0, down0, ident0 = self.state()
        up0 = self.daemon_up()
        if via == "gateway":
            assert self.gateway is not None
            ok, what = send(*self.gateway, f"/v1/services/{t.uuid}", t.builtin, t.name, timeout)
        else:
            ok, what = send(t.host, t.port, "", t.builtin, t.name, timeout)
        up1 = self.daemon_up()
        step1, epoch1, down1, ident1 = self.state()
        with self.lock:
            self.counts["requests_sent"] += 1
            if ok:
                return True
            latest = self.targets.get(t.uuid, t)
            may_sleep = t.may_sleep or latest.may_sleep
            racing = any(t.uuid in self.excluded.get(k, ()) or k in self.all_excluded for k in range(step0, step1 + 1))
            no_daemon = down0 or down1 or epoch0 != epoch1 or ident0 != ident1 or not (up0 and up1)
            if racing:
                self.counts["requests_failed_racing_step"] += 1
                return False
            if (no_daemon and may_sleep) or (via == "own" and not t.builtin and may_sleep):
                self.counts["requests_failed_no_daemon"] += 1
                return False
            self.counts["requests_failed"] += 1
        self.chaos.note(f"request failed: {via} {t.uuid[:8]} ({'built-in' if t.builtin else 'command'}"
                        f"{', may sleep' if may_sleep else ''}) steps {step0}-{step1}, daemon "
                        f"{'down' if no_daemon else 'up'}: {what}")
        return False


class ChaosDaemon(DaemonProcess):
    """The daemon, telling the traffic when it goes down and comes up; MODELD_MAX_ACTIVE passes."""

    traffic: Traffic | None = None

    def env(self, die_at: str | None) -> dict[str, str]:
        env = super().env(die_at)
        if "MODELD_MAX_ACTIVE" in os.environ:
            env["MODELD_MAX_ACTIVE"] = os.environ["MODELD_MAX_ACTIVE"]
        return env

    def signal(self, sig: int) -> None:
        if self.traffic is not None and sig in (signal.SIGKILL, signal.SIGTERM):
            self.traffic.going_down()
        super().signal(sig)

    def start(self, die_at: str | None = None) -> bool:
        if self.traffic is not None:
            self.traffic.going_down()
        return super().start(die_at)

    def wait_answering(self, timeout: float = 30) -> bool:
        answered = super().wait_answering(timeout)
        if answered and self.traffic is not None:
            with DaemonClient(self.home, auto_start=False) as client, contextlib.suppress(DaemonError):
                self.traffic.up(client.daemon_info().get("gateway_url"))
        return answered


# -------------------------------------------------------------------- chaos


@dataclass
class Expect:
    """What chaos asked of one service; ``certain`` False while a call about it had no answer.
    ``desired``: the desired state chaos last asked for ("running" or "stopped"), None while a call
    that may have changed it had no answer (then the next snapshot says)."""

    uuid: str
    kind: str
    name: str
    certain: bool = True
    deleting: bool = False
    desired: str | None = "running"
    may_sleep: bool = False  # it has an idle_timeout, or chaos unloaded it since it last loaded it


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
    kinds: dict[str, int] = field(default_factory=dict)
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
             "daemon_kills_with_helpers", "daemon_terms", "daemon_terms_mid_operation", "daemon_restarts",
             "stop_alls", "stop_alls_cut_short", "pid_files_planted", "server_kills_followed",
             "server_kills_restarted", "servers_killed_while_down", "helpers_started", "envless_helpers_escaped",
             "tagged_outside_cgroup", "stowaways", "failed_calls", "services_in_error", "unloads", "wakes",
             "bursts", "bursts_in_idle_stop", "stale_answers_racing_idle_stop"), 0)
        self.expect: dict[str, Expect] = {}
        self.seen: dict[str, set[Any]] = {}
        self.deleted: set[str] = set()
        self.killed_alone: list[tuple[str, str | None, int]] = []  # (uuid, launch, pid): followed or restarted?
        self.last: Snapshot | None = None
        self.models = self.home / "models"
        self.models.mkdir(parents=True, exist_ok=True)
        (self.models / "tiny.py").write_text(TINY_SERVER)
        (self.models / "helper.py").write_text(HELPER_SERVER)
        (self.models / "flood.py").write_text(FLOOD_SERVER)
        for tag in ("a", "b"):
            (self.models / f"{tag}.py").write_text(f"def model(instances):\n    return [{tag!r} for _ in instances]\n")
        self.traffic = Traffic(self, self.seed)
        self.daemon = ChaosDaemon(self.home)
        self.daemon.traffic = self.traffic
        self.client = DaemonClient(self.home, auto_start=False)
        self.counter = 0
        # Admission: one cap for the whole run (each daemon it starts has it), so that "never more
        # than max_active servers of on-demand services alive" holds at every convergence.
        cap = self.rng.choice((None, 2, 3))
        self.max_active = cap if ADMISSION else None

    # ----------------------------------------------------------- helpers

    def config(self, kind: str, name: str, tag: str) -> ServiceConfig:
        common: dict[str, Any] = dict(
            pipeline_name="chaos", pipeline_step_name="step", model_name=name, working_dir=str(self.models),
            restart={"max_restarts": 1000, "backoff_initial": 0.05, "backoff_max": 0.5},
            stop_timeout=3, startup_timeout=30,
        )
        py = sys.executable
        commands = {
            "command": [py, "tiny.py", "{port}", tag],
            "helper": [py, "helper.py", "{port}", HELPERS, tag],
            "envless": [py, "helper.py", "{port}", HELPERS, "--envless", tag],
            "flood": [py, "flood.py", "{port}", tag],
        }
        if kind == "flood":
            common.update(log_max_bytes=65536, log_backups=1)
        if kind in ON_DEMAND_KINDS and self.rng.random() < 0.45:
            common.update(idle_timeout=round(self.rng.uniform(0.5, 2.0), 2))
        if kind in commands:
            return ServiceConfig(model_type="command", command=commands[kind], health_path="/", **common)
        return ServiceConfig(model_type="python", model_uri=f"{tag}.py:model", python=py, **common)

    def choose_kind(self, uuid: str | None = None) -> str:
        """The first deploys go through every kind once, then at random; one flood server at most."""
        flooding = self.last is not None and any(
            kind_of(s.config) == "flood" for u, s in self.last.services.items() if u != uuid)
        allowed = [k for k in KINDS if not (k == "flood" and flooding)]
        if self.counter <= len(KINDS) and uuid is None and KINDS[self.counter - 1] in allowed:
            kind = KINDS[self.counter - 1]
        else:
            kind = self.rng.choice(allowed)
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        return kind

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"chaos[{self.seed}]: {text}", file=sys.stderr)

    def live(self) -> list[Expect]:
        return [e for e in self.expect.values() if e.certain and not e.deleting]

    def helpers_alive(self) -> int:
        return sum(h.alive() for h in helpers(self.home))

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
        self.counts["daemon_kills_with_helpers"] += self.helpers_alive() > 0
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
            self.traffic.exclude(uuid)
            path.write_text(f"{pid}\n{ticks}\n{boot_id()}\nversion=1\n")
            self.counts["pid_files_planted"] += 1

    def kill_while_down(self) -> None:
        """kill -9 a server while no daemon runs, the process its pid file names alone (a worker may
        keep serving: the next daemon follows it) or its whole group (the next daemon starts it again,
        past whatever the dead one left)."""
        procs = server_processes(self.home)
        targets = []
        for uuid in sorted(self.expect):
            for ident in read_pid(Paths(self.home).service_pid(uuid))[:1]:
                p = next((p for p in procs if p.pid == ident.pid and p.uuid == uuid), None)
                if p is not None and p.ticks == ident.start_ticks:
                    targets.append(p)
        if targets:
            victim = self.rng.choice(targets)
            self.traffic.exclude(victim.uuid)
            self.kill(victim, group=self.rng.random() < 0.5)
            self.counts["servers_killed_while_down"] += 1

    def kill(self, p: ServerProcess, group: bool) -> None:
        """kill -9 one server process, or its whole process group. For the group, the process is
        stopped first (checked through a pidfd): while it exists its group does, so the pgid
        cannot have been reused when the group is killed."""
        if not group:
            kill_verified(p.pid, p.ticks)
        elif kill_verified(p.pid, p.ticks, signal.SIGSTOP):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pgid, signal.SIGKILL)

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
        self.last = snap
        if since_start and settled:
            self.converge_ms.append((time.monotonic() - self.daemon.started_at) * 1000)
        if not settled:
            self.counts["unconverged"] += 1
            self.note(f"not settled after {CONVERGE_TIMEOUT}s: {describe(snap)}")
        self.reconcile(snap)
        faults = check(snap)
        faults["stale_states"] = self.not_racing_idle_stop(snap, faults["stale_states"])
        faults["logs_over_cap"] = log_faults(self.home, snap.services)
        faults.update(self.ondemand_faults(snap))
        if snap.containment == "cgroup":
            faults["tagged_outside_cgroup"] = {(p.pid, p.ticks) for p in snap.procs if not p.in_cgroup}
            faults["stowaways"] = lasting_stowaways(self.home)
        for key, found in faults.items():
            new = found - self.seen.setdefault(key, set())
            if new:
                self.note(f"{key} += {len(new)}: {sorted(map(str, new))[:6]} {describe(snap)}")
                self.seen[key] |= new
                self.counts[key] += len(new)
        for h in snap.escaped_envless():  # tag mode's documented limit: counted apart, and killed here
            self.counts["envless_helpers_escaped"] += kill_helper(h)
        tracked = snap.tracked()
        for uuid, launch, pid in self.killed_alone:
            svc = snap.services.get(uuid)
            if svc is not None and uuid in tracked:
                followed = tracked[uuid] == launch and svc.status.pid != pid
                self.counts["server_kills_followed" if followed else "server_kills_restarted"] += 1
        self.killed_alone.clear()
        if self.daemon.containment and snap.containment and self.daemon.containment != snap.containment:
            self.note(f"containment changed: {self.daemon.containment} -> {snap.containment}")
        self.counts["services_in_error"] = sum(s.status.state == ServiceState.ERROR for s in snap.services.values())
        signalled = self.strangers.signalled()
        if signalled > self.counts["strangers_signalled"]:
            self.note(f"strangers signalled: {signalled}")
            self.counts["strangers_signalled"] = signalled
        self.traffic.publish(snap)

    def not_racing_idle_stop(self, snap: Snapshot, stale: set[Any]) -> set[Any]:
        """The stale states that are: an active service that may be scaled to zero (an idle_timeout,
        or unloaded) whose port did not answer is stale only if the daemon still says it is active
        with the same server afterwards. (An idle stop records ``pending_shutdown`` before it stops
        the server, so a port that closes for an idle stop is never seen with ``active``.)"""
        kept = set()
        for fault in stale:
            uuid, pid = fault[0], fault[1]
            svc, e = snap.services[uuid], self.expect.get(uuid)
            if svc.config.idle_timeout is not None or (e is not None and e.may_sleep):
                with contextlib.suppress(DaemonError):
                    now = self.client.get(uuid)
                    if now.status.state != ServiceState.ACTIVE or now.status.pid != pid:
                        self.counts["stale_answers_racing_idle_stop"] += 1
                        continue
            kept.add(fault)
        return kept

    def ondemand_faults(self, snap: Snapshot) -> dict[str, set[Any]]:
        """A service scaled to zero though it has no idle_timeout and chaos did not unload it
        (``stopped_unasked``); more servers of on-demand services alive than ``max_active``."""
        faults: dict[str, set[Any]] = {"stopped_unasked": set(), "over_max_active": set()}
        for uuid, svc in snap.services.items():
            e = self.expect.get(uuid)
            if e is None:
                continue
            if svc.config.idle_timeout is not None:
                e.may_sleep = True
            elif svc.status.state == ServiceState.SCALED_TO_ZERO and not e.may_sleep:
                faults["stopped_unasked"].add(("scaled_to_zero", uuid, svc.status.updated_at))
        if self.max_active is not None:
            loaded = sorted(u for u in snap.launches if u in snap.services and snap.services[u].config.idle_timeout is not None)
            if len(loaded) > self.max_active:
                faults["over_max_active"].add(tuple(loaded))
        return faults

    def reconcile(self, snap: Snapshot) -> None:
        for uuid, e in list(self.expect.items()):
            present = uuid in snap.services
            if e.deleting:
                if present:
                    e.deleting = False
                    e.desired = None
                else:
                    self.deleted.add(uuid)
                    del self.expect[uuid]
                    continue
            elif not e.certain:
                if present:
                    e.certain = True
                    e.desired = None
                else:
                    del self.expect[uuid]
                    continue
            elif not present:
                self.counts["services_lost"] += 1
                self.note(f"service {uuid} lost")
                del self.expect[uuid]
                continue
            actual = snap.services[uuid].desired_state.value
            if e.desired == "stopped" and actual != "stopped":
                self.counts["resurrected"] += 1
                self.note(f"service {uuid}, stopped, wants to run again though nobody asked")
            elif e.desired == "running" and actual != "running":
                self.counts["stopped_unasked"] += 1
                self.note(f"service {uuid}, left running, is stopped though nobody asked: {snap.services[uuid].desired_reason!r}")
            e.desired = actual
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
        stopped = any(e.desired != "running" for e in live)
        choices: list[tuple[str, int]] = [
            ("deploy", 12 if len(live) < self.max_services else 0),
            ("replace", 14 if live else 0), ("stop", 8 if live else 0), ("start", 8 if live else 0),
            ("delete", 6 if live else 0), ("kill_server", 8 if live else 0), ("kill_group", 5 if live else 0),
            ("kill_launch", 3 if live else 0), ("kill_daemon", 3), ("term_daemon", 4), ("restart_daemon", 4),
            ("stop_all", 3 if live else 0), ("start_all", (5 if stopped else 1) if live else 0),
            ("unload", 6 if live else 0), ("wake", 6 if live else 0), ("burst", 5 if live else 0),
        ]
        names, weights = zip(*choices)
        op = self.rng.choices(names, weights)[0]
        self.ops[op] = self.ops.get(op, 0) + 1
        self.traffic.begin_step()
        getattr(self, f"op_{op}")()

    def pick(self) -> Expect:
        return self.rng.choice(sorted(self.live(), key=lambda e: e.uuid))

    def service_call(self, fn: Callable[[DaemonClient], Any]) -> Outcome:
        mid_kill = self.rng.random() < self.mid_kill_chance
        out = self.call(fn, mid_kill)
        if not out.ok and not out.daemon_died and not isinstance(out.error, ServiceNotFound):
            self.counts["failed_calls"] += 1
            self.note(f"call failed with the daemon alive: {type(out.error).__name__}: {out.error}")
        return out

    def op_deploy(self) -> None:
        self.counter += 1
        kind = self.choose_kind()
        e = Expect(str(uuidlib.uuid4()), kind, f"m{self.counter}", certain=False)
        self.expect[e.uuid] = e
        config = self.config(kind, e.name, "a")
        e.may_sleep = config.idle_timeout is not None
        out = self.service_call(lambda c: c.deploy(config, uuid=e.uuid, timeout=30))
        e.certain = out.ok  # else: done or not done, the next reconcile sees which
        e.desired = "running" if out.ok else None

    def op_replace(self) -> None:
        e = self.pick()
        current = self.client_get(e)
        if current is None:
            return
        tag = "b" if config_tag(current) == "a" else "a"
        kind = self.choose_kind(e.uuid)
        config = self.config(kind, e.name, tag)
        self.traffic.exclude(e.uuid)
        out = self.service_call(lambda c: c.deploy(config, replace=True, uuid=e.uuid, timeout=30))
        e.desired = "running" if out.ok else None
        e.may_sleep = config.idle_timeout is not None if out.ok else True  # a replace loads it

    def op_stop(self) -> None:
        e = self.pick()
        self.traffic.exclude(e.uuid)
        out = self.service_call(lambda c: c.stop(e.uuid, timeout=10))
        e.desired = "stopped" if out.ok else None

    def op_start(self) -> None:
        e = self.pick()
        out = self.service_call(lambda c: c.start(e.uuid, timeout=30))
        e.desired = "running" if out.ok else None
        if out.ok and out.value is not None:
            e.may_sleep = out.value.config.idle_timeout is not None  # a start loads it

    def op_start_all(self) -> None:
        """``POST /v1/services/start``: every service runs again (the way back from ``stop --all``)."""
        out = self.service_call(lambda c: c.start_all(timeout=30))
        failed = out.value[1] if out.ok else {}
        for e in self.expect.values():
            e.desired = "running" if out.ok and e in self.live() and e.uuid not in failed else None

    def op_delete(self) -> None:
        e = self.pick()
        self.traffic.exclude(e.uuid)
        out = self.service_call(lambda c: c.delete(e.uuid, timeout=10))
        if out.ok:
            self.deleted.add(e.uuid)
            del self.expect[e.uuid]
        elif out.daemon_died:
            e.deleting = True

    def op_unload(self) -> None:
        """``POST /v1/services/{uuid}/unload`` of any service (one without an idle_timeout too): scaled
        to zero now, it wakes on its next request (a built-in one on its own URL, any through the
        gateway). Requests racing it are counted: it is a graceful stop, as an idle stop is."""
        self.unload(self.pick())

    def unload(self, e: Expect) -> Outcome:
        e.may_sleep = True
        self.traffic.may_sleep(e.uuid)
        was = e.desired
        out = self.service_call(lambda c: c.unload(e.uuid))
        self.counts["unloads"] += 1
        # An unload scales to zero with the desired state running; of a stopped service, the next
        # snapshot says what it did (see the report of issue 12's chaos run).
        e.desired = "running" if out.ok and was == "running" else None
        return out

    def scaled(self) -> list[Expect]:
        with contextlib.suppress(DaemonError):
            asleep = {str(s.uuid) for s in self.client.find() if s.status.state == ServiceState.SCALED_TO_ZERO
                      and s.desired_state.value == "running"}
            return [e for e in sorted(self.live(), key=lambda e: e.uuid) if e.uuid in asleep]
        return []

    def requests(self, t: Target, routes: list[str], delays: list[float]) -> list[bool]:
        """Requests to ``t``, one per delay (seconds from now), each by a route at random, at once."""
        results: list[bool] = []
        plan = [(delay, self.rng.choice(routes)) for delay in delays]

        def one(delay: float, via: str) -> None:
            time.sleep(delay)
            results.append(self.traffic.request(t, via))

        threads = [threading.Thread(target=one, args=p) for p in plan]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return results

    def op_wake(self) -> None:
        """A request to a scaled-to-zero service (unloaded first if none is): on its own URL (built-in)
        and through the gateway, at once."""
        asleep = self.scaled()
        if asleep:
            e = self.rng.choice(asleep)
        else:
            e = self.pick()
            if not self.unload(e).ok or e.desired != "running":
                return
        with self.traffic.lock:
            t = self.traffic.targets.get(e.uuid)
        if t is None:
            return  # not yet seen to serve (a deploy that had no answer)
        self.counts["wakes"] += 1
        self.requests(t, self.traffic.routes(t), [0.0, self.rng.uniform(0.0, 0.05)])

    def op_burst(self) -> None:
        """A burst of requests as an on-demand service is being scaled to zero for being idle: the
        thread's requests to it are paused, chaos watches it until it leaves ``active`` (or its
        idle_timeout + 3 s pass), then sends 6 at once, on its own URL (built-in) and through the
        gateway."""
        with contextlib.suppress(DaemonError):
            awake = {str(s.uuid): s for s in self.client.find() if s.status.state == ServiceState.ACTIVE
                     and s.config.idle_timeout is not None and s.desired_state.value == "running"}
            choices = [e for e in sorted(self.live(), key=lambda e: e.uuid) if e.uuid in awake]
            if not choices:
                self.op_wake()
                return
            e = self.rng.choice(choices)
            with self.traffic.lock:
                t = self.traffic.targets.get(e.uuid)
                self.traffic.paused.add(e.uuid)
            try:
                if t is None:
                    return
                timeout = awake[e.uuid].config.idle_timeout or 1.0
                lead = self.rng.uniform(0.0, 0.3)  # sometimes a little after the stop began
                deadline = time.monotonic() + timeout + 3
                state = ServiceState.ACTIVE
                while time.monotonic() < deadline:
                    state = self.client.get(e.uuid).status.state
                    if state != ServiceState.ACTIVE:
                        break
                    time.sleep(0.01)
                self.counts["bursts"] += 1
                self.counts["bursts_in_idle_stop"] += state in (ServiceState.PENDING_SHUTDOWN, ServiceState.SCALED_TO_ZERO)
                self.requests(t, self.traffic.routes(t), sorted(self.rng.uniform(0.0, lead) for _ in range(6)))
            finally:
                with self.traffic.lock:
                    self.traffic.paused.discard(e.uuid)

    def client_get(self, e: Expect) -> BaseService | None:
        try:
            return self.client.get(e.uuid)
        except ServiceNotFound:
            return None

    def target(self, e: Expect) -> tuple[ServerProcess | None, list[ServerProcess]]:
        """The process a service's ``status.pid`` names (if it is one of its processes), and the processes of its launch."""
        svc = self.client_get(e)
        if svc is None or not svc.status.pid:
            return None, []
        procs = [p for p in server_processes(self.home) if p.uuid == e.uuid]
        p = next((p for p in procs if p.pid == svc.status.pid), None)
        return p, [q for q in procs if p is not None and q.launch == p.launch]

    def op_kill_server(self) -> None:
        """kill -9 of the process the service names alone: a worker or a process it started that
        serves is followed (the service stays, its pid changes); else it is a crash."""
        e = self.pick()
        self.traffic.exclude(e.uuid)
        p, _ = self.target(e)
        if p is not None:
            self.kill(p, group=False)
            self.killed_alone.append((p.uuid, p.launch, p.pid))

    def op_kill_group(self) -> None:
        """kill -9 of its process group: a crash (helpers in sessions of their own outlive it, until the daemon acts)."""
        e = self.pick()
        self.traffic.exclude(e.uuid)
        p, _ = self.target(e)
        if p is not None:
            self.kill(p, group=True)

    def op_kill_launch(self) -> None:
        """kill -9 of every process of its launch that chaos can see: a crash."""
        e = self.pick()
        self.traffic.exclude(e.uuid)
        _, procs = self.target(e)
        for q in procs:
            kill_verified(q.pid, q.ticks)

    def op_kill_daemon(self) -> None:
        self.daemon.kill9()
        self.counted_kill(0, in_flight=False, by_us=True)

    def op_term_daemon(self) -> None:
        self.daemon.signal(signal.SIGTERM)
        self.daemon.wait_dead()
        self.counts["daemon_terms"] += 1

    def op_restart_daemon(self) -> None:
        self.traffic.going_down()
        with contextlib.suppress(DaemonError):
            self.client.shutdown()
        self.daemon.wait_dead()
        self.counts["daemon_restarts"] += 1
        self.maybe_autostart()

    def op_stop_all(self) -> None:
        """``modeld daemon stop --all``: every service is stopped and stays stopped, also in the next
        daemon, until a start; sometimes a kill -9 lands while the daemon stops them."""
        offset = self.daemon.log_size()
        self.traffic.exclude(None)
        self.traffic.going_down()
        with contextlib.suppress(DaemonError):
            self.client.shutdown(stop_services=True)
        self.counts["stop_alls"] += 1
        cut = False
        if self.rng.random() < self.mid_kill_chance:
            deadline = time.monotonic() + self.rng.uniform(0.0, 0.2)
            while self.daemon.alive() and time.monotonic() < deadline:
                time.sleep(0.005)
            if self.daemon.alive():
                self.daemon.kill9()
                self.counted_kill(offset, in_flight=True, by_us=True)
                self.counts["stop_alls_cut_short"] += 1
                cut = True
        self.daemon.wait_dead()
        if not cut and self.daemon.died_at_kill_point(offset):
            self.counted_kill(offset, in_flight=True)
            cut = True
        for e in self.expect.values():
            e.desired = None if cut else "stopped"
        self.maybe_autostart()

    def maybe_autostart(self) -> None:
        if self.rng.random() < 0.5:
            # Let a client auto-start it, as a user's next call would.
            with DaemonClient(self.home) as auto:
                auto.daemon_info()
            self.daemon.adopt_autostarted()
            self.converge(since_start=True)

    # ---------------------------------------------------------------- run

    def leftovers(self, when: str) -> None:
        """With no daemon running after ``daemon stop --all``: no process of any server, no helper."""
        snap = Snapshot({}, server_processes(self.home), helpers(self.home), self.daemon.containment)
        faults = check(snap)["untracked_servers"] - self.seen.setdefault("untracked_servers", set())
        if faults:
            self.note(f"left after `daemon stop --all` ({when}): {sorted(map(str, faults))} {describe(snap)}")
            self.seen["untracked_servers"] |= faults
            self.counts["untracked_servers"] += len(faults)
        for h in snap.escaped_envless():
            self.counts["envless_helpers_escaped"] += kill_helper(h)

    def finish(self) -> None:
        """``daemon stop --all``, nothing left; a daemon started again starts nothing; ``stop --all`` again."""
        self.traffic.stop()
        for attempt in range(2):
            with contextlib.suppress(DaemonError):
                self.client.shutdown(stop_services=True)
            self.daemon.wait_dead()
            for e in self.expect.values():
                e.desired = "stopped"
            self.leftovers("the last" if attempt else "the first")
            if attempt == 0:
                if not self.daemon.start():
                    self.note("the daemon started after `daemon stop --all` died")
                    self.counts["unconverged"] += 1
                    continue
                self.converge(since_start=True)

    def run(self, n_ops: int) -> dict[str, Any]:
        started = time.monotonic()
        other = Path(tempfile.mkdtemp(prefix="mdo", dir="/tmp"))
        self.strangers = Strangers(self.home, other)
        saved = {key: os.environ.get(key) for key in ("MODELD_GATEWAY", "MODELD_MAX_ACTIVE")}
        os.environ["MODELD_GATEWAY"] = ":0"  # a free port, picked once and kept by the home (auto-started daemons too)
        os.environ.pop("MODELD_MAX_ACTIVE", None)
        if self.max_active is not None:
            os.environ["MODELD_MAX_ACTIVE"] = str(self.max_active)
        try:
            self.start_daemon()
            self.traffic.start()
            for _ in range(n_ops):
                self.step()
                self.ensure_daemon()
                self.converge()
            self.finish()
            self.counts["strangers_signalled"] = self.strangers.signalled()
            self.counts["helpers_started"] = len(helpers(self.home))
        finally:
            self.traffic.stop()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            self.client.close()
            with contextlib.suppress(Exception):
                self.daemon.kill9()
            reap_home(self.home)  # its servers, helpers, log writer and cgroups (the daemon is dead)
            self.strangers.close()
            shutil.rmtree(other, ignore_errors=True)
        ms = sorted(self.converge_ms)
        log_lines = self.daemon.paths.daemon_log.read_text(errors="replace") if self.daemon.paths.daemon_log.exists() else ""
        return {
            "seed": self.seed,
            "containment": self.daemon.containment,
            "operations": sum(self.ops.values()),
            "by_operation": dict(sorted(self.ops.items())),
            "by_kind": dict(sorted(self.kinds.items())),
            **self.counts,
            **self.traffic.counts,
            "idle_stops": log_lines.count("scaling it to zero"),
            "socket_wakes": log_lines.count("a request is waiting; waking it"),
            "max_active": self.max_active,
            "converge_ms": {
                "n": len(ms),
                "p50": round(statistics.median(ms)) if ms else None,
                "max": round(ms[-1]) if ms else None,
                "over_5s": sum(v > 5000 for v in ms),
            },
            "elapsed_s": round(time.monotonic() - started, 1),
        }


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
