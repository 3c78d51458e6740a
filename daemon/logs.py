"""The servers' logs: the daemon's end of the log writer, and reading logs in bounded memory.

Servers never write their log files themselves: each writes into a pipe whose
read end belongs to the log writer (``runtime/logd.py``, one process per home,
see there), which appends whole lines to ``service.log`` and rotates it. The
writer outlives the daemon, so a daemon restart or kill -9 loses no line and
never leaves a server blocked on a full pipe. If the writer cannot be had, a
server is given its log file directly (unbounded, as before the writer existed)
and the daemon's log says why.

Reading never loads a whole file: ``tail`` scans back from the end in 64 KiB
blocks until it has counted enough of the server's lines (the daemon's own
``--- modeld: ... ---`` marker lines are not counted, and are left out of a
tail), and a stream goes forward in 64 KiB chunks, across ``service.log.N`` …
``.1`` and ``service.log``; ``follow`` continues across a rotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from .detached import start_detached
from .linux import ProcessIdentity
from .paths import Paths

log = logging.getLogger("modeld.logs")

LOGD_PY = str(Path(__file__).with_name("runtime") / "logd.py")
CHUNK = 64 * 1024
MARKER = b"--- modeld: "
FLUSH_LIMIT = 1 << 20
FOLLOW_POLL = (0.01, 0.2)  # seconds a follower waits for new lines: at first, and at most


MARKER_TEXT_MAX = 512  # characters of what a marker quotes (an argv item may be 128 KiB)


def marker(text: str) -> bytes:
    """A line the daemon writes into a server's log (not counted as the server's by ``tail``)."""
    if len(text) > MARKER_TEXT_MAX:
        text = text[:MARKER_TEXT_MAX] + "…"
    return f"--- modeld: {text} at {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode()


class LogWriterClient:
    """The daemon's connection to the log writer of its home; starts the writer when there is none."""

    REPLY_TIMEOUT = 2.0

    def __init__(self, paths: Paths):
        self.paths = paths
        self.socket_path = paths.run / "logd.sock"
        self.record = paths.run / "logd.pid"
        self._conn: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.failure = ""  # why servers write their files directly, if they do
        self._known: tuple[tuple[int, int, int], ProcessIdentity | None] | None = None  # pid(): the record as last read
        self._lock = threading.RLock()  # one request at a time on the connection (flushes come from threads)

    # ----------------------------------------------------------------- writer life

    def ensure(self, start: bool = True) -> bool:
        """Connected to a live writer (started if needed and ``start``); False if none can be had.

        Only the event loop's thread starts one (``start``): a spawn from another thread could
        happen while the daemon stands in a service's cgroup for a spawn of its own (see
        containment.py), and the writer must never be part of a service.
        """
        if self._conn is not None:
            return True
        conn = self._connect()
        if conn is None and not start:
            return False
        if conn is None:
            self._stop_unanswering()
            self._spawn()
            deadline = time.monotonic() + 5.0
            while conn is None and time.monotonic() < deadline:
                if self._proc is None or self._proc.poll() is not None:
                    break  # it could not be started, or exited
                time.sleep(0.005)
                conn = self._connect()
        if conn is None:
            self.failure = f"the log writer did not start (see {self.paths.home / 'logd.log'})"
            log.error("%s; servers write their logs directly, unbounded", self.failure)
            return False
        self._conn = conn
        self.failure = ""
        return True

    def _connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.settimeout(self.REPLY_TIMEOUT)
        try:
            sock.connect(str(self.socket_path))
            sock.send(b'{"op": "ping"}')
            reply = json.loads(sock.recv(65536) or b"{}")
            if reply.get("ok"):
                return sock
        except (OSError, ValueError):
            pass
        sock.close()
        return None

    def _stop_unanswering(self) -> None:
        """A writer whose record says it lives but who does not answer is stopped (its pipes are lost)."""
        ident = self.pid()
        if ident is None:
            return
        log.warning("the log writer (pid %d) does not answer; starting another", ident.pid)
        with contextlib.suppress(OSError):
            fd = os.pidfd_open(ident.pid)
            try:
                if ident.is_alive():
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
            finally:
                os.close(fd)

    def pid(self) -> ProcessIdentity | None:
        """The live writer's identity from its record (checked against its start time and tag).

        The record is read and the tag checked again only when the record file changed (GET
        /v1/daemon asks this on every call); whether the process lives is checked every time.
        """
        try:
            st = os.stat(self.record)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if self._known is None or self._known[0] != stamp:
                lines = self.record.read_text().split()
                ident = ProcessIdentity(int(lines[0]), int(lines[1]), lines[2])
                with open(f"/proc/{ident.pid}/environ", "rb") as f:
                    tagged = f"MODELD_HOME={self.paths.home}".encode() in f.read().split(b"\0")
                self._known = (stamp, ident if tagged else None)
        except (OSError, ValueError, IndexError):
            self._known = None
            return None
        known = self._known[1]
        return known if known is not None and known.is_alive() else None

    def _spawn(self) -> None:
        env = {**os.environ, "MODELD_HOME": str(self.paths.home), "MODELD_PROCESS": json.dumps({"role": "logd"})}
        env.pop("MODELD_SERVICE_UUID", None)
        try:
            self._proc = start_detached(
                [sys.executable, "-I", LOGD_PY, "--socket", str(self.socket_path), "--record", str(self.record)],
                env=env,
                log_path=self.paths.home / "logd.log",
            )
        except OSError as exc:
            log.error("cannot start the log writer: %s", exc)
            self._proc = None

    def reap(self) -> None:
        """Collect a writer we started that has exited (it is our child)."""
        if self._proc is not None:
            self._proc.poll()

    def close(self) -> None:
        """Disconnect (the writer carries on for the servers)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        self.reap()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the writer to drain every pipe and exit (after every server has stopped)."""
        ident = self.pid()
        with contextlib.suppress(OSError, ValueError, LogWriterError):
            self._request({"op": "exit"}, retry=False, start=False)
        self.close()
        deadline = time.monotonic() + timeout
        while ident is not None and ident.is_alive() and time.monotonic() < deadline:
            if self._proc is not None:
                self._proc.poll()
            time.sleep(0.005)

    # -------------------------------------------------------------------- requests

    def _request(
        self, message: dict[str, object], fds: tuple[int, ...] = (), retry: bool = True, start: bool = True
    ) -> dict[str, object]:
        with self._lock:
            return self._exchange(message, fds, retry, start)

    def _exchange(self, message: dict[str, object], fds: tuple[int, ...], retry: bool, start: bool) -> dict[str, object]:
        for attempt in (1, 2):
            if not self.ensure(start):
                raise LogWriterError(self.failure)
            assert self._conn is not None
            try:
                data = json.dumps(message).encode()
                if fds:
                    socket.send_fds(self._conn, [data], list(fds))
                else:
                    self._conn.send(data)
                reply = json.loads(self._conn.recv(65536) or b"null")
            except (OSError, ValueError) as exc:
                self.close()  # a writer that went away: the next attempt starts another
                if attempt == 2 or not retry:
                    raise LogWriterError(f"the log writer failed: {exc}") from exc
                continue
            if not isinstance(reply, dict) or not reply.get("ok"):
                raise LogWriterError(f"the log writer refused {message.get('op')}: {reply}")
            return reply
        raise AssertionError("unreachable")

    def open(self, key: str, path: Path, max_bytes: int, backups: int, first_line: bytes) -> int:
        """A fd for a server's stdout and stderr (the caller passes it on and closes it).

        The write end of a new pipe whose read end the writer appends to ``path``; ``first_line``
        goes in before anything the server writes. Without a writer, ``path`` itself, appended to.
        """
        r, w = os.pipe2(os.O_CLOEXEC)
        first_line = first_line[:4096]  # a pipe takes this much at once with no reader yet (64 KiB, at least a page)
        try:
            os.write(w, first_line)
            self._request({"op": "attach", "key": key, "path": str(path), "max_bytes": max_bytes, "backups": backups}, (r,))
        except LogWriterError as exc:
            os.close(w)
            log.warning("%s: %s; the server writes its log directly", key, exc)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            with contextlib.suppress(OSError):
                os.write(fd, first_line)
            return fd
        finally:
            os.close(r)
        return w

    def limits(self, key: str, path: Path, max_bytes: int, backups: int) -> None:
        with contextlib.suppress(LogWriterError):
            self._request({"op": "limits", "key": key, "path": str(path), "max_bytes": max_bytes, "backups": backups})

    def flush(self, key: str) -> None:
        """Everything the service's servers have written so far is in its file (best effort)."""
        with contextlib.suppress(LogWriterError):
            self._request({"op": "flush", "key": key}, retry=False, start=False)  # (called from threads)


