"""The ray flavor without a cluster: built in, its config validated without importing ray,
its refusals, its records (fast to list), and that nothing outside deployers/ray imports ray."""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon import ServiceConfig
from daemon.exceptions import DeployError, FlavorError, ServiceNotFound
from daemon.models import DesiredState, ServiceState
from daemon.testing import REPO
from deployers.ray.flavor import RayServeModelDeployerConfig, RefusedOnRay
from deployers.ray.records import RayModelService, Records, observed
from deployers.registry import FlavorRegistry

SOURCES = ("daemon", "deployers", "modeld_zenml", "scripts")


def test_nothing_outside_deployers_ray_imports_ray():
    """Read from the source (ast), so imports inside functions count too."""
    offenders = []
    for top in SOURCES:
        for path in (REPO / top).rglob("*.py"):
            rel = path.relative_to(REPO)
            if rel.parts[:2] == ("deployers", "ray") or rel.name == "bench_ray.py":
                continue  # the flavor itself, and its benchmark (which runs bare serve.run beside it)
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module or ""]
                offenders += [f"{rel}:{node.lineno} imports {n}" for n in names if n == "ray" or n.startswith("ray.")]
    assert not offenders, offenders
    # And at run time: the registry, the CLI's modules and the flavor load without ray.
    code = (
        "import sys, deployers, deployers.registry, deployers.ray, deployers.ray.flavor, deployers.ray.records, deployers.cli;"
        "from deployers.registry import FlavorRegistry;"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_ray_is_a_builtin_flavor_validated_without_ray(tmp_path: Path):
    registry = FlavorRegistry(tmp_path)
    flavors = {f["name"]: f for f in registry.list_flavors()}
    assert flavors["ray"]["builtin"] and flavors["local"]["builtin"]
    info = registry.register_deployer("cluster", "ray", {"address": "ray://10.0.0.5:10001", "num_cpus": "0.5"})
    assert info["config"] == {"address": "ray://10.0.0.5:10001", "num_cpus": 0.5}
    with pytest.raises(FlavorError, match="address: .*expected 'auto', host:port"):
        registry.register_deployer("bad", "ray", {"address": "10.0.0.5"})
    with pytest.raises(FlavorError, match="min_replicas \\(3\\) is above max_replicas \\(2\\)"):
        registry.register_deployer("bad", "ray", {"min_replicas": "3", "max_replicas": "2"})
    with pytest.raises(FlavorError, match="proxy_prot: unknown setting"):
        registry.register_deployer("bad", "ray", {"proxy_prot": "1"})
    with pytest.raises(FlavorError, match="built in and cannot be deleted"):
        registry.delete_flavor("ray")
    # The records default to <home>/ray/<deployer name>.
    code = (
        "from deployers.registry import FlavorRegistry;"
        f"d = FlavorRegistry({str(tmp_path)!r}).get_deployer('cluster'); print(d.records.home)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    try:
        import ray  # noqa: F401
    except ImportError:
        assert "pip install 'modeld[ray]'" in out.stderr, out.stderr
    else:
        assert out.stdout.strip() == str(tmp_path / "ray" / "cluster"), out.stdout + out.stderr


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("proxy_host", "http://10.0.0.5"),  # a URL
        ("proxy_host", "127.0.0.1:8000"),  # with a port
        ("proxy_host", "[::1]"),  # in brackets
        ("proxy_host", "my host"),
        ("namespace", "team a"),
        ("namespace", "x\ny"),
        ("home", "/tmp/a\0b"),
        ("home", "  "),
        ("num_cpus", "inf"),  # validates as a float, but is not JSON (deployers.json) and overflows Ray
        ("num_gpus", "-inf"),
        ("num_cpus", "nan"),
    ],
)
def test_settings_that_cannot_work_are_refused_at_registration_naming_them(tmp_path: Path, setting: str, value: str):
    registry = FlavorRegistry(tmp_path)
    with pytest.raises(FlavorError, match=f"{setting}: .*(expected|got)"):
        registry.register_deployer("odd", "ray", {setting: value})
    assert "odd" not in {d["name"] for d in registry.list_deployers()}


def test_a_relative_home_is_made_absolute_from_where_it_is_registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    info = FlavorRegistry(tmp_path / "h").register_deployer("rel", "ray", {"home": "records", "proxy_host": "::1"})
    assert info["config"] == {"home": str(tmp_path / "records"), "proxy_host": "::1"}


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"port": 8080}, "port=8080"),
        ({"host": "0.0.0.0"}, "host='0.0.0.0'"),
        ({"bind_unix": True}, "bind_unix=True"),
        ({"python": "/usr/bin/python3.9"}, "python='/usr/bin/python3.9'"),
        ({"restart": {"max_restarts": 1}}, "restart"),
    ],
)
def test_cluster_meaningless_fields_are_refused_by_name(fields, named):
    from deployers.ray.deployer import RayServeModelDeployer  # imports ray only when it talks to a cluster

    config = ServiceConfig(model_name="m", model_uri="examples/iris.py:model", **fields)
    with pytest.raises(
        RefusedOnRay, match=f"^{named.replace('(', '.').replace(')', '.')}: this field means nothing on a Ray cluster"
    ):
        RayServeModelDeployer.check(config)
    assert RefusedOnRay.status_code == 400
    # Their defaults (and the deploying interpreter, which clients fill in) pass.
    RayServeModelDeployer.check(ServiceConfig(model_name="m", model_uri="examples/iris.py:model", python=sys.executable))


