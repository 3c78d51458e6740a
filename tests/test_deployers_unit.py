"""Unit tests of deployers/: the ZenML contract, the flavor and deployer registries.

No daemon is needed: the local deployer is driven through a fake client,
and the registries live in a temporary home.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Dict, List, Optional
from uuid import UUID, uuid4

import pytest

import deployers
from daemon.exceptions import FlavorError, StorageError
from daemon.config import ServiceConfig
from daemon.models import BaseService, ServiceEndpoint, ServiceState, ServiceStatus
from deployers import (
    DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT,
    BaseModelDeployer,
    BaseModelDeployerConfig,
    BaseModelDeployerFlavor,
    FlavorRegistry,
    LocalDaemonModelDeployer,
    LocalDaemonModelDeployerConfig,
    LocalDaemonModelDeployerFlavor,
    StackComponentType,
)
from deployers.base import StackComponentConfig
from deployers.registry import parse_key_values

REPO = Path(__file__).resolve().parents[1]
FIX = "tests.flavor_fixtures"
MEMORY = f"{FIX}.memory_flavor.InMemoryModelDeployerFlavor"
BROKEN = f"{FIX}.broken_flavor.BrokenModelDeployerFlavor"


# -- the contract: ZenML's seed, copied verbatim ---------------------------------


class _Seed(ABC):
    """The abstract methods of ZenML's BaseModelDeployer, as the seed pages give them."""

    @abstractmethod
    def deploy_model(
        self,
        config: ServiceConfig,
        replace: bool = False,
        timeout: int = 300,
    ) -> BaseService: ...

    @staticmethod
    @abstractmethod
    def get_model_server_info(
        service: BaseService,
    ) -> Dict[str, Optional[str]]: ...

    @abstractmethod
    def find_model_server(
        self,
        running: bool = False,
        service_uuid: Optional[UUID] = None,
        pipeline_name: Optional[str] = None,
        pipeline_run_id: Optional[str] = None,
        pipeline_step_name: Optional[str] = None,
        model_name: Optional[str] = None,
        model_uri: Optional[str] = None,
        model_type: Optional[str] = None,
    ) -> List[BaseService]: ...

    @abstractmethod
    def stop_model_server(
        self,
        uuid: UUID,
        timeout: int = 300,
        force: bool = False,
    ) -> None: ...

    @abstractmethod
    def start_model_server(
        self,
        uuid: UUID,
        timeout: int = 300,
    ) -> None: ...

    @abstractmethod
    def delete_model_server(
        self,
        uuid: UUID,
        timeout: int = 300,
        force: bool = False,
    ) -> None: ...


SEED_METHODS = sorted(_Seed.__abstractmethods__)


def _shape(func: Any) -> list[tuple[str, Any, Any]]:
    sig = inspect.signature(func)
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def test_default_timeout_is_300() -> None:
    assert DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT == 300


def test_abstract_methods_are_exactly_the_seeds_six() -> None:
    assert len(SEED_METHODS) == 6
    assert BaseModelDeployer.__abstractmethods__ == frozenset(SEED_METHODS)
    assert BaseModelDeployer.TYPE == StackComponentType.MODEL_DEPLOYER == "model_deployer"


@pytest.mark.parametrize("method", SEED_METHODS)
@pytest.mark.parametrize("cls", [BaseModelDeployer, LocalDaemonModelDeployer], ids=lambda c: c.__name__)
def test_signatures_match_the_seed(cls: type, method: str) -> None:
    assert _shape(getattr(cls, method)) == _shape(getattr(_Seed, method))
    seed_return = inspect.signature(getattr(_Seed, method)).return_annotation
    assert inspect.signature(getattr(cls, method)).return_annotation == seed_return


@pytest.mark.parametrize("cls", [BaseModelDeployer, LocalDaemonModelDeployer], ids=lambda c: c.__name__)
def test_get_model_server_info_is_a_staticmethod(cls: type) -> None:
    assert isinstance(inspect.getattr_static(cls, "get_model_server_info"), staticmethod)