class LogWriterError(OSError):
    pass


# ------------------------------------------------------------------------ reading


def log_files(path: Path, backups: int) -> list[Path]:
    """The log's files, oldest first: service.log.N … service.log.1, service.log (those that exist)."""
    older = [path.with_name(f"{path.name}.{i}") for i in range(max(backups, 0), 0, -1)]
    return [p for p in older if p.exists()] + [path]


def _is_marker(line: bytes) -> bool:
    return line.startswith(MARKER)


def tail_start(sources: list[tuple[int, int]], n: int) -> tuple[int, int]:
    """Where the last ``n`` of the server's lines start: (index into ``sources``, byte offset).

    ``sources``: (fd, size) of each file, oldest first; only the first ``size`` bytes of each count
    (what was there when the files were opened). Reads back from the end in blocks, so the cost
    is the size of those lines, not of the files. Marker lines are not counted.
    """
    wanted = n
    for index in range(len(sources) - 1, -1, -1):
        fd, end = sources[index]
        position, pending = end, b""  # pending: the bytes from ``position`` to the end of the line being read
        while True:
            start = max(0, position - CHUNK) if position else 0
            data = (os.pread(fd, position - start, start) if position else b"") + pending
            cut = data.rfind(b"\n")
            while cut >= 0 or start == 0:
                line_start = start + cut + 1
                line = data[cut + 1 :]
                # (after a final newline there is no line)
                if not (line_start == end and not line) and not _is_marker(line):
                    wanted -= 1
                    if wanted == 0:
                        return index, line_start
                if cut < 0:
                    break
                data = data[:cut]
                cut = data.rfind(b"\n")
            if start == 0:
                break
            position, pending = start, data
            if len(pending) > 16 * CHUNK:  # an absurdly long line: count it from here
                pending = b""
    return 0, 0


