"""The on-disk store: the source of truth the daemon rebuilds itself from.

Every write goes to a temp file in the same folder, is fsynced, then renamed
over the old one, so a crash at any instant leaves the old or the new file,
never half of one. Mutations of a service's files happen under a file lock
(``services/<uuid>/.lock``) so that tools outside the daemon can read or
edit them safely. A ``service.json`` that cannot be read or validated is set
aside (renamed to ``service.json.corrupt-<time>``) and reported, and the
other services load.

For tests, ``MODELD_FAIL_WRITE_AT=<step>[,<step>...]`` makes each named write (the ``step`` a
caller passes to :meth:`Store.save` or :meth:`Store.write_pid`) fail as a full disk would:
a real ``OSError`` (ENOSPC) raised where the write would be, turned into a StorageError by the
same code path. It reaches precise steps that RLIMIT_FSIZE (every write past a size) cannot.

Errors: the store is the persistence unit, and its public API (``Store``'s methods and
``atomic_write``, which the daemon's pid file and the deployer registry use too) is that unit's
boundary: an ``OSError`` of the disk becomes a StorageError here, once, naming the file. Every
caller means the same by it (the state on disk could not be written), so no caller converts again.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar
from uuid import UUID

from . import killpoints
from .exceptions import StorageError
from .linux import ProcessIdentity
from .models import SERVICE_REGISTRY, BaseService
from .paths import Paths

log = logging.getLogger("modeld.store")


_temp_names = itertools.count()
FAIL_WRITE_ENV = "MODELD_FAIL_WRITE_AT"
_failing_steps = frozenset(filter(None, os.environ.get(FAIL_WRITE_ENV, "").split(",")))


def atomic_write(path: Path, data: bytes, mode: int = 0o600, step: str = "") -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never half.

    ``step`` names the write, for MODELD_FAIL_WRITE_AT (tests only).
    """
    if step and step in _failing_steps:
        exc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        log.warning("failing the write %s of %s (%s)", step, path, FAIL_WRITE_ENV)
        raise StorageError(f"cannot write {path}: {exc.strerror}") from exc
    tmp = os.path.join(path.parent, f".{path.name}.{os.getpid()}.{next(_temp_names)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        try:
            os.fchmod(fd, mode)  # whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fdatasync(fd)  # the data and the size: all a rename needs
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing, left in place), as filelock's FileLock takes it.

    Not reentrant. Plain fcntl instead of filelock here: a service's files are locked on every
    save, and this costs one open and one flock (filelock: ~0.5 ms per lock).
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@dataclass(frozen=True)
class LaunchInfo:
    """What is known of one launch of a server, beside its identity: in its pid file, and (as
    JSON) in its ``MODELD_PROCESS`` tag, which every process it starts inherits.

    On disk the fields have short keys (``version``, ``launch``, ``h``, ``f``); a key this
    version does not know is ignored, a missing one is None, so every earlier file loads.
    """

    version: str | None = None  # the service version it runs
    launch: str | None = None  # the launch id: its cgroup leaf (None: started before launches)
    health_socket: str | None = None  # a built-in server's private health socket (``h``)
    fd_socket: str | None = None  # where a built-in server hands out its listening socket (``f``)

    KEYS: ClassVar[dict[str, str]] = {"version": "version", "launch": "launch", "health_socket": "h", "fd_socket": "f"}

    def fields(self) -> dict[str, str]:
        """The on-disk keys and values, the unset ones left out."""
        return {key: value for name, key in self.KEYS.items() if (value := getattr(self, name)) is not None}

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> LaunchInfo:
        return cls(**{name: str(fields[key]) for name, key in cls.KEYS.items() if fields.get(key) is not None})

    @classmethod
    def from_tag(cls, info: str) -> LaunchInfo:
        """From a ``MODELD_PROCESS`` tag (JSON); empty if it is not a JSON object."""
        try:
            fields = json.loads(info)
        except ValueError:
            return cls()
        return cls.from_fields(fields) if isinstance(fields, dict) else cls()


@dataclass(frozen=True)
class PidRecord:
    """The contents of ``service.pid``: who the process is, what it runs and how to reach it
    privately, and during a hand-over the previous server too."""

    ident: ProcessIdentity
    info: LaunchInfo = LaunchInfo()
    previous: PidRecord | None = None

    # During a hand-over the record names both servers: the new one, and the previous one as
    # ``prev=pid:ticks:boot`` with its own fields as ``prev_<key>=...``.

    def dumps(self) -> bytes:
        lines = [str(self.ident.pid), str(self.ident.start_ticks), self.ident.boot_id]
        fields = self.info.fields()
        if self.previous is not None:
            prev = self.previous.ident
            fields["prev"] = f"{prev.pid}:{prev.start_ticks}:{prev.boot_id}"
            fields.update({f"prev_{k}": v for k, v in self.previous.info.fields().items()})
        lines += [f"{k}={v}" for k, v in sorted(fields.items())]
        return ("\n".join(lines) + "\n").encode()

    @classmethod
    def loads(cls, text: str) -> PidRecord:
        lines = text.splitlines()
        ident = ProcessIdentity(int(lines[0]), int(lines[1]), lines[2].strip())
        fields = dict(line.split("=", 1) for line in lines[3:] if "=" in line)
        previous = None
        try:  # (an unreadable previous server is no previous server)
            pid, ticks, boot = fields["prev"].split(":", 2)
            previous = PidRecord(
                ProcessIdentity(int(pid), int(ticks), boot),
                LaunchInfo.from_fields({k[5:]: v for k, v in fields.items() if k.startswith("prev_")}),
            )
        except (KeyError, ValueError):
            pass
        return cls(ident, LaunchInfo.from_fields(fields), previous)

    def with_previous(self, previous: PidRecord) -> PidRecord:
        return PidRecord(self.ident, self.info, PidRecord(previous.ident, previous.info))

    def split_previous(self) -> tuple[PidRecord, PidRecord | None]:
        """(this record without the previous server, the previous server's record or None)."""
        return PidRecord(self.ident, self.info), self.previous


