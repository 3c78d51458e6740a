"""A service's logs on Ray: its replicas' log files under the head's session folder.

Serve writes each replica's log to ``<session>/logs/serve/replica_<app>_<deployment>_<id>.log``
on the node that runs it; the application is named by the service's uuid. They are read
where this driver runs on a node of the cluster whose replicas are there (a local head);
from a ``ray://`` driver, or for replicas on other nodes, they are out of reach, and the
call says where they are instead.
"""

from __future__ import annotations

import glob
import os
import time
from collections import deque
from collections.abc import Callable, Iterator

from daemon.exceptions import ServiceError

FOLLOW_POLL = 0.2  # seconds between two looks at the files when following


def _files(session: str, app: str) -> list[str]:
    paths = glob.glob(os.path.join(glob.escape(session), "logs", "serve", f"replica_{glob.escape(app)}_*.log"))
    return sorted(paths, key=lambda p: (os.path.getmtime(p), p))


def replica_logs(
    app: str,
    session: str | None,
    address: str,
    follow: bool = False,
    tail: int | None = None,
    gone: Callable[[], bool] = lambda: False,
) -> Iterator[str]:
    """Lines (each ending in a newline) of the replica logs of ``app``, oldest file first; ``tail``: the last N.
    ``follow`` ends once ``gone()`` (the service deleted), after the lines written until then."""
    if session is None or not os.path.isdir(session):
        raise ServiceError(
            f"the logs of {app} are on the nodes of the Ray cluster at {address} (logs/serve/replica_{app}_*.log in each "
            "node's session folder), which this process cannot read: it is not on a node of that cluster "
            "(a ray:// driver); read them there, or with `ray logs`"
        )
    if tail is not None and tail < 0:
        raise ValueError(f"tail must be 0 or more, got {tail}")
    return _read(session, app, follow, tail, gone)


def _read(session: str, app: str, follow: bool, tail: int | None, gone: Callable[[], bool]) -> Iterator[str]:
    offsets: dict[str, int] = {}
    lines: deque[str] | list[str] = deque(maxlen=tail) if tail is not None else []
    for path in _files(session, app):
        with open(path, "rb") as f:
            data = f.read()
        offsets[path] = len(data)
        lines.extend(line + "\n" for line in data.decode(errors="replace").splitlines())
    yield from lines
    while follow:
        time.sleep(FOLLOW_POLL)
        follow = not gone()  # (the lines written until it went are read once more)
        for path in _files(session, app):  # a replace starts new replicas, with new files
            with open(path, "rb") as f:
                f.seek(offsets.get(path, 0))
                data = f.read()
            end = data.rfind(b"\n") + 1  # whole lines only; the rest comes next time
            if end:
                offsets[path] = offsets.get(path, 0) + end
                yield from (line + "\n" for line in data[:end].decode(errors="replace").splitlines())
