"""modeld's log writer: owns every server's stdout and stderr, so the logs outlive the daemon.

One process per modeld home, shared by all its services, started by the daemon
(``python -I logd.py --socket run/logd.sock --record run/logd.pid``) and re-used
by the next daemon: a daemon that stops, restarts or is killed with -9 leaves it
running, so no line is lost and no server ever blocks on a pipe that nobody
reads. It imports the standard library only (about 9 MiB for the whole home, not
per service).

Each server writes into a pipe; this process reads the pipes (epoll, at most
64 KiB from one pipe at a time, so a flood cannot starve the others) and appends
whole lines to the service's ``service.log``. Past ``max_bytes`` the file is
rotated by rename (``service.log`` → ``.1`` → … → ``.N``, N = ``backups``; the
oldest goes), between two lines: a line is never split between files, lost or
written twice, and no file grows past ``max_bytes`` + 64 KiB. A line longer than
64 KiB is written in 64 KiB pieces.

Wire format: SOCK_SEQPACKET on ``--socket`` (0600; peers of another uid are
refused), one JSON object per message, answered by ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``:

    {"op": "attach", "key": K, "path": P, "max_bytes": N, "backups": B}
                      + one fd (SCM_RIGHTS): the read end of a server's pipe
    {"op": "limits", "key": K, "max_bytes": N, "backups": B}
    {"op": "flush", "key": K}    everything already in K's pipes is in the file when answered
    {"op": "ping"}               -> {"ok": true, "pid": ..., "pipes": ..., "files": ...}
    {"op": "exit"}               drain every pipe, then exit

It exits by itself once it has had no pipe and no connection for ``IDLE_EXIT``
seconds (a daemon keeps a connection open while it runs).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import selectors
import socket
import struct
import sys
import time

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing, which this process otherwise never loads
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    # A decoded request: a JSON object from a client, its values checked where they are used (str(), int()).
    Request = dict[str, Any]

CHUNK = 64 * 1024
IDLE_EXIT = 2.0
NAME = "modeld-logd"


def _log(msg: str) -> None:
    print(f"modeld-logd: {msg}", file=sys.stderr, flush=True)


class Sink:
    """One service's log file."""

    def __init__(self, path: str, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.fd = -1
        self.size = 0
        self.readers = 0

    def open(self) -> None:
        if self.fd < 0:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self.size = os.fstat(self.fd).st_size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def write(self, data: bytes) -> None:
        try:
            self.open()
            self.size = os.fstat(self.fd).st_size  # (someone else may have appended: a test, a user)
            if self.size >= self.max_bytes and self.size:
                self.rotate()
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
            self.size += len(data)
        except OSError as exc:
            # A full disk, a deleted folder: the lines are dropped, the pipe keeps being drained
            # (a server must never block on its log).
            if exc.errno != errno.ENOENT:
                _log(f"cannot write {self.path}: {exc}")
            self.close()

    def rotate(self) -> None:
        self.close()
        for i in range(self.backups, 1, -1):
            try:
                os.replace(f"{self.path}.{i - 1}", f"{self.path}.{i}")
            except FileNotFoundError:
                pass
        if self.backups >= 1:
            os.replace(self.path, f"{self.path}.1")
        else:
            os.unlink(self.path)
        self.open()


class Reader:
    """The read end of one server's pipe; keeps a partial last line until its newline comes."""

    def __init__(self, fd: int, key: str, sink: Sink) -> None:
        self.fd = fd
        self.key = key
        self.sink = sink
        self.partial = b""

    def drain(self, limit: int) -> bool:
        """Read what is there (up to ``limit`` bytes); False once the writers are all gone."""
        done = 0
        while done < limit:
            try:
                data = os.read(self.fd, CHUNK - len(self.partial))
            except BlockingIOError:
                return True
            except OSError as exc:
                _log(f"reading a pipe of {self.key}: {exc}")
                data = b""
            if not data:
                if self.partial:
                    self.sink.write(self.partial + b"\n")
                    self.partial = b""
                return False
            done += len(data)
            data = self.partial + data
            cut = data.rfind(b"\n") + 1
            if cut == 0 and len(data) >= CHUNK:
                cut = len(data)  # a line longer than a chunk: written in pieces
            if cut:
                self.sink.write(data[:cut])
            self.partial = data[cut:]
        return True


class LogWriter:
    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.selector = selectors.DefaultSelector()
        self.sinks: dict[str, Sink] = {}  # key -> Sink
        self.readers: dict[int, Reader] = {}  # fd -> Reader
        self.connections: set[socket.socket] = set()
        self.idle_since = time.monotonic()
        self.exiting = False
        control.setblocking(False)
        self.selector.register(control, selectors.EVENT_READ, ("accept", None))

    def run(self) -> int:
        while True:
            events = self.selector.select(timeout=0.5)
            for key, _mask in events:
                kind, obj = key.data
                if kind == "accept":
                    self._accept()
                elif kind == "conn":
                    self._request(obj)
                else:
                    self._drain(obj, CHUNK)
            if self.exiting:
                self._drain_all()
                return 0
            if self.readers or self.connections:
                self.idle_since = time.monotonic()
            elif time.monotonic() - self.idle_since > IDLE_EXIT:
                return 0

    def _accept(self) -> None:
        try:
            conn, _ = self.control.accept()
        except (BlockingIOError, InterruptedError):
            return
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        if struct.unpack("3i", creds)[1] != os.getuid():
            conn.close()
            return
        conn.setblocking(False)
        self.connections.add(conn)
        self.selector.register(conn, selectors.EVENT_READ, ("conn", conn))

    def _request(self, conn: socket.socket) -> None:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(conn, 65536, 4)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            msg, fds = b"", []
        if not msg:
            for fd in fds:
                os.close(fd)
            self.selector.unregister(conn)
            self.connections.discard(conn)
            conn.close()
            return
        try:
            reply = self._handle(json.loads(msg), fds)
        except Exception as exc:  # noqa: BLE001  (a bad request is answered, never fatal)
            for fd in fds:
                os.close(fd)
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        try:
            conn.setblocking(True)
            conn.settimeout(2.0)
            conn.send(json.dumps(reply).encode())
        except OSError:
            pass
        finally:
            conn.setblocking(False)

    def _handle(self, req: Request, fds: list[int]) -> dict[str, object]:
        op = req.get("op")
        if op == "attach":
            if len(fds) != 1:
                raise ValueError("attach takes exactly one fd")
            key = str(req["key"])
            sink = self._sink(key, req)
            os.set_blocking(fds[0], False)
            reader = Reader(fds[0], key, sink)
            sink.readers += 1
            self.readers[fds[0]] = reader
            self.selector.register(fds[0], selectors.EVENT_READ, ("pipe", reader))
            return {"ok": True}
        for fd in fds:
            os.close(fd)
        if op == "limits":
            self._sink(str(req["key"]), req)
            return {"ok": True}
        if op == "flush":
            key = str(req["key"])
            for reader in [r for r in self.readers.values() if r.key == key]:
                self._drain(reader, 1 << 30)
            return {"ok": True}
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "pipes": len(self.readers), "files": len(self.sinks)}
        if op == "exit":
            self.exiting = True
            return {"ok": True}
        raise ValueError(f"unknown op {op!r}")

    def _sink(self, key: str, req: Request) -> Sink:
        sink = self.sinks.get(key)
        max_bytes, backups = int(req["max_bytes"]), int(req["backups"])
        if sink is None or (req.get("path") and sink.path != req["path"]):
            if sink is not None:
                sink.close()
            sink = self.sinks[key] = Sink(str(req["path"]), max_bytes, backups)
        sink.max_bytes, sink.backups = max_bytes, backups
        return sink

    def _drain(self, reader: Reader, limit: int) -> None:
        if reader.drain(limit):
            return
        self.selector.unregister(reader.fd)
        os.close(reader.fd)
        del self.readers[reader.fd]
        reader.sink.readers -= 1
        if reader.sink.readers == 0:
            reader.sink.close()  # reopened by the next attach: an idle service holds no fd here

    def _drain_all(self) -> None:
        for reader in list(self.readers.values()):
            while reader.fd in self.readers:
                before = len(reader.partial)
                self._drain(reader, CHUNK)
                if reader.fd in self.readers and len(reader.partial) == before:
                    break  # nothing more right now (its writers live on)
        for sink in self.sinks.values():
            sink.close()


def _set_name(name: str) -> None:
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name)
    except OSError:
        pass


def _write_record(path: str) -> None:
    """pid, start time (clock ticks), boot id: as the daemon's own daemon.pid."""
    with open(f"/proc/{os.getpid()}/stat", "rb") as f:
        ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, f"{os.getpid()}\n{ticks}\n{boot}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="logd.py", description="modeld's log writer (started by the daemon)")
    p.add_argument("--socket", required=True, help="control socket path (SOCK_SEQPACKET)")
    p.add_argument("--record", required=True, help="where to write pid, start ticks and boot id")
    args = p.parse_args(argv)
    _set_name(NAME)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # two fds per live service (its pipe and its file)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    old = os.umask(0o077)
    try:
        try:
            os.unlink(args.socket)
        except FileNotFoundError:
            pass
        control = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        control.bind(args.socket)
        control.listen(64)
    finally:
        os.umask(old)
    _write_record(args.record)
    try:
        return LogWriter(control).run()
    finally:
        for path in (args.record, args.socket):
            try:
                os.unlink(path)
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main())
