"""What a service becomes on Ray Serve: its application (deployment options, runtime_env) and
its state read back from ``serve.status()``. Imports ray on use only (the deployer's calls)."""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any
from urllib.parse import quote

from daemon.config import PICKLE_SUFFIXES, ServiceConfig
from daemon.exceptions import with_log_excerpt
from daemon.models import ServiceEndpoint, ServiceState
from deployers.ray.flavor import RayServeModelDeployerConfig, RefusedOnRay
from deployers.ray.records import RayModelService

DEPLOYMENT = "model"  # the one deployment of each application (its name is the service's uuid)
# Ray uploads a runtime_env's working_dir to the GCS as one zip, bounded by its gRPC message size.
SHIP_CAP = 512 * 1024 * 1024


def app_name(service: RayModelService) -> str:
    return str(service.uuid)


def route_prefix(service: RayModelService) -> str:
    return f"/{service.uuid}"


def endpoint(service: RayModelService, config: RayServeModelDeployerConfig) -> ServiceEndpoint:
    name = service.config.model_name or "model"
    prefix = route_prefix(service)
    return ServiceEndpoint(
        host=config.proxy_host,
        port=config.proxy_port,
        health_path=f"{prefix}/health",
        prediction_path=f"{prefix}/v1/models/{quote(name, safe='')}:predict",
        model_name=name,
        root_path=prefix,
    )


def model_file(config: ServiceConfig) -> tuple[str | None, str]:
    """(the model's file, absolute; or None for a ``package.module:attr``) and the ``:attr`` suffix."""
    uri = config.model_uri
    if config.model_type == "pickle" or uri.endswith(PICKLE_SUFFIXES):
        path = uri.removeprefix("file://")
        return os.path.abspath(os.path.join(config.working_dir, path)), ""
    target, sep, attr = uri.rpartition(":")
    if not sep:
        target, attr = uri, ""
    if target.endswith(".py") or "/" in target:
        path = os.path.abspath(os.path.join(config.working_dir, target))
        if not os.path.isfile(path) and os.path.isfile(path + ".py"):
            path += ".py"
        return path, f":{attr}" if sep else ""
    return None, ""


def application(service: RayModelService, config: RayServeModelDeployerConfig, stage: str) -> Any:
    """The Serve application of ``service`` (``Deployment.bind(...)``); ``stage``: its folder for a shipped model."""
    from ray import serve

    from deployers.ray.replica import ModelReplica

    sc = service.config
    file, suffix = model_file(sc)
    if file is not None and not os.path.isfile(file):
        raise RefusedOnRay(f"model file not found: {file}")
    runtime_env: dict[str, Any] = {}
    if sc.env:
        runtime_env["env_vars"] = dict(sc.env)
    ship = config.ship_model
    uri, working_dir = sc.model_uri, sc.working_dir
    if file is not None:
        uri = file + suffix
    if ship and file is not None:
        if config.address.startswith("ray://"):
            # Ray's upload of a package to the GCS does not return through a Ray client connection (seen with 2.60).
            raise RefusedOnRay(
                f"ship_model over a ray:// address is not supported: put {file} where every node can read it at that "
                "path and set ship_model=false, or deploy from a node of the cluster (address host:port)"
            )
        size = os.path.getsize(file)
        if size > SHIP_CAP:
            raise RefusedOnRay(
                f"model file {file} is {size} bytes; Ray ships a runtime_env of at most {SHIP_CAP} bytes (zipped): "
                "put it where every node can read it and set ship_model=false"
            )
        shutil.rmtree(stage, ignore_errors=True)
        os.makedirs(stage, mode=0o700)
        shutil.copy2(file, os.path.join(stage, os.path.basename(file)))
        # Serve takes only URIs there (its config is checked against a schema): upload the folder to the
        # GCS as Ray's job submission does, and name it by its gcs:// URI (content-addressed).
        from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

        runtime_env["working_dir"] = stage
        runtime_env = upload_working_dir_if_needed(runtime_env, include_gitignore=False)
        uri, working_dir = os.path.basename(file) + suffix, ""
    actor: dict[str, Any] = {"num_cpus": config.num_cpus}
    if config.num_gpus:
        actor["num_gpus"] = config.num_gpus
    if config.memory:
        actor["memory"] = config.memory
    if runtime_env:
        actor["runtime_env"] = runtime_env
    # A stopping replica checks for requests still in flight every this many seconds (Serve's default, 2 s, makes
    # each stop and replace wait about 2 s for nothing once the last request is answered).
    options: dict[str, Any] = {"name": DEPLOYMENT, "ray_actor_options": actor, "graceful_shutdown_wait_loop_s": 0.2}
    if sc.idle_timeout is not None or config.min_replicas is not None:
        low = 0 if sc.idle_timeout is not None else int(config.min_replicas or 0)
        high = config.max_replicas or max(config.num_replicas, low, 1)
        autoscaling: dict[str, Any] = {
            "min_replicas": low,
            "max_replicas": high,
            "initial_replicas": max(1, min(config.num_replicas, high)),
        }
        if sc.idle_timeout is not None:
            autoscaling["downscale_to_zero_delay_s"] = sc.idle_timeout
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = config.num_replicas
    return serve.deployment(ModelReplica).options(**options).bind(sc.model_name or "model", uri, sc.model_type, working_dir)


