"""Shared fixtures: a private modeld home per test, and cleanup of every process it started.

Each test gets a short temp ``MODELD_HOME`` (a Unix socket path is limited to
108 bytes). Cleanup finds the daemon and the model servers by the pids the
home records and by the ``MODELD_HOME`` tag in their environment, and kills
their process groups: never by name.

Markers (registered in pyproject.toml): ``slow`` for the tests of several seconds each that
``-m "not slow"`` leaves out (the fast subset CI runs on each extra Python), and
``needs_root("<reason>")`` for a test that only root can run (see ``needs_root`` below).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from daemon import DaemonClient, ServiceConfig
from daemon.linux import ProcessIdentity, cgroup2_mount

REPO = Path(__file__).resolve().parent.parent
IRIS = str(REPO / "examples" / "iris.py") + ":model"


def wait_for(condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.01, what: str = "condition") -> object:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def processes_of(home: Path) -> list[psutil.Process]:
    """Every live process whose environment names this home (daemon, servers and their children)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid():
                continue
            if proc.environ().get("MODELD_HOME") == str(home):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def kill_home(home: Path) -> None:
    """Kill the daemon and every server of ``home``, by recorded pid and by environment tag."""
    pids: set[int] = set()
    for pidfile in [home / "daemon.pid", *home.glob("services/*/service.pid")]:
        with contextlib.suppress(OSError, ValueError, IndexError):
            lines = pidfile.read_text().split()
            ident = ProcessIdentity(int(lines[0]), int(lines[1]), lines[2])
            if ident.is_alive():
                pids.add(ident.pid)
    pids.update(p.pid for p in processes_of(home))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        # Dead is enough: a zombie whose parent is init may wait a while to be reaped here.
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not pid_alive(pid), 5, interval=0.005, what=f"pid {pid} to die")
    remove_cgroups(home)


def remove_cgroups(home: Path) -> None:
    """Kill what is left in the cgroups of ``home``'s services and remove them (the daemon keeps its
    parent cgroup, named from the home, while the home exists)."""
    mount = cgroup2_mount()
    if mount is None:
        return
    digest = hashlib.sha256(os.fsencode(os.path.realpath(home))).hexdigest()[:16]
    parent = Path(mount) / f"modeld-{digest}"
    if not parent.is_dir():
        return
    for cgroup in sorted((p for p in parent.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [parent]:
        with contextlib.suppress(OSError):
            (cgroup / "cgroup.kill").write_text("1")
        with contextlib.suppress(AssertionError, OSError):
            wait_for(lambda: "populated 0" in (cgroup / "cgroup.events").read_text(), 5, what=f"{cgroup} to empty")
        with contextlib.suppress(OSError):
            cgroup.rmdir()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[FAILED] = report.failed


FAILED = pytest.StashKey[bool]()


def in_ci() -> bool:
    """``CI`` is set (as CI services do: ``true``, ``1``); ``CI=0`` or ``CI=false`` count as unset."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def needs_root(item: pytest.Item) -> str | None:
    """``"needs root <reason>"`` for a test marked ``@pytest.mark.needs_root("<reason>")``, else None.

    The reason completes the sentence, e.g. "to switch a child to another uid". Such a test skips
    for anyone but root, saying so in the summary (``SKIPPED ... needs root to switch a child to
    another uid; CI runs it as root``). Under CI it fails instead: CI runs the suite as root, so a
    CI that silently lost root is caught rather than skipping what only root can check.
    """
    mark = item.get_closest_marker("needs_root")
    if mark is None:
        return None
    (reason,) = mark.args
    return f"needs root {reason}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0 or in_ci():
        return
    for item in items:
        if what := needs_root(item):
            # A skip mark (not pytest.skip() at setup), so the summary names the test's own file and line.
            item.add_marker(pytest.mark.skip(reason=f"{what}; CI runs it as root"))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if os.geteuid() != 0 and in_ci() and (what := needs_root(item)):
        pytest.fail(f"CI is set but the tests run as uid {os.geteuid()}, not root, and this test {what}", pytrace=False)


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="md", dir="/tmp"))
    monkeypatch.setenv("MODELD_HOME", str(path))
    monkeypatch.delenv("MODELD_SOCKET", raising=False)
    try:
        yield path
    finally:
        if request.node.stash.get(FAILED, False):
            # The daemon's side of a failure, in the test's report, before the home goes.
            with contextlib.suppress(OSError):
                print(f"--- tail of {path}/daemon.log ---\n" + (path / "daemon.log").read_text(errors="replace")[-4000:])
        kill_home(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def client(home: Path) -> Iterator[DaemonClient]:
    c = DaemonClient(home=home)
    try:
        yield c
    finally:
        c.close()


def iris_config(**overrides: object) -> ServiceConfig:
    fields: dict[str, object] = dict(
        model_name="iris", model_uri=IRIS, model_type="python",
        pipeline_name="train", pipeline_step_name="deploy", pipeline_run_id="r1",
    )
    fields.update(overrides)
    return ServiceConfig(**fields)  # type: ignore[arg-type]


def modeld(*args: str, home: Path, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``modeld`` command as a user would (through this interpreter)."""
    env = {**os.environ, "MODELD_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "deployers.cli", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, input=input,
    )


def predict(url: str, instances: list[object], timeout: float = 10) -> tuple[int, object]:
    """POST ``{"instances": ...}`` to a prediction URL; (status, parsed JSON)."""
    import http.client
    import json
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", parts.path, body=json.dumps({"instances": instances}), headers={"content-type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def http_get(port: int, path: str = "/", host: str = "127.0.0.1", timeout: float = 5) -> int:
    """The status of one GET."""
    import http.client

    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0