def test_flavor_base_shape() -> None:
    assert BaseModelDeployerFlavor.__abstractmethods__ == frozenset({"name", "implementation_class"})

    class Minimal(BaseModelDeployerFlavor):
        name = "minimal"  # type: ignore[assignment]
        implementation_class = BaseModelDeployer  # type: ignore[assignment]

    flavor = Minimal()
    assert flavor.type == StackComponentType.MODEL_DEPLOYER
    assert flavor.config_class is BaseModelDeployerConfig


def test_component_config_refuses_unknown_settings() -> None:
    assert issubclass(BaseModelDeployerConfig, StackComponentConfig)
    with pytest.raises(Exception, match="extra"):
        LocalDaemonModelDeployerConfig(hme="/tmp")  # type: ignore[call-arg]


def test_public_api_is_sorted_and_complete() -> None:
    assert deployers.__all__ == sorted(deployers.__all__)
    assert set(deployers.__all__) == {
        "BaseModelDeployer", "BaseModelDeployerConfig", "BaseModelDeployerFlavor",
        "DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT", "FlavorRegistry", "LocalDaemonModelDeployer",
        "LocalDaemonModelDeployerConfig", "LocalDaemonModelDeployerFlavor", "StackComponentType", "get_deployer",
    }
    for name in deployers.__all__:
        assert getattr(deployers, name) is not None


