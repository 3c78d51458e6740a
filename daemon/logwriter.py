"""The daemon's end of the log writer (``runtime/logd.py``): the one process that writes every server's log.

Servers never write their log files themselves: each writes into a pipe whose
read end belongs to the log writer (one process per home, see there), which
appends whole lines to ``service.log`` and rotates it. The writer outlives the
daemon, so a daemon restart or kill -9 loses no line and never leaves a server
blocked on a full pipe. If the writer cannot be had, a server is given its log
file directly (unbounded, as before the writer existed) and the daemon's log
says why. Reading the files is ``logs.py``'s.
"""

from __future__ import annotations

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
from pathlib import Path

from .detached import start_detached
from .linux import ProcessIdentity
from .paths import Paths

log = logging.getLogger("modeld.logs")  # (the name the daemon's log has always shown for these lines)

LOGD_PY = str(Path(__file__).with_name("runtime") / "logd.py")


class LogWriterClient:
    """The daemon's connection to the log writer of its home; starts the writer when there is none."""

    REPLY_TIMEOUT = 2.0

    def __init__(self, paths: Paths):
        self.paths = paths
        self.socket_path = paths.run / "logd.sock"
        self.record = paths.run / "logd.pid"
        self._conn: socket.socket | None = None
        self._writer_proc: subprocess.Popen[bytes] | None = None
        self.failure = ""  # why servers write their files directly, if they do
        self._record_cache: tuple[tuple[int, int, int], ProcessIdentity | None] | None = None  # pid(): the record as last read
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
                if self._writer_proc is None or self._writer_proc.poll() is not None:
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
            if self._record_cache is None or self._record_cache[0] != stamp:
                lines = self.record.read_text().split()
                ident = ProcessIdentity(int(lines[0]), int(lines[1]), lines[2])
                with open(f"/proc/{ident.pid}/environ", "rb") as f:
                    tagged = f"MODELD_HOME={self.paths.home}".encode() in f.read().split(b"\0")
                self._record_cache = (stamp, ident if tagged else None)
        except (OSError, ValueError, IndexError):
            self._record_cache = None
            return None
        known = self._record_cache[1]
        return known if known is not None and known.is_alive() else None

    def _spawn(self) -> None:
        env = {**os.environ, "MODELD_HOME": str(self.paths.home), "MODELD_PROCESS": json.dumps({"role": "logd"})}
        env.pop("MODELD_SERVICE_UUID", None)
        try:
            self._writer_proc = start_detached(
                [sys.executable, "-I", LOGD_PY, "--socket", str(self.socket_path), "--record", str(self.record)],
                env=env,
                log_path=self.paths.home / "logd.log",
            )
        except OSError as exc:
            log.error("cannot start the log writer: %s", exc)
            self._writer_proc = None

    def reap(self) -> None:
        """Collect a writer we started that has exited (it is our child)."""
        if self._writer_proc is not None:
            self._writer_proc.poll()

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
            if self._writer_proc is not None:
                self._writer_proc.poll()
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