def test_command_models_are_refused_naming_the_local_flavor():
    from deployers.ray.deployer import RayServeModelDeployer

    with pytest.raises(RefusedOnRay, match="runs on the local flavor"):
        RayServeModelDeployer.check(ServiceConfig(model_name="web", command=["python3", "-m", "http.server", "{port}"]))


def test_a_deploy_refused_before_the_cluster_leaves_no_record_and_is_a_400(tmp_path: Path):
    """A model file that is not there is refused before anything is asked of the cluster or recorded (the
    local daemon keeps nothing of a refused deploy either); a refusal is a 400, exit code 2 on the CLI."""
    from daemon.exceptions import InvalidRequest
    from deployers.cli.errors import EXIT_CODES
    from deployers.ray.deployer import RayServeModelDeployer

    dep = RayServeModelDeployer(RayServeModelDeployerConfig(address="127.0.0.1:9", home=str(tmp_path / "h")), name="x")
    with pytest.raises(RefusedOnRay, match="model file '/nonexistent/m.py' does not exist") as refused:
        dep.deploy_model(ServiceConfig(model_name="m", model_uri="/nonexistent/m.py:model"), timeout=5)
    assert isinstance(refused.value, InvalidRequest) and isinstance(refused.value, DeployError)
    assert next(code for cls, code in EXIT_CODES if isinstance(refused.value, cls)) == 2
    assert dep.find_model_server() == []


def test_records_list_1000_fast_and_survive_a_new_reader(tmp_path: Path):
    records = Records(tmp_path)
    for i in range(1000):
        service = RayModelService(config=ServiceConfig(model_name=f"m{i}", model_uri="x.py:model", pipeline_name=f"p{i % 7}"))
        observed(service, ServiceState.ACTIVE)
        records.write(service)
    assert len(records.all()) == 1000  # the first read parses them all
    times = []
    for _ in range(7):
        start = time.perf_counter()
        listed = records.all()
        times.append(time.perf_counter() - start)
        assert len(listed) == 1000
    # Nothing changed since the last list: one small file read (the bench's target is 5 ms).
    assert sorted(times)[3] < 0.005, times
    # A change made by another reader (another process) is seen: a write makes a new file.
    other = Records(tmp_path)
    first = listed[0]
    other.update(first.uuid, lambda s: setattr(s, "desired_state", DesiredState.STOPPED))
    assert records.get(first.uuid).desired_state == DesiredState.STOPPED
    assert next(s for s in records.all() if s.uuid == first.uuid).desired_state == DesiredState.STOPPED
    other.remove(first.uuid)
    assert len(records.all()) == 999
    with pytest.raises(ServiceNotFound):
        records.get(first.uuid)
    data = (tmp_path / "services" / str(listed[1].uuid) / "service.json").read_text()
    assert '"name": "ray-model-server"' in data and '"observed_at"' in data


def test_an_unreadable_record_is_left_out_of_the_lists_saying_so_once(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """One bad file (a crash of the disk, a hand edit) must not stop every command of the deployer."""
    records = Records(tmp_path)
    good = records.write(RayModelService(config=ServiceConfig(model_name="good", model_uri="x.py:model")))
    for name, text in (("deadbeef-0000-0000-0000-000000000000", "{garbage"), ("empty", "")):
        (tmp_path / "services" / name).mkdir()
        (tmp_path / "services" / name / "service.json").write_text(text)
    with caplog.at_level("WARNING", logger="modeld.ray"):
        assert [s.uuid for s in records.all()] == [good.uuid]
        assert [s.uuid for s in Records(tmp_path).all()] == [good.uuid]  # (another reader, not from a cache)
        records.remove(good.uuid)  # the others still work
        assert records.all() == []
    said = [r.getMessage() for r in caplog.records]
    assert sum("deadbeef" in m for m in said) == 2 and sum("/empty" in m for m in said) == 2, said  # once per reader
    assert all("fix or remove the file" in m for m in said), said


def test_shipping_over_ray_client_is_refused_naming_the_way_out(tmp_path: Path):
    """Ray's package upload does not return through a ray:// connection: refused before any upload."""
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'modeld[ray]')")
    from deployers.ray import serving
    from deployers.ray.flavor import RayServeModelDeployerConfig

    model = tmp_path / "m.py"
    model.write_text("def model(x):\n    return x\n")
    service = RayModelService(config=ServiceConfig(model_name="m", model_uri=f"{model}:model"))
    config = RayServeModelDeployerConfig(address="ray://10.0.0.5:10001", ship_model=True)
    with pytest.raises(RefusedOnRay, match="ship_model over a ray:// address is not supported: .*ship_model=false"):
        serving.application(service, config, str(tmp_path / "ship"))
    assert not (tmp_path / "ship").exists()
