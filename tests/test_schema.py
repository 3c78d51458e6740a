"""Each schema is defined once: ServiceConfig's fields make `modeld deploy`'s options and the ZenML
deployment config; daemon.filters.FIND_FILTERS makes find's filters everywhere.

A new field of ServiceConfig (with a description and a default) must need no other change: the
tests below add one in a subclass and find it as a CLI option and as a ZenML setting.
"""

from __future__ import annotations

import argparse
import inspect
from typing import Any, Optional

import pytest
from pydantic import BaseModel, Field

from daemon.filters import FIND_FILTERS, FIND_PARAMS, SEED_FILTERS
from daemon.config import RestartPolicy, ServiceConfig
from deployers.cli import options as cli_options, parser as cli_parser
from modeld_zenml import settings


class ExtendedConfig(ServiceConfig):
    """ServiceConfig with one more setting, as a future version would add it."""

    gpu_memory_mib: int = Field(0, ge=0, description="GPU memory to reserve, in MiB")


def _deploy_help(config: type[ServiceConfig] = ServiceConfig) -> str:
    parser = cli_parser.build_parser(config)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return " ".join(sub.choices["deploy"].format_help().split())  # unwrapped


def _deploy(*argv: str, config: type[ServiceConfig] = ServiceConfig) -> ServiceConfig:
    own, command = cli_parser._split_command(["deploy", *argv])
    args = cli_parser.build_parser(config).parse_args(own)
    args.command = command
    return cli_options.deploy_config(args, config)


# ------------------------------------------------------------------ the CLI


class OptionalFields(ServiceConfig):
    """New settings that are unset unless given, as most new settings are (``idle_timeout: float | None``)."""

    gpu_memory_mib: int | None = Field(None, ge=0, description="GPU memory to reserve, in MiB")
    warmup_seconds: Optional[float] = Field(None, description="seconds of warm-up before the first probe")
    accelerator: str | None = Field(None, description="the accelerator to use")


def test_an_optional_new_field_is_a_deploy_option_too():
    """An ``X | None`` field takes X on the command line and stays None when not given (the whole CLI failed
    to build before: "no command-line form for int | None")."""
    help_text = _deploy_help(OptionalFields)
    for flag in ("--gpu-memory-mib GPU_MEMORY_MIB", "--warmup-seconds WARMUP_SECONDS", "--accelerator ACCELERATOR"):
        assert flag in help_text
    config = _deploy("--model-uri", "m.py:x", "--gpu-memory-mib", "512", "--warmup-seconds", "1.5",
                     "--accelerator", "cuda:0", config=OptionalFields)
    assert isinstance(config, OptionalFields)
    assert (config.gpu_memory_mib, config.warmup_seconds, config.accelerator) == (512, 1.5, "cuda:0")
    unset = _deploy("--model-uri", "m.py:x", config=OptionalFields)
    assert (unset.gpu_memory_mib, unset.warmup_seconds, unset.accelerator) == (None, None, None)
    with pytest.raises(SystemExit):  # argparse refuses a value of the wrong type
        _deploy("--model-uri", "m.py:x", "--gpu-memory-mib", "lots", config=OptionalFields)


def test_a_new_field_is_a_deploy_option():
    help_text = _deploy_help(ExtendedConfig)
    assert "--gpu-memory-mib GPU_MEMORY_MIB GPU memory to reserve, in MiB (default 0)" in help_text
    config = _deploy("--model-uri", "m.py:x", "--gpu-memory-mib", "512", config=ExtendedConfig)
    assert isinstance(config, ExtendedConfig) and config.gpu_memory_mib == 512
    assert _deploy("--model-uri", "m.py:x", config=ExtendedConfig).gpu_memory_mib == 0
    with pytest.raises(ValueError, match="gpu_memory_mib"):  # the field's own bounds apply
        _deploy("--model-uri", "m.py:x", "--gpu-memory-mib", "-1", config=ExtendedConfig)
    assert "--gpu-memory-mib" not in _deploy_help()


