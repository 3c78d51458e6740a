"""``DaemonClient``: typed calls to the daemon over HTTP on its Unix socket.

One keep-alive connection per client, re-opened when the daemon closed it.
Any call that finds no daemon starts one unless ``auto_start`` is off; see
:func:`ensure_daemon` for how that stays safe when many clients do it at
once. Errors come back as the classes of ``daemon.exceptions``.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import select
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode
from uuid import UUID

from ._version import __version__
from .exceptions import DaemonError, DaemonNotRunning, DaemonStartError, ModeldError, ProtocolError, error_from_dict
from .models import SERVICE_REGISTRY, BaseService, ServiceConfig
from .paths import Paths

DEFAULT_TIMEOUT = 300.0
START_TIMEOUT = float(os.environ.get("MODELD_START_TIMEOUT", 30))
_MARGIN = 30.0  # seconds beyond an operation's own timeout before the client gives up on the socket
_LONGEST_WAIT = 1e9  # seconds (31 years); a socket timeout past ~9.2e9 s overflows
READ_RETRY_SECONDS = 5.0  # how long a read is retried while a killed daemon resets connections in its backlog


class VersionMismatchWarning(UserWarning):
    """The client and the running daemon are different versions of modeld."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None):
        super().__init__("modeld", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class DaemonClient:
    """Talks to the modeld daemon of one home."""

    client_version = __version__

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        socket_path: str | os.PathLike[str] | None = None,
        auto_start: bool = True,
        timeout: float | None = None,
    ):
        self.paths = Paths(home, socket_path)
        self.auto_start = auto_start
        self.timeout = timeout
        self._conn: _UnixConnection | None = None
        self.daemon_version: str | None = None

    # ------------------------------------------------------------------ calls

    def deploy(
        self, config: ServiceConfig, replace: bool = False, timeout: float = DEFAULT_TIMEOUT, uuid: UUID | str | None = None
    ) -> BaseService:
        body: dict[str, Any] = {
            "config": config.with_client_defaults().model_dump(mode="json"),
            "replace": replace,
            "timeout": timeout,
        }
        if uuid is not None:
            body["uuid"] = str(uuid)
        return self._service(self._call("POST", "/v1/services", body=body, timeout=timeout))

    def find(
        self,
        running: bool = False,
        service_uuid: UUID | str | None = None,
        pipeline_name: str | None = None,
        pipeline_run_id: str | None = None,
        pipeline_step_name: str | None = None,
        model_name: str | None = None,
        model_uri: str | None = None,
        model_type: str | None = None,
    ) -> list[BaseService]:
        query = {
            "running": "true" if running else None,
            "service_uuid": str(service_uuid) if service_uuid is not None else None,
            "pipeline_name": pipeline_name,
            "pipeline_run_id": pipeline_run_id,
            "pipeline_step_name": pipeline_step_name,
            "model_name": model_name,
            "model_uri": model_uri,
            "model_type": model_type,
        }
        data = self._call("GET", "/v1/services", query=query)
        return [self._service(item) for item in data["services"]]

    def get(self, uuid: UUID | str) -> BaseService:
        return self._service(self._call("GET", f"/v1/services/{_quote(uuid)}"))

    def start(self, uuid: UUID | str, timeout: float = DEFAULT_TIMEOUT) -> BaseService:
        return self._service(self._call("POST", f"/v1/services/{_quote(uuid)}/start", query={"timeout": timeout}, timeout=timeout))

    def start_all(self, timeout: float = DEFAULT_TIMEOUT) -> tuple[list[BaseService], dict[str, ModeldError]]:
        """Start every service that is not running (after ``modeld daemon stop --all``, say):
        (the services started, the error of each that failed, by uuid)."""
        data = self._call("POST", "/v1/services/start", query={"timeout": timeout}, timeout=timeout)
        failed = {uuid: error_from_dict(500, {"error": error}) for uuid, error in data.get("failed", {}).items()}
        return [self._service(item) for item in data["services"]], failed

    def stop(self, uuid: UUID | str, timeout: float = DEFAULT_TIMEOUT, force: bool = False) -> BaseService:
        query = {"timeout": timeout, "force": "true" if force else None}
        return self._service(self._call("POST", f"/v1/services/{_quote(uuid)}/stop", query=query, timeout=timeout))

    def delete(self, uuid: UUID | str, timeout: float = DEFAULT_TIMEOUT, force: bool = False) -> None:
        query = {"timeout": timeout, "force": "true" if force else None}
        self._call("DELETE", f"/v1/services/{_quote(uuid)}", query=query, timeout=timeout)

    def logs(self, uuid: UUID | str, tail: int | None = None, follow: bool = False) -> Iterator[str]:
        """The server's log as text chunks; with ``follow``, keeps yielding until the service goes."""
        query = {"tail": tail, "follow": "true" if follow else None}
        conn = self._open(None)
        try:
            conn.request("GET", _path(f"/v1/services/{_quote(uuid)}/logs", query))
            response = conn.getresponse()
            if response.status != 200:
                raise error_from_dict(response.status, _json(response.read()))
            while chunk := response.read1(65536):
                yield chunk.decode(errors="replace")
        except (http.client.IncompleteRead, ConnectionError):
            return  # the daemon went away (stopped or restarted): the stream simply ends
        finally:
            conn.close()

    def daemon_info(self) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/daemon"))

    def shutdown(self, stop_services: bool = False) -> None:
        """Ask the daemon to exit; model servers keep running unless ``stop_services``."""
        self._call("POST", "/v1/daemon/shutdown", query={"stop_services": "true" if stop_services else None}, start=False)
        self.close()

    def is_running(self) -> bool:
        try:
            self._call("GET", "/v1/daemon", start=False)
        except DaemonNotRunning:
            return False
        return True

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- transport

    @staticmethod
    def _service(data: Any) -> BaseService:
        return SERVICE_REGISTRY.load(data)

    def _open(self, timeout: float | None) -> _UnixConnection:
        self.paths.check_socket()
        conn = _UnixConnection(str(self.paths.socket), timeout)
        try:
            conn.connect()
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
            if not self.auto_start:
                raise DaemonNotRunning(f"no modeld daemon answers on {self.paths.socket}; start one with `modeld daemon start`") from exc
            ensure_daemon(self.paths)
            conn.connect()
        return conn

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, Any] | None = None,
        timeout: float | None = None,
        start: bool = True,
    ) -> Any:
        socket_timeout: float | None = self.timeout if self.timeout is not None else (timeout or 60.0) + _MARGIN
        if socket_timeout is not None and not socket_timeout < _LONGEST_WAIT:
            socket_timeout = None  # also inf and nan, which a socket cannot hold either: wait as long as it takes
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"content-type": "application/json"} if payload is not None else {}
        retry_reads_until = time.monotonic() + READ_RETRY_SECONDS
        for attempt in itertools.count(1):
            self._drop_if_closed()
            try:
                if self._conn is None:
                    auto_start, self.auto_start = self.auto_start, self.auto_start and start
                    try:
                        self._conn = self._open(socket_timeout)
                    finally:
                        self.auto_start = auto_start
                self._conn.timeout = socket_timeout
                if self._conn.sock is not None:
                    self._conn.sock.settimeout(socket_timeout)
                self._conn.request(method, _path(path, query), body=payload, headers=headers)
                response = self._conn.getresponse()
                raw = response.read()
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                self.close()
                raise DaemonNotRunning(f"no modeld daemon answers on {self.paths.socket}") from exc
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                # The daemon closed the connection: idle, restarting, or killed. A daemon killed
                # with -9 goes on accepting connections into its backlog until its last thread has
                # exited (its main thread already shows as a zombie), then resets them all. A read
                # is sent again on a new connection, backing off, until it is answered or the
                # socket refuses (then a daemon is auto-started). A deploy, stop or delete is not:
                # it may have been done before the daemon went, and sending it again could start a
                # second server, so the caller is told instead.
                self.close()
                if method == "GET" and time.monotonic() < retry_reads_until:
                    time.sleep(min(0.002 * 2**attempt, 0.1))
                    continue
                raise ProtocolError(
                    f"the daemon closed the connection during {method} {path}: {exc}"
                    + ("" if method == "GET" else "; it may or may not have been done (check with `modeld ls`)")
                ) from exc
            except TimeoutError as exc:
                self.close()
                raise ProtocolError(f"no answer from the daemon to {method} {path} within {socket_timeout:g}s") from exc
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise DaemonError(f"cannot talk to the daemon on {self.paths.socket}: {exc}") from exc
            self._check_version(response.getheader("x-modeld-version"))
            data = _json(raw)
            if response.status >= 400:
                raise error_from_dict(response.status, data)
            return data
        raise AssertionError("unreachable")  # (the loop returns or raises)

    def _drop_if_closed(self) -> None:
        """Forget a kept-alive connection the daemon has closed meanwhile (idle timeout, restart),
        so that no request is sent on it and none needs sending twice."""
        sock = self._conn.sock if self._conn is not None else None
        if sock is None:
            return
        try:
            poller = select.poll()  # (select() takes no fd past 1023: a client in a busy process may have them)
            poller.register(sock, select.POLLIN)
            readable = bool(poller.poll(0))
        except (OSError, ValueError):
            readable = True
        if readable:  # an idle HTTP connection is readable only once closed (or with bytes nobody asked for)
            self.close()

    def _check_version(self, version: str | None) -> None:
        if version is None or version == self.daemon_version:
            return
        self.daemon_version = version
        if version != self.client_version:
            relation = "newer" if _version_tuple(self.client_version) > _version_tuple(version) else "older"
            warnings.warn(
                f"this modeld client ({self.client_version}) is {relation} than the running daemon ({version}); "
                "restart the daemon (`modeld daemon stop && modeld daemon start`) to run the same version",
                VersionMismatchWarning,
                stacklevel=4,
            )


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("."))