def _open_all(files: list[Path]) -> list[tuple[int, int, int]]:
    """(fd, size, inode) of each file that exists, oldest first: a snapshot of the log."""
    opened = []
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        st = os.fstat(fd)
        opened.append((fd, st.st_size, st.st_ino))
    return opened


def tail_text(path: Path, n: int = 20, max_bytes: int = 16384) -> str:
    """The last ``n`` of the server's lines in its log, at most ``max_bytes`` of them (for error messages).

    A line cut by ``max_bytes`` is left out whole: it may start mid-secret, which scrubbing would
    then not recognise.
    """
    opened = _open_all(log_files(path, 1))
    try:
        index, offset = tail_start([(fd, size) for fd, size, _ in opened], n)
        data = b""
        for i in range(index, len(opened)):
            fd, size, _ = opened[i]
            start = offset if i == index else 0
            cut = max(start, size - max_bytes)
            part = os.pread(fd, size - cut, cut)
            if cut > start:
                part = part.partition(b"\n")[2]
            data = (data + part)[-max_bytes:]
    finally:
        for fd, _, _ in opened:
            os.close(fd)
    if len(data) == max_bytes:
        data = data.partition(b"\n")[2]
    lines = data.decode(errors="replace").splitlines()
    return "\n".join(line for line in lines if not line.startswith(MARKER.decode()))


class _Filter:
    """Drops marker lines from a stream of chunks (a line may span chunks)."""

    def __init__(self) -> None:
        self.partial = b""

    def __call__(self, data: bytes, final: bool = False) -> bytes:
        data = self.partial + data
        cut = len(data) if final else data.rfind(b"\n") + 1
        self.partial = data[cut:]
        if len(self.partial) > CHUNK:  # a very long line: pass it on as it comes
            cut, self.partial = len(data), b""
        lines = data[:cut].split(b"\n")
        return b"\n".join(line for line in lines if not _is_marker(line))


