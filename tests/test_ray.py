"""The ray flavor on a real local Ray head: one head for the session (``ray start --head`` in a
short temp dir, free ports, dashboard off, 2 CPUs), stopped by the pids it started.

Skipped, saying why, when the ray extra is not installed. The test that stops the head and
starts a new one runs last and leaves the new one to the fixture's cleanup.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'modeld[ray]'); .ci/run installs it")

from daemon import DaemonClient, ServiceConfig
from daemon.exceptions import DeployError, FlavorError, ServiceNotFound
from daemon.models import DesiredState, ServiceState
from daemon.testing import IRIS, REPO
from daemon.testing.wait import wait_for
from deployers.ray.deployer import RayServeModelDeployer
from deployers.ray.flavor import RayServeModelDeployerConfig
from tests.rayhead import Head

IRIS_V2 = str(Path(IRIS.rsplit(":", 1)[0]).with_name("iris_v2.py")) + ":model"
SETOSA = [[5.1, 3.5, 1.4, 0.2]]


@pytest.fixture(scope="session")
def head() -> Iterator[Head]:
    started = Head().start()
    try:
        yield started
    finally:
        from deployers.ray import cluster

        try:
            cluster.disconnect(30)  # before the head goes: a driver whose GCS vanished may abort the process
        finally:
            started.stop()
            started.remove()


@pytest.fixture(scope="module")
def dep(head: Head, tmp_path_factory: pytest.TempPathFactory) -> RayServeModelDeployer:
    home = tmp_path_factory.mktemp("rayhome")
    return RayServeModelDeployer(
        RayServeModelDeployerConfig(address=head.address, home=str(home), proxy_port=head.proxy_port), name="cluster"
    )


def post(url: str, body: object, timeout: float = 30) -> tuple[int, object]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")  # Serve's proxy answers a route it lacks in plain text


def config(**fields: object) -> ServiceConfig:
    values: dict[str, object] = dict(model_name="iris", model_uri=IRIS, pipeline_name="train", pipeline_step_name="deploy")
    values.update(fields)
    return ServiceConfig(**values)  # type: ignore[arg-type]


def test_deploy_predict_as_the_local_daemon_does(dep: RayServeModelDeployer, home: Path):
    svc = dep.deploy_model(config(pipeline_run_id="r1"), replace=True, timeout=120)
    info = dep.get_model_server_info(svc)
    assert info["STATE"] == "active" and info["PORT"] == str(dep.config.proxy_port)
    assert info["PREDICTION_URL"] == f"http://127.0.0.1:{dep.config.proxy_port}/{svc.uuid}/v1/models/iris:predict"
    assert info["PID"] is None and info["SERVICE_PATH"] == str(dep.records.path(svc.uuid).parent)
    # The same model and requests, through the local daemon's built-in server: the same answers.
    local = DaemonClient(home=home).deploy(config(), timeout=60)
    for body in ({"instances": SETOSA + [[6.9, 3.1, 5.4, 2.1]]}, {"instances": "x"}, {"nope": 1}, [1]):
        assert post(info["PREDICTION_URL"], body) == post(local.prediction_url, body), body
    with urllib.request.urlopen(info["HEALTH_CHECK_URL"], timeout=10) as response:
        assert json.load(response) == {"status": "ok"}
    # The record is the daemon's service.json form, with when it was observed.
    record = json.loads(dep.records.path(svc.uuid).read_text())
    assert record["type"]["name"] == "ray-model-server" and record["status"]["state"] == "active"
    assert record["observed_at"] and record["desired_state"] == "running"
    # Its replica's log, read from the head's session folder.
    assert "modeld: model 'iris' loaded" in "".join(dep.get_logs(svc.uuid, tail=50))


def test_every_filter(dep: RayServeModelDeployer, tmp_path: Path):
    import pickle

    model = tmp_path / "count.pkl"
    model.write_bytes(pickle.dumps(len))  # a pickled callable: predictions = len(instances)
    assert dep.find_model_server(pipeline_name="etl") == []
    other = dep.deploy_model(
        config(model_name="count", model_uri=str(model), pipeline_name="etl", pipeline_step_name="serve", pipeline_run_id="r2"),
        timeout=120,
    )
    assert other.config.model_type == "pickle"
    followed: list[str] = []

    def follow() -> None:  # new lines only (tail=0), until the request's access line comes
        for line in dep.get_logs(other.uuid, follow=True, tail=0):
            followed.append(line)
            if "POST" in line:
                return

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    assert post(other.prediction_url, {"instances": [1, 2, 3]}) == (200, {"predictions": 3})
    follower.join(30)
    assert not follower.is_alive() and f"POST /{other.uuid}" in followed[-1], followed
    others = {s.uuid for s in dep.find_model_server(running=True)} - {other.uuid}  # the other tests' services
    for key, value in [
        ("pipeline_name", "etl"),
        ("pipeline_run_id", "r2"),
        ("pipeline_step_name", "serve"),
        ("model_name", "count"),
        ("model_uri", str(model)),
        ("model_type", "pickle"),
        ("service_uuid", other.uuid),
    ]:
        assert [s.uuid for s in dep.find_model_server(**{key: value})] == [other.uuid], key
    assert {s.uuid for s in dep.find_model_server(running=True)} == others | {other.uuid}
    assert dep.find_model_server(pipeline_name="etl", model_name="iris") == []
    dep.delete_model_server(other.uuid, timeout=60)


def test_a_shipped_model_file_and_env_reach_the_replica(dep: RayServeModelDeployer, tmp_path: Path):
    """ship_model: the file travels as a gcs:// package in the runtime_env, and the replica loads Ray's copy."""
    model = tmp_path / "where.py"
    model.write_text("import os\ndef model(instances):\n    return [__file__, os.environ['GREETING']]\n")
    shipping = RayServeModelDeployer(dep.config.model_copy(update={"ship_model": True, "home": str(tmp_path / "h")}), name="ship")
    svc = shipping.deploy_model(config(model_name="where", model_uri=f"{model}:model", env={"GREETING": "hi"}), timeout=120)
    status, body = post(svc.prediction_url, {"instances": [1]})
    assert status == 200, body
    loaded_from, greeting = body["predictions"]  # type: ignore[index]
    assert greeting == "hi" and loaded_from.endswith("/where.py") and loaded_from != str(model), loaded_from
    assert (tmp_path / "h" / "services" / str(svc.uuid) / "ship" / "where.py").read_text() == model.read_text()
    shipping.delete_model_server(svc.uuid, timeout=60)


