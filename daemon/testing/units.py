"""The units a daemon builds over one home, wired as ``Manager`` wires them, for tests that run them without a manager.

``Units.over(paths)`` builds them; ``close()`` stops what they hold (the fork servers, the prober, the log writer)
but not the servers they started: the caller reaps those by the home (``reap_home``). ``die()`` lets go of
everything as a daemon killed with kill -9 does, so that a second set of units over the same home can rebuild.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from daemon.containment import Containment
from daemon.health import Prober
from daemon.launch import Launcher
from daemon.logwriter import LogWriterClient
from daemon.paths import Paths
from daemon.rebuild import Rebuilder
from daemon.replace import Replacer
from daemon.service import ServiceRuntime
from daemon.startstop import StartStop
from daemon.store import Store
from daemon.supervise import Supervisor


@dataclass
class Units:
    paths: Paths
    store: Store
    logs: LogWriterClient
    services: dict[UUID, ServiceRuntime]
    containment: Containment
    launcher: Launcher
    prober: Prober
    supervisor: Supervisor
    startstop: StartStop
    replacer: Replacer
    rebuilder: Rebuilder

    @classmethod
    def over(cls, paths: Paths, health_interval: float = 5.0) -> Units:
        """The units over ``paths`` (its run folder made), with the containment of the home's own kind
        (tag: a cgroup is the daemon's, chosen by ``containment.choose``)."""
        paths.run.mkdir(parents=True, exist_ok=True)
        store = Store(paths)
        logs = LogWriterClient(paths)
        services: dict[UUID, ServiceRuntime] = {}
        containment = Containment(paths.home, paths.run)
        launcher = Launcher(paths, store, containment, logs, services)
        prober = Prober(health_interval)
        supervisor = Supervisor(paths, store, logs, launcher, prober)
        startstop = StartStop(store, launcher, supervisor)
        replacer = Replacer(services, store, launcher, supervisor, startstop)
        rebuilder = Rebuilder(paths, store, containment, logs, launcher, supervisor, startstop, services)
        return cls(paths, store, logs, services, containment, launcher, prober, supervisor, startstop, replacer, rebuilder)

    async def die(self) -> None:
        """Let go of everything, as a daemon killed with kill -9 does: nothing is stopped."""
        self.rebuilder.close()
        for m in self.services.values():
            await self.supervisor.cancel_supervision(m)
            if m.proc is not None:
                m.proc.close()
            m.close_listener()
        self.launcher.fork_servers.close()
        self.prober.close()

    def close(self) -> None:
        """Stop the fork servers, the prober and the log writer (not the servers: reap them by the home)."""
        self.launcher.fork_servers.close()
        self.prober.close()
        self.logs.stop()