def test_every_field_is_a_deploy_option_with_its_description_and_default():
    options = {".".join(o.path): o for o in cli_options.deploy_options()}
    nested = {f"restart.{name}" for name in RestartPolicy.model_fields}
    assert set(options) == (set(ServiceConfig.model_fields) - {"restart"}) | nested
    help_text = _deploy_help()
    for path, option in options.items():
        model, name = (RestartPolicy, path.split(".")[1]) if "." in path else (ServiceConfig, path)
        field = model.model_fields[name]
        assert field.description, f"{path} has no description: it is its option's help"
        if option.kwargs.get("help") == argparse.SUPPRESS or path == "command":
            continue
        assert option.flags[0] in help_text
        if name not in ("bind_unix", "on_unhealthy"):  # those two are helped in the CLI's own words
            assert field.description.split(";")[0].split("(")[0].strip() in help_text, path
    for shown in ("(default /health)", "(default 127.0.0.1)", "(default 10M)", "(default 0.1)", "(default 300)",
                  "(default 5)", "(default 3)", "(default 2)", "(default python)"):
        assert shown in help_text


def test_the_flags_keep_their_names_and_forms():
    flags = {o.flags[0] for o in cli_options.deploy_options()}
    assert flags == {
        "--name", "--description", "--pipeline-name", "--pipeline-run-id", "--pipeline-step-name", "--model-name",
        "--model-uri", "--model-type", "command", "--health-path", "--prediction-path", "--host", "--port",
        "--unix-socket", "--env", "--secret-env", "--python", "--working-dir", "--search-path", "--restart", "--max-restarts",
        "--backoff", "--backoff-max", "--healthy-reset", "--liveness-failures", "--no-restart-on-unhealthy",
        "--startup-timeout", "--idle-timeout", "--stop-timeout", "--stop-command", "--log-max-bytes", "--log-backups", "--service-type",
        "--project",
    }
    config = _deploy("--model-name", "c", "--health-path", "/", "--env", "A=1", "--env", "B=x=y", "--secret-env", "A",
                     "--stop-command", "docker stop '{name}'", "--log-max-bytes", "64K", "--restart", "always",
                     "--backoff", "0.5", "--liveness-failures", "7", "--no-restart-on-unhealthy", "--stop-timeout", "2",
                     "--", "sleep", "{port}")
    assert config.command == ["sleep", "{port}"] and config.model_type == "command"
    assert config.env == {"A": "1", "B": "x=y"} and config.secret_env == ["A"]
    assert config.stop_command == ["docker", "stop", "{name}"] and config.log_max_bytes == 64 * 1024
    assert config.restart == RestartPolicy(mode="always", backoff_initial=0.5, liveness_failures=7, on_unhealthy=False)
    assert config.stop_timeout == 2
    # Only what was given is set: every other field takes its default.
    assert _deploy("--model-uri", "m.pkl").model_fields_set == {"model_uri", "model_type"}
    assert _deploy("--model-uri", "m.py:x", "--unix-socket").bind_unix is True


def test_ls_takes_the_find_filters():
    parser = cli_parser.build_parser()
    args = parser.parse_args(["ls", *[arg for name in FIND_FILTERS for arg in (cli_options.flag_of(name), "python")]])
    assert {name: getattr(args, name) for name in FIND_FILTERS} == dict.fromkeys(FIND_FILTERS, "python")
    with pytest.raises(SystemExit):
        parser.parse_args(["ls", "--model-type", "nope"])  # choices from the field's Literal


# ------------------------------------------------------------------ ZenML


