"""Where modeld keeps its state: one folder, ``$MODELD_HOME``, spelled one way (its real path).

$MODELD_HOME/                     default: $XDG_STATE_HOME/modeld (~/.local/state/modeld)
  daemon.toml                     the daemon's settings (optional; see settings.py)
  daemon.lock daemon.pid daemon.log autostart.lock flavors.json deployers.json
  apply.lock                      held by a `modeld apply` while it plans and carries its plan out
  modeld.sock                     unless $MODELD_SOCKET says otherwise
  run/                            private per-process sockets of built-in servers
  run/activity/<uuid>             an on-demand service's requests (see runtime/_serve/activity.py)
  run/requests/<uuid>.<via>       a service's request counters, for /metrics (see runtime/_serve/counters.py)
  services/<uuid>/service.json    the whole BaseService
  services/<uuid>/service.pid     pid, start time (clock ticks), boot id, then key=value lines
  services/<uuid>/service.log     the server's stdout and stderr (rotated to service.log.1)
  services/<uuid>/model.sock      the server's socket, for a service deployed with bind_unix

Errors: a home that cannot be used raises ``HomeError``, an ``OSError`` whose text is the
sentence a user reads; the daemon process (``daemon_process.run``) and the client (its transport
and auto-start) each convert it, once, to a StorageError.
"""

from __future__ import annotations

import os
from pathlib import Path
from uuid import UUID

from .sockets import MAX_SOCKET_PATH


class HomeError(OSError):
    """The home (or its socket path) cannot be used: ``str()`` says why, ``path`` names what."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


def canonical(path: str | os.PathLike[str]) -> Path:
    """``path`` absolute, with ``~``, ``.``, ``..`` and every symlink resolved (as far as it exists).

    One home has one spelling: the daemon tags its servers with it and finds them by it, so a
    home reached through a symlink, a ``..`` or a relative path must give the same string.
    """
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def canonical_socket(path: str | os.PathLike[str]) -> Path:
    """A socket path with its folder canonical; the last part is kept (it is the socket itself)."""
    path = Path(os.path.expanduser(os.fspath(path)))
    return canonical(path.parent) / path.name


def default_home() -> Path:
    if os.environ.get("MODELD_HOME"):
        return canonical(os.environ["MODELD_HOME"])
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return canonical(os.path.join(state, "modeld"))


class Paths:
    """All the paths of one modeld home, each spelled one way (see :func:`canonical`)."""

    def __init__(self, home: str | os.PathLike[str] | None = None, socket: str | os.PathLike[str] | None = None):
        self.home = canonical(home) if home else default_home()
        sock = socket or (os.environ.get("MODELD_SOCKET") if not home else None)
        self.socket = canonical_socket(sock) if sock else self.home / "modeld.sock"
        # How each was given (the daemon shows it with its settings): "argument", the variable, or "default".
        self.home_from = "argument" if home else "MODELD_HOME" if os.environ.get("MODELD_HOME") else "default"
        self.socket_from = "argument" if socket else "MODELD_SOCKET" if sock else "default"

    @property
    def daemon_lock(self) -> Path:
        return self.home / "daemon.lock"

    @property
    def daemon_pid(self) -> Path:
        return self.home / "daemon.pid"

    @property
    def daemon_log(self) -> Path:
        return self.home / "daemon.log"

    @property
    def autostart_lock(self) -> Path:
        return self.home / "autostart.lock"

    @property
    def apply_lock(self) -> Path:
        """Held by one apply of this home at a time (see daemon/client/applylock.py)."""
        return self.home / "apply.lock"

    @property
    def flavors(self) -> Path:
        return self.home / "flavors.json"

    @property
    def deployers(self) -> Path:
        return self.home / "deployers.json"

    @property
    def services(self) -> Path:
        return self.home / "services"

    @property
    def run(self) -> Path:
        return self.home / "run"

    def service_dir(self, uuid: UUID | str) -> Path:
        return self.services / str(uuid)

    def service_json(self, uuid: UUID | str) -> Path:
        return self.service_dir(uuid) / "service.json"

    def service_pid(self, uuid: UUID | str) -> Path:
        return self.service_dir(uuid) / "service.pid"

    def service_log(self, uuid: UUID | str) -> Path:
        return self.service_dir(uuid) / "service.log"

    def model_socket(self, uuid: UUID | str) -> Path:
        """The Unix socket a ``bind_unix`` service serves on (inside its private folder)."""
        return self.service_dir(uuid) / "model.sock"

    def activity_file(self, uuid: UUID | str) -> Path:
        """An on-demand service's activity file (see runtime/_serve/activity.py)."""
        return self.run / "activity" / str(uuid)

    def requests_file(self, uuid: UUID | str, via: str) -> Path:
        """A service's request counters as ``via`` (direct, gateway) counts them (see runtime/_serve/counters.py)."""
        return self.run / "requests" / f"{uuid}.{via}"

    def process_socket(self, uuid: UUID | str, launch: str, kind: str) -> Path:
        """Private socket of one launch's server: ``kind`` is ``h`` (HTTP) or ``f`` (fd hand-over)."""
        return self.run / f"{str(uuid)[:13]}-{launch}.{kind}"

    def ensure(self) -> None:
        """Create the home and its folders, private to this user."""
        try:
            for path in (self.home, self.services, self.run, self.socket.parent):
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.home, 0o700)
        except OSError as exc:
            raise HomeError(
                f"cannot create the modeld home {self.home}: {exc.strerror or exc} ({exc.filename})", self.home
            ) from exc
        self.check_socket()

    def check_socket(self) -> None:
        """A Unix socket path longer than the kernel allows is a clear error, not EINVAL later."""
        if len(os.fsencode(self.socket)) > MAX_SOCKET_PATH:
            raise HomeError(
                f"socket path {self.socket} is longer than {MAX_SOCKET_PATH} bytes; "
                "set MODELD_HOME (or MODELD_SOCKET) to a shorter path",
                self.socket,
            )
