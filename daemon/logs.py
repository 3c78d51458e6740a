"""The servers' logs, read in bounded memory, and the marker lines the daemon writes into them.

The files themselves are written by the log writer (``runtime/logd.py``; the daemon's end of it
is ``logwriter.py``), which appends whole lines to ``service.log`` and rotates it by rename to
``service.log.1`` … ``.N``. This module is the one place they are read: the API's
``GET /v1/services/{uuid}/logs`` (what ``modeld logs`` and ``DaemonClient.logs`` get) streams
``read_log``, and supervision quotes ``tail_text`` in errors.

Reading never loads a whole file: ``tail`` scans back from the end in 64 KiB
blocks until it has counted enough of the server's lines (the daemon's own
``--- modeld: ... ---`` marker lines are not counted, and are left out of a
tail), and a stream goes forward in 64 KiB chunks, across ``service.log.N`` …
``.1`` and ``service.log``; ``follow`` continues across a rotation.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

CHUNK = 64 * 1024
MARKER = b"--- modeld: "
FOLLOW_POLL = (0.01, 0.2)  # seconds a follower waits for new lines: at first, and at most


MARKER_TEXT_MAX = 512  # characters of what a marker quotes (an argv item may be 128 KiB)


def marker(text: str) -> bytes:
    """A line the daemon writes into a server's log (not counted as the server's by ``tail``)."""
    if len(text) > MARKER_TEXT_MAX:
        text = text[:MARKER_TEXT_MAX] + "…"
    return f"--- modeld: {text} at {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode()


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


def _open_snapshot(files: list[Path]) -> list[tuple[int, int, int]]:
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
    opened = _open_snapshot(log_files(path, 1))
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


class _MarkerFilter:
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
    opened = await asyncio.to_thread(_open_snapshot, log_files(path, backups))
    try:
        index, offset = 0, 0
        strip: _MarkerFilter | None = None
        if tail is not None and opened:
            if tail == 0:
                index, offset = len(opened) - 1, opened[-1][1]
            else:
                index, offset = await asyncio.to_thread(tail_start, [(fd, size) for fd, size, _ in opened], tail)
                strip = _MarkerFilter()
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
            rotated = _inode_of(path) not in (inode, None)
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
        opened = _open_snapshot(names)
        if [_inode_of(p) for p in names if _inode_of(p) is not None] == [ino for _, _, ino in opened]:
            break
        for fd, _, _ in opened:
            os.close(fd)
    else:
        opened = _open_snapshot(names)  # (a flood that rotates faster than this can look: best effort)
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


def _inode_of(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None
