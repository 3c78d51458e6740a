"""Starting a service's server: the checks before anything is created, the port it keeps for
life, its argv and env, the spawn (cold, or forked from a warm fork server) into its own
launch group, and forgetting a process once its group is gone.

Invariants:
- ``precheck`` refuses (InvalidRequest, Conflict) what cannot run, before any record exists.
- A port is claimed for life by its service; claims conflict exactly when the kernel's binds
  would (``addresses.Address.conflicts``), on hosts resolved off the event loop
  (``resolve_hosts``) and never looked up again meanwhile.
- ``launch`` writes the pid file only after the spawn, and sets ``m.proc`` first, so a failed
  write still leaves a process the caller's cleanup stops; every launch has a fresh launch id,
  its own group (cgroup or tag) and the ``MODELD_*`` tags its descendants inherit.

Errors: the Launcher is where the OS errors of its helpers become modeld errors, once each: a
``SocketError`` (sockets.py) or ``SpawnError`` (process.py, forkservers.py) becomes the error
its step means to the caller (InvalidRequest or Conflict in ``precheck``, the ``refused`` class of
``ensure_port``, DeployError in ``launch``), keeping the helper's text.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from uuid import UUID

from . import killpoints
from .addresses import Address, literal_address, resolve
from .config import ServiceConfig
from .containment import Containment
from .exceptions import Conflict, DeployError, InvalidRequest, ModeldError, StorageError
from .forkservers import ForkServers
from .health import ProbeTarget
from .logwriter import LogWriterClient
from .models import ServiceEndpoint
from .paths import Paths
from .process import ProcessHandle, SpawnError, exec_limit, exec_size, resolve_executable, spawn
from .service import ServiceRuntime, fill, is_builtin, server_env
from .sockets import MAX_SOCKET_PATH, SocketError, bind_listener, bind_private_socket, bind_unclaimed
from .store import LaunchInfo, PidRecord, Store

log = logging.getLogger("modeld.manager")

SERVE_PY = str(Path(__file__).with_name("runtime") / "serve.py")


class Launcher:
    """Starts servers for the services of one home (see the module docstring)."""

    def __init__(
        self,
        paths: Paths,
        store: Store,
        containment: Containment,
        logs: LogWriterClient,
        services: Mapping[UUID, ServiceRuntime],
        warm_start: bool = True,
    ):
        self.paths = paths
        self.warm_start = warm_start  # built-in servers forked from a pre-imported process (the warm_start setting)
        self.store = store
        self.containment = containment
        self.logs = logs
        self.services = services  # the manager's registry, read for port claims
        self.fork_servers = ForkServers(SERVE_PY, paths.home / "forkserver.log")
        self._addresses: dict[str, Address] = {}  # each host of a config, resolved (see resolve_hosts)

    async def resolve_hosts(self, hosts: list[str]) -> None:
        """Resolve hosts (names in threads, all at once) into the map the port functions read.

        A name is looked up again on each deploy that names it; the daemon binds, probes and
        claims on what it resolved to, never looking a name up on the event loop.
        """
        names = sorted({h for h in hosts if literal_address(h) is None})
        for address in await asyncio.gather(*(resolve(h) for h in names)):
            self._addresses[address.host] = address

    def address(self, host: str) -> Address:
        """What ``host`` binds: an IP address is itself; a name as last resolved (see _resolve_hosts)."""
        address = self._addresses.get(host)
        if address is None:
            address = literal_address(host)
            if address is None:
                return Address(host, error=f"{host!r} was not resolved")
            self._addresses[host] = address  # parsed once: claims read every service's address
        return address

    def claimed_ports(self, host: str, owner: ServiceRuntime | None) -> dict[int, UUID]:
        """The ports other services keep for life (also while their server is down) on an address
        the kernel would not let ``host`` share a port with, and whose (see daemon/addresses.py)."""
        mine = self.address(host)
        return {
            o.svc.endpoint.port: o.uuid
            for o in self.services.values()
            if o is not owner and o.svc.endpoint.port and mine.conflicts(self.address(o.svc.config.host))
        }

    def check_port_unclaimed(
        self, config: ServiceConfig, owner: ServiceRuntime | None, refused: type[ModeldError] = Conflict
    ) -> None:
        """``refused`` if another service than ``owner`` claims ``config.port`` on a conflicting address."""
        other = self.claimed_ports(config.host, owner).get(config.port)
        if other is not None:
            raise refused(f"port {config.port} on {config.host} belongs to service {other}")

    def precheck(self, config: ServiceConfig, fresh: bool, owner: ServiceRuntime | None = None) -> None:
        """Refuse a config that cannot run, before anything is created or replaced (a 400, not a record in error).

        ``owner``: the service a replace updates (its own port claim is no conflict).
        """
        address = self.address(config.host)
        if not address.resolved:
            raise InvalidRequest(f"config.host: {address.error}")
        cwd = config.working_dir
        if cwd and not os.path.isdir(cwd):
            raise InvalidRequest(f"working_dir {cwd!r} does not exist")
        env = server_env(config)
        try:
            resolve_executable(config.python or sys.executable if is_builtin(config) else config.command[0], env, cwd)
        except SpawnError as exc:
            raise InvalidRequest(f"{'python' if is_builtin(config) else 'command'}: {exc}") from None
        # exec refuses more than its argument space (E2BIG): say so here, not with a record in error.
        if is_builtin(config):
            argv = [config.python or sys.executable, SERVE_PY, config.model_uri, config.model_name]
        else:
            argv = [
                fill(arg, {"{port}": "65535", "{host}": address.ip, "{model_uri}": config.model_uri}) for arg in config.command
            ]
        margin = 4096 + 2 * len(os.fsencode(self.paths.home))  # the rest of a built-in's argv, the MODELD_* tags
        needed, limit = exec_size(argv, env) + margin, exec_limit()
        if needed > limit:
            field = "env" if exec_size([], config.env) > exec_size(argv, {}) else "command"
            raise InvalidRequest(
                f"config.{field}: the server's arguments and environment would take {needed} bytes "
                f"(with {len(argv) + len(env)} pointers); exec takes at most {limit} (ARG_MAX)"
            )
        if is_builtin(config):
            path = config.model_uri if config.model_type == "pickle" else config.model_uri.rsplit(":", 1)[0]
            if config.model_type == "pickle" or path.endswith(".py") or os.sep in path:
                full = os.path.join(cwd, path) if cwd else path
                if not os.path.exists(full) and not os.path.exists(full + ".py"):
                    raise InvalidRequest(f"model file {full!r} does not exist")
        # The port it asks for, or the one a replace keeps (its host may change).
        port = config.port or (owner.svc.endpoint.port if owner is not None else 0)
        if port and not config.bind_unix:
            self.check_port_unclaimed(config.model_copy(update={"port": port}), owner)
        if not is_builtin(config) and config.port and fresh:
            try:
                free = bind_listener(address.ip, config.port)
            except SocketError as exc:
                raise Conflict(str(exc)) from exc
            free.close()

    @staticmethod
    def endpoint(config: ServiceConfig, port: int) -> ServiceEndpoint:
        return ServiceEndpoint(
            host=config.host,
            port=port,
            health_path=config.health_path,
            prediction_path=config.prediction_path,
            model_name=config.model_name or "model",
            kserve=is_builtin(config),
        )

    def probe_target(self, m: ServiceRuntime, proc: ProcessHandle) -> ProbeTarget:
        """Where ``proc``'s health is probed: its private health socket (built-in servers), else its port."""
        config = m.svc.config
        if is_builtin(config) and proc.info.health_socket:
            return ProbeTarget(config.health_path, unix=proc.info.health_socket)
        return ProbeTarget(config.health_path, host=self.address(config.host).ip or config.host, port=m.svc.endpoint.port)

    def ensure_port(self, m: ServiceRuntime, config: ServiceConfig, refused: type[ModeldError] = DeployError) -> None:
        """Make sure the service has its port (kept for life) and, for built-in servers, holds it.

        ``refused``: the error for a port or socket it cannot have (a deploy's is a Conflict).
        """
        port = m.svc.endpoint.port or config.port
        if is_builtin(config) and config.bind_unix:
            path = self.paths.model_socket(m.uuid)
            if m.listener is None:
                if len(os.fsencode(path)) > MAX_SOCKET_PATH:
                    raise InvalidRequest(
                        f"bind_unix: the socket path {path} would be longer than {MAX_SOCKET_PATH} "
                        "bytes; set MODELD_HOME to a shorter path"
                    )
                directory = self.paths.service_dir(m.uuid)
                created = not directory.exists()
                try:
                    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                    m.listener = bind_private_socket(path)
                except OSError as exc:
                    if created:  # leave no folder behind for a service that was never created
                        shutil.rmtree(directory, ignore_errors=True)
                    if isinstance(exc, SocketError):
                        raise refused(str(exc)) from exc
                    raise StorageError(f"cannot create {directory}: {exc.strerror or exc}") from exc
            m.svc.endpoint = self.endpoint(config, 0)
            m.svc.endpoint.unix_socket = str(path)
            return
        address = self.address(config.host)
        if not address.resolved and not (is_builtin(config) and m.listener is not None):
            raise refused(f"cannot listen on {config.host}: {address.error}")
        try:
            if is_builtin(config):
                if m.listener is None:
                    if port:  # a kept port: another service may have claimed it on an address it now conflicts with
                        self.check_port_free_for(m, config, port, refused)
                    m.listener = (
                        bind_listener(address.ip, port)
                        if port
                        else bind_unclaimed(address.ip, self.claimed_ports(config.host, m))
                    )
                port = int(m.listener.getsockname()[1])
            elif port == 0:
                with bind_unclaimed(address.ip, self.claimed_ports(config.host, m)) as sock:
                    port = int(sock.getsockname()[1])
            else:
                # A command server binds its port itself: if someone else holds it, its health
                # probe would reach that stranger and report it as ours.
                self.check_port_free_for(m, config, port, refused)
                bind_listener(address.ip, port).close()
        except SocketError as exc:
            raise refused(str(exc)) from exc
        m.svc.endpoint = self.endpoint(config, port)

    def check_port_free_for(self, m: ServiceRuntime, config: ServiceConfig, port: int, refused: type[ModeldError]) -> None:
        self.check_port_unclaimed(config.model_copy(update={"port": port}), m, refused)

    def launch(
        self, m: ServiceRuntime, config: ServiceConfig, op: str, version: int | None = None, previous: ProcessHandle | None = None
    ) -> ProcessHandle:
        """Spawn one server process for ``config`` and record its pid; does not wait.

        ``version`` is the service version the process runs; during a hand-over the pid
        file also names the ``previous`` process, so that a daemon killed halfway keeps
        the one that matches service.json and stops the other (see rebuild.Rebuilder.settle_replace).
        The server's environment names its home, its service and what the pid file will
        say about it (with its launch's token), so a daemon killed before writing the pid
        file finds it on restart (see rebuild.Rebuilder.untracked_candidates). It is born in
        its launch's group (see containment.py), with its stdout and stderr going to the log writer.
        ``op`` names the operation, for its kill points.
        """
        self.ensure_port(m, config)
        launch = os.urandom(4).hex()  # (not secrets: it imports hashlib, and OpenSSL with it, in the daemon)
        info = LaunchInfo(version=str(version if version is not None else m.svc.version), launch=launch)
        pass_fds: tuple[int, ...] = ()
        if is_builtin(config):
            assert m.listener is not None
            info = dataclasses.replace(
                info,
                health_socket=str(self.paths.process_socket(m.uuid, launch, "h")),
                fd_socket=str(self.paths.process_socket(m.uuid, launch, "f")),
            )
            argv = [
                config.python or sys.executable,
                SERVE_PY,
                "--model-uri",
                config.model_uri,
                "--model-type",
                config.model_type,
                "--model-name",
                config.model_name or "model",
                "--fd",
                str(m.listener.fileno()),
                "--unix",
                str(info.health_socket),
                "--fd-socket",
                str(info.fd_socket),
            ]
            if config.idle_timeout is not None:  # an on-demand server counts its requests (see idle.py)
                argv += ["--activity", str(self.paths.activity_file(m.uuid))]
            argv += ["--counters", str(self.paths.requests_file(m.uuid, "direct"))]  # metrics (runtime/_serve/counters.py)
            pass_fds = (m.listener.fileno(),)
        else:
            argv = [fill(arg, self.placeholders(m, config)) for arg in config.command]
        env = {
            **server_env(config),
            "PYTHONUNBUFFERED": "1",
            "MODELD_HOME": str(self.paths.home),
            "MODELD_SERVICE_UUID": str(m.uuid),
            "MODELD_PROCESS": json.dumps(info.fields()),
        }
        self.paths.service_dir(m.uuid).mkdir(mode=0o700, parents=True, exist_ok=True)
        group = self.containment.create(str(m.uuid), launch)
        log_path = self.paths.service_log(m.uuid)

        def open_log(first_line: bytes) -> int:
            return self.logs.open(str(m.uuid), log_path, config.log_max_bytes, config.log_backups, first_line)

        proc = None
        try:
            if self.warm_start and pass_fds and not any(key.startswith("PYTHON") for key in config.env):
                # Forked from a warm process that has imported uvicorn already (env that changes how
                # an interpreter starts, PYTHONPATH and such, needs a cold one).
                proc = self.fork_servers.spawn(
                    argv[0],
                    argv[2:],
                    env=env,
                    cwd=config.working_dir,
                    open_log=open_log,
                    listen_fd=pass_fds[0],
                    info=info,
                    group=group,
                    containment=self.containment,
                )
            if proc is None:
                proc = spawn(
                    argv,
                    env=env,
                    cwd=config.working_dir,
                    open_log=open_log,
                    pass_fds=pass_fds,
                    info=info,
                    group=group,
                    containment=self.containment,
                )
        except BaseException as exc:
            with contextlib.suppress(OSError):
                group.remove()
            if isinstance(exc, SpawnError):
                raise DeployError(str(exc)) from exc
            raise
        killpoints.reached(f"{op}.after-spawn")
        record = PidRecord(proc.ident, info)
        if previous is not None:
            record = record.with_previous(PidRecord(previous.ident, previous.info))
        m.proc = proc  # first: if the pid file cannot be written (disk full), the caller's cleanup stops it
        self.store.write_pid(m.uuid, record, step=f"{op}.pid")
        killpoints.reached(f"{op}.after-pid")
        m.svc.status.pid = proc.pid
        if m.svc.status.exit_code is not None:  # the previous server's, kept in the record for /metrics
            m.svc.status.last_exit_code = m.svc.status.exit_code
        m.svc.status.exit_code = None
        m.svc.status.started_at = time.time()
        log.info("started %s pid %d: %s", m.uuid, proc.pid, " ".join(argv[:2]))
        return proc

    def placeholders(self, m: ServiceRuntime, config: ServiceConfig) -> dict[str, str]:
        """What ``{port}`` and the other placeholders of ``command`` and ``stop_command`` stand for."""
        # {host}: the address the port is claimed and probed on (a name as resolved, IPv4 first).
        return {
            "{port}": str(m.svc.endpoint.port),
            "{host}": self.address(config.host).ip or config.host,
            "{model_uri}": config.model_uri,
            "{uuid}": str(m.uuid),
            "{name}": config.name or config.model_name or "model",
        }

    @staticmethod
    def unlink_sockets(proc: ProcessHandle) -> None:
        for path in (proc.info.health_socket, proc.info.fd_socket):
            if path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def forget_process(self, m: ServiceRuntime, proc: ProcessHandle) -> None:
        """Clean up after a process whose group is gone: its sockets, its cgroup, its pid file."""
        self.unlink_sockets(proc)
        if proc.group is not None:
            with contextlib.suppress(OSError):
                proc.group.remove()
        if m.proc is proc:
            m.proc = None
            with contextlib.suppress(FileNotFoundError):
                record = self.store.read_pid(m.uuid)
                if record is None or record.ident == proc.ident:
                    self.store.clear_pid(m.uuid)

    def save_pid(self, uuid: UUID | str, proc: ProcessHandle, step: str = "") -> None:
        """Name a process in service.pid; if that cannot be written, the daemon's log says so (its tags
        and its group still let the next daemon find it)."""
        try:
            self.store.write_pid(uuid, PidRecord(proc.ident, proc.info), step=step)
        except StorageError as exc:
            log.error("%s: %s", uuid, exc)
