"""modeld as a ZenML model-deployer flavor, through real ZenML: its CLI, a real pipeline, a real daemon.

One module-scoped project does what the README's "ZenML" section says
(``zenml init``, register the flavor, the deployer and a stack, run
``examples/zenml_pipeline.py``); the tests then use ZenML's own
``zenml model-deployer models`` commands on what it deployed, in order.
ZenML's state lives in a temp ``ZENML_CONFIG_PATH``, modeld's in a temp
``MODELD_HOME``; every process of that home is killed at the end (by pid).
Skipped when ZenML is not installed (``pip install 'modeld[zenml]'``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import port_open, predict
from daemon import DaemonClient, ServiceState
from daemon.testing import REPO, reap_home

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("zenml") is None, reason="ZenML is not installed: pip install 'modeld[zenml]'"),
    pytest.mark.slow,  # ZenML's imports alone take seconds; every test here runs its CLI
]

INSTANCES = [[5.1, 3.5, 1.4, 0.2], [6.2, 2.9, 4.3, 1.3], [6.9, 3.1, 5.4, 2.1]]
SPECIES = ["setosa", "versicolor", "virginica"]
# Runs each argument as one `zenml` command line; stops at the first that fails.
CLI_DRIVER = textwrap.dedent(
    """
    import shlex, sys
    from zenml.cli.cli import cli
    for i, command in enumerate(sys.argv[1:]):
        print(f"=== zenml command {i} ===", flush=True)
        try:
            cli.main(shlex.split(command), prog_name="zenml", standalone_mode=False)
        except SystemExit as exc:
            if exc.code:
                raise
        sys.stdout.flush()
    """
)


@dataclass
class Project:
    root: Path  # the ZenML repository (zenml init ran here); examples/ copied in
    home: Path  # MODELD_HOME
    env: dict[str, str]
    service: str = ""  # the ZenML service id the last pipeline run reported
    url: str = ""  # the prediction URL it reported

    # A bound, not a wait: ZenML's import and `zenml init` alone took 80 s on a loaded 2-core machine.
    def run(self, *argv: str, timeout: float = 300) -> str:
        proc = subprocess.run(argv, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{' '.join(argv)} exited with {proc.returncode}:\n{out}"
        return out

    def zenml(self, *commands: str) -> list[str]:
        """The outputs of ZenML CLI commands (``"model-deployer models list"``, ...), run in order.

        They go through ZenML's own click CLI, as ``zenml …`` would, but in one
        interpreter: importing ZenML costs ~3 s a process.
        """
        out = self.run(sys.executable, "-c", CLI_DRIVER, *commands)
        parts = re.split(r"^=== zenml command \d+ ===$", out, flags=re.M)
        assert len(parts) == len(commands) + 1, out
        return parts[1:]

    def models(self, *commands: str) -> list[str]:
        return self.zenml(*(f"model-deployer models {c}" for c in commands))

    def run_pipeline(self) -> None:
        out = self.run(sys.executable, "examples/zenml_pipeline.py")
        self.service = _match(r"zenml service\s+(\S+)", out)
        self.url = _match(r"prediction url\s+(\S+)", out)

    def daemon(self) -> DaemonClient:
        return DaemonClient(home=self.home, auto_start=False)


def _match(pattern: str, text: str) -> str:
    found = re.search(pattern, text)
    assert found, f"no {pattern!r} in:\n{text}"
    return found.group(1)


def _row(key: str, table: str) -> str:
    """A value of ``zenml model-deployer models describe``'s table."""
    return _match(rf"│\s*{key}\s*│\s*(\S+)", table)


