"""A home's invariants: a ``snapshot`` of the daemon's services beside the server processes found,
``check`` (untracked servers, duplicates, stale states, version mismatches), ``wait_settled``,
``log_faults`` (log files over their cap) and ``describe`` (one line for a failure message)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.client import DaemonClient
from daemon.models import BaseService, DesiredState, ServiceState
from daemon.testing.processes import Helper, ServerProcess, helpers, launches, server_leaders, server_processes
from daemon.testing.wait import WaitTimeout, wait_for

CONVERGE_TIMEOUT = 15.0
LOG_SLACK = 64 * 1024  # a log file may pass log_max_bytes by one chunk of the log writer


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
        its tracked launch alive, or scaled to zero (idle or unloaded) with no process; any other
        has no process; no process belongs to no service. (``wait_settled`` also wants the active
        ones to answer.)"""
        by_service = self.launches
        if set(by_service) - set(self.services):
            return False
        tracked = self.tracked()
        for uuid, svc in self.services.items():
            mine = list(by_service.get(uuid, {}))
            asleep = svc.desired_state == DesiredState.RUNNING and svc.status.state == ServiceState.SCALED_TO_ZERO
            if svc.status.state == ServiceState.ERROR or asleep:
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
