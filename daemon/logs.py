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

from .linux import ProcessIdentity
from .paths import Paths

log = logging.getLogger("modeld.logs")

LOGD_PY = str(Path(__file__).with_name("runtime") / "logd.py")
CHUNK = 64 * 1024
MARKER = b"--- modeld: "
FLUSH_LIMIT = 1 << 20


def marker(text: str) -> bytes:
    """A line the daemon writes into a server's log (not counted as the server's by ``tail``)."""
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
        self._lock = threading.RLock()  # one request at a time on the connection (flushes come from threads)

    # ----------------------------------------------------------------- writer life

    def ensure(self) -> bool:
        """Connected to a live writer (started if needed); False if none can be had."""
        if self._conn is not None:
            return True
        conn = self._connect()
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
        """The live writer's identity from its record (checked against its start time and tag)."""
        try:
            lines = self.record.read_text().split()
            ident = ProcessIdentity(int(lines[0]), int(lines[1]), lines[2])
            with open(f"/proc/{ident.pid}/environ", "rb") as f:
                tagged = f"MODELD_HOME={self.paths.home}".encode() in f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            return None
        return ident if tagged and ident.is_alive() else None

    def _spawn(self) -> None:
        env = {**os.environ, "MODELD_HOME": str(self.paths.home), "MODELD_PROCESS": json.dumps({"role": "logd"})}
        env.pop("MODELD_SERVICE_UUID", None)
        try:
            with open(self.paths.home / "logd.log", "ab") as out:
                self._proc = subprocess.Popen(
                    [sys.executable, "-I", LOGD_PY, "--socket", str(self.socket_path), "--record", str(self.record)],
                    env=env, cwd="/", stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True, close_fds=True,
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
            self._request({"op": "exit"}, retry=False)
        self.close()
        deadline = time.monotonic() + timeout
        while ident is not None and ident.is_alive() and time.monotonic() < deadline:
            if self._proc is not None:
                self._proc.poll()
            time.sleep(0.005)

    # -------------------------------------------------------------------- requests

    def _request(self, message: dict[str, object], fds: tuple[int, ...] = (), retry: bool = True) -> dict[str, object]:
        with self._lock:
            return self._exchange(message, fds, retry)

    def _exchange(self, message: dict[str, object], fds: tuple[int, ...], retry: bool) -> dict[str, object]:
        for attempt in (1, 2):
            if not self.ensure():
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
            self._request({"op": "flush", "key": key}, retry=False)


class LogWriterError(OSError):
    pass


# ------------------------------------------------------------------------ reading


def log_files(path: Path, backups: int) -> list[Path]:
    """The log's files, oldest first: service.log.N … service.log.1, service.log (those that exist)."""
    older = [path.with_name(f"{path.name}.{i}") for i in range(max(backups, 0), 0, -1)]
    return [p for p in older if p.exists()] + [path]


def _is_marker(line: bytes) -> bool:
    return line.startswith(MARKER)


def tail_start(files: list[Path], n: int) -> tuple[int, int]:
    """Where the last ``n`` of the server's lines start: (index into ``files``, byte offset).

    Reads back from the end in blocks, so the cost is the size of those lines, not of the files.
    Marker lines are not counted.
    """
    wanted = n
    for index in range(len(files) - 1, -1, -1):
        try:
            f = open(files[index], "rb")
        except FileNotFoundError:
            continue
        with f:
            end = os.fstat(f.fileno()).st_size
            position, pending = end, b""  # pending: the bytes from ``position`` to the end of the line being read
            while True:
                start = max(0, position - CHUNK) if position else 0
                if position:
                    f.seek(start)
                    data = f.read(position - start) + pending
                else:
                    data = pending
                cut = data.rfind(b"\n")
                while cut >= 0 or start == 0:
                    line_start = start + cut + 1
                    line = data[cut + 1:]
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


def tail_text(path: Path, n: int = 20, max_bytes: int = 16384) -> str:
    """The last ``n`` of the server's lines in its log, at most ``max_bytes`` of them (for error messages).

    A line cut by ``max_bytes`` is left out whole: it may start mid-secret, which scrubbing would
    then not recognise.
    """
    files = log_files(path, 1)
    index, offset = tail_start(files, n)
    data = b""
    for i in range(index, len(files)):
        with contextlib.suppress(OSError), open(files[i], "rb") as f:
            start = offset if i == index else 0
            size = os.fstat(f.fileno()).st_size
            cut = max(start, size - max_bytes)
            f.seek(cut)
            part = f.read(max_bytes)
            if cut > start:
                part = part.partition(b"\n")[2]
            data = (data + part)[-max_bytes:]
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
    path: Path, backups: int, tail: int | None, follow: bool, keep_going: Callable[[], Awaitable[bool]]
) -> AsyncIterator[bytes]:
    """The log as chunks: everything (oldest file first), or the last ``tail`` server lines; with
    ``follow``, then what is written next, across rotations, while ``keep_going()`` says so."""
    files = log_files(path, backups)
    index, offset = 0, 0
    strip: _Filter | None = None
    if tail is not None:
        if tail == 0:
            index, offset = len(files) - 1, _size(files[-1])
        else:
            index, offset = await asyncio.to_thread(tail_start, files, tail)
            strip = _Filter()
    current: tuple[int, int] | None = None  # (fd, inode) of service.log once reached
    for i in range(index, len(files)):
        try:
            fd = os.open(files[i], os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        os.lseek(fd, offset if i == index else 0, os.SEEK_SET)
        try:
            while data := os.read(fd, CHUNK):
                yield strip(data) if strip else data
        except BaseException:
            os.close(fd)
            raise
        if i == len(files) - 1 and follow:
            current = (fd, os.fstat(fd).st_ino)
        else:
            os.close(fd)
    if strip is not None and (rest := strip(b"", final=True)):
        yield rest
    if not follow:
        return
    if current is None:  # no service.log yet
        current = await _wait_open(path, keep_going)
        if current is None:
            return
    fd, inode = current
    try:
        while True:
            data = os.read(fd, CHUNK)
            if data:
                yield data
                continue
            rotated = _inode(path) not in (inode, None)
            if rotated:
                # Ours was renamed away: finish it, then the files written after it, oldest first.
                while data := os.read(fd, CHUNK):
                    yield data
                os.close(fd)
                fd = -1
                for newer in _newer_than(path, backups, inode):
                    async for data in _whole(newer):
                        yield data
                opened = await _wait_open(path, keep_going)
                if opened is None:
                    return
                fd, inode = opened
                continue
            if not await keep_going():
                return
    finally:
        if fd >= 0:
            os.close(fd)


async def _whole(path: Path) -> AsyncIterator[bytes]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        while data := os.read(fd, CHUNK):
            yield data
    finally:
        os.close(fd)


def _newer_than(path: Path, backups: int, inode: int) -> list[Path]:
    """The rotated files written after the one with ``inode`` (oldest first); all of them if it is gone."""
    older = [path.with_name(f"{path.name}.{i}") for i in range(max(backups, 0), 0, -1)]
    for i, candidate in enumerate(older):
        if _inode(candidate) == inode:
            return older[i + 1:]
    return [p for p in older if p.exists()]


async def _wait_open(path: Path, keep_going: Callable[[], Awaitable[bool]]) -> tuple[int, int] | None:
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            return fd, os.fstat(fd).st_ino
        except FileNotFoundError:
            if not await keep_going():
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