def test_a_new_field_is_a_zenml_setting():
    """Without ZenML: its config class is made by settings.with_run_settings on ZenML's ServiceConfig;
    here on a stand-in with the fields ZenML's has."""

    class ZenMLServiceConfig(BaseModel):
        service_name: str = ""
        description: str = ""
        pipeline_name: str = ""
        pipeline_step_name: str = ""
        model_name: str = ""

    made = settings.with_run_settings(ZenMLServiceConfig, "Made", __name__, ExtendedConfig)
    field = made.model_fields["gpu_memory_mib"]
    assert field.annotation == Optional[int] and field.default is None
    assert field.description == "GPU memory to reserve, in MiB"
    zenml_config = made(service_name="svc", model_name="m", model_uri="m.py:x", gpu_memory_mib=256, restart={"mode": "never"})
    modeld = ExtendedConfig(**settings.modeld_fields(zenml_config, settings.run_settings(ExtendedConfig)))
    assert (modeld.name, modeld.model_name, modeld.gpu_memory_mib, modeld.restart.mode) == ("svc", "m", 256, "never")
    assert ExtendedConfig(**settings.modeld_fields(made(model_uri="m.py:x"), settings.run_settings(ExtendedConfig))).gpu_memory_mib == 0


def test_every_field_reaches_zenml():
    covered = set(settings.run_settings()) | set(settings.FROM_ZENML) | set(settings.LEFT_OUT)
    assert covered == set(ServiceConfig.model_fields)
    for name, (_, info) in settings.run_settings().items():
        assert info.description == ServiceConfig.model_fields[name].description


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_the_zenml_config_is_made_from_the_fields():
    pytest.importorskip("zenml", reason="ZenML is not installed (MODELD_EXTRAS=test,zenml ./scripts/test installs it)")
    from modeld_zenml import ModeldDeploymentConfig

    for name, (annotation, info) in settings.run_settings().items():
        field = ModeldDeploymentConfig.model_fields[name]
        assert (field.annotation, field.default, field.description) == (annotation, info.default, info.description)
    config = ModeldDeploymentConfig(model_name="m", model_uri="m.py:x", service_name="s", port=8123, restart={"mode": "never"})
    modeld = config.to_modeld()
    assert (modeld.name, modeld.model_name, modeld.port, modeld.restart.mode, modeld.stop_timeout) == ("s", "m", 8123, "never", 10.0)


# ------------------------------------------------------------------ find's filters


def _keywords(func: Any) -> list[str]:
    return [p.name for p in inspect.signature(func).parameters.values() if p.name != "self"]


def test_find_filters_are_one_list():
    from daemon import api
    from daemon.client import DaemonClient
    from deployers.base import BaseModelDeployer
    from deployers.local.deployer import LocalDaemonModelDeployer

    assert set(FIND_FILTERS) <= set(ServiceConfig.model_fields)
    assert list(FIND_PARAMS) == ["running", "service_uuid", *FIND_FILTERS, "state"]
    # The Python APIs spell them out as keywords (for readers and type checkers): in the same order
    # (ZenML's find_model_server has no state).
    assert _keywords(DaemonClient.find) == list(FIND_PARAMS)
    for find in (BaseModelDeployer.find_model_server, LocalDaemonModelDeployer.find_model_server):
        assert _keywords(find) == ["running", "service_uuid", *SEED_FILTERS], find.__qualname__
    assert all(name in (api.__doc__ or "") for name in FIND_PARAMS)
    from daemon import manager

    assert not hasattr(manager, "FIND_FILTERS")  # defined once, in daemon.filters


@pytest.mark.parametrize("name", FIND_FILTERS)
def test_each_find_filter_reaches_the_daemon(name):
    """Not only the keyword: each filter given to the client or the local deployer is sent as its query parameter."""
    from daemon.client import DaemonClient, InMemoryTransport, json_response
    from deployers.local.deployer import LocalDaemonModelDeployer

    transport = InMemoryTransport(lambda request: json_response({"services": []}))
    client = DaemonClient(transport=transport)
    assert client.find(**{name: "wanted"}) == []
    if name in SEED_FILTERS:  # (ZenML's find_model_server has no project)
        deployer = LocalDaemonModelDeployer(client=client)
        assert deployer.find_model_server(**{name: "wanted"}) == []
    for request in transport.requests:
        assert request.path == "/v1/services"
        assert {k: v for k, v in (request.query or {}).items() if v is not None} == {name: "wanted"}
