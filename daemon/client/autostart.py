"""Auto-start: spawn the daemon of a home when none answers, and wait until it does.

Invariants:

* clients serialise on ``autostart.lock``, so when many find no daemon at
  once exactly one spawns it and the others find it answering;
* the daemon is fully detached (own session, stdio to ``daemon.log``, cwd
  ``/``) and runs under this interpreter, with ``daemon/`` importable from
  where this client found it;
* if it exits instead of answering, the reason from its log is raised at
  once (``DaemonStartError``), not after a timeout; a daemon stopped by a
  bad setting is reported by its own line ("cannot start the daemon:
  daemon.toml: health_interval: ..."), see ``daemon_process.CANNOT_START``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from ..detached import start_detached
from ..exceptions import DaemonStartError, StorageError
from ..paths import HomeError, Paths

START_TIMEOUT = float(os.environ.get("MODELD_START_TIMEOUT", 30))


def _answers(paths: Paths) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(paths.socket))
        except OSError:
            return False
    return True


def ensure_daemon(paths: Paths, timeout: float = START_TIMEOUT) -> None:
    """Start a daemon for ``paths`` unless one answers; return once its socket answers."""
    from filelock import FileLock, Timeout

    from ..daemon_process import CANNOT_START, CANNOT_START_EXIT, daemon_pid

    try:
        paths.ensure()
    except HomeError as exc:
        raise StorageError(str(exc)) from exc
    try:
        with FileLock(paths.autostart_lock, timeout=timeout, mode=0o600):
            if _answers(paths):
                return
            deadline = time.monotonic() + timeout
            if daemon_pid(paths) is None:
                proc = _spawn_daemon(paths)
            else:
                proc = None  # a daemon is starting up (rebuilding): wait for its socket
            log_offset = _size(paths.daemon_log) if proc is not None else 0
            while time.monotonic() < deadline:
                if _answers(paths):
                    return
                if proc is None and daemon_pid(paths) is None and _lock_free(paths):
                    # The daemon we found was shutting down, not starting: it is gone, start one.
                    log_offset = _size(paths.daemon_log)
                    proc = _spawn_daemon(paths)
                if proc is not None and proc.poll() is not None:
                    reason = _read_from(paths.daemon_log, log_offset).strip().splitlines()
                    if proc.returncode == CANNOT_START_EXIT and reason and reason[-1].startswith(CANNOT_START):
                        said = reason[-1].removeprefix("modeld: ")
                        raise DaemonStartError(f"{said} (the modeld daemon exited with code {proc.returncode})")
                    raise DaemonStartError(
                        f"the modeld daemon exited with code {proc.returncode} instead of starting: "
                        + (reason[-1] if reason else f"see {paths.daemon_log}")
                    )
                time.sleep(0.005)
    except Timeout:
        raise DaemonStartError(f"timed out after {timeout:g}s waiting for another client starting the daemon") from None
    raise DaemonStartError(f"the modeld daemon did not answer on {paths.socket} within {timeout:g}s; see {paths.daemon_log}")


def _lock_free(paths: Paths) -> bool:
    """No daemon holds this home's lock (one that is exiting holds it until its very end)."""
    from filelock import FileLock, Timeout

    lock = FileLock(paths.daemon_lock, mode=0o600)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    lock.release()
    return True


def _spawn_daemon(paths: Paths) -> subprocess.Popen[bytes]:
    env = {**os.environ, "MODELD_HOME": str(paths.home), "MODELD_SOCKET": str(paths.socket)}
    env.pop("PYTHONSTARTUP", None)
    # A client running inside a model server inherits its tags; the daemon must not look like that server.
    env.pop("MODELD_SERVICE_UUID", None)
    env.pop("MODELD_PROCESS", None)
    # Run daemon/ from where this client found it, even if it is not installed in site-packages
    # (this file is daemon/client/autostart.py: the folder that holds daemon/ is three levels up).
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    return start_detached(
        [sys.executable, "-m", "daemon", "--home", str(paths.home), "--socket", str(paths.socket)],
        env=env,
        log_path=paths.daemon_log,
    )


def _size(path: os.PathLike[str]) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _read_from(path: os.PathLike[str], offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
