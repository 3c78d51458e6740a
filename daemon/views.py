"""What find and get answer, served from memory (the API's ``GET /v1/services`` and ``GET /v1/services/{uuid}``).

The daemon's most frequent requests are answered without walking or serialising every service:
an index by each of find's filters (``filters.FIND_FILTERS``), and each service's public JSON,
both made again only when what they were made from changed (see ``ServiceViews``).
"""

from __future__ import annotations

import operator
from typing import Any
from uuid import UUID

from .filters import FIND_FILTERS
from .manager import Manager
from .models import BaseService, ServiceState, changes


class ServiceViews:
    """What find and get answer, served from memory: an index for find's filters and each service's JSON.

    Both are checked, not trusted, on every call, at C speed and without hooks into the manager:
    the index is rebuilt when the list of services or any service's config object changed (configs
    are replaced, never edited in place); a service's JSON (from pydantic's Rust serializer) is
    reused while nothing was edited since (``models.changes()``), or else while the objects and
    status and endpoint values it was made from are the same; the list's answer is reused while
    nothing was edited and it lists the same objects.
    """

    _configs = operator.attrgetter("svc.config")

    def __init__(self, manager: Manager):
        self.manager = manager
        self._members: list[Any] = []
        self._configs_seen: list[Any] = []
        self._ordered: list[Any] = []  # by created_at, as find answers
        self._index: dict[str, dict[str, list[Any]]] = {name: {} for name in FIND_FILTERS}  # (none yet: no refresh)
        self._json: dict[UUID, tuple[int, BaseService, tuple[Any, ...], bytes]] = {}
        self._list: tuple[list[bytes], bytes] = ([], b'{"services": []}')
        self._list_stamp = -1
        self._list_services: list[BaseService] = []

    def _refresh_index(self) -> None:
        members = list(self.manager.services.values())
        configs = list(map(self._configs, members))
        if members == self._members and configs == self._configs_seen:  # identity compares: fast
            return
        self._members, self._configs_seen = members, configs
        self._ordered = sorted(members, key=lambda m: m.svc.created_at)
        self._index = {name: {} for name in FIND_FILTERS}
        for m in self._ordered:
            for name, values in self._index.items():
                values.setdefault(getattr(m.svc.config, name), []).append(m)
        live = {m.uuid for m in members}
        for uuid in [u for u in self._json if u not in live]:
            del self._json[uuid]

    def find(
        self,
        running: bool = False,
        service_uuid: UUID | None = None,
        state: ServiceState | None = None,
        **filters: str | None,
    ) -> list[BaseService]:
        """The services matching every filter given (``running``: active only; ``state``: in that state), oldest first."""
        self._refresh_index()
        wanted = {k: v for k, v in filters.items() if v is not None}
        if service_uuid is not None:
            m = self.manager.services.get(service_uuid)
            candidates = [m] if m is not None else []
        elif wanted:
            candidates = min((self._index[k].get(v, []) for k, v in wanted.items()), key=len)
        else:
            candidates = self._ordered
        found = []
        for m in candidates:
            svc = m.svc
            if running and svc.status.state != ServiceState.ACTIVE:
                continue
            if state is not None and svc.status.state != state:
                continue
            if wanted and any(getattr(svc.config, k) != v for k, v in wanted.items()):
                continue
            found.append(svc)
        return found

    def json(self, svc: BaseService) -> bytes:
        """The service's public JSON, made again only when something in it changed."""
        stamp = changes()
        cached = self._json.get(svc.uuid)
        if cached is not None and cached[0] == stamp and cached[1] is svc:
            return cached[3]  # nothing was edited anywhere since, and it is the same object
        # Every field of the service, its status and its endpoint (the objects edited in place;
        # the others are replaced, never edited). Tuples compare item by item, identity first:
        # the cached objects are the same ones in the common case (and kept alive by the cache,
        # so no new object can take their ids).
        key = (*svc.__dict__.values(), *svc.status.__dict__.values(), *svc.endpoint.__dict__.values())
        if cached is not None and cached[2] == key:
            data = cached[3]
        else:
            data = svc.public().model_dump_json().encode()
        self._json[svc.uuid] = (stamp, svc, key, data)
        return data

    def list_json(self, services: list[BaseService]) -> bytes:
        stamp = changes()
        if stamp == self._list_stamp and services == self._list_services:  # identity compares: fast
            return self._list[1]
        parts = [self.json(s) for s in services]
        if parts != self._list[0]:  # the same bytes objects as last time: reuse the joined answer
            self._list = (parts, b'{"services": [' + b", ".join(parts) + b"]}")
        self._list_stamp, self._list_services = stamp, services
        return self._list[1]
