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
  daemon.toml: health_interval: ..."), see ``daemon_process.CANNOT_START``;
  one refused because another daemon holds the home (started meanwhile, by
  systemd or by hand) leaves the client waiting for that one's socket, and
  the error, if it never answers, says which one runs;
* with modeld's systemd unit installed for this home and socket
  (``modeld daemon install``, see ``login.py``) and a user manager that
  answers, the client asks systemd to start the unit instead of forking:
  one daemon per home, always under systemd. Without a user manager it forks
  as usual, and says so in ``daemon.log``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

from .. import login
from ..detached import start_detached
from ..exceptions import DaemonStartError, StorageError
from ..notify import AUTOSTART, STARTED_BY_ENV
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

    from ..daemon_process import CANNOT_START, CANNOT_START_EXIT, already_running, daemon_pid

    try:
        paths.ensure()
    except HomeError as exc:
        raise StorageError(str(exc)) from exc
    refused = ""  # what a daemon we spawned said when another one held the home
    try:
        with FileLock(paths.autostart_lock, timeout=timeout, mode=0o600):
            if _answers(paths):
                return
            deadline = time.monotonic() + timeout
            by_systemd = False
            if daemon_pid(paths) is not None:
                proc = None  # a daemon is starting up (rebuilding): wait for its socket
            elif _start_unit(paths, deadline):
                proc, by_systemd = None, True
            else:
                proc = _spawn_daemon(paths)
            log_offset = _size(paths.daemon_log) if proc is not None else 0
            while time.monotonic() < deadline:
                if _answers(paths):
                    return
                if proc is None and not by_systemd and daemon_pid(paths) is None and _lock_free(paths):
                    # The daemon we found was shutting down, not starting: it is gone, start one.
                    log_offset = _size(paths.daemon_log)
                    proc = _spawn_daemon(paths)
                if proc is not None and proc.poll() is not None:
                    reason = _read_from(paths.daemon_log, log_offset).strip().splitlines()
                    if proc.returncode == CANNOT_START_EXIT and reason and "is already running for" in reason[-1]:
                        # Another daemon took the home after we looked (systemd's at login, one run by
                        # hand): that one answers soon; this client waits for it as for any other.
                        refused, proc = reason[-1].removeprefix("modeld: "), None
                        continue
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
    see = f"see `journalctl --user -u {login.UNIT_NAME}`" if by_systemd else f"see {paths.daemon_log}"
    running = already_running(paths) if refused or daemon_pid(paths) is not None else ""
    raise DaemonStartError(
        f"the modeld daemon did not answer on {paths.socket} within {timeout:g}s"
        + (f" ({running})" if running else "")
        + f"; {see}"
    )


def _start_unit(paths: Paths, deadline: float) -> bool:
    """Start the daemon as modeld's systemd unit, if it is installed for this home and socket and a
    user manager answers; False (noted in daemon.log if the unit is there) when the client should fork."""
    try:
        env = login.read_unit()
    except login.UnitError:
        return False  # a modeld.service modeld did not write is not ours to start
    if not login.serves(env, paths):
        return False
    if login.user_manager() is None:
        _note(paths, f"{login.unit_path()} serves this home, but no systemd user manager answers: starting the daemon directly")
        return False
    try:
        # Type=notify: systemctl returns once the daemon has rebuilt every service (READY=1), or it failed.
        result = login.systemctl("start", login.UNIT_NAME, timeout=max(deadline - time.monotonic(), 1.0))
    except subprocess.TimeoutExpired:
        return True  # still starting: wait for its socket, until the same deadline
    except OSError as exc:
        raise DaemonStartError(f"cannot run systemctl to start {login.UNIT_NAME}: {exc}") from exc
    if result.returncode != 0:
        said = " ".join(result.stderr.split()) or f"exit code {result.returncode}"
        raise DaemonStartError(
            f"systemd could not start {login.UNIT_NAME} (modeld's daemon for {paths.home}): {said}; "
            f"see `journalctl --user -u {login.UNIT_NAME}`"
        )
    return True


def _note(paths: Paths, line: str) -> None:
    """A line of the client's in ``daemon.log`` (the daemon's own lines are its log records)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        with open(paths.daemon_log, "a", opener=lambda p, f: os.open(p, f, 0o600)) as log:
            log.write(f"{stamp} modeld client (pid {os.getpid()}): {line}\n")
    except OSError:
        pass  # a note only


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
    env = {**os.environ, "MODELD_HOME": str(paths.home), "MODELD_SOCKET": str(paths.socket), STARTED_BY_ENV: AUTOSTART}
    env.pop("PYTHONSTARTUP", None)
    # A client running inside a model server inherits its tags; the daemon must not look like that server.
    env.pop("MODELD_SERVICE_UUID", None)
    env.pop("MODELD_PROCESS", None)
    # Nor like a systemd service because the client runs in one (a terminal started as a unit).
    env.pop("INVOCATION_ID", None)
    env.pop("NOTIFY_SOCKET", None)
    # Run daemon/ from where this client found it, even if it is not installed in site-packages.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (login.PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
    return start_detached(login.daemon_command(paths), env=env, log_path=paths.daemon_log)


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