def _quote(uuid: UUID | str) -> str:
    return quote(str(uuid), safe="")


def _path(path: str, query: dict[str, Any] | None) -> str:
    items = {k: v for k, v in (query or {}).items() if v is not None}
    return f"{path}?{urlencode(items)}" if items else path


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else {}
    except ValueError as exc:
        raise ProtocolError(f"the daemon answered something that is not JSON: {raw[:200]!r}") from exc


# ---------------------------------------------------------------- auto-start


def _answers(paths: Paths) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(paths.socket))
        except OSError:
            return False
    return True


def ensure_daemon(paths: Paths, timeout: float = START_TIMEOUT) -> None:
    """Start a daemon for ``paths`` unless one answers; return once its socket answers.

    Clients serialise on ``autostart.lock``, so when many find no daemon at once
    exactly one spawns it and the others find it answering. The daemon is fully
    detached (own session, stdio to ``daemon.log``) and runs under this
    interpreter. If it exits instead of answering, the reason from its log is
    raised at once, not after a timeout.
    """
    from filelock import FileLock, Timeout

    from .server import daemon_pid

    paths.ensure()
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
    # Run daemon/ from where this client found it, even if it is not installed in site-packages.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    with open(paths.daemon_log, "ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "daemon", "--home", str(paths.home), "--socket", str(paths.socket)],
            env=env,
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
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