@pytest.fixture(scope="module")
def project() -> Iterator[Project]:
    tmp = Path(tempfile.mkdtemp(prefix="zm", dir="/tmp"))  # short: the daemon's socket lives here
    root, home = tmp / "p", tmp / "h"
    (root / "examples").mkdir(parents=True)
    for name in ("zenml_pipeline.py", "iris.py"):
        shutil.copy(REPO / "examples" / name, root / "examples" / name)
    env = {
        **os.environ,
        "ZENML_CONFIG_PATH": str(tmp / "z"),
        "ZENML_ANALYTICS_OPT_IN": "false",
        "ZENML_LOGGING_COLORS_DISABLED": "true",
        "MODELD_HOME": str(home),
        "COLUMNS": "200",  # rich tables would cut uuids and URLs at 80 columns
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    }
    env.pop("MODELD_SOCKET", None)
    p = Project(root, home, env)
    try:
        p.zenml(
            "init",
            "model-deployer flavor register modeld_zenml.ModeldModelDeployerFlavor",
            "model-deployer register modeld --flavor=modeld",
            "stack register modeld_stack -o default -a default -d modeld --set",
        )
        p.run_pipeline()
        yield p
    finally:
        reap_home(home)
        shutil.rmtree(tmp, ignore_errors=True)


