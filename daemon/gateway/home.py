"""The gateway's routing table, read from the home: ``services/*/service.json``, watched for changes.

The records on disk are the source of truth (every transition is written to ``service.json``
atomically, by rename), so the gateway needs nothing from the daemon: it keeps routing while the
daemon is dead, and even a gateway started while the daemon is dead has every route.

Watching: inotify (through ctypes, as ``daemon/linux.py`` would) on ``services/`` (a service
comes or goes: a create, a delete's rename away) and on each ``services/<uuid>/`` (its record
renamed into place). Any event schedules one rescan a few milliseconds later, which re-reads only
the records whose (inode, mtime, size) changed, so an idle gateway does not wake at all. Where
inotify cannot be had (no instance left, or a folder that cannot be watched: the user's
``max_user_watches`` spent), or with ``watch="poll"``, the same rescan runs every ``POLL_INTERVAL``
(a stat per service) instead; ``mode`` says which.

A record that cannot be read keeps its last good entry; the gateway never writes to the home.
Standard library only.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .routes import Entry, Table

POLL_INTERVAL = 0.5
RECHECK_GAP = 0.002  # the least time between two rescans made for an answer (see HomeTable.refresh)
SETTLE = 0.005  # seconds from the first event to the rescan: a burst of events is one rescan

IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_ONLYDIR = 0x01000000
TOP_MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_ONLYDIR
DIR_MASK = IN_MOVED_TO | IN_CLOSE_WRITE | IN_DELETE | IN_ONLYDIR

SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")  # as daemon/config.py's
REDACTED = "********"
WILDCARD = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def entry_of(record: dict[str, Any], created: int = 0) -> Entry:
    """A route from a service.json (raises KeyError, TypeError or ValueError for one that is not a service)."""
    config, status, endpoint = record["config"], record.get("status") or {}, record.get("endpoint") or {}
    state = str(status.get("state", "inactive"))
    if record.get("desired_state") == "stopped" and state == "active":
        state = "inactive"  # (a stop being recorded)
    private = bool(endpoint.get("unix_socket"))  # its owner chose a socket only they can reach: not routed
    host, port = WILDCARD.get(str(endpoint.get("host", "")), str(endpoint.get("host"))), int(endpoint.get("port") or 0)
    if port == 0 and state == "active" and not private:
        state = "pending_startup"  # (no port recorded yet)
    idle, startup = config.get("idle_timeout"), config.get("startup_timeout", 300.0)
    return Entry(
        uuid=str(record["uuid"]),
        # A built-in server serves the name its endpoint records (the model name, else "model"), as its
        # prediction URL says; a command service is known by its model name alone.
        name=str((endpoint.get("model_name") if endpoint.get("kserve") else None) or config.get("model_name") or ""),
        host=host,
        port=port,
        state=state,
        last_error=_scrub(str(status.get("last_error") or ""), config),
        private=private,
        created=created or int(record.get("created_at") or time.time()),  # (OpenAI's: when the model was made)
        model_type=str(config.get("model_type") or ("command" if config.get("command") else "python")),
        idle_timeout=None if idle is None else float(idle),
        startup_timeout=float("inf") if startup is None else float(startup),  # (null: an old record's infinity)
        desired=str(record.get("desired_state") or "running"),
        woken=state == "pending_startup" and status.get("last_state") == "scaled_to_zero",
    )


def _scrub(text: str, config: dict[str, Any]) -> str:
    """Secret env values masked, as the daemon masks them (``ServiceConfig.scrub``)."""
    if not text:
        return text
    secret_env = set(config.get("secret_env") or ())
    env = config.get("env") or {}
    values = {
        str(v) for k, v in env.items() if len(str(v)) >= 4 and (k in secret_env or any(m in k.upper() for m in SECRET_MARKERS))
    }
    for value in sorted(values, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return text


class HomeTable:
    """Keeps ``on_change(Table)`` fed with the table of ``home``'s services."""

    def __init__(self, home: Path, on_change: Callable[[Table], None], watch: str = "auto"):
        self.services = home / "services"
        self.watch = watch  # "auto": inotify where it can be had; "poll": never
        self.on_change = on_change
        self.entries: dict[str, tuple[tuple[int, int, int], Entry]] = {}  # by folder name: (stat key, entry)
        self.watches: dict[str, int] = {}
        self.inotify = -1
        self.mode = "poll"
        self.scans = 0
        self.changes = 0
        self._last_scan = 0.0
        self._pending: asyncio.TimerHandle | None = None
        self._libc: Any = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.inotify = self._inotify_init() if self.watch != "poll" else -1
        if self.inotify >= 0 and self._add_watch(str(self.services), TOP_MASK) >= 0:
            self.mode = "inotify"
            loop.add_reader(self.inotify, self._events)
        else:
            self._poll_instead()
        self.rescan()

    def _poll_instead(self) -> None:
        """Give up inotify (if it was on) and rescan every POLL_INTERVAL from now on."""
        if self.mode == "inotify":
            asyncio.get_running_loop().remove_reader(self.inotify)
        if self.inotify >= 0:
            os.close(self.inotify)
        self.inotify, self.mode = -1, "poll"
        self.watches.clear()
        asyncio.get_running_loop().call_later(POLL_INTERVAL, self._poll)

    # ------------------------------------------------------------------ inotify

    def _inotify_init(self) -> int:
        try:
            self._libc = ctypes.CDLL(None, use_errno=True)
            return int(self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
        except (OSError, AttributeError):
            return -1

    def _add_watch(self, path: str, mask: int) -> int:
        return int(self._libc.inotify_add_watch(self.inotify, os.fsencode(path), ctypes.c_uint32(mask)))

    def _events(self) -> None:
        try:
            while os.read(self.inotify, 65536):
                pass
        except BlockingIOError:
            pass
        if self._pending is None:
            self._pending = asyncio.get_running_loop().call_later(SETTLE, self.rescan)

    def _poll(self) -> None:
        self.rescan()
        asyncio.get_running_loop().call_later(POLL_INTERVAL, self._poll)

    # ------------------------------------------------------------------ reading

    def refresh(self) -> bool:
        """Rescan now, unless one ran in the last ``RECHECK_GAP`` s (a client asking for a missing
        model in a loop costs a rescan per RECHECK_GAP at most). True if the table changed."""
        if time.monotonic() - self._last_scan < RECHECK_GAP:
            return False
        before = self.changes
        self.rescan()
        return self.changes != before

    def rescan(self) -> None:
        """Re-read the records that changed; tell ``on_change`` if the table did."""
        self._last_scan = time.monotonic()
        if self._pending is not None:
            self._pending.cancel()
        self._pending = None
        self.scans += 1
        try:
            names = [n for n in os.listdir(self.services) if not n.startswith(".")]
        except OSError:
            names = []
        changed = False
        for gone in set(self.entries) - set(names):
            del self.entries[gone]
            changed = True
        for name in names:
            folder = self.services / name
            if self.mode == "inotify" and name not in self.watches:
                wd = self._add_watch(str(folder), DIR_MASK)
                if wd < 0 and ctypes.get_errno() != errno.ENOENT:  # (ENOENT: deleted meanwhile)
                    self._poll_instead()  # an unwatched record would never be read again
                else:
                    self.watches[name] = wd
            path = folder / "service.json"
            try:
                st = os.stat(path)
            except OSError:
                continue  # being created or deleted: the next event brings it
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            known = self.entries.get(name)
            if known is not None and known[0] == key:
                continue
            try:
                with open(path, "rb") as f:
                    entry = entry_of(json.load(f), known[1].created if known else 0)
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue  # a record that does not parse keeps its last good entry
            if known is None or known[1] != entry:
                changed = True
            self.entries[name] = (key, entry)
        for gone in set(self.watches) - set(names):
            del self.watches[gone]  # (the kernel dropped the watch with the folder)
        if changed or self.scans == 1:
            self.changes += 1
            self.on_change(Table([entry for _key, entry in self.entries.values()]))