def state_of(app: Any) -> tuple[ServiceState, str]:
    """A service's state and error from its ``ApplicationStatusOverview`` (None: no such application)."""
    if app is None:
        return ServiceState.INACTIVE, ""
    status = str(getattr(app.status, "value", app.status))
    if status == "RUNNING":
        running = sum(int(d.replica_states.get("RUNNING", 0)) for d in app.deployments.values())
        return (ServiceState.ACTIVE if running else ServiceState.SCALED_TO_ZERO), ""
    if status in ("DEPLOYING", "NOT_STARTED"):
        return ServiceState.PENDING_STARTUP, ""
    if status == "DELETING":
        return ServiceState.PENDING_SHUTDOWN, ""
    return ServiceState.ERROR, failure(app) or status.lower()


def failure(app: Any) -> str:
    """The messages of an application and its deployments (a replica's exception and traceback)."""
    parts = [str(app.message)] if app.message else []
    parts += [str(d.message) for d in app.deployments.values() if d.message and str(d.message) not in parts]
    return "\n".join(parts)


# ServiceConfig fields a cluster gives no meaning to: Serve runs the replicas (its interpreter, its restarts)
# behind its one proxy (its host and port).
LOCAL_ONLY = ("python", "port", "bind_unix", "restart", "host")


def checked(config: ServiceConfig) -> ServiceConfig:
    """Refuse what a cluster cannot do; fill in the working directory (relative paths resolve against it)."""
    if config.model_type == "command":
        raise RefusedOnRay(
            "model_type 'command' (any argv) runs on the local flavor, whose daemon runs the program; "
            "the ray flavor serves python and pickle models"
        )
    fields = ServiceConfig.model_fields
    given = []
    for field in LOCAL_ONLY:
        value = getattr(config, field)
        if field == "python" and value in ("", sys.executable):
            continue
        if value != fields[field].get_default(call_default_factory=True):
            given.append(f"{field}={value!r}" if field != "restart" else field)
    if given:
        raise RefusedOnRay(
            f"{', '.join(given)}: {'this field means' if len(given) == 1 else 'these fields mean'} nothing on a Ray "
            "cluster (Serve runs the replicas behind its own proxy); leave them at their defaults"
        )
    config = config.model_copy(update={"working_dir": os.path.abspath(config.working_dir or os.getcwd())})
    file, _ = model_file(config)
    if file is not None and not os.path.isfile(file):  # (before any record is written: as the local daemon refuses it)
        raise RefusedOnRay(f"model file {file!r} does not exist")
    return config


def failed_message(service: RayModelService) -> str:
    """Why Serve could not run it: one line (the last of Serve's text), Serve's whole text as the excerpt."""
    error = service.status.last_error
    cause = next((line.strip() for line in reversed(error.splitlines()) if line.strip()), "no message")
    return with_log_excerpt(f"{service.uuid} ({service.config.model_name}) failed to deploy on Ray Serve: {cause}", error)