def test_a_follow_of_the_logs_ends_when_the_service_is_deleted(dep: RayServeModelDeployer, tmp_path: Path):
    model = tmp_path / "loud.py"
    model.write_text("def model(instances):\n    return instances\n")
    svc = dep.deploy_model(config(model_name="loud", model_uri=f"{model}:model"), timeout=120)
    followed: list[str] = []
    ended = threading.Event()

    def follow() -> None:
        for line in dep.get_logs(svc.uuid, follow=True, tail=0):
            followed.append(line)
        ended.set()

    threading.Thread(target=follow, daemon=True).start()
    wait_for(lambda: post(svc.prediction_url, {"instances": [1, 2, 3]}) and any("POST" in x for x in followed), 30,
             interval=1, what="the follow to see a new line (the request's access line)")
    assert not ended.is_set()
    dep.delete_model_server(svc.uuid, timeout=60)
    assert ended.wait(10), "the follow went on after the service was deleted"


def test_stop_start_delete(dep: RayServeModelDeployer):
    svc = dep.deploy_model(config(model_name="lifecycle", pipeline_name="life"), timeout=120)
    url = svc.prediction_url
    assert post(url, {"instances": SETOSA})[0] == 200
    dep.stop_model_server(svc.uuid, timeout=60)
    assert post(url, {"instances": SETOSA})[0] == 404  # Serve's proxy: no such route any more
    (stopped,) = dep.find_model_server(service_uuid=svc.uuid)
    assert (stopped.status.state, stopped.desired_state) == (ServiceState.INACTIVE, DesiredState.STOPPED)
    assert svc.uuid not in {s.uuid for s in dep.find_model_server(running=True)}
    dep.start_model_server(svc.uuid, timeout=120)
    assert post(url, {"instances": SETOSA}) == (200, {"predictions": ["setosa"]})
    (started,) = dep.find_model_server(service_uuid=svc.uuid, refresh=True)
    assert (started.status.state, started.desired_state) == (ServiceState.ACTIVE, DesiredState.RUNNING)
    # Serving already: a start and a redeploy_all leave it as it is (no new replica), as the local daemon does.
    replica = replica_of(dep, svc.uuid)
    dep.start_model_server(svc.uuid, timeout=60)
    assert svc.uuid not in {s.uuid for s in dep.redeploy_all(timeout=60)}
    assert replica_of(dep, svc.uuid) == replica

    # A stop that cannot reach the cluster changes nothing: the record still wants it running. (Another
    # process: a process drives one cluster at a time.)
    dead = {"address": "127.0.0.1:9", "home": str(dep.records.home)}
    code = f"""
import sys; from uuid import UUID
from deployers.ray.deployer import RayServeModelDeployer; from deployers.ray.flavor import RayServeModelDeployerConfig
dep = RayServeModelDeployer(RayServeModelDeployerConfig(**{dead!r}), name="dead")
try:
    dep.stop_model_server(UUID("{svc.uuid}"), timeout=5)
except Exception as exc:
    sys.exit(type(exc).__name__)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "ClusterUnreachable" in done.stderr, (done.returncode, done.stderr[-2000:])
    (kept,) = dep.find_model_server(service_uuid=svc.uuid, refresh=False)
    assert kept.desired_state == DesiredState.RUNNING
    dep.delete_model_server(svc.uuid, timeout=60)
    assert post(url, {"instances": SETOSA})[0] == 404
    assert dep.find_model_server(service_uuid=svc.uuid) == []
    with pytest.raises(ServiceNotFound):
        dep.start_model_server(svc.uuid)


@pytest.mark.slow
def test_replace_under_load_fails_no_request(dep: RayServeModelDeployer):
    svc = dep.deploy_model(config(model_name="loaded", pipeline_name="load"), timeout=120)
    results: list[tuple[int, object]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            results.append(post(svc.prediction_url, {"instances": SETOSA}, timeout=60))

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        wait_for(lambda: len(results) >= 20, 30, what="requests before the replace")
        new = dep.deploy_model(config(model_name="loaded", pipeline_name="load", model_uri=IRIS_V2), replace=True, timeout=120)
        # Returned once the new version serves: the next request is v2's.
        assert "distance" in json.dumps(post(svc.prediction_url, {"instances": SETOSA}))
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    assert (new.uuid, new.prediction_url, new.version) == (svc.uuid, svc.prediction_url, svc.version + 1)
    failed = [r for r in results if r[0] != 200]
    assert not failed and len(results) > 40, (len(results), failed[:3])
    dep.delete_model_server(svc.uuid, timeout=60)


def replica_of(dep: RayServeModelDeployer, uuid: object) -> list[str]:
    """The service's replicas so far, by their log files (Serve writes one per replica, named by its id)."""
    from deployers.ray import cluster, logs

    session = cluster.session_dir()
    assert session is not None  # (the test head is on this machine)
    return sorted(logs._files(session, str(uuid)))


