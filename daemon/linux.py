"""Every Linux-only call modeld makes, in one place (a macOS fallback goes here).

- process identity from ``/proc/<pid>/stat`` (start time in clock ticks, which
  unlike psutil's ``create_time`` does not move with the wall clock) and the
  boot id, so a reused pid or one from before a reboot is never trusted;
- ``pidfd_open`` to learn of an exit at once, for adopted processes too, and
  ``waitid(P_PIDFD)`` to reap our own children; the exit code of a process that is not our child
  (a warm server, an adopted one) from its zombie's ``/proc/<pid>/stat`` or, once reaped, its pidfd;
- ``SO_PEERCRED`` to know who is on the other end of a Unix socket;
- the cgroup2 mount and this process's cgroup (``/proc/self/mountinfo``,
  ``/proc/self/cgroup``), for containment (see ``containment.py``);
- which process holds a listening socket (``/proc/net/tcp*`` inodes against
  ``/proc/<pid>/fd``), to tell the serving process of a tree from its helpers;
- the soft limit on open files, raised to the hard one.
"""

from __future__ import annotations

import fcntl
import os
import resource
import signal
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


_boot_id = ""


def boot_id() -> str:
    """This boot's id (read once: it cannot change while this process lives)."""
    global _boot_id
    if not _boot_id:
        with open(_BOOT_ID_PATH) as f:
            _boot_id = f.read().strip()
    return _boot_id


def start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot; None if gone or a zombie."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in (b"Z", b"X"):  # a zombie is dead
        return None
    return int(fields[19])


def _stat_fields(pid: int | str) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may hold spaces and parentheses: the fields start after the last ')'.
    return stat[stat.rindex(b")") + 2 :].split()


# glibc's malloc_trim(pad) -> int, False where there is none, None until looked up.
_malloc_trim: Callable[[int], int] | Literal[False] | None = None


def trim_heap() -> None:
    """Give memory that malloc holds free back to the kernel (glibc's ``malloc_trim``; elsewhere nothing).

    A long-lived daemon's heap keeps the high-water mark of its busiest moment (a
    re-adoption, a burst of deploys); trimming when idle keeps its RSS what it needs.
    """
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes  # only now: ~0.4 MiB the daemon need not carry if it never gets here

        libc = ctypes.CDLL(None)
        _malloc_trim = libc.malloc_trim if hasattr(libc, "malloc_trim") else False
    if _malloc_trim:
        _malloc_trim(0)


@dataclass(frozen=True)
class ProcessIdentity:
    """What proves a pid still names the process we started."""

    pid: int
    start_ticks: int
    boot_id: str

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        ticks = start_ticks(pid)
        return None if ticks is None else cls(pid, ticks, boot_id())

    def is_alive(self) -> bool:
        return self.boot_id == boot_id() and start_ticks(self.pid) == self.start_ticks


def pidfd_open(pid: int) -> int:
    return os.pidfd_open(pid)


def reap(pidfd: int) -> int | None:
    """Reap our exited child behind ``pidfd``; its exit code, -N for signal N.

    None when it is not our child (an adopted process, a warm server): see ``exit_code_of``.
    """
    try:
        result = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
    except ChildProcessError:
        return None
    if result is None:
        return None
    if result.si_code == os.CLD_EXITED:
        return result.si_status
    return -result.si_status


# PIDFD_GET_INFO (Linux 6.13+): _IOWR(0xFF, 11, struct pidfd_info) at the struct's first size, 64
# bytes; with PIDFD_INFO_EXIT (6.15+) in its mask it gives the exit status (as wait reports it, at
# offset 60) of a process that has been reaped, by whichever parent. Older kernels refuse it.
_PIDFD_GET_INFO = 0xC040FF0B
_PIDFD_INFO_EXIT = 1 << 3


def exit_code_of(pidfd: int, ident: ProcessIdentity) -> int | None:
    """The exit code (-N for signal N) of the exited process behind ``pidfd``, whoever its parent: from
    the zombie's ``/proc/<pid>/stat`` until its parent reaps it, then from the pidfd (Linux 6.15+).
    None if neither tells (an older kernel, once reaped): its parent alone knows then. (A main thread
    that ended before the others shows its own code in stat, not the process's: never a built-in server.)"""
    fields = _stat_fields(ident.pid)  # (a pid reused since the reaping is another process: other ticks)
    if fields is not None and fields[0] == b"Z" and int(fields[19]) == ident.start_ticks and len(fields) > 49:
        status: int | None = int(fields[49])
    else:
        status = _pidfd_exit_status(pidfd)
    try:
        return None if status is None else os.waitstatus_to_exitcode(status)
    except ValueError:
        return None


def _pidfd_exit_status(pidfd: int) -> int | None:
    info = bytearray(64)
    struct.pack_into("Q", info, 0, _PIDFD_INFO_EXIT)
    try:
        fcntl.ioctl(pidfd, _PIDFD_GET_INFO, info)
    except OSError:  # ENOTTY or EINVAL before 6.13, ESRCH when it is gone and 6.15's exit info is not there
        return None
    mask, status = struct.unpack_from("Q", info)[0], struct.unpack_from("i", info, 60)[0]
    return int(status) if mask & _PIDFD_INFO_EXIT else None


def send_group_signal(ident: ProcessIdentity, sig: int) -> bool:
    """Signal the process group led by ``ident`` if that process is still itself.

    Returns False (and signals nothing) when the pid no longer names it.
    """
    if not ident.is_alive():
        return False
    try:
        os.killpg(ident.pid, sig)
    except ProcessLookupError:
        return False
    return True


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


