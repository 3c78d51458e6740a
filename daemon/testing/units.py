"""The units a daemon builds over one home, for tests that run them without a manager.

``Units.over(paths)`` wires them with ``daemon.units.Units.wire``, as the manager does, with the
tag containment (a cgroup is the daemon's, chosen by ``containment.choose``) and the settings'
defaults. ``close()`` stops what they hold (the fork servers, the prober, the log writer) but not
the servers they started: the caller reaps those by the home (``reap_home``). ``die()`` lets go of
everything as a daemon killed with kill -9 does, so that a second set of units over the same home
can rebuild.
"""

from __future__ import annotations

from daemon import units
from daemon.containment import Containment
from daemon.paths import Paths


class Units(units.Units):
    @classmethod
    def over(cls, paths: Paths, health_interval: float = 5.0) -> Units:
        paths.run.mkdir(parents=True, exist_ok=True)
        return cls.wire(paths, Containment(paths.home, paths.run), health_interval=health_interval)

    async def die(self) -> None:
        """Let go of everything, as a daemon killed with kill -9 does: nothing is stopped."""
        await self.stop_watching()
        self.let_go()

    def close(self) -> None:
        """Stop the fork servers, the prober and the log writer (not the servers: reap them by the home)."""
        self.launcher.fork_servers.close()
        self.prober.close()
        self.logs.stop()
