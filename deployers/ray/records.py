"""The ray flavor's records: modeld's own source of truth, one ``service.json`` per service.

    <home>/services/<uuid>/service.json   the whole service (the daemon's form, type ``ray-model-server``)
    <home>/records.lock                   held while a record is read, changed and written back
    <home>/generation                     a new token after every write or removal

No daemon runs for Ray, so the records are what ``find`` answers from: each service's
desired state and its last observed state with ``observed_at``. Writes are atomic
(temp file, fsync, rename: :func:`daemon.store.atomic_write`), so a reader sees the old
record or the new one. Reads are cached per file by (inode, mtime, size): every write
makes a new inode, so a list after a change costs 1,000 ``stat`` calls, not 1,000 parses.
Every write through this module then puts a new token in ``generation``, so a list with
nothing changed since the last one reads that one small file (a record edited by hand is
seen after the next write). The services handed out are shared with the cache: read
them, do not edit them.
Nothing here imports ray.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar
from uuid import UUID, uuid4

from pydantic import Field

from daemon.exceptions import ServiceNotFound, StorageError
from daemon.models import SERVICE_REGISTRY, BaseService, ServiceState, ServiceType

RAY_SERVICE_TYPE = ServiceType(flavor="ray", name="ray-model-server")
LOCK_TIMEOUT = 30.0
log = logging.getLogger("modeld.ray")


@SERVICE_REGISTRY.register
class RayModelService(BaseService):
    """A model server run by Ray Serve: the application named by its uuid, at route prefix ``/<uuid>``."""

    SERVICE_TYPE: ClassVar[ServiceType] = RAY_SERVICE_TYPE

    type: ServiceType = Field(default_factory=lambda: RAY_SERVICE_TYPE)
    observed_at: float | None = Field(None, description="when the state was last asked of Ray (time.time())")
    cluster: str = Field("", description="the address of the cluster it was deployed to")


class Records:
    """The records under one home; any number of processes may share it."""

    def __init__(self, home: str | os.PathLike[str]) -> None:
        self.home = Path(home)
        self.services = self.home / "services"
        self._cache: dict[str, tuple[tuple[int, int, int], RayModelService]] = {}
        self._listed: tuple[bytes, list[RayModelService]] | None = None  # (generation, all()) of the last list
        self._skipped: set[tuple[str, str]] = set()  # unreadable records already reported

    def path(self, uuid: UUID | str) -> Path:
        return self.services / str(uuid) / "service.json"

    # -- reading ------------------------------------------------------------

    def _load(self, name: str) -> RayModelService | None:
        path = os.path.join(self.services, name, "service.json")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._cache.pop(name, None)
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._cache.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            with open(path, "rb") as f:
                service = SERVICE_REGISTRY.load_json(f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read {path}: {exc}; fix or remove the file") from exc
        if not isinstance(service, RayModelService):
            raise StorageError(f"{path} is a {service.type.name!r} record, not a ray-model-server one; fix or remove the file")
        self._cache[name] = (key, service)
        return service

    def _generation(self) -> bytes:
        try:
            with open(self.home / "generation", "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""
        except OSError as exc:
            raise StorageError(f"cannot read {self.home / 'generation'}: {exc.strerror or exc}") from exc

    def _bump(self) -> None:
        """Written after the record, so a reader that saw the new token sees the new record."""
        from daemon.store import atomic_write

        atomic_write(self.home / "generation", uuid4().hex.encode())

    def all(self) -> list[RayModelService]:
        """Every record, oldest first."""
        generation = self._generation()  # before the scan: what it finds is at least this new
        if generation and self._listed is not None and self._listed[0] == generation:
            return list(self._listed[1])
        found = self._scan()
        self._listed = (generation, found) if generation else None
        return list(found)

    def _scan(self) -> list[RayModelService]:
        try:
            names = os.listdir(self.services)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(f"cannot list {self.services}: {exc.strerror or exc}") from exc
        found = []
        for name in names:
            try:
                service = self._load(name)
            except StorageError as exc:  # one bad record must not hide (or block the removal of) the others
                self._skip(name, exc)
                continue
            if service is not None:
                found.append(service)
        if len(self._cache) > len(names):  # forget the deleted ones
            for gone in set(self._cache) - set(names):
                del self._cache[gone]
        found.sort(key=lambda s: (s.created_at, str(s.uuid)))
        return found

    def _skip(self, name: str, exc: StorageError) -> None:
        """Say once (per process and problem) that a record is left out of the lists, and why."""
        said = (name, str(exc))
        if said not in self._skipped:
            self._skipped.add(said)
            log.warning("modeld: left out of the list: %s", exc)

    def find(self, uuid: UUID | str) -> RayModelService | None:
        return self._load(str(uuid))

    def get(self, uuid: UUID | str) -> RayModelService:
        service = self._load(str(uuid))
        if service is None:
            raise ServiceNotFound(f"no service {uuid} in {self.services}")
        return service

    # -- writing ------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Held around a read-change-write, so two processes never lose each other's change."""
        from filelock import FileLock, Timeout  # ~70 ms: only writers need it

        try:
            self.services.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock = FileLock(str(self.home / "records.lock"), timeout=LOCK_TIMEOUT, mode=0o600)
            lock.acquire()
        except Timeout as exc:
            raise StorageError(
                f"{self.home / 'records.lock'} is held by another process for more than {LOCK_TIMEOUT:g}s"
            ) from exc
        except OSError as exc:
            raise StorageError(f"cannot lock {self.home / 'records.lock'}: {exc.strerror or exc}") from exc
        try:
            yield
        finally:
            lock.release()

    def write(self, service: RayModelService) -> RayModelService:
        from daemon.store import atomic_write

        folder = self.services / str(service.uuid)
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {folder}: {exc.strerror or exc}") from exc
        service.service_path = str(folder)
        atomic_write(folder / "service.json", service.model_dump_json(indent=2).encode() + b"\n")
        self._bump()
        return service

    def update(self, uuid: UUID | str, change: Callable[[RayModelService], None]) -> RayModelService:
        """Read the record afresh, apply ``change`` to a copy, and write it back, under the lock."""
        with self.locked():
            service = self.get(uuid).model_copy(deep=True)
            change(service)
            return self.write(service)

    def remove(self, uuid: UUID | str) -> None:
        import shutil

        folder = self.services / str(uuid)
        with self.locked():
            try:
                shutil.rmtree(folder)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StorageError(f"cannot remove {folder}: {exc.strerror or exc}") from exc
            self._bump()
        self._cache.pop(str(uuid), None)


def observed(service: RayModelService, state: ServiceState, error: str | None = None) -> None:
    """Record what Ray said of the service, and when."""
    service.status.moved_to(state, error)
    service.observed_at = time.time()
