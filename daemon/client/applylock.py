"""``apply.lock``: one apply of a home at a time, from its plan to the end of carrying it out.

Two applies that overlapped would each carry out a plan made against a state the other was
changing: a prune's deletes undone by the other's replaces (the same uuid back), for instance.
So an apply takes an exclusive ``flock`` on ``$MODELD_HOME/apply.lock`` before it lists the
services, and keeps it until its last step; a second apply waits for it, then plans against
the state the first left. A dry run changes nothing and takes no lock.

Plain fcntl, as filelock's FileLock takes it (so the two exclude each other), rather than
filelock itself: importing that costs ~90 ms, more than an apply of an unchanged file
(``apply_noop_ms``). The kernel drops the lock when its holder exits, however it exits.
"""

from __future__ import annotations

import fcntl
import os
import time

from ..exceptions import StorageError
from ..paths import Paths

POLL = 0.05  # how often an asyncio apply tries again (a blocking flock in a thread could not be cancelled)


class ApplyLock:
    """The home's apply lock: ``acquire`` (blocking), ``acquire_async`` (awaited), ``release``."""

    def __init__(self, paths: Paths) -> None:
        self.path = paths.apply_lock
        self.fd: int | None = None
        self.waited = 0.0  # seconds spent waiting for another apply

    def note(self) -> str | None:
        """What the report says when this apply had to wait for another one."""
        if not self.waited:
            return None
        return f"waited {self.waited:.1f} s for another apply of this home to finish ({self.path})"

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot open {self.path}: {exc.strerror or exc}") from exc

    def _try(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def acquire(self) -> None:
        fd = self._open()
        try:
            if not self._try(fd):
                start = time.monotonic()
                fcntl.flock(fd, fcntl.LOCK_EX)
                self.waited = max(time.monotonic() - start, 0.1)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    async def acquire_async(self) -> None:
        """As ``acquire``, without blocking the event loop: a non-blocking try every POLL s (a
        cancelled apply leaves no lock held, nor a thread blocked in flock)."""
        import asyncio  # (here: the blocking clients and every `modeld` command must not import it)

        fd = self._open()
        try:
            start = time.monotonic()
            while not self._try(fd):
                await asyncio.sleep(POLL)
            if time.monotonic() - start >= POLL:
                self.waited = time.monotonic() - start
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None
