"""The ``ray`` flavor: model servers run by Ray Serve on a Ray cluster (issue 15).

This module holds only the flavor, its config and its errors, and imports
neither ray nor the implementation: registering a ``ray`` deployer validates
its settings on a machine without the ``ray`` extra. ``implementation_class``
imports :mod:`deployers.ray.deployer`, and says which extra to install when
ray is missing.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import TYPE_CHECKING

from pydantic import Field, field_validator, model_validator

from daemon.exceptions import DeployError, FlavorError, InvalidRequest, ServiceError
from deployers.base import BaseModelDeployerConfig, BaseModelDeployerFlavor

if TYPE_CHECKING:
    from deployers.ray.deployer import RayServeModelDeployer

RAY_FLAVOR = "ray"
EXTRA_HINT = "pip install 'modeld[ray]'"
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$")
_HOST_PORT = re.compile(r"^(ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})$")


class RefusedOnRay(DeployError, InvalidRequest):
    """A deploy asks for something a Ray cluster cannot do (a command model, a local-only field, a model
    file that is not there): a DeployError, and a 400 like the local daemon's refusals (exit code 2)."""

    status_code = 400


class ClusterUnreachable(ServiceError):
    """The Ray cluster did not answer within the call's timeout (or refused the connection)."""

    status_code = 503


class RayServeModelDeployerConfig(BaseModelDeployerConfig):
    """Where the cluster is, where the records live, and the Serve options of every deployment."""

    address: str = Field(
        "auto",
        description="the cluster: 'auto' (the head started on this machine), a GCS address host:port, or ray://host:port",
    )
    namespace: str = Field("modeld", min_length=1, description="Ray namespace of the driver")
    home: str | None = Field(None, description="folder of the records; default: $MODELD_HOME/ray/<deployer name>")
    proxy_host: str = Field("127.0.0.1", min_length=1, description="host Serve's HTTP proxy binds (fixed once per cluster)")
    proxy_port: int = Field(8000, ge=1, le=65535, description="port of Serve's HTTP proxy (fixed once per cluster)")
    num_replicas: int = Field(1, ge=1, description="replicas of each model, without autoscaling")
    min_replicas: int | None = Field(
        None, ge=0, description="autoscaling: fewest replicas (a service's idle_timeout makes it 0); unset: no autoscaling"
    )
    max_replicas: int | None = Field(
        None, ge=1, description="autoscaling: most replicas (default: max(num_replicas, min_replicas, 1))"
    )
    num_cpus: float = Field(0.1, ge=0, description="CPUs each replica reserves (Ray's default, 1, fits 2 models on 2 cores)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs each replica reserves")
    memory: int | None = Field(None, gt=0, description="bytes of memory each replica reserves (Ray's scheduling, not a limit)")
    ship_model: bool = Field(
        False,
        description="upload the model file as a gcs:// package the replicas load (Ray's 512 MiB cap; not over ray:// yet); "
        "false: the replicas load it by its path, which every node that runs one must have",
    )

    @field_validator("address")
    @classmethod
    def _address_syntax(cls, value: str) -> str:
        value = value.strip()
        if value == "auto":
            return value
        match = _HOST_PORT.match(value)
        if not match or not 0 < int(match.group(3)) <= 65535:
            raise ValueError("expected 'auto', host:port (the GCS) or ray://host:port (the Ray client server)")
        return value

    @field_validator("proxy_host")
    @classmethod
    def _host_syntax(cls, value: str) -> str:
        value = value.strip()
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            pass
        if not _HOSTNAME.match(value):
            raise ValueError(f"expected a host name or an IP address (no scheme, port or brackets), got {value!r}")
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace_syntax(cls, value: str) -> str:
        if len(value) > 256 or not value.isprintable() or any(c.isspace() for c in value):
            raise ValueError(f"expected up to 256 printable characters with no spaces, got {value!r}")
        return value

    @field_validator("home")
    @classmethod
    def _home_path(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip() or "\0" in value:
            raise ValueError(f"expected a folder's path, got {value!r}")
        return os.path.abspath(os.path.expanduser(value))  # a relative one: from where it is registered

    @model_validator(mode="after")
    def _replicas(self) -> RayServeModelDeployerConfig:
        if self.min_replicas is not None and self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


class RayServeModelDeployerFlavor(BaseModelDeployerFlavor):
    """Built in, like ``local``: known without ``modeld flavor register``."""

    @property
    def name(self) -> str:
        return RAY_FLAVOR

    @property
    def config_class(self) -> type[RayServeModelDeployerConfig]:
        return RayServeModelDeployerConfig

    @property
    def implementation_class(self) -> type[RayServeModelDeployer]:
        try:
            import ray  # noqa: F401  (only to say which extra is missing; the deployer imports it again)
        except ImportError as exc:
            raise FlavorError(f"the ray flavor needs Ray Serve, which is not installed: {EXTRA_HINT} ({exc})") from exc
        from deployers.ray.deployer import RayServeModelDeployer

        return RayServeModelDeployer
