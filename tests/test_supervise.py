"""Supervision alone (daemon/supervise.py) over the launcher, without a manager or a daemon:
a server that dies before it answers is a DeployError carrying its last log lines; one that
ignores SIGTERM is killed at the timeout with everything it started. Real processes."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path

import pytest

from daemon.config import ServiceConfig
from daemon.exceptions import DeployError
from daemon.models import LocalModelService
from daemon.paths import Paths
from daemon.service import ServiceRuntime
from daemon.testing import pid_alive

DIES = "import sys; print('no model here, giving up', flush=True); sys.exit(4)"
# Serves, starts a child in a session of its own, and ignores SIGTERM (only SIGKILL ends it).
STUBBORN = textwrap.dedent('''
    import http.server, signal, subprocess, sys
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    open(sys.argv[2], "w").write(str(child.pid))
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
''')


def runtime(paths: Paths, tmp_path: Path, script: str, *args: str, **kw: object) -> ServiceRuntime:
    (tmp_path / "s.py").write_text(script)
    config = ServiceConfig(model_type="command", command=[sys.executable, "s.py", "{port}", *args], working_dir=str(tmp_path),
                           health_path="/", **kw)
    svc = LocalModelService(config=config)
    svc.service_path = str(paths.service_dir(svc.uuid))
    return ServiceRuntime(svc)


def test_a_server_that_dies_before_it_answers_is_a_deploy_error_with_its_last_lines(units, tmp_path):
    paths, launcher, supervisor = units.paths, units.launcher, units.supervisor
    m = runtime(paths, tmp_path, DIES)

    async def go() -> None:
        launcher.ensure_port(m, m.svc.config)
        proc = launcher.launch(m, m.svc.config, "start")
        with pytest.raises(DeployError) as failed:
            await supervisor.wait_healthy(m, proc, timeout=20)
        assert "exited with code 4" in str(failed.value)
        assert "no model here, giving up" in (failed.value.log_excerpt or "")

    asyncio.run(go())


def test_a_server_ignoring_sigterm_is_killed_at_the_timeout_with_what_it_started(units, tmp_path):
    paths, launcher, supervisor = units.paths, units.launcher, units.supervisor
    m = runtime(paths, tmp_path, STUBBORN, str(tmp_path / "child.pid"))

    async def go() -> None:
        launcher.ensure_port(m, m.svc.config)
        proc = launcher.launch(m, m.svc.config, "start")
        proc = await supervisor.wait_healthy(m, proc, timeout=20)
        child = int((tmp_path / "child.pid").read_text())
        assert pid_alive(child)
        started = asyncio.get_running_loop().time()
        await supervisor.terminate(m, proc, timeout=0.5)
        assert asyncio.get_running_loop().time() - started >= 0.5  # TERM was ignored: KILL at the timeout
        assert not proc.alive and not pid_alive(child)

    asyncio.run(go())
