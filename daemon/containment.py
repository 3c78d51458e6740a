"""Containment: every process a server starts goes with it.

Each launch of a server (a first start, a restart, a new version) is a *group*:
the server process and everything it starts, including processes that leave its
session or process group (``setsid``, a double fork, a daemonizing server). A
stop, a crash restart, a replace, a delete and a rebuild act on whole groups,
with TERM → timeout → KILL for every member. There are two ways to know the
members, chosen once when the daemon starts (``GET /v1/daemon`` says which):

``cgroup``, the kernel's tool. Each service has a cgroup v2,
``<base>/modeld-<hash of the canonical home>/<uuid>``, and each launch a leaf
below it, ``<uuid>/<launch>``. A process cannot leave a cgroup without rights a
server does not have, so the leaf's ``cgroup.procs`` is the whole tree, and
``cgroup.kill`` kills it at once. A server is born in its leaf, never moved
there after it runs: the daemon steps into the leaf for the instant of the
spawn (a child starts in its parent's cgroup) and back, and a server forked
warm by the fork server enters it before it runs anything of the model's.
``<base>`` is the cgroup2 mount when the daemon runs as root; for a user it is
the daemon's own cgroup when that is delegated to the user (owned by it and
writable, as systemd's ``Delegate=yes`` leaves it). The ``cgroup`` setting
(``MODELD_CGROUP``, see ``settings.py``) names another base, or ``off``.

``tag``, where no cgroup can be had. Every server's environment carries
``MODELD_HOME``, ``MODELD_SERVICE_UUID`` and ``MODELD_PROCESS`` (with the
launch's token), which every descendant inherits; members are the live
processes carrying the launch's tag (found in ``/proc/<pid>/environ``, or in a
fork server's ``run/forked-<pid>`` record), plus their descendants by parent
pid (a child that cleared its environment while its parent lives). A process
that both clears its environment and outlives its parent escapes this mode;
that is what cgroups are for.

Only verified processes are signalled: a cgroup member after its pidfd is open
and its ``/proc/<pid>/cgroup`` still names the leaf, a tagged one after its
start time matched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from .linux import ProcessIdentity, cgroup2_mount, children_map, descendants, own_cgroup, tagged_processes
from .runtime._serve import forkserver

log = logging.getLogger("modeld.containment")


class Group:
    """The processes of one launch of a service (the server and all it started)."""

    kind = "tag"

    def __init__(self, uuid: str, launch: str | None):
        self.uuid = uuid
        self.launch = launch

    def members(self) -> list[ProcessIdentity]:
        raise NotImplementedError

    def signal(self, *signals: int) -> int:
        """Send each of ``signals`` to every member, in order; how many members were signalled."""
        return self.send(self.members(), *signals)

    def send(self, members: list[ProcessIdentity], *signals: int) -> int:
        """Send each of ``signals`` to each of ``members`` that still is one (checked through a pidfd)."""
        sent = 0
        for ident in members:
            if self._send(ident, *signals):
                sent += 1
        return sent

    def kill(self) -> None:
        """SIGKILL every member."""
        self.signal(signal.SIGKILL)

    def empty(self) -> bool:
        return not self.members()

    def remove(self) -> None:
        """Forget the group once it is empty (its cgroup is removed)."""

    def _send(self, ident: ProcessIdentity, *signals: int) -> bool:
        try:
            fd = os.pidfd_open(ident.pid)
        except (ProcessLookupError, PermissionError):
            return False
        try:
            if not self._still_member(ident):
                return False
            for sig in signals:
                signal.pidfd_send_signal(fd, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False
        finally:
            os.close(fd)

    def _still_member(self, ident: ProcessIdentity) -> bool:
        return ident.is_alive()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.uuid} {self.launch}>"


class TagGroup(Group):
    """Members found by the environment tag every descendant inherits (see the module docstring)."""

    def __init__(self, uuid: str, launch: str | None, home: str, forked: Forked):
        super().__init__(uuid, launch)
        self.home = home
        self.forked = forked
        self._seen: dict[int, ProcessIdentity] = {}  # members found by an earlier scan (by pid)

    def members(self) -> list[ProcessIdentity]:
        tagged = tagged_processes(self.home, self.forked())
        mine = {p.ident.pid: p.ident for p in tagged if p.service_uuid == self.uuid and launch_of(p.info) == self.launch}
        found: dict[int, ProcessIdentity] = {}
        if mine:
            for pid in descendants(set(mine), children_map()):
                ident = mine.get(pid) or ProcessIdentity.of(pid)
                if ident is not None:
                    found[pid] = ident
        # A member found earlier through its parent stays one after that parent died (it is
        # still the same process: its start time is checked).
        for pid, ident in self._seen.items():
            if pid not in found and ident.is_alive():
                found[pid] = ident
        self._seen = found
        return list(found.values())


class CgroupGroup(Group):
    """Members are the processes of a leaf cgroup (and of any cgroup below it)."""

    kind = "cgroup"

    def __init__(self, uuid: str, launch: str | None, path: Path, relative: str):
        super().__init__(uuid, launch)
        self.path = path
        self.relative = relative  # as /proc/<pid>/cgroup names it

    def members(self) -> list[ProcessIdentity]:
        found = []
        for directory in _walk(self.path):
            try:
                with open(directory / "cgroup.procs") as f:
                    pids = [int(line) for line in f if line.strip()]
            except ValueError:
                continue
            except OSError as exc:
                if exc.errno in _GONE:
                    continue
                raise
            for pid in pids:
                ident = ProcessIdentity.of(pid)
                if ident is not None:
                    found.append(ident)
        return found

    def empty(self) -> bool:
        try:
            with open(self.path / "cgroup.events") as f:
                return "populated 0" in f.read()
        except OSError as exc:
            if exc.errno in _GONE:
                return True
            raise

    def kill(self) -> None:
        try:
            with open(self.path / "cgroup.kill", "w") as f:
                f.write("1")
            return
        except OSError as exc:
            if exc.errno in _GONE and not self.path.exists():
                return  # removed meanwhile (by another thread finishing the same delete)
            log.debug("cgroup.kill of %s: %s", self.path, exc)  # a kernel before 5.14 has no cgroup.kill
        super().kill()

    def remove(self) -> None:
        for directory in reversed(_walk(self.path)):
            try:
                os.rmdir(directory)
            except OSError as exc:
                if exc.errno in _GONE:
                    continue
                if exc.errno != errno.EBUSY:
                    raise
                log.warning("cannot remove %s yet: it still has processes", directory)

    def _still_member(self, ident: ProcessIdentity) -> bool:
        cgroup = own_cgroup(ident.pid)
        return ident.is_alive() and cgroup is not None and (cgroup == self.relative or cgroup.startswith(self.relative + "/"))


# A cgroup removed while we use it: its files are gone (ENOENT), or an open one answers ENODEV.
_GONE = (errno.ENOENT, errno.ENODEV)


def _subdirs(path: Path) -> list[Path]:
    """The folders in ``path`` (a cgroup's children), by the type readdir gives (no stat of each file)."""
    try:
        with os.scandir(path) as entries:
            return [Path(entry.path) for entry in entries if entry.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _walk(path: Path) -> list[Path]:
    """``path`` and every cgroup below it, parents first."""
    found = [path]
    for directory in found:
        found.extend(_subdirs(directory))
    return found


def launch_of(info: str) -> str | None:
    """The launch token in a process's MODELD_PROCESS tag (None for servers from before launches had one)."""
    try:
        value = json.loads(info).get("launch")
    except (ValueError, AttributeError):
        return None
    return str(value) if value else None


class Forked:
    """What the fork servers recorded about the servers they forked (``run/forked-<pid>``)."""

    def __init__(self, run: Path):
        self.run = run

    def __call__(self) -> dict[int, tuple[int, list[bytes]]]:
        return forkserver.read_records(self.run)


class Containment:
    """Makes the group of each launch; the tag kind (the fallback)."""

    kind = "tag"
    reason = ""  # why cgroups are not used, for the log

    def __init__(self, home: Path, run: Path):
        self.home = str(home)
        self.forked = Forked(run)

    def group(self, uuid: str, launch: str | None) -> Group:
        return TagGroup(str(uuid), launch, self.home, self.forked)

    def create(self, uuid: str, launch: str) -> Group:
        """A new, empty group for a launch about to be spawned."""
        return self.group(uuid, launch)

    @contextlib.contextmanager
    def born_in(self, group: Group) -> Iterator[None]:
        """Around a spawn: the child starts in ``group``."""
        yield

    def child_cgroup(self, group: Group) -> str:
        """The ``cgroup.procs`` a server forked warm writes itself into before it runs the model ('' if none)."""
        return ""

    def launches(self, uuid: str) -> list[str]:
        """The launches of a service that have a group (cgroup kind only: tags are found with the processes)."""
        return []

    def services(self) -> list[str]:
        """Every service that has groups (cgroup kind only)."""
        return []

    def remove_service(self, uuid: str) -> None:
        """Remove what is left of a deleted service (its cgroup)."""

    def prune(self) -> None:
        """Remove the cgroups that are empty (they are made again when needed)."""


class Cgroups(Containment):
    """Each service a cgroup v2 under ``parent``, each launch a leaf below it."""

    kind = "cgroup"

    def __init__(self, home: Path, run: Path, mount: str, base: str):
        super().__init__(home, run)
        self.mount = Path(mount)
        digest = hashlib.sha256(os.fsencode(str(home))).hexdigest()[:16]
        self.parent_relative = f"{base.rstrip('/')}/modeld-{digest}"
        self.parent = self.mount / self.parent_relative.lstrip("/")
        self.parent.mkdir(mode=0o755, exist_ok=True)
        self._own_procs = self.mount / (own_cgroup() or "/").lstrip("/") / "cgroup.procs"

    def _leaf(self, uuid: str, launch: str) -> tuple[Path, str]:
        return self.parent / str(uuid) / launch, f"{self.parent_relative}/{uuid}/{launch}"

    def group(self, uuid: str, launch: str | None) -> Group:
        if launch is None:  # a server started before cgroups were used: found by its tag
            return super().group(uuid, launch)
        path, relative = self._leaf(uuid, launch)
        return CgroupGroup(str(uuid), launch, path, relative)

    def create(self, uuid: str, launch: str) -> Group:
        path, relative = self._leaf(uuid, launch)
        try:
            path.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("cannot create cgroup %s (%s); this launch is contained by its tag only", path, exc)
            return super().group(uuid, launch)
        return CgroupGroup(str(uuid), launch, path, relative)

    @contextlib.contextmanager
    def born_in(self, group: Group) -> Iterator[None]:
        if not isinstance(group, CgroupGroup):
            yield
            return
        # Every thread of the daemon moves with it, for about a millisecond; nothing else is
        # spawned meanwhile (spawns happen on the event loop's thread, one at a time).
        _write(group.path / "cgroup.procs", str(os.getpid()))
        try:
            yield
        finally:
            _write(self._own_procs, str(os.getpid()))

    def child_cgroup(self, group: Group) -> str:
        return str(group.path / "cgroup.procs") if isinstance(group, CgroupGroup) else ""

    def launches(self, uuid: str) -> list[str]:
        return sorted(path.name for path in _subdirs(self.parent / str(uuid)))

    def services(self) -> list[str]:
        return sorted(path.name for path in _subdirs(self.parent))

    def remove_service(self, uuid: str) -> None:
        path = self.parent / str(uuid)
        for launch in self.launches(uuid):
            group = self.group(uuid, launch)
            group.kill()
            _wait_empty(group)
            group.remove()
        try:
            os.rmdir(path)
        except OSError as exc:
            if exc.errno not in _GONE:  # (else removed meanwhile)
                log.warning("cannot remove %s: %s", path, exc)

    def prune(self) -> None:
        for directory in reversed(_walk(self.parent)):
            with contextlib.suppress(OSError):  # (one with processes stays)
                os.rmdir(directory)


def _write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _wait_empty(group: Group, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not group.empty():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def choose(home: Path, run: Path, setting: str, named: str) -> Containment:
    """Cgroups where one can be had (see the module docstring), else tags; never raises.

    ``setting`` is the ``cgroup`` setting, ``named`` where it was set (``MODELD_CGROUP``, or the file and key).
    """
    fallback = Containment(home, run)
    if setting.lower() in ("off", "tag", "0", "no"):
        fallback.reason = f"{named}={setting}"
        return fallback
    mount = cgroup2_mount()
    if mount is None:
        fallback.reason = "no cgroup2 hierarchy is mounted"
        return fallback
    if setting:
        base = setting
        if setting.startswith(mount):
            base = setting[len(mount) :] or "/"
    elif os.geteuid() == 0:
        base = "/"
    else:
        base = own_cgroup() or ""
        directory = Path(mount) / base.lstrip("/")
        try:
            owner = directory.stat().st_uid
        except OSError as exc:
            fallback.reason = f"cannot read this process's cgroup {directory}: {exc.strerror}"
            return fallback
        if owner != os.getuid() or not os.access(directory / "cgroup.procs", os.W_OK):
            fallback.reason = (
                f"this process's cgroup {base} is not delegated to uid {os.getuid()} "
                "(run the daemon in a unit with Delegate=yes, or set MODELD_CGROUP)"
            )
            return fallback
    try:
        containment = Cgroups(home, run, mount, base)
        probe = containment.create("probe", "p")  # can we make a leaf and step into it and out?
        if not isinstance(probe, CgroupGroup):
            raise OSError("cannot create a cgroup")
        with containment.born_in(probe):
            pass
        probe.remove()
        with contextlib.suppress(OSError):
            os.rmdir(containment.parent / "probe")
    except OSError as exc:
        fallback.reason = f"cannot use cgroups under {Path(mount) / base.lstrip('/')}: {exc.strerror or exc}"
        return fallback
    return containment
