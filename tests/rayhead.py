"""A real local Ray head for the ray flavor's tests (and scripts/bench_ray.py).

``ray start --head --block`` as a child in its own process group, in a short temp dir
(``/tmp/r-XXXX``: Ray's Unix socket paths must fit in 107 bytes), on free ports, with the
dashboard off and 2 CPUs. Stopped by the pids it started: its process group, then every
descendant seen (pid checked with its start time). Never ``ray stop``: that finds Ray's
processes by name across the machine and stops every head there.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from daemon.testing.wait import wait_for
from daemon.testing.wire import free_port

RAY = str(Path(sys.executable).with_name("ray"))


class Head:
    def __init__(self, gcs_port: int | None = None, proxy_port: int | None = None) -> None:
        self.gcs_port = gcs_port or free_port()
        self.proxy_port = proxy_port or free_port()
        self.client_port = free_port()  # the Ray client server (ray://)
        self.temp_dir = tempfile.mkdtemp(prefix="r-", dir="/tmp")
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen: dict[int, float] = {}  # pid -> create time, of the head and its descendants

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def start(self, timeout: float = 60.0) -> Head:
        argv = [
            RAY, "start", "--head", "--block", "--disable-usage-stats", "--include-dashboard=false",
            "--num-cpus", "2", "--node-ip-address", "127.0.0.1", "--port", str(self.gcs_port),
            "--ray-client-server-port", str(self.client_port), "--dashboard-agent-listen-port", str(free_port()),
            "--temp-dir", self.temp_dir,
        ]  # fmt: skip
        log = open(os.path.join(self.temp_dir, "head.out"), "wb")  # noqa: SIM115  (the child holds it)
        with log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        wait_for(self._ready, timeout=timeout, interval=0.1, what=f"the Ray head at {self.address} ({argv})")
        self._remember()
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {self.proc.returncode}: {self.output()[-3000:]}")
        return "Ray runtime started" in self.output()

    def output(self) -> str:
        try:
            return Path(self.temp_dir, "head.out").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _remember(self) -> None:
        """Note the head's descendants (Serve's controller, proxy and replicas are the raylet's children)."""
        if self.proc is None:
            return
        try:
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                self.seen[p.pid] = p.create_time()
        except psutil.Error:
            pass

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM the head and every descendant seen (Serve's actors run in sessions of their own, so the
        process group alone is not enough), by pid checked with its start time; SIGKILL what is left after ``grace``."""
        if self.proc is None:
            return
        self._remember()
        procs = []
        for pid, created in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created:
                    procs.append(p)
            except psutil.Error:
                continue
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything of its group not seen yet
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(5)
        self.proc = None
        self.seen.clear()

    def remove(self) -> None:
        shutil.rmtree(self.temp_dir, ignore_errors=True)
