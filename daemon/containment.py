"""Containment: every process a server starts goes with it.

Each launch of a server is a *group* (``groups.py``: its members, and
signalling them); this module makes the groups and removes them, in one of two
kinds chosen once when the daemon starts (``GET /v1/daemon`` says which):

``cgroup``, the kernel's tool. Each service has a cgroup v2,
``<base>/modeld-<hash of the canonical home>/<uuid>``, and each launch a leaf
below it, ``<uuid>/<launch>``. A server is born in its leaf, never moved
there after it runs: the daemon steps into the leaf for the instant of the
spawn (a child starts in its parent's cgroup) and back, and a server forked
warm by the fork server enters it before it runs anything of the model's.
``<base>`` is the cgroup2 mount when the daemon runs as root; for a user it is
the daemon's own cgroup when that is delegated to the user (owned by it and
writable, as systemd's ``Delegate=yes`` leaves it). The ``cgroup`` setting
(``MODELD_CGROUP``, see ``settings.py``) names another base, or ``off``.

``tag``, where no cgroup can be had: a launch's members are found by the
environment tag every process it starts inherits (``TagGroup``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from .groups import GONE, CgroupGroup, Forked, Group, TagGroup, subdirs, walk
from .linux import cgroup2_mount, own_cgroup

log = logging.getLogger("modeld.containment")


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
        return sorted(path.name for path in subdirs(self.parent / str(uuid)))

    def services(self) -> list[str]:
        return sorted(path.name for path in subdirs(self.parent))

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
            if exc.errno not in GONE:  # (else removed meanwhile)
                log.warning("cannot remove %s: %s", path, exc)

    def prune(self) -> None:
        for directory in reversed(walk(self.parent)):
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
