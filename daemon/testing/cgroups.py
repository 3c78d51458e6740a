"""The cgroups of a home's services, as a daemon run from here makes them: where they are, who is
in them, and their removal (what is left in them killed first)."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from daemon.linux import cgroup2_mount
from daemon.paths import Paths
from daemon.testing.wait import wait_for


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


def cgroup_tree(parent: Path) -> list[Path]:
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
        for folder in cgroup_tree(parent):
            parts = folder.relative_to(parent).parts
            try:
                pids = [int(line) for line in (folder / "cgroup.procs").read_text().split()]
            except (OSError, ValueError):
                continue
            for pid in pids:
                members[pid] = (parts[0] if parts else "", parts[1] if len(parts) > 1 else None)
    return members


def remove_cgroups(home: Path) -> None:
    """Kill what is left in ``home``'s cgroups and remove them, deepest first."""
    for parent in home_cgroups(home):
        for folder in reversed(cgroup_tree(parent)):
            with contextlib.suppress(OSError):
                (folder / "cgroup.kill").write_text("1")
            with contextlib.suppress(AssertionError, OSError):
                wait_for(lambda: "populated 0" in (folder / "cgroup.events").read_text(), 5, what=f"{folder} to empty")  # noqa: B023 (called in this iteration only)
            with contextlib.suppress(OSError):
                folder.rmdir()