@dataclass
class Problem:
    """Something found wrong on disk, reported by ``GET /v1/daemon``."""

    path: str
    message: str
    set_aside_as: str = ""
    at: float = field(default_factory=time.time)


class Store:
    def __init__(self, paths: Paths):
        self.paths = paths

    @contextmanager
    def locked(self, uuid: UUID | str) -> Iterator[None]:
        directory = self.paths.service_dir(uuid)
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {directory}: {exc.strerror or exc}") from exc
        with file_lock(directory / ".lock"):
            yield

    def save(self, svc: BaseService, step: str = "") -> None:
        with self.locked(svc.uuid):
            atomic_write(self.paths.service_json(svc.uuid), svc.model_dump_json(indent=2).encode(), step=step)

    def write_pid(self, uuid: UUID | str, record: PidRecord, step: str = "") -> None:
        """Write service.pid atomically: a reader sees the old record or the new one, never none."""
        with self.locked(uuid):
            atomic_write(self.paths.service_pid(uuid), record.dumps(), step=step)

    def read_pid(self, uuid: UUID | str) -> PidRecord | None:
        path = self.paths.service_pid(uuid)
        try:
            return PidRecord.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, IndexError, OSError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            return None

    def clear_pid(self, uuid: UUID | str) -> None:
        with self.locked(uuid):
            try:
                os.unlink(self.paths.service_pid(uuid))
            except FileNotFoundError:
                pass

    def delete(self, uuid: UUID | str) -> None:
        trash = self.retire(uuid)
        if trash is not None:
            self.purge(trash)

    def retire(self, uuid: UUID | str) -> Path | None:
        """Rename a service's folder away: from here on it is deleted, even if we crash now.

        A renamed folder (``.deleted-*``) is removed by the next load; None if there was none.
        """
        directory = self.paths.service_dir(uuid)
        trash = directory.with_name(f".deleted-{directory.name}-{time.time_ns()}")
        try:
            os.rename(directory, trash)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot delete {directory}: {exc.strerror or exc}") from exc
        return trash

    @staticmethod
    def purge(trash: Path) -> None:
        """Remove a retired folder; service.json goes first, so what is left is never a service."""
        try:
            os.unlink(trash / "service.json")
        except OSError:
            pass
        killpoints.reached("delete.mid-unlink")
        shutil.rmtree(trash, ignore_errors=True)

    def load_all(self) -> tuple[list[BaseService], list[Problem]]:
        """Every service on disk, and what had to be set aside."""
        services: list[BaseService] = []
        problems: list[Problem] = []
        self.paths.services.mkdir(mode=0o700, parents=True, exist_ok=True)
        # One listing of each folder (scandir: no stat per file): a thousand services load in
        # a re-adoption's critical path.
        with os.scandir(self.paths.services) as entries:
            folders = sorted((entry.name, Path(entry.path)) for entry in entries if entry.is_dir())
        for name, directory in folders:
            if name.startswith(".deleted-"):
                shutil.rmtree(directory, ignore_errors=True)  # a delete that was cut short
                continue
            try:
                files = os.listdir(directory)
            except OSError:
                continue
            self._remove_temp_files(directory, files)
            path = directory / "service.json"
            if "service.json" not in files:
                # Set aside by an earlier daemon: keep reporting it until someone deals with it.
                for aside in sorted(f for f in files if f.startswith("service.json.corrupt-"))[-1:]:
                    problems.append(Problem(str(path), "unreadable, set aside by an earlier start", str(directory / aside)))
                continue
            try:
                svc = SERVICE_REGISTRY.load_json(path.read_bytes())
                if str(svc.uuid) != directory.name:
                    raise ValueError(f"uuid {svc.uuid} does not match its folder")
            except Exception as exc:  # noqa: BLE001  (any unreadable file is set aside, whatever broke)
                problems.append(self._set_aside(path, exc))
                continue
            svc.service_path = str(directory)
            services.append(svc)
        return services, problems

    @staticmethod
    def _remove_temp_files(directory: Path, files: list[str]) -> None:
        """Remove the temp files of writes cut short (a kill between create and rename).

        Called at load, while this daemon holds the daemon lock and writes nothing yet: every
        ``.service.json.*.tmp`` or ``.service.pid.*.tmp`` there is a leftover.
        """
        temps = [directory / f for f in files if f.endswith(".tmp") and f.startswith((".service.json.", ".service.pid."))]
        for tmp in temps:
            try:
                os.unlink(tmp)
                log.info("removed %s, left by a write cut short", tmp)
            except OSError as exc:
                log.warning("cannot remove %s: %s", tmp, exc)

    def _set_aside(self, path: Path, exc: Exception) -> Problem:
        aside = path.with_name(f"service.json.corrupt-{int(time.time())}")
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        try:
            os.rename(path, aside)
        except OSError as rename_exc:
            log.error("cannot set aside %s: %s", path, rename_exc)
            return Problem(str(path), f"unreadable ({reason}); could not be set aside: {rename_exc}")
        log.error("set aside unreadable %s as %s: %s", path, aside.name, reason)
        return Problem(str(path), f"unreadable ({reason})", str(aside))