async def read_log(
    path: Path, backups: int, tail: int | None, follow: bool, keep_going: Callable[[float], Awaitable[bool]]
) -> AsyncIterator[bytes]:
    """The log as chunks: everything (oldest file first), or the last ``tail`` server lines, as it
    was when asked; with ``follow``, then what is written next, across rotations, while
    ``keep_going()`` says so."""
    opened = await asyncio.to_thread(_open_all, log_files(path, backups))
    try:
        index, offset = 0, 0
        strip: _Filter | None = None
        if tail is not None and opened:
            if tail == 0:
                index, offset = len(opened) - 1, opened[-1][1]
            else:
                index, offset = await asyncio.to_thread(tail_start, [(fd, size) for fd, size, _ in opened], tail)
                strip = _Filter()
        for i in range(index, len(opened)):
            fd, size, _ = opened[i]
            position = offset if i == index else 0
            while position < size:
                data = os.pread(fd, min(CHUNK, size - position), position)
                if not data:
                    break
                position += len(data)
                yield strip(data) if strip else data
        if strip is not None and (rest := strip(b"", final=True)):
            yield rest
        if not follow:
            return
        if opened:  # service.log as it was: go on from where the snapshot ended
            fd, size, inode = opened.pop()
            os.lseek(fd, size, os.SEEK_SET)
        else:
            current = await _wait_open(path, keep_going)
            if current is None:
                return
            fd, inode = current
    finally:
        for fd_, _, _ in opened:
            os.close(fd_)
    try:
        idle = FOLLOW_POLL[0]
        while True:
            data = os.read(fd, CHUNK)
            if data:
                idle = FOLLOW_POLL[0]
                yield data
                continue
            rotated = _inode(path) not in (inode, None)
            if rotated:
                # Ours was renamed away: finish it, then the files written after it, oldest first.
                while data := os.read(fd, CHUNK):
                    yield data
                os.close(fd)
                fd = -1
                newer = await asyncio.to_thread(_newer_than, path, backups, inode)
                try:
                    while newer and len(newer) > 1:
                        older_fd, _, _ = newer.pop(0)
                        while data := os.read(older_fd, CHUNK):
                            yield data
                        os.close(older_fd)
                finally:
                    for extra_fd, _, _ in newer[:-1]:
                        os.close(extra_fd)
                if newer:  # the current service.log, as of the snapshot: followed from its start
                    fd, _, inode = newer[0]
                else:
                    reopened = await _wait_open(path, keep_going)
                    if reopened is None:
                        return
                    fd, inode = reopened
                continue
            # Nothing new: wait a little, longer while it stays quiet (a busy log is read soon again,
            # so that no rotated file is missed; an idle one costs little).
            if not await keep_going(idle):
                return
            idle = min(idle * 2, FOLLOW_POLL[1])
    finally:
        if fd >= 0:
            os.close(fd)


def _newer_than(path: Path, backups: int, inode: int) -> list[tuple[int, int, int]]:
    """The files written after the one with ``inode``, oldest first, opened ((fd, size, inode)),
    the current service.log last: all of them if that one is gone (rotated past the backups).

    The snapshot is taken again if a rotation moved a file while it was being taken, so that the
    order is right.
    """
    names = [path.with_name(f"{path.name}.{i}") for i in range(max(backups, 0), 0, -1)] + [path]
    for _attempt in range(20):
        opened = _open_all(names)
        if [_inode(p) for p in names if _inode(p) is not None] == [ino for _, _, ino in opened]:
            break
        for fd, _, _ in opened:
            os.close(fd)
    else:
        opened = _open_all(names)  # (a flood that rotates faster than this can look: best effort)
    for i, (_, _, ino) in enumerate(opened):
        if ino == inode:
            for fd, _, _ in opened[: i + 1]:
                os.close(fd)
            return opened[i + 1 :]
    return opened


async def _wait_open(path: Path, keep_going: Callable[[float], Awaitable[bool]]) -> tuple[int, int] | None:
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            return fd, os.fstat(fd).st_ino
        except FileNotFoundError:
            if not await keep_going(FOLLOW_POLL[0]):
                return None


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