@pytest.mark.slow
@pytest.mark.long
def test_a_replace_that_fails_to_load_brings_the_previous_version_back(dep: RayServeModelDeployer, tmp_path: Path):
    """With one replica Serve stops the old one to start the new; when the new cannot load, the previous
    version's record and application come back, as the local daemon keeps its previous version serving."""
    svc = dep.deploy_model(config(model_name="steady", pipeline_name="steady"), timeout=120)
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('cannot load: weights missing')\n")
    with pytest.raises(DeployError, match="the new version failed and the previous version .* serves again"):
        dep.deploy_model(config(model_name="steady", pipeline_name="steady", model_uri=f"{bad}:model"), replace=True, timeout=60)
    (back,) = dep.find_model_server(service_uuid=svc.uuid, refresh=True)
    assert (back.config.model_uri, back.version, back.status.state) == (svc.config.model_uri, svc.version, ServiceState.ACTIVE)
    assert post(svc.prediction_url, {"instances": SETOSA}) == (200, {"predictions": ["setosa"]})
    dep.delete_model_server(svc.uuid, timeout=60)


@pytest.mark.slow
@pytest.mark.long
def test_a_model_that_fails_to_load_says_why(dep: RayServeModelDeployer, tmp_path: Path):
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('cannot load: weights missing')\n")
    start = time.monotonic()
    with pytest.raises(DeployError, match="failed to deploy on Ray Serve: RuntimeError: cannot load: weights missing"):
        dep.deploy_model(config(model_name="bad", model_uri=f"{bad}:model"), timeout=60)
    assert time.monotonic() - start < 60
    (record,) = dep.find_model_server(model_name="bad", refresh=False)
    assert record.status.state == ServiceState.ERROR and "weights missing" in record.status.last_error
    # As the local daemon's after a failed deploy: given up (its application deleted, its desired state
    # stopped), so redeploy_all does not try it again, and a refresh keeps its error.
    assert record.desired_state == DesiredState.STOPPED
    assert record.uuid not in {s.uuid for s in dep.redeploy_all(timeout=60)}
    (again,) = dep.find_model_server(service_uuid=record.uuid, refresh=True)
    assert again.status.state == ServiceState.ERROR and "weights missing" in again.status.last_error
    from ray import serve

    wait_for(lambda: str(record.uuid) not in serve.status().applications, 30, what="its application deleted")
    dep.delete_model_server(record.uuid, timeout=60)


