"""The daemon of one home as a test drives it: started in its own session, watched, signalled, killed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from daemon.client import DaemonClient
from daemon.exceptions import DaemonError
from daemon.linux import ProcessIdentity
from daemon.paths import Paths
from daemon.testing.checkout import REPO
from daemon.testing.identities import kill_verified
from daemon.testing.wait import wait_for


class DaemonProcess:
    """The daemon of one home, started in its own session; its identity comes from GET /v1/daemon."""

    def __init__(self, home: Path):
        self.home = home
        self.paths = Paths(home)
        self.popen: subprocess.Popen[bytes] | None = None
        self.ident: ProcessIdentity | None = None
        self.die_at: str | None = None
        self.started_at = 0.0
        self.containment: str | None = None  # as GET /v1/daemon says: "cgroup" or "tag"

    def env(self, die_at: str | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELD_") or k in ("MODELD_CGROUP", "MODELD_GATEWAY")}
        env.update(MODELD_HOME=str(self.home), PYTHONPATH=str(REPO))
        env.setdefault("MODELD_GATEWAY", "off")  # one port per machine: a gateway only where a test asks for one
        if die_at:
            env["MODELD_DIE_AT"] = die_at
        return env

    def start(self, die_at: str | None = None) -> bool:
        """Start it and wait until it answers (its rebuild is done); False if it died first."""
        self.die_at = die_at
        self.started_at = time.monotonic()
        with open(self.paths.daemon_log, "ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "daemon", "--home", str(self.home)],
                env=self.env(die_at),
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self.wait_answering()

    def adopt_autostarted(self) -> bool:
        """A daemon some client auto-started: track it through what it answers."""
        self.popen, self.die_at = None, None
        self.started_at = time.monotonic()
        return self.wait_answering()

    def wait_answering(self, timeout: float = 30) -> bool:
        with DaemonClient(self.home, auto_start=False, timeout=timeout) as client:

            def answered() -> dict[str, Any] | bool | None:
                if self.popen is not None and self.popen.poll() is not None:
                    return True  # died first
                with contextlib.suppress(DaemonError):
                    return client.daemon_info()
                return None

            info = wait_for(answered, timeout, interval=0.005, what=f"the daemon of {self.home} to answer")
        if not isinstance(info, dict):
            return False  # it died first
        self.ident = ProcessIdentity.of(int(info["pid"]))
        self.containment = info.get("containment")
        return self.ident is not None

    def alive(self) -> bool:
        if self.popen is not None and self.popen.poll() is not None:
            return False
        return self.ident is not None and self.ident.is_alive()

    def gone_after_error(self, grace: float = 1.0) -> bool:
        """After a failed call: did the daemon die? A dying process closes its sockets before
        /proc shows it dead, so give it a moment."""
        with contextlib.suppress(AssertionError):
            return wait_for(lambda: not self.alive(), grace, interval=0.005)
        return False

    def signal(self, sig: int) -> None:
        if self.ident is not None:
            kill_verified(self.ident.pid, self.ident.start_ticks, sig)

    def wait_dead(self, timeout: float = 15) -> None:
        wait_for(lambda: not self.alive(), timeout, interval=0.005, what=f"daemon {self.ident} to die")
        if self.popen is not None:
            self.popen.wait()

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait_dead()

    def died_at_kill_point(self, offset: int) -> str | None:
        """The kill point named in daemon.log after ``offset``, if the daemon died at one."""
        try:
            with open(self.paths.daemon_log, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return None
        for line in text.splitlines():
            if "kill point " in line and " reached" in line:
                return line.split("kill point ", 1)[1].split()[0]
        return None

    def log_size(self) -> int:
        try:
            return self.paths.daemon_log.stat().st_size
        except FileNotFoundError:
            return 0