def _fresh_python(code: str, tmp_path: Path) -> list[str]:
    """Run ``code`` in a new interpreter (own sys.modules) and return its printed lines."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MODELD_HOME": str(tmp_path / "home")}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_flavor_module_does_not_import_the_implementation(tmp_path: Path) -> None:
    lines = _fresh_python(
        """
        import sys
        import deployers.local.flavor
        print("deployers.local.deployer" in sys.modules, "daemon.client" in sys.modules)
        import deployers
        deployers.FlavorRegistry().register_deployer("lazy", "local", {"auto_start": "no"})
        print("daemon.client" in sys.modules)
        """,
        tmp_path,
    )
    assert lines == ["False", "False", "False"]


# -- the local deployer, over a fake client ---------------------------------------


class FakeClient:
    """Records calls; answers like DaemonClient."""

    def __init__(self, service: BaseService) -> None:
        self.service = service
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def _record(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((name, args, kwargs))

    def deploy(self, config: ServiceConfig, **kwargs: Any) -> BaseService:
        self._record("deploy", config, **kwargs)
        return self.service

    def find(self, **kwargs: Any) -> list[BaseService]:
        self._record("find", **kwargs)
        return [self.service]

    def start(self, uuid: Any, **kwargs: Any) -> BaseService:
        self._record("start", uuid, **kwargs)
        return self.service

    def stop(self, uuid: Any, **kwargs: Any) -> BaseService:
        self._record("stop", uuid, **kwargs)
        return self.service

    def delete(self, uuid: Any, **kwargs: Any) -> None:
        self._record("delete", uuid, **kwargs)


def _service(**status: Any) -> BaseService:
    config = ServiceConfig(name="iris", model_name="iris", model_uri="models/iris.pkl", model_type="pickle")
    return BaseService(
        config=config,
        status=ServiceStatus(**status),
        endpoint=ServiceEndpoint(port=8123, model_name="iris"),
        service_path="/home/u/.local/state/modeld/services/abc",
    )


def test_local_deployer_delegates_every_method_to_the_client() -> None:
    svc = _service()
    client = FakeClient(svc)
    deployer = LocalDaemonModelDeployer(client=client)  # type: ignore[arg-type]
    assert deployer.name == "local" and deployer.config == LocalDaemonModelDeployerConfig()
    assert deployer.FLAVOR is LocalDaemonModelDeployerFlavor

    assert deployer.deploy_model(svc.config, replace=True, timeout=7) is svc
    filters = dict(
        running=True, service_uuid=svc.uuid, pipeline_name="p", pipeline_run_id="r",
        pipeline_step_name="s", model_name="m", model_uri="u", model_type="pickle",
    )
    assert deployer.find_model_server(**filters) == [svc]
    assert deployer.stop_model_server(svc.uuid, timeout=3, force=True) is None
    assert deployer.start_model_server(svc.uuid, timeout=4) is None
    assert deployer.delete_model_server(svc.uuid, timeout=5, force=True) is None
    assert client.calls == [
        ("deploy", (svc.config,), {"replace": True, "timeout": 7}),
        ("find", (), filters),
        ("stop", (svc.uuid,), {"timeout": 3, "force": True}),
        ("start", (svc.uuid,), {"timeout": 4}),
        ("delete", (svc.uuid,), {"timeout": 5, "force": True}),
    ]


def test_local_deployer_defaults_pass_the_seed_timeouts() -> None:
    svc = _service()
    client = FakeClient(svc)
    deployer = LocalDaemonModelDeployer(client=client)  # type: ignore[arg-type]
    deployer.deploy_model(svc.config)
    deployer.find_model_server()
    deployer.stop_model_server(svc.uuid)
    assert client.calls[0][2] == {"replace": False, "timeout": 300}
    assert client.calls[1][2]["running"] is False
    assert all(v is None for k, v in client.calls[1][2].items() if k != "running")
    assert client.calls[2][2] == {"timeout": 300, "force": False}


def test_local_deployer_builds_its_client_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[dict[str, Any]] = []

    class Recorder:
        def __init__(self, **kwargs: Any) -> None:
            made.append(kwargs)

    fake_module = type(sys)("daemon.client")
    fake_module.DaemonClient = Recorder  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "daemon.client", fake_module)
    config = LocalDaemonModelDeployerConfig(home="/tmp/h", socket="/tmp/h/s.sock", auto_start=False)
    deployer = LocalDaemonModelDeployer(config, name="mine")
    assert made == []
    assert deployer.client is deployer.client
    assert made == [{"home": "/tmp/h", "socket_path": "/tmp/h/s.sock", "auto_start": False}]


def test_local_deployer_with_the_real_client_and_no_daemon(tmp_path: Path) -> None:
    from daemon.client import DaemonClient
    from daemon.exceptions import DaemonNotRunning

    config = LocalDaemonModelDeployerConfig(home=str(tmp_path / "home"), auto_start=False)
    deployer = LocalDaemonModelDeployer(config)
    assert isinstance(deployer.client, DaemonClient)
    assert deployer.client.paths.home == tmp_path / "home"
    with pytest.raises(DaemonNotRunning, match="no modeld daemon answers"):
        deployer.find_model_server()


def test_get_model_server_info() -> None:
    svc = _service(state=ServiceState.ACTIVE, pid=4242)
    info = LocalDaemonModelDeployer.get_model_server_info(svc)
    assert info["PREDICTION_URL"] == "http://127.0.0.1:8123/v1/models/iris:predict"
    assert info["HEALTH_CHECK_URL"] == "http://127.0.0.1:8123/health"
    assert info["MODEL_URI"] == "models/iris.pkl"
    assert info["MODEL_NAME"] == "iris"
    assert info["SERVICE_PATH"] == "/home/u/.local/state/modeld/services/abc"
    assert info["LOG_PATH"] == "/home/u/.local/state/modeld/services/abc/service.log"
    assert info["PID"] == "4242"
    assert info["STATE"] == "active"
    assert info["UUID"] == str(svc.uuid)
    assert info["PORT"] == "8123"
    assert all(v is None or isinstance(v, str) for v in info.values())


def test_get_model_server_info_before_a_port_and_a_pid() -> None:
    svc = BaseService(config=ServiceConfig(model_uri="m.pkl", model_type="pickle"))
    info = LocalDaemonModelDeployer.get_model_server_info(svc)
    for key in ("PREDICTION_URL", "HEALTH_CHECK_URL", "PORT", "PID", "SERVICE_PATH", "LOG_PATH", "MODEL_NAME"):
        assert info[key] is None, key
    assert info["STATE"] == "inactive"


# -- flavor registry ---------------------------------------------------------------


@pytest.fixture
def registry(tmp_path: Path) -> FlavorRegistry:
    return FlavorRegistry(tmp_path / "home")


def test_flavor_round_trip(registry: FlavorRegistry) -> None:
    assert [f["name"] for f in registry.list_flavors()] == ["local", "ray"]
    assert all(f["builtin"] for f in registry.list_flavors())

    info = registry.register_flavor(MEMORY)
    assert info["name"] == "memory" and info["source"] == MEMORY and not info["builtin"]
    assert info["config_source"] == f"{FIX}.memory_flavor.InMemoryModelDeployerConfig"

    stored = json.loads((registry.home / "flavors.json").read_text())
    assert stored["memory"]["source"] == MEMORY
    assert isinstance(stored["memory"]["registered_at"], float)

    assert [(f["name"], f["builtin"]) for f in registry.list_flavors()] == [("local", True), ("ray", True), ("memory", False)]
    flavor = registry.get_flavor("memory")
    assert flavor.name == "memory" and flavor.config_class.__name__ == "InMemoryModelDeployerConfig"
    assert isinstance(registry.get_flavor("local"), LocalDaemonModelDeployerFlavor)

    # A second registry on the same home sees it; re-registering overwrites.
    again = FlavorRegistry(registry.home).register_flavor(MEMORY)
    assert again["registered_at"] >= info["registered_at"]  # type: ignore[operator]
    assert [f["name"] for f in registry.list_flavors()] == ["local", "ray", "memory"]

    registry.delete_flavor("memory")
    assert [f["name"] for f in registry.list_flavors()] == ["local", "ray"]
    assert not list(registry.home.glob("*.tmp"))


def test_registering_a_flavor_does_not_read_implementation_class(registry: FlavorRegistry) -> None:
    # GoodTypeFlavor.implementation_class raises AssertionError if read.
    registry.register_flavor(f"{FIX}.bad_flavors.GoodTypeFlavor")
    assert registry.get_flavor("good").name == "good"
    registry.register_deployer("g", "good", {})
    with pytest.raises(FlavorError, match=r"deployer 'g' \(flavor 'good'\): cannot load its implementation.*AssertionError"):
        registry.get_deployer("g")


@pytest.mark.parametrize(
    ("cls", "pattern"),
    [
        ("ImplNotADeployerFlavor", "implementation_class <class 'dict'> is not a subclass of deployers.BaseModelDeployer"),
        ("ImplAbstractFlavor", "implementation deployers.base.BaseModelDeployer does not implement delete_model_server"),
        ("ImplRaisingInitFlavor", r"Raising\(config=..., name=...\) failed: ValueError: no capacity left"),
    ],
)
def test_get_deployer_refuses_a_bad_implementation(registry: FlavorRegistry, cls: str, pattern: str) -> None:
    flavor = registry.register_flavor(f"{FIX}.bad_flavors.{cls}")["name"]
    registry.register_deployer("d", flavor, {})
    with pytest.raises(FlavorError, match=rf"deployer 'd'.*{pattern}"):
        registry.get_deployer("d")


@pytest.mark.parametrize(
    ("source", "pattern"),
    [
        ("", "invalid source path"),
        ("NoDots", "invalid source path"),
        ("a..B", "invalid source path"),
        ("1mod.Class", "invalid source path"),
        ("mod.Class-Name", "invalid source path"),
        ("modeld_no_such_module.Flavor", r"cannot import module 'modeld_no_such_module'.*ModuleNotFoundError"),
        (f"{FIX}.import_fails.Flavor",
         rf"cannot import module '{FIX}.import_fails'.*modeld_test_dependency_that_does_not_exist"),
        (f"{FIX}.import_crashes.Flavor", r"importing module .*import_crashes.*RuntimeError: flavor module exploded"),
        (f"{FIX}.bad_flavors.NoSuchClass", r"module .*bad_flavors' has no 'NoSuchClass'"),
        (f"{FIX}.bad_flavors.NotAFlavor", "class NotAFlavor, not a subclass of deployers.BaseModelDeployerFlavor"),
        (f"{FIX}.bad_flavors.not_a_class", "is a GoodTypeFlavor, not a subclass"),
        (f"{FIX}.bad_flavors.AbstractFlavor", "is abstract: it does not implement implementation_class, name"),
        (f"{FIX}.bad_flavors.RaisingInitFlavor", "cannot be instantiated: RuntimeError: cannot build me"),
        (f"{FIX}.bad_flavors.EmptyNameFlavor", "has an empty name"),
        (f"{FIX}.bad_flavors.SpacedNameFlavor", "has a name with whitespace"),
        (f"{FIX}.bad_flavors.RaisingNameFlavor", "reading its name failed: KeyError"),
        (f"{FIX}.bad_flavors.WrongTypeFlavor", "has type 'orchestrator'; a model deployer flavor must have type"),
        (f"{FIX}.bad_flavors.BadConfigFlavor", "config_class .*NotAConfig.* is not a subclass of"),
        (f"{FIX}.bad_flavors.PlainComponentConfigFlavor", "config_class .*StackComponentConfig.* is not a subclass"),
        (f"{FIX}.bad_flavors.LocalImpostorFlavor", "named 'local', which is built in and cannot be overridden"),
        ("deployers.local.flavor.LocalDaemonModelDeployerFlavor", "built in and cannot be overridden"),
    ],
)
def test_register_flavor_errors(registry: FlavorRegistry, source: str, pattern: str) -> None:
    with pytest.raises(FlavorError, match=pattern):
        registry.register_flavor(source)
    assert not (registry.home / "flavors.json").exists()


def test_unknown_flavor_names_the_known_ones(registry: FlavorRegistry) -> None:
    registry.register_flavor(MEMORY)
    with pytest.raises(FlavorError, match="unknown flavor 'nope'; known flavors: local, ray, memory"):
        registry.get_flavor("nope")
    with pytest.raises(FlavorError, match="unknown flavor 'nope'"):
        registry.delete_flavor("nope")
    with pytest.raises(FlavorError, match="built in and cannot be deleted"):
        registry.delete_flavor("local")


def test_a_flavor_in_use_cannot_be_deleted(registry: FlavorRegistry) -> None:
    registry.register_flavor(MEMORY)
    registry.register_deployer("m1", "memory", {})
    with pytest.raises(FlavorError, match="used by deployer.*m1"):
        registry.delete_flavor("memory")
    registry.delete_deployer("m1")
    registry.delete_flavor("memory")


def test_corrupt_registry_file_is_reported(registry: FlavorRegistry) -> None:
    registry.home.mkdir(parents=True)
    (registry.home / "flavors.json").write_text("{not json")
    with pytest.raises(StorageError, match="flavors.json.*fix or remove"):
        registry.list_flavors()
    with pytest.raises(StorageError, match="flavors.json"):
        registry.register_flavor(MEMORY)
    (registry.home / "flavors.json").write_text("[1, 2]")
    with pytest.raises(StorageError, match="expected an object"):
        registry.get_flavor("memory")


# -- deployer registry ---------------------------------------------------------------


def test_deployer_round_trip(registry: FlavorRegistry) -> None:
    registry.register_flavor(MEMORY)
    info = registry.register_deployer("mem", "memory", {"capacity": "3", "strict": "true"})
    assert info == {
        "name": "mem", "flavor": "memory", "config": {"capacity": 3, "strict": True},
        "builtin": False, "registered_at": info["registered_at"],
    }
    stored = json.loads((registry.home / "deployers.json").read_text())
    assert stored["mem"]["config"] == {"capacity": 3, "strict": True}

    assert [(d["name"], d["builtin"]) for d in registry.list_deployers()] == [("local", True), ("mem", False)]
    deployer = registry.get_deployer("mem")
    assert type(deployer).__name__ == "InMemoryModelDeployer"
    assert deployer.name == "mem"
    assert deployer.config.model_dump() == {"capacity": 3, "label": "memory", "strict": True}

    # The whole interface works through the registry-built deployer.
    config = ServiceConfig(pipeline_name="p", pipeline_step_name="s", model_name="m", model_uri="m.pkl")
    first = deployer.deploy_model(config)
    assert deployer.deploy_model(config.model_copy(update={"model_uri": "v2.pkl"}), replace=True).uuid == first.uuid
    assert [s.uuid for s in deployer.find_model_server(running=True, model_uri="v2.pkl")] == [first.uuid]
    deployer.stop_model_server(first.uuid)
    assert deployer.find_model_server(running=True) == []
    deployer.start_model_server(first.uuid)
    deployer.delete_model_server(first.uuid)
    assert deployer.find_model_server() == []

    registry.delete_deployer("mem")
    assert [d["name"] for d in registry.list_deployers()] == ["local"]


def test_registering_an_existing_deployer_replaces_it(registry: FlavorRegistry) -> None:
    registry.register_flavor(MEMORY)
    registry.register_deployer("mem", "memory", {"capacity": "3"})
    registry.register_deployer("mem", "memory", {"label": "x"})
    assert registry.get_deployer("mem").config.model_dump() == {"capacity": 10, "label": "x", "strict": False}


def test_deployer_of_an_unimportable_implementation(registry: FlavorRegistry) -> None:
    registry.register_flavor(BROKEN)
    info = registry.register_deployer("b", "broken", {"endpoint": "https://example.invalid", "replicas": "2"})
    assert info["config"] == {"endpoint": "https://example.invalid", "replicas": 2}
    assert f"{FIX}.broken_impl" not in sys.modules
    with pytest.raises(FlavorError) as caught:
        registry.get_deployer("b")
    message = str(caught.value)
    assert "deployer 'b'" in message and "flavor 'broken'" in message
    assert "ImportError" in message and "heavy_serving_lib" in message
    assert isinstance(caught.value.__cause__, ImportError)


@pytest.mark.parametrize(
    ("values", "pattern"),
    [
        ({"endpoint": "x", "replicas": "many"}, r"replicas: Input should be a valid integer.*got 'many'"),
        ({"endpoint": "x", "replicas": "0"}, r"replicas: Input should be greater than or equal to 1"),
        ({}, r"endpoint: required"),
        ({"endpoint": "x", "replica": "2"}, r"replica: unknown setting \(known: endpoint, replicas\)"),
    ],
)
def test_bad_config_is_refused_naming_the_field(registry: FlavorRegistry, values: dict[str, str], pattern: str) -> None:
    registry.register_flavor(BROKEN)
    with pytest.raises(FlavorError, match=r"invalid config for deployer 'b' \(flavor 'broken'\): " + pattern):
        registry.register_deployer("b", "broken", values)
    assert [d["name"] for d in registry.list_deployers()] == ["local"]


def test_several_bad_fields_are_named_in_one_message(registry: FlavorRegistry) -> None:
    with pytest.raises(FlavorError, match=r"auto_start: Input should be a valid boolean.*; bogus: unknown setting"):
        registry.register_deployer("l", "local", {"auto_start": "maybe", "bogus": "1"})


def test_register_deployer_errors(registry: FlavorRegistry) -> None:
    with pytest.raises(FlavorError, match="unknown flavor 'nope'; known flavors: local, ray"):
        registry.register_deployer("d", "nope", {})
    with pytest.raises(FlavorError, match="deployer 'local' is built in"):
        registry.register_deployer("local", "local", {})
    for bad in ("", "has space", "-dash", "a/b"):
        with pytest.raises(FlavorError, match="invalid deployer name"):
            registry.register_deployer(bad, "local", {})
    with pytest.raises(FlavorError, match="unknown deployer 'ghost'; known deployers: local"):
        registry.get_deployer("ghost")
    with pytest.raises(FlavorError, match="unknown deployer 'ghost'"):
        registry.delete_deployer("ghost")
    with pytest.raises(FlavorError, match="built in and cannot be deleted"):
        registry.delete_deployer("local")


def test_deployer_whose_flavor_disappeared(registry: FlavorRegistry) -> None:
    registry.register_flavor(MEMORY)
    registry.register_deployer("mem", "memory", {})
    flavors = json.loads((registry.home / "flavors.json").read_text())
    del flavors["memory"]
    (registry.home / "flavors.json").write_text(json.dumps(flavors))
    with pytest.raises(FlavorError, match="deployer 'mem': unknown flavor 'memory'"):
        registry.get_deployer("mem")


def test_local_deployers(registry: FlavorRegistry) -> None:
    builtin = registry.get_deployer()
    assert isinstance(builtin, LocalDaemonModelDeployer) and builtin.name == "local"
    # A registry with its own home hands that home to local deployers that name none.
    assert builtin.config.home == str(registry.home)

    registry.register_deployer("quiet", "local", {"auto_start": "false", "socket": "/tmp/x.sock"})
    assert registry.list_deployers()[1]["config"] == {"auto_start": False, "socket": "/tmp/x.sock"}
    quiet = registry.get_deployer("quiet")
    assert isinstance(quiet, LocalDaemonModelDeployer)
    assert quiet.config == LocalDaemonModelDeployerConfig(home=str(registry.home), socket="/tmp/x.sock", auto_start=False)

    registry.register_deployer("elsewhere", "local", {"home": "/srv/modeld"})
    assert registry.get_deployer("elsewhere").config.home == "/srv/modeld"  # type: ignore[attr-defined]


def test_default_home_registry_leaves_local_home_to_the_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELD_HOME", str(tmp_path / "envhome"))
    registry = FlavorRegistry()
    assert registry.home == tmp_path / "envhome"
    assert registry.get_deployer().config.home is None  # type: ignore[attr-defined]
    assert deployers.get_deployer().config.home is None  # type: ignore[attr-defined]
    registry.register_flavor(MEMORY)
    assert (tmp_path / "envhome" / "flavors.json").exists()


@pytest.mark.slow
def test_concurrent_registrations_are_all_kept(tmp_path: Path) -> None:
    home = tmp_path / "home"
    code = textwrap.dedent(
        """
        import sys
        from deployers import FlavorRegistry
        registry = FlavorRegistry(sys.argv[1])
        for i in range(5):
            registry.register_deployer(f"d{sys.argv[2]}-{i}", "local", {"auto_start": "false"})
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(home), str(n)], cwd=REPO, env=env, stderr=subprocess.PIPE)
        for n in range(6)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
    names = {d["name"] for d in FlavorRegistry(home).list_deployers()}
    assert names == {"local"} | {f"d{n}-{i}" for n in range(6) for i in range(5)}