def test_core_never_imports_zenml(tmp_path: Path) -> None:
    """ZenML is an optional extra: modeld's packages, its CLI and modeld_zenml's own import go without it."""
    env = {**os.environ, "ZENML_CONFIG_PATH": str(tmp_path), "ZENML_ANALYTICS_OPT_IN": "false"}
    code = (
        "import sys, daemon.client, daemon.manager, deployers.cli, modeld_zenml as m\n"
        "before = 'zenml' in sys.modules\n"
        "print(before, m.__all__ == sorted(m.__all__), all(getattr(m, n) for n in m.__all__))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "True"]


def test_pipeline_deploys_through_modeld(project: Project) -> None:
    assert predict(project.url, INSTANCES) == (200, {"predictions": SPECIES})
    with project.daemon() as client:
        [svc] = client.find()
    # A first deploy gives the modeld service the ZenML service's id.
    assert str(svc.uuid) == project.service
    assert svc.status.state == ServiceState.ACTIVE
    assert svc.endpoint.prediction_url == project.url
    assert (svc.config.pipeline_name, svc.config.pipeline_step_name, svc.config.model_name) == ("iris_pipeline", "deploy", "iris")
    assert svc.config.model_type == "pickle"


def test_list_describe_get_url_logs_after_a_daemon_restart(project: Project) -> None:
    """ZenML's record leads its CLI to the daemon, which it starts again if needed."""
    with project.daemon() as client:
        daemon_pid = client.daemon_info()["pid"]
        server_pid = client.get(project.service).status.pid
        client.shutdown()  # the model server keeps running
    listing, table, get_url, logs = project.models(
        "list", f"describe {project.service}", f"get-url {project.service}", f"logs {project.service}"
    )
    with project.daemon() as client:
        assert client.daemon_info()["pid"] != daemon_pid
        svc = client.get(project.service)
    assert svc.status.state == ServiceState.ACTIVE and svc.status.pid == server_pid  # adopted, not restarted
    assert project.service in listing and "modeld" in listing and "iris_pipeline" in listing
    assert _row("PREDICTION_URL", table) == project.url
    assert _row("MODELD_UUID", table) == str(svc.uuid)
    assert _row("PID", table) == str(server_pid)
    assert _row("FLAVOR", table) == "modeld"
    url = _match(r"Prediction URL of Served Model \S+ is:\s+(\S+)", get_url)
    assert url == project.url
    assert predict(url, INSTANCES) == (200, {"predictions": SPECIES})
    assert "--- modeld: starting" in logs
    assert "modeld: serving model 'iris'" in logs


def test_stop_then_start(project: Project) -> None:
    port = _port(project.url)
    project.models(f"stop {project.service}")
    with project.daemon() as client:
        svc = client.get(project.service)
    assert svc.status.state == ServiceState.INACTIVE and svc.status.pid is None
    assert not port_open(port)
    listing, _ = project.models("list", f"start {project.service}")
    assert "⏸" in listing  # ZenML's record says stopped too
    with project.daemon() as client:
        svc = client.get(project.service)
    assert svc.status.state == ServiceState.ACTIVE
    assert svc.endpoint.prediction_url == project.url  # a service keeps its port across stop and start
    assert predict(project.url, INSTANCES) == (200, {"predictions": SPECIES})


def test_start_deploys_again_what_modeld_forgot(project: Project) -> None:
    """ZenML's record is enough to deploy the service again, under the same uuid."""
    with project.daemon() as client:
        client.delete(project.service)
    listing, _, get_url = project.models("list", f"start {project.service}", f"get-url {project.service}")
    assert "⏸" in listing  # not in modeld: ZenML sees it inactive
    with project.daemon() as client:
        svc = client.get(project.service)
    assert svc.status.state == ServiceState.ACTIVE
    project.url = _match(r"Prediction URL of Served Model \S+ is:\s+(\S+)", get_url)
    assert project.url == svc.endpoint.prediction_url
    assert predict(project.url, INSTANCES) == (200, {"predictions": SPECIES})


def test_continuous_deployment_keeps_serving(project: Project) -> None:
    """ZenML deletes the old service and creates a new one; modeld hands the server over in place."""
    old_service, old_url = project.service, project.url
    with project.daemon() as client:
        [before] = client.find()
    failures: list[object] = []
    answered = 0
    done = threading.Event()

    def ask() -> None:
        nonlocal answered
        while not done.is_set():
            try:
                result = predict(old_url, INSTANCES[:1])
            except OSError as exc:
                result = exc
            if result == (200, {"predictions": SPECIES[:1]}):
                answered += 1
            else:
                failures.append(result)

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        project.run_pipeline()
    finally:
        done.set()
        asker.join()
    assert project.service != old_service  # a new ZenML record...
    assert project.url == old_url  # ...for the same server: same port, same URL
    with project.daemon() as client:
        [after] = client.find()
    assert after.uuid == before.uuid and after.version == before.version + 1
    assert after.status.pid != before.status.pid
    assert answered > 0 and failures == []
    listing, table = project.models("list", f"describe {project.service}")
    assert project.service in listing and old_service not in listing
    assert _row("MODELD_UUID", table) == str(before.uuid)


def test_failed_new_version_leaves_old_one_serving(project: Project) -> None:
    """A version that cannot load fails the deploy; the old one still serves and is in ZenML again."""
    (project.root / "broken.pkl").write_bytes(b"not a pickle")
    script = textwrap.dedent(
        """
        from modeld_zenml import ModeldDeploymentConfig, ModeldDeploymentService, ModeldModelDeployer
        config = ModeldDeploymentConfig(model_name="iris", model_uri="broken.pkl", pipeline_name="iris_pipeline",
                                        pipeline_step_name="deploy")
        deployer = ModeldModelDeployer.get_active_model_deployer()
        try:
            deployer.deploy_model(config, service_type=ModeldDeploymentService.SERVICE_TYPE,
                                  continuous_deployment_mode=True, timeout=60)
        except RuntimeError as exc:
            print("FAILED:", exc)
        for service in deployer.find_model_server():
            print("FOUND", service.uuid, service.modeld_uuid, service.prediction_url, service.status.state.value)
        """
    )
    with project.daemon() as client:
        [before] = client.find()
    out = project.run(sys.executable, "-c", script)
    assert "FAILED: Failed to deploy model server for iris" in out
    assert predict(project.url, INSTANCES) == (200, {"predictions": SPECIES})
    with project.daemon() as client:
        [after] = client.find()
    assert (after.uuid, after.status.pid, after.config.model_uri) == (before.uuid, before.status.pid, before.config.model_uri)
    # ZenML had deleted the old record before the new version failed; it is registered again.
    [found] = re.findall(r"^FOUND (\S+) (\S+) (\S+) (\S+)$", out, flags=re.M)
    service, modeld_uuid, url, state = found
    assert service != project.service
    assert (modeld_uuid, url, state) == (str(before.uuid), project.url, "active")
    project.service = service


def test_delete(project: Project) -> None:
    _, listing = project.models(f"delete {project.service}", "list")
    assert "No served models found" in listing
    with project.daemon() as client:
        assert client.find() == []
    assert not port_open(_port(project.url))


def _port(url: str) -> int:
    port = urlsplit(url).port
    assert port, url
    return port
