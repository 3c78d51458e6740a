"""Shared fixtures: a private modeld home per test, and cleanup of every process it started.

Each test gets a short temp ``MODELD_HOME`` (a Unix socket path is limited to
108 bytes). Cleanup is the harness's reaper (``daemon.testing.reap_home``): it
finds the daemon and the model servers by the pids the home records, by the
``MODELD_HOME`` tag in their environment and by the home's cgroups, and kills
them by pid checked with start time or by process group: never by name.

Markers (registered in pyproject.toml): ``slow`` for the tests of about 2 s or more each that
``-m "not slow"`` leaves out (the fast subset CI runs on each extra Python), and
``needs_root("<reason>")`` for a test that only root can run (see ``needs_root`` below).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import DaemonClient, ServiceConfig
from daemon.paths import Paths
from daemon.testing import IRIS, REPO, reap_home
from daemon.testing.units import Units


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
    monkeypatch.delenv("MODELD_DEPLOYER", raising=False)  # (a user's own, from the shell, would redirect the CLI)
    # No gateway unless a test asks for one (tests/test_gateway.py sets ":0"): the default port,
    # 127.0.0.1:9277, is one per machine, and the daemons of parallel tests would race for it.
    monkeypatch.setenv("MODELD_GATEWAY", "off")
    try:
        yield path
    finally:
        if request.node.stash.get(FAILED, False):
            # The daemon's side of a failure, in the test's report, before the home goes.
            with contextlib.suppress(OSError):
                print(f"--- tail of {path}/daemon.log ---\n" + (path / "daemon.log").read_text(errors="replace")[-4000:])
        reap_home(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def units(tmp_path: Path) -> Iterator[Units]:
    """The units of a daemon over a home of its own, without a manager (``daemon/testing/units.py``);
    every server they start is reaped by the home afterwards."""
    units = Units.over(Paths(tmp_path / "h"))
    try:
        yield units
    finally:
        units.close()
        reap_home(units.paths.home)


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


def pidfd_keeps_exit_codes() -> bool:
    """Whether this kernel gives a reaped process's exit status through its pidfd (PIDFD_INFO_EXIT,
    Linux 6.15+), so the daemon knows the exit code of a server that is not its child whoever reaps it."""
    import select

    from daemon.linux import _pidfd_exit_status

    proc = subprocess.Popen([sys.executable, "-c", ""])
    fd = os.pidfd_open(proc.pid)
    try:
        select.select([fd], [], [], 30)
        proc.wait()
        return _pidfd_exit_status(fd) is not None
    finally:
        os.close(fd)


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
