"""The objects a daemon's work is done by, wired once over one home and one registry.

``Units.wire`` builds them as the daemon runs them: the store, the log writer's client, the
launcher, the prober, the supervisor, start/stop, the replacer, on-demand (scale to zero and
wake), the rebuilder, the idle checker and the sizes of on-demand servers, all over the
same ``services`` registry. The manager builds its units here, and so do the tests that run the
units without a manager (``daemon/testing/units.py``), so the two cannot be wired apart.

Letting go is in two steps, as a shutdown needs them: ``stop_watching`` (no supervision, no
listener fetch: nothing acts on a process any more), then ``let_go`` (close every handle, the
fork servers, the prober and the log writer's connection). Neither stops a server: a daemon that
lets go leaves its servers running for the next daemon to re-adopt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self
from uuid import UUID

from .containment import Containment
from .health import Prober
from .idle import IdleChecker
from .launch import Launcher
from .logwriter import LogWriterClient
from .memory import Sizes
from .ondemand import OnDemand
from .paths import Paths
from .rebuild import Rebuilder
from .replace import Replacer
from .service import ServiceRuntime
from .settings import DaemonSettings
from .startstop import StartStop
from .store import Store
from .supervise import Supervisor

_DEFAULTS = DaemonSettings.model_fields


@dataclass
class Units:
    paths: Paths
    containment: Containment
    store: Store
    logs: LogWriterClient
    launcher: Launcher
    prober: Prober
    supervisor: Supervisor
    startstop: StartStop
    replacer: Replacer
    rebuilder: Rebuilder
    ondemand: OnDemand
    idle: IdleChecker
    sizes: Sizes
    services: dict[UUID, ServiceRuntime]

    @classmethod
    def wire(
        cls,
        paths: Paths,
        containment: Containment,
        services: dict[UUID, ServiceRuntime] | None = None,
        *,
        warm_start: bool = _DEFAULTS["warm_start"].default,
        health_interval: float = _DEFAULTS["health_interval"].default,
        wake_timeout: float | None = _DEFAULTS["wake_timeout"].default,
    ) -> Self:
        """The units over ``paths`` and the registry ``services`` (a new one if not given); the
        defaults are the settings' (``DaemonSettings``)."""
        services = {} if services is None else services
        store = Store(paths)
        logs = LogWriterClient(paths)
        launcher = Launcher(paths, store, containment, logs, services, warm_start)
        prober = Prober(health_interval)  # every healthy server, on one shared beat
        supervisor = Supervisor(paths, store, logs, launcher, prober)
        startstop = StartStop(store, launcher, supervisor)
        replacer = Replacer(services, store, launcher, supervisor, startstop)
        sizes = Sizes()  # each on-demand server's peak memory, for admission (memory.py)
        ondemand = OnDemand(paths, store, launcher, supervisor, startstop, services, wake_timeout, sizes)
        rebuilder = Rebuilder(paths, store, containment, logs, launcher, supervisor, startstop, ondemand, services)
        idle = IdleChecker(paths, services, ondemand.idle_stop, sizes.measure_service)
        return cls(
            paths,
            containment,
            store,
            logs,
            launcher,
            prober,
            supervisor,
            startstop,
            replacer,
            rebuilder,
            ondemand,
            idle,
            sizes,
            services,
        )

    async def stop_watching(self) -> None:
        """Nothing acts on a process any more: the rebuild's jobs and every supervision cancelled."""
        self.rebuilder.close()
        self.idle.close()
        for m in self.services.values():
            await self.supervisor.cancel_supervision(m)

    def let_go(self) -> None:
        """Close every process handle and held listener, the fork servers, the prober and the log
        writer's connection; the servers keep running."""
        for m in self.services.values():
            if m.proc is not None:
                m.proc.close()
            m.close_listener()
        self.launcher.fork_servers.close()
        self.prober.close()
        self.logs.close()