@pytest.mark.slow
@pytest.mark.long
def test_idle_timeout_scales_to_zero_and_a_request_wakes_it(dep: RayServeModelDeployer):
    svc = dep.deploy_model(config(model_name="idle", pipeline_name="idle", idle_timeout=1), timeout=120)
    assert svc.status.state == ServiceState.ACTIVE  # one replica to start with (initial_replicas)

    def state() -> ServiceState:
        return dep.find_model_server(service_uuid=svc.uuid, refresh=True)[0].status.state

    wait_for(lambda: state() == ServiceState.SCALED_TO_ZERO, 90, interval=0.5, what="Serve to scale it to zero")
    assert svc.uuid not in {s.uuid for s in dep.find_model_server(running=True)}
    assert post(svc.prediction_url, {"instances": SETOSA}, timeout=90) == (200, {"predictions": ["setosa"]})
    assert state() == ServiceState.ACTIVE
    dep.delete_model_server(svc.uuid, timeout=60)


def test_a_proxy_other_than_the_clusters_is_refused_naming_both(dep: RayServeModelDeployer, head: Head, tmp_path: Path):
    from deployers.ray.cluster import Deadline

    dep._connect(Deadline(60))  # Serve runs there, with the session deployer's proxy
    elsewhere = RayServeModelDeployer(
        RayServeModelDeployerConfig(address=head.address, home=str(tmp_path), proxy_port=head.proxy_port + 1), name="x"
    )
    with pytest.raises(FlavorError, match=f"HTTP proxy on 127.0.0.1:{head.proxy_port}.*proxy_port={head.proxy_port + 1}"):
        elsewhere.deploy_model(config(model_name="elsewhere"), timeout=60)
    assert elsewhere.find_model_server() == []  # refused before any record


