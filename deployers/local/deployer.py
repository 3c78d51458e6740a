"""The ``local`` model deployer: the ZenML interface over the modeld daemon.

Every method is one call to :class:`daemon.client.DaemonClient`; the daemon
does the work (continuous deployment, supervision, persistence), so this
deployer keeps no state of its own and any number of them, in any number
of processes, agree on what is deployed. The client is made on first use,
so building a deployer (e.g. to show its config) never touches the socket.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, ClassVar, Dict, Iterator, List, Optional, Type
from uuid import UUID

from daemon.config import ServiceConfig
from daemon.exceptions import ModeldError, ServiceNotFound, StillStarting
from daemon.filters import SEED_FILTERS, filters_given
from daemon.models import BaseService, DesiredState, ServiceState
from deployers.base import DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT, BaseModelDeployer, RedeployError
from deployers.local.flavor import LocalDaemonModelDeployerConfig, LocalDaemonModelDeployerFlavor

if TYPE_CHECKING:
    from daemon.client import DaemonClient


class LocalDaemonModelDeployer(BaseModelDeployer):
    """Deploys model servers as processes supervised by the local modeld daemon."""

    FLAVOR: ClassVar[Type[LocalDaemonModelDeployerFlavor]] = LocalDaemonModelDeployerFlavor

    config: LocalDaemonModelDeployerConfig

    def __init__(
        self,
        config: LocalDaemonModelDeployerConfig | None = None,
        name: str = "local",
        *,
        client: DaemonClient | None = None,
    ) -> None:
        # ``client`` lets tests and embedders hand in a ready client (or a fake).
        super().__init__(config if config is not None else LocalDaemonModelDeployerConfig(), name)
        self._client = client

    @property
    def client(self) -> DaemonClient:
        if self._client is None:
            from daemon.client import DaemonClient

            self._client = DaemonClient(
                home=self.config.home,
                socket_path=self.config.socket,
                auto_start=self.config.auto_start,
            )
        return self._client

    def deploy_model(
        self,
        config: ServiceConfig,
        replace: bool = False,
        timeout: int = DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT,
    ) -> BaseService:
        return self.client.deploy(config, replace=replace, timeout=timeout)

    @staticmethod
    def get_model_server_info(
        service: BaseService,
    ) -> Dict[str, Optional[str]]:
        # URLs are only meaningful once the daemon has given the server a port (or its Unix socket).
        port = service.endpoint.port
        bound = port or service.endpoint.unix_socket
        return {
            "UUID": str(service.uuid),
            "PREDICTION_URL": service.endpoint.prediction_url if bound else None,
            "HEALTH_CHECK_URL": service.endpoint.health_check_url if bound else None,
            "PORT": str(port) if port else None,
            "MODEL_URI": service.config.model_uri or None,
            "MODEL_NAME": service.config.model_name or None,
            "MODEL_TYPE": service.config.model_type,  # never empty (python, pickle or command)
            "SERVICE_PATH": service.service_path or None,
            "LOG_PATH": service.log_path or None,
            "PID": str(service.status.pid) if service.status.pid is not None else None,
            "STATE": str(service.status.state),
        }

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
    ) -> List[BaseService]:
        return self.client.find(running=running, service_uuid=service_uuid, **filters_given(locals(), SEED_FILTERS))

    def stop_model_server(
        self,
        uuid: UUID,
        timeout: int = DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT,
        force: bool = False,
    ) -> None:
        self.client.stop(uuid, timeout=timeout, force=force)

    def start_model_server(
        self,
        uuid: UUID,
        timeout: int = DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT,
    ) -> None:
        self.client.start(uuid, timeout=timeout)

    def delete_model_server(
        self,
        uuid: UUID,
        timeout: int = DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT,
        force: bool = False,
    ) -> None:
        self.client.delete(uuid, timeout=timeout, force=force)

    def get_logs(
        self,
        uuid: UUID,
        follow: bool = False,
        tail: Optional[int] = None,
    ) -> Iterator[str]:
        # The daemon streams its log file in chunks; cut them at newlines (a line split across two
        # chunks waits for its end), so the lines joined are the very text `modeld logs` prints.
        pending = ""
        for chunk in self.client.logs(uuid, tail=tail, follow=follow):
            pending += chunk
            *lines, pending = pending.split("\n")
            for line in lines:
                yield line + "\n"
        if pending:
            yield pending

    def redeploy_all(
        self,
        timeout: int = DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT,
    ) -> List[BaseService]:
        # Desired running, not serving: neither active nor scaled to zero (which serves on demand).
        # One at a time, each given what is left of ``timeout``.
        deadline = time.monotonic() + timeout
        wanted = [
            s
            for s in self.client.find()
            if s.desired_state == DesiredState.RUNNING
            and s.status.state not in (ServiceState.ACTIVE, ServiceState.SCALED_TO_ZERO)
        ]
        started: List[BaseService] = []
        failed: Dict[str, Exception] = {}
        for svc in wanted:
            left = deadline - time.monotonic()
            if left <= 0:
                failed[str(svc.uuid)] = StillStarting(f"not started: the redeploy's timeout of {timeout}s ran out first")
                continue
            try:
                started.append(self.client.start(svc.uuid, timeout=left))
            except ServiceNotFound:
                continue  # deleted meanwhile
            except ModeldError as error:
                failed[str(svc.uuid)] = error
        if failed:
            raise RedeployError(
                f"{len(failed)} of {len(wanted)} services did not start: "
                + "; ".join(f"{uuid}: {getattr(error, 'headline', error)}" for uuid, error in failed.items()),
                started,
                failed,
            )
        return started
