"""In-memory implementation of the model-deployer interface."""

from __future__ import annotations

from typing import ClassVar, Dict, List, Optional, Type
from uuid import UUID

from daemon.exceptions import ServiceNotFound
from daemon.filters import SEED_FILTERS, filters_given
from daemon.models import BaseService, ServiceConfig, ServiceState
from deployers.base import DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT, BaseModelDeployer
from tests.flavor_fixtures.memory_flavor import InMemoryModelDeployerConfig, InMemoryModelDeployerFlavor


class InMemoryModelDeployer(BaseModelDeployer):
    FLAVOR: ClassVar[Type[InMemoryModelDeployerFlavor]] = InMemoryModelDeployerFlavor

    config: InMemoryModelDeployerConfig

    def __init__(self, config: InMemoryModelDeployerConfig, name: str = "memory") -> None:
        super().__init__(config, name)
        self.services: dict[UUID, BaseService] = {}

    def deploy_model(
        self,
        config: ServiceConfig,
        replace: bool = False,
        timeout: int = DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT,
    ) -> BaseService:
        if replace:
            for svc in self.services.values():
                same = (svc.config.pipeline_name, svc.config.pipeline_step_name, svc.config.model_name)
                if same == (config.pipeline_name, config.pipeline_step_name, config.model_name):
                    svc.config = config
                    svc.version += 1
                    return svc
        svc = BaseService(config=config)
        svc.status.moved_to(ServiceState.ACTIVE)
        self.services[svc.uuid] = svc
        return svc

    @staticmethod
    def get_model_server_info(
        service: BaseService,
    ) -> Dict[str, Optional[str]]:
        return {"MODEL_URI": service.config.model_uri or None}

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
        wanted = filters_given(locals(), SEED_FILTERS)
        return [
            svc
            for svc in self.services.values()
            if (not running or svc.is_running)
            and (service_uuid is None or svc.uuid == service_uuid)
            and all(v is None or getattr(svc.config, k) == v for k, v in wanted.items())
        ]

    def _get(self, uuid: UUID) -> BaseService:
        try:
            return self.services[uuid]
        except KeyError:
            raise ServiceNotFound(f"no service {uuid}") from None

    def stop_model_server(
        self,
        uuid: UUID,
        timeout: int = DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT,
        force: bool = False,
    ) -> None:
        self._get(uuid).status.moved_to(ServiceState.INACTIVE)

    def start_model_server(
        self,
        uuid: UUID,
        timeout: int = DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT,
    ) -> None:
        self._get(uuid).status.moved_to(ServiceState.ACTIVE)

    def delete_model_server(
        self,
        uuid: UUID,
        timeout: int = DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT,
        force: bool = False,
    ) -> None:
        del self.services[self._get(uuid).uuid]