def _unreachable(address: str, timeout: float, home: Path) -> subprocess.CompletedProcess[str]:
    """A deploy from a fresh process (a process's driver is tied to one cluster)."""
    code = (
        "import sys, time\n"
        "from daemon import ServiceConfig\n"
        "from deployers.ray.deployer import RayServeModelDeployer\n"
        "from deployers.ray.flavor import RayServeModelDeployerConfig\n"
        f"d = RayServeModelDeployer(RayServeModelDeployerConfig(address={address!r}, home=sys.argv[1]))\n"
        "t = time.monotonic()\n"
        "try:\n"
        f"    d.deploy_model(ServiceConfig(model_name='m', model_uri={IRIS!r}), timeout={timeout})\n"
        "except Exception as e:\n"
        "    print(f'{time.monotonic() - t:.2f} {type(e).__name__}: {e}')\n"
    )
    return subprocess.run([sys.executable, "-c", code, str(home)], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_an_unreachable_cluster_fails_within_the_timeout_naming_it(tmp_path: Path):
    """A listener that accepts and never answers (Ray alone hangs on it), and a closed port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: [accepted.append(listener.accept()[0]) for _ in range(16)], daemon=True).start()
    try:
        out = _unreachable(f"127.0.0.1:{port}", 3, tmp_path).stdout.strip()
        seconds, _, message = out.partition(" ")
        assert message.startswith(
            f"ClusterUnreachable: the Ray cluster at 127.0.0.1:{port} accepted a connection but did not answer"
        ), out
        assert 2.5 < float(seconds) < 5, out
        assert accepted, "the listener was never reached"
        assert not list(tmp_path.iterdir()), "a record was written for a deploy that never reached a cluster"
    finally:
        listener.close()
        for s in accepted:
            s.close()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    out = _unreachable(f"ray://127.0.0.1:{port}", 3, tmp_path).stdout.strip()
    assert f"ClusterUnreachable: cannot reach the Ray cluster at ray://127.0.0.1:{port}: Connection refused" in out, out
    assert float(out.split()[0]) < 3, out


def _cli_has_deployer_option() -> bool:
    from conftest import modeld

    return "--deployer" in modeld("--help", home=Path("/nonexistent")).stdout


@pytest.mark.slow
@pytest.mark.long
def test_local_and_ray_side_by_side_through_the_same_cli(request: pytest.FixtureRequest, home: Path):
    """`modeld --deployer cluster ...` on the ray deployer, plain `modeld ...` on the local daemon, one home."""
    from conftest import modeld

    if not _cli_has_deployer_option():
        pytest.skip("this CLI has no --deployer option yet (it comes with the one-CLI-for-both change)")
    head: Head = request.getfixturevalue("head")

    def ok(*args: str) -> str:
        result = modeld(*args, home=home, timeout=180)
        # Nothing on stderr when all went well: none of Ray's driver-side notes either (cluster.quiet_ray).
        assert result.returncode == 0 and result.stderr == "", (args, result.stdout, result.stderr)
        return result.stdout

    ok("deployer", "register", "cluster", "--flavor", "ray", f"address={head.address}", f"proxy_port={head.proxy_port}")
    ok("--deployer", "cluster", "deploy", "--model-name", "iris", "--model-uri", IRIS, "--pipeline-name", "cli")
    ok("deploy", "--model-name", "iris", "--model-uri", IRIS, "--pipeline-name", "cli")
    from deployers.registry import get_deployer

    cluster = get_deployer("cluster", home=home)
    assert isinstance(cluster, RayServeModelDeployer) and cluster.records.home == home / "ray" / "cluster"
    (remote,) = cluster.find_model_server(pipeline_name="cli")
    (local,) = DaemonClient(home=home).find(pipeline_name="cli")
    on_ray, on_local = ok("--deployer", "cluster", "ls"), ok("ls")  # short uuids (8 characters)
    assert str(remote.uuid)[:8] in on_ray and str(remote.uuid)[:8] not in on_local, (on_ray, on_local)
    assert f":{head.proxy_port}/{remote.uuid}" in on_ray, on_ray  # its own URL, not the proxy's shared root
    assert str(local.uuid)[:8] in on_local and str(local.uuid)[:8] not in on_ray, (on_ray, on_local)
    assert post(remote.prediction_url, {"instances": SETOSA}) == post(local.prediction_url, {"instances": SETOSA})
    shown = ok("--deployer", "cluster", "info", str(remote.uuid))
    assert remote.prediction_url in shown, shown
    # The state is the one asked of Ray just now, and says when (a cluster that did not answer: an old time).
    assert re.search(r"^OBSERVED +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(\ds ago\)$", shown, re.M), shown
    assert "OBSERVED" not in ok("info", str(local.uuid))
    assert "modeld: model 'iris' loaded" in ok("--deployer", "cluster", "logs", str(remote.uuid), "-n", "50")
    ok("--deployer", "cluster", "rm", str(remote.uuid))
    assert cluster.find_model_server(pipeline_name="cli") == []
    assert post(local.prediction_url, {"instances": SETOSA})[0] == 200


@pytest.mark.slow
@pytest.mark.long
def test_a_new_head_then_redeploy_from_the_records(dep: RayServeModelDeployer, head: Head):
    """Nothing of Serve survives its head; the records do. Last in the module: it replaces the head."""
    running = dep.deploy_model(config(model_name="survivor", pipeline_name="again"), timeout=120)
    stopped = dep.deploy_model(config(model_name="resting", pipeline_name="again"), timeout=120)
    dep.stop_model_server(stopped.uuid, timeout=60)
    before = {s.uuid for s in dep.find_model_server()}
    # Disconnected first: a driver still connected when a new head comes up at the same address was once
    # seen to end this process (Ray's own check on reconnecting, it seems), which would end the test run.
    dep.disconnect()
    head.stop()
    head.start()  # the same ports: the same deployer config
    assert {s.uuid for s in dep.find_model_server()} == before  # from the records, without asking Ray
    (seen,) = dep.find_model_server(service_uuid=running.uuid, refresh=True)
    assert seen.status.state == ServiceState.INACTIVE and "not on the cluster" in seen.status.last_error
    with pytest.raises(urllib.error.URLError, match="Connection refused"):
        post(running.prediction_url, {"instances": SETOSA})  # no Serve, so no proxy, on the new head yet
    start = time.monotonic()
    back = dep.redeploy_all(timeout=120)
    took = time.monotonic() - start
    assert running.uuid in {s.uuid for s in back} and stopped.uuid not in {s.uuid for s in back}, back
    assert all(s.status.state == ServiceState.ACTIVE for s in back), [(s.config.model_name, s.status) for s in back]
    assert post(running.prediction_url, {"instances": SETOSA}) == (200, {"predictions": ["setosa"]})
    dep.start_model_server(stopped.uuid, timeout=120)  # and one by one, from its record
    assert post(stopped.prediction_url, {"instances": SETOSA})[0] == 200
    print(f"redeploy_all of {len(back)} after a new head: {took:.1f}s")
