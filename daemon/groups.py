"""Groups: the processes of one launch of a server, and signalling them.

Each launch of a server (a first start, a restart, a new version) is a *group*:
the server process and everything it starts, including processes that leave its
session or process group (``setsid``, a double fork, a daemonizing server). A
stop, a crash restart, a replace, a delete and a rebuild act on whole groups,
with TERM → timeout → KILL for every member. There are two ways to know the
members (``containment.py`` chooses one, once when the daemon starts):

``CgroupGroup``: the processes of the launch's leaf cgroup (and of any below
it). A process cannot leave a cgroup without rights a server does not have, so
the leaf's ``cgroup.procs`` is the whole tree, and ``cgroup.kill`` kills it at
once.

``TagGroup``, where no cgroup can be had. Every server's environment carries
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

import errno
import logging
import os
import signal
from pathlib import Path

from .linux import ProcessIdentity, children_map, descendants, own_cgroup, tagged_processes
from .runtime._serve import forkserver
from .store import LaunchInfo

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
        mine = {
            p.ident.pid: p.ident
            for p in tagged
            if p.service_uuid == self.uuid and LaunchInfo.from_tag(p.info).launch == self.launch
        }
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
        for directory in walk(self.path):
            try:
                with open(directory / "cgroup.procs") as f:
                    pids = [int(line) for line in f if line.strip()]
            except ValueError:
                continue
            except OSError as exc:
                if exc.errno in GONE:
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
            if exc.errno in GONE:
                return True
            raise

    def kill(self) -> None:
        try:
            with open(self.path / "cgroup.kill", "w") as f:
                f.write("1")
            return
        except OSError as exc:
            if exc.errno in GONE and not self.path.exists():
                return  # removed meanwhile (by another thread finishing the same delete)
            log.debug("cgroup.kill of %s: %s", self.path, exc)  # a kernel before 5.14 has no cgroup.kill
        super().kill()

    def remove(self) -> None:
        for directory in reversed(walk(self.path)):
            try:
                os.rmdir(directory)
            except OSError as exc:
                if exc.errno in GONE:
                    continue
                if exc.errno != errno.EBUSY:
                    raise
                log.warning("cannot remove %s yet: it still has processes", directory)

    def _still_member(self, ident: ProcessIdentity) -> bool:
        cgroup = own_cgroup(ident.pid)
        return ident.is_alive() and cgroup is not None and (cgroup == self.relative or cgroup.startswith(self.relative + "/"))


# A cgroup removed while we use it: its files are gone (ENOENT), or an open one answers ENODEV.
GONE = (errno.ENOENT, errno.ENODEV)


def subdirs(path: Path) -> list[Path]:
    """The folders in ``path`` (a cgroup's children), by the type readdir gives (no stat of each file)."""
    try:
        with os.scandir(path) as entries:
            return [Path(entry.path) for entry in entries if entry.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def walk(path: Path) -> list[Path]:
    """``path`` and every cgroup below it, parents first."""
    found = [path]
    for directory in found:
        found.extend(subdirs(directory))
    return found


class Forked:
    """What the fork servers recorded about the servers they forked (``run/forked-<pid>``)."""

    def __init__(self, run: Path):
        self.run = run

    def __call__(self) -> dict[int, tuple[int, list[bytes]]]:
        return forkserver.read_records(self.run)
