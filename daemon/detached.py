"""Starting a process that outlives whoever started it: the daemon (started by a client), the log
writer and the fork server (started by the daemon).

Such a process runs in a session of its own (no signal to the starter's terminal or group reaches
it), in ``/`` (it holds no directory busy), with stdin from ``/dev/null``, its stdout and stderr
appended to its own log file, and no fd of the starter but ``pass_fds``. Standard library only:
every ``modeld`` command imports it through the client.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence


def start_detached(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log_path: str | os.PathLike[str],
    pass_fds: Sequence[int] = (),
    umask: int = -1,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` detached (see the module docstring); OSError if it cannot be started."""
    with open(log_path, "ab", buffering=0) as log_file:
        return subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            pass_fds=tuple(pass_fds),
            umask=umask,
        )