@dataclass(frozen=True)
class TaggedProcess:
    """A live process whose environment says it is (or descends from) a server of a modeld home."""

    ident: ProcessIdentity
    pgid: int
    ppid: int
    service_uuid: str
    info: str  # MODELD_PROCESS: what the daemon recorded about the process when it spawned it

    @property
    def leads_group(self) -> bool:
        return self.pgid == self.ident.pid


def tagged_processes(home: str, forked: dict[int, tuple[int, list[bytes]]] | None = None) -> list[TaggedProcess]:
    """Every live process of this uid whose environment has ``MODELD_HOME=home`` and a service uuid.

    The daemon puts both in each server's environment, and children inherit them: so a
    server spawned just before a daemon died, before its pid file was written, is still
    found. A server forked by a fork server shows that server's environment instead; for
    those, ``forked`` maps a pid to its start ticks and the environment entries the fork
    server recorded, used when the ticks match. A process is listed only if its start time
    is the same before and after its environment was read, so the identity belongs to it.
    """
    uid, me = os.getuid(), str(os.getpid())
    want_home = b"MODELD_HOME=" + os.fsencode(home)
    forked = forked or {}
    boot = boot_id()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or entry == me:
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            before = _stat_fields(entry)
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if before is None or before[0] in (b"Z", b"X"):
            continue
        record = forked.get(int(entry))
        if record is not None and record[0] == int(before[19]):
            environ = record[1]
        if want_home not in environ and not _same_home(environ, home):
            continue
        tags = {
            k: v for k, _, v in (item.partition(b"=") for item in environ) if k in (b"MODELD_SERVICE_UUID", b"MODELD_PROCESS")
        }
        if not tags.get(b"MODELD_SERVICE_UUID"):
            continue
        after = _stat_fields(entry)
        if after is None or after[19] != before[19]:
            continue
        found.append(
            TaggedProcess(
                ident=ProcessIdentity(int(entry), int(before[19]), boot),
                pgid=int(before[2]),
                ppid=int(before[1]),
                service_uuid=tags[b"MODELD_SERVICE_UUID"].decode(errors="replace"),
                info=tags.get(b"MODELD_PROCESS", b"").decode(errors="replace"),
            )
        )
    return found


def _same_home(environ: list[bytes], home: str) -> bool:
    """Whether the MODELD_HOME in ``environ`` is ``home`` spelled another way (a symlink, a ``..``):
    the tag of a server started before homes were made canonical (daemon/paths.py)."""
    for item in environ:
        if item.startswith(b"MODELD_HOME="):
            spelled = os.fsdecode(item[len(b"MODELD_HOME=") :])
            return os.path.isabs(spelled) and os.path.realpath(spelled) == home
    return False


def signal_verified(ident: ProcessIdentity, sig: int) -> int | None:
    """Send ``sig`` to exactly this process (through a pidfd, after checking its start time).

    Returns the pidfd (the caller waits on it and closes it), or None if the process is gone.
    A pidfd names one process: unlike a pid, it cannot come to mean another after an exit.
    """
    try:
        fd = os.pidfd_open(ident.pid)
    except ProcessLookupError:
        return None
    if not ident.is_alive():
        os.close(fd)
        return None
    try:
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        os.close(fd)
        return None
    return fd


def children_map() -> dict[int, list[int]]:
    """Every live process's children, by parent pid (one pass over /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(entry)
        if fields is None or fields[0] in (b"Z", b"X"):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def descendants(roots: set[int], children: dict[int, list[int]] | None = None) -> set[int]:
    """``roots`` and every live process below them by parent pid."""
    children = children if children is not None else children_map()
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children.get(pid, ()))
    return found


# ------------------------------------------------------------------ cgroups


def cgroup2_mount() -> str | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup`` on most machines, ``.../unified`` in
    hybrid mode), from /proc/self/mountinfo; None if there is none."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                before, _, after = line.partition(" - ")
                if after.split(" ", 1)[0] == "cgroup2":
                    return _unescape_mount(before.split()[4])
    except OSError:
        return None
    return None


def _unescape_mount(path: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...)
    return path.encode().decode("unicode_escape") if "\\" in path else path


def own_cgroup(pid: int | str = "self") -> str | None:
    """The cgroup v2 path of a process, relative to the mount ("/" for the root); None if unknown."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].rstrip("\n") or "/"
    except OSError:
        return None
    return None


# ----------------------------------------------------------- who is serving


def listening_inodes(port: int) -> set[int]:
    """Inodes of the TCP sockets listening on ``port`` (any address, IPv4 or IPv6)."""
    want = f":{port:04X}"
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == "0A" and fields[1].endswith(want):
                        inodes.add(int(fields[9]))
        except OSError:
            continue
    return inodes


def listening_unix_inodes(path: str) -> set[int]:
    """Inodes of the Unix sockets listening at ``path``."""
    inodes = set()
    try:
        with open("/proc/net/unix") as f:
            next(f, None)
            for line in f:
                fields = line.split(None, 7)
                # Num RefCount Protocol Flags Type St Inode Path; flags 00010000 = __SO_ACCEPTCON
                if len(fields) == 8 and fields[7].rstrip("\n") == path and int(fields[3], 16) & 0x10000:
                    inodes.add(int(fields[6]))
    except (OSError, ValueError):
        pass
    return inodes


def holds_socket(pid: int, inodes: set[int]) -> bool:
    """Whether ``pid`` has one of these socket inodes open."""
    if not inodes:
        return False
    wanted = {f"socket:[{inode}]" for inode in inodes}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                return True
        except OSError:
            continue
    return False


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit; (old soft, new soft).

    Each live service costs the daemon a few fds (see the README), and a soft limit of
    1024 is still common: probes failing with EMFILE must never be what ends a service.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return soft, hard
        except (ValueError, OSError):
            pass
    return soft, soft