# -- helpers -----------------------------------------------------------------------------


def test_parse_key_values() -> None:
    assert parse_key_values(["a=1", "b=x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}
    assert parse_key_values([]) == {}
    with pytest.raises(FlavorError, match="expected key=value, got 'oops'"):
        parse_key_values(["a=1", "oops"])
    with pytest.raises(FlavorError, match="expected key=value, got '=1'"):
        parse_key_values(["=1"])
    with pytest.raises(FlavorError, match="'a' given twice"):
        parse_key_values(["a=1", "a=2"])


def test_uuid_filters_reach_the_client_unchanged() -> None:
    svc = _service()
    client = FakeClient(svc)
    deployer = LocalDaemonModelDeployer(client=client)  # type: ignore[arg-type]
    wanted = uuid4()
    deployer.find_model_server(service_uuid=wanted)
    assert client.calls[0][2]["service_uuid"] is wanted


def test_local_deployer_over_the_real_client_in_memory() -> None:
    """The deployer's calls as the daemon receives them (query, body, method), and its errors as the daemon
    sends them, through the real DaemonClient on an in-memory transport: no daemon needed."""
    from daemon.client import DaemonClient, InMemoryTransport, Request, Response, json_response
    from daemon.exceptions import DeployError, ServiceNotFound
    from daemon.models import LocalModelService

    config = ServiceConfig(model_name="iris", model_uri="/tmp/m.py:model", pipeline_name="train",
                           python=sys.executable, working_dir="/tmp")
    served = LocalModelService(config=config)

    def daemon(request: Request) -> Response:
        if request.path == "/v1/services" and request.method == "GET":
            return json_response({"services": [served.public().model_dump(mode="json")]})
        if request.path == "/v1/services":
            raise DeployError("the server exited with code 1; last log lines:\nkaboom")
        raise ServiceNotFound(f"no service with uuid {request.path.split('/')[3]}")

    transport = InMemoryTransport(daemon)
    deployer = LocalDaemonModelDeployer(client=DaemonClient(transport=transport))
    found = deployer.find_model_server(running=True, pipeline_name="train")
    assert [s.uuid for s in found] == [served.uuid] and found[0].config.model_name == "iris"
    assert transport.requests[-1].target == "/v1/services?running=true&pipeline_name=train"
    with pytest.raises(DeployError) as info:
        deployer.deploy_model(config, replace=True, timeout=60)
    assert info.value.log_excerpt == "kaboom"
    body = transport.requests[-1].body
    assert (body["replace"], body["timeout"], body["config"]["model_name"]) == (True, 60, "iris")
    with pytest.raises(ServiceNotFound):
        deployer.stop_model_server(served.uuid, timeout=5, force=True)
    assert transport.requests[-1].target == f"/v1/services/{served.uuid}/stop?timeout=5&force=true"
