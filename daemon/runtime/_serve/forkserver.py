"""Warm starts: the fork server, and its wire and record formats (written and parsed only here).

One fork server per interpreter (``serve.py --fork-server FD``, started by the
daemon, see ``daemon/forkservers.py``) has imported uvicorn and the whole runtime
already, so a server forked from it skips the ~100 ms of a cold interpreter
start. It stays single-threaded with no event loop (forking is safe), and each
child starts its own session, so a server is the leader of its own process group
as a cold one is; the child enters the service's cgroup, takes the service's env,
working directory, log and listening socket, then runs ``main`` (which imports
the model). The fork server exits when the daemon closes its end; the servers it
forked carry on in their own sessions.

Wire format: a SOCK_SEQPACKET socket pair, one JSON object per message.

    us -> daemon: {"ready": true}            once, when ready to fork (also named FORK_SERVER_NAME by then)
    daemon -> us: {"argv": [...], "env": {...}, "cwd": "...", "cgroup": "..."}
                  with two fds (SCM_RIGHTS): the log file, the listening socket.
                  argv: serve.py's arguments, without the interpreter and serve.py;
                  its "--fd" value is replaced by the listening socket's fd in the child.
                  cgroup: the cgroup.procs file the child writes itself into first ('': none)
    us -> daemon: {"pid": N, "ticks": T}     the reply to each request (T: start time in clock ticks)
    us -> daemon: {"exit": N, "code": C}     when child N exited (C < 0: killed by signal -C)

Record format: ``$MODELD_HOME/run/forked-<pid>``, written before the daemon hears
of the pid and removed when the child is reaped. A cold server's
/proc/<pid>/environ carries the daemon's tags (its service uuid...), so a daemon
killed before it wrote the pid file still finds it on restart; a forked one shows
the fork server's environ instead, and this file stands in for it: the start
ticks, a newline, then the ``RECORD_TAGS`` as environ has them (``KEY=value``,
NUL-separated). A record is about a process only if the ticks match.

Both ends use the functions below (the daemon's in ``daemon/forkservers.py``,
``daemon/groups.py`` and ``daemon/rebuild.py``), so the formats are defined
once. This module imports only the standard library at import time: the daemon
imports it too.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import TYPE_CHECKING

from .identity import EXIT_USAGE, FORK_SERVER_NAME, log, set_comm

if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Literal, TypedDict

    StrPath = str | os.PathLike[str]

    class SpawnRequest(TypedDict):
        """daemon -> us: one server to fork (see the wire format above)."""

        argv: list[str]
        env: dict[str, str]
        cwd: str
        cgroup: str

    class ReplyMessage(TypedDict, total=False):
        """us -> daemon, as sent: {"ready": true}, {"pid": N, "ticks": T} or {"exit": N, "code": C}."""

        ready: bool
        pid: int
        ticks: int
        exit: int
        code: int

    # us -> daemon, parsed: ("ready", 0, 0), ("exit", pid, code) or ("spawned", pid, ticks)
    Reply = tuple[Literal["ready", "exit", "spawned"], int, int]

MAX_REQUEST = 1 << 20  # bytes of one request
MAX_REPLY = 4096  # bytes of one message to the daemon
MAX_FDS = 4
READY = b'{"ready": true}'

RECORD_PREFIX = "forked-"
RECORD_TAGS = ("MODELD_HOME", "MODELD_SERVICE_UUID", "MODELD_PROCESS")


# --------------------------------------------------------------------------
# Wire format


def send_request(
    sock: socket.socket, argv: list[str], env: Mapping[str, str], cwd: str, cgroup: str, log_fd: int, listen_fd: int
) -> None:
    """The daemon asks for a server."""
    request = json.dumps({"argv": argv, "env": env, "cwd": cwd, "cgroup": cgroup}).encode()
    socket.send_fds(sock, [request], [log_fd, listen_fd])


def recv_request(sock: socket.socket) -> tuple[SpawnRequest | None, list[int]]:
    """The fork server takes a request: (request, fds), or (None, []) once the daemon is gone."""
    msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST, MAX_FDS)
    if not msg:
        return None, fds
    request: SpawnRequest = json.loads(msg)  # the daemon's send_request wrote it
    return request, fds


def encode_spawned(pid: int, ticks: int) -> bytes:
    return json.dumps({"pid": pid, "ticks": ticks}).encode()


def encode_exit(pid: int, code: int) -> bytes:
    return json.dumps({"exit": pid, "code": code}).encode()


def parse_reply(msg: bytes) -> Reply | None:
    """A message to the daemon: ("ready", 0, 0), ("exit", pid, code), ("spawned", pid, ticks), or None if unknown."""
    message: ReplyMessage = json.loads(msg)
    if message.get("ready"):
        return "ready", 0, 0
    if "exit" in message:
        return "exit", int(message["exit"]), int(message["code"])
    if "pid" in message:
        return "spawned", int(message["pid"]), int(message["ticks"])
    return None


# --------------------------------------------------------------------------
# Record format


def record_path(run: StrPath, pid: int) -> str:
    """``run/forked-<pid>``: the record of the server ``pid`` a fork server forked."""
    return os.path.join(run, f"{RECORD_PREFIX}{pid}")


def write_record(env: Mapping[str, str], pid: int, ticks: int) -> str | None:
    """Say who a forked server is, in ``$MODELD_HOME/run/forked-<pid>``, before the daemon hears of it."""
    home = env.get("MODELD_HOME")
    if not home:
        return None
    path = record_path(os.path.join(home, "run"), pid)
    tags = b"\0".join(f"{k}={env[k]}".encode() for k in RECORD_TAGS if k in env)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"%d\n" % ticks + tags)
        finally:
            os.close(fd)
    except OSError as exc:
        print(f"modeld fork server: cannot write {path}: {exc}", file=sys.stderr, flush=True)
        return None
    return path


def remove_record(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


def read_record(path: StrPath) -> tuple[int, list[bytes]]:
    """(start ticks, the environ entries ``b"KEY=value"``) of a record; OSError or ValueError if unreadable."""
    with open(path, "rb") as f:
        ticks, _, tags = f.read().partition(b"\n")
    return int(ticks), tags.split(b"\0")


def read_records(run: StrPath) -> dict[int, tuple[int, list[bytes]]]:
    """Every record in the folder ``run``: {pid: (start ticks, environ entries)}, unreadable ones left out."""
    records: dict[int, tuple[int, list[bytes]]] = {}
    try:
        names = os.listdir(run)
    except OSError:
        return records
    for name in names:
        if not name.startswith(RECORD_PREFIX):
            continue
        try:
            records[int(name[len(RECORD_PREFIX) :])] = read_record(os.path.join(run, name))
        except (OSError, ValueError):
            pass
    return records


# --------------------------------------------------------------------------
# The fork server


def fork_server(control_fd: int) -> int:
    """Serve spawn requests from the daemon on ``control_fd``, forking a server for each (see the module docstring)."""
    import gc
    import signal

    from .cli import main  # noqa: F401  (the whole runtime and uvicorn, imported once here for every child)

    ctl = socket.socket(fileno=control_fd)
    records: dict[int, str | None] = {}  # pid -> its record file

    def reap(*_: object) -> None:
        # Every child of ours is a server we forked: those that exited, whatever their number (one
        # SIGCHLD may stand for several), each at the cost of one call however many live on.
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            remove_record(records.pop(pid, None))
            try:
                ctl.send(encode_exit(pid, os.waitstatus_to_exitcode(status)))
            except (OSError, ValueError):
                pass

    signal.signal(signal.SIGCHLD, reap)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    import ctypes  # noqa: F401  (imported once here: each forked server renames itself with it)

    gc.collect()
    gc.freeze()  # the pre-imported objects stay shared with the children (no copy-on-write by the GC)
    # Named once ready, just before saying so (in ps and /proc/<pid>/comm; the servers it forks
    # name themselves, see cli.main): its name is a sign that it is ready.
    set_comm(FORK_SERVER_NAME)
    ctl.send(READY)
    while True:
        try:
            request, fds = recv_request(ctl)
        except OSError:
            return 0
        if request is None:
            return 0  # the daemon is gone; running servers carry on in their own sessions
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = _forked(ctl, request, fds)
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
                except BaseException:  # noqa: BLE001  (the child's error is printed to its log; it exits with 1)
                    import traceback

                    traceback.print_exc()
                finally:
                    try:
                        sys.stdout.flush()
                        sys.stderr.flush()
                    finally:
                        os._exit(code)
            for fd in fds:
                os.close(fd)
            ticks = _start_ticks(pid)
            records[pid] = write_record(request["env"], pid, ticks)
            ctl.send(encode_spawned(pid, ticks))
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        reap()


def _start_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return -1


def _forked(ctl: socket.socket, request: SpawnRequest, fds: list[int]) -> int:
    """In the child: become what a cold spawn would have been, then run the server."""
    import signal

    from .cli import main

    ctl.close()
    os.setsid()
    if request.get("cgroup"):
        # Into the service's cgroup before anything else runs here, the model's code above all:
        # from now on, everything this server starts is stopped with it.
        try:
            with open(request["cgroup"], "w") as f:
                f.write("0")
        except OSError as exc:
            log(f"cannot enter the service's cgroup {request['cgroup']}: {exc}")
            return EXIT_USAGE
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    log_fd, listen_fd = fds
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    for fd in (devnull, log_fd):
        os.close(fd)
    cwd = request.get("cwd") or os.getcwd()
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[0] = cwd  # serve.py put the working directory first; this child's is another
    argv = list(request["argv"])
    argv[argv.index("--fd") + 1] = str(listen_fd)
    return main(argv)
