"""The ``modeld`` model deployer: ZenML 0.98's ``BaseModelDeployer`` over the modeld daemon.

ZenML's ``deploy_model`` creates its service record, then calls
``perform_deploy_model(id, config, timeout)``; ``stop/start/delete_model_server``
find the record and call ``perform_stop/start/delete_model``. Each of those
is one call to the daemon through :class:`~modeld_zenml.service.ModeldDeploymentService`.

Continuous deployment. ZenML 0.98 ignores ``replace``; with
``continuous_deployment_mode=True`` it deletes the service of the same
pipeline, step and model, then creates a new one, so a plain implementation
has no server between the two. Here the delete is deferred while
``deploy_model`` runs: the old server keeps serving, and the new ZenML
service takes it over through modeld's in-place replace (same modeld uuid,
same port, the old version retired only once the new one is healthy). If
the new version fails, the old one is still serving; it is registered in
ZenML again (under a new ZenML id, since ZenML had already deleted its
record) and the deploy fails with modeld's reason. An old service the new
one cannot take over (it runs under another daemon's home) is removed, as
ZenML asked.
"""

from __future__ import annotations

import sys
from typing import ClassVar, cast
from uuid import UUID

from zenml.client import Client
from zenml.logger import get_logger
from zenml.model_deployers import BaseModelDeployer, BaseModelDeployerFlavor
from zenml.models.v2.misc.service import ServiceType
from zenml.services.service import BaseService, ServiceConfig

from modeld_zenml.flavor import ModeldModelDeployerConfig, ModeldModelDeployerFlavor
from modeld_zenml.service import ModeldDeploymentConfig, ModeldDeploymentService

logger = get_logger(__name__)

DEFAULT_TIMEOUT = 300


class ModeldModelDeployer(BaseModelDeployer):
    """Deploys model servers as processes supervised by the local modeld daemon."""

    NAME: ClassVar[str] = "modeld"
    FLAVOR: ClassVar[type[BaseModelDeployerFlavor]] = ModeldModelDeployerFlavor

    # Old services whose delete is deferred during a continuous deployment (None: not in one).
    _retiring: list[ModeldDeploymentService] | None = None

    @property
    def config(self) -> ModeldModelDeployerConfig:
        return cast(ModeldModelDeployerConfig, self._config)

    def deploy_model(
        self,
        config: ServiceConfig,
        service_type: ServiceType,
        replace: bool = False,
        continuous_deployment_mode: bool = False,
        timeout: int = DEFAULT_TIMEOUT,
    ) -> BaseService:
        """ZenML's deploy_model, with the config completed first and a continuous deployment made seamless."""
        config = self._completed(_modeld_config(config))
        if not continuous_deployment_mode:
            return super().deploy_model(config, service_type, replace, False, timeout)
        self._retiring = []
        try:
            service = super().deploy_model(config, service_type, replace, True, timeout)
        except BaseException:
            retiring, self._retiring = self._retiring, None
            for old in retiring:  # the new version never took over: the old one still serves
                self._register_again(old)
            raise
        retiring, self._retiring = self._retiring, None
        for old in retiring:  # deleted by ZenML and not taken over (another daemon serves the new one)
            old.remove(timeout=timeout)
        return service

    def perform_deploy_model(
        self,
        id: UUID,
        config: ServiceConfig,
        timeout: int = DEFAULT_TIMEOUT,
    ) -> BaseService:
        config = self._completed(_modeld_config(config))
        service = ModeldDeploymentService(uuid=id, config=config)
        old = self._claim_retiring(config)
        if old is not None:
            service.status.modeld_uuid = old.modeld_uuid
            service._handover = True
            logger.info(
                "Replacing modeld service %s in place; the old version serves until the new one is healthy.", old.modeld_uuid
            )
        service.start(timeout=timeout)
        if old is not None and self._retiring is not None:
            self._retiring.remove(old)
        return service

    @staticmethod
    def get_model_server_info(  # type: ignore[override]  # ZenML's takes any BaseService; ours only its own
        service: ModeldDeploymentService,
    ) -> dict[str, str | None]:
        return {
            "PREDICTION_URL": service.prediction_url,
            "HEALTH_CHECK_URL": service.healthcheck_url,
            "MODEL_URI": service.config.model_uri or None,
            "MODEL_NAME": service.config.model_name or None,
            "MODELD_UUID": str(service.modeld_uuid),
            "MODELD_HOME": service.config.modeld_home or None,
            "PID": str(service.status.pid) if service.status.pid is not None else None,
        }

    def perform_stop_model(
        self,
        service: BaseService,
        timeout: int = DEFAULT_TIMEOUT,
        force: bool = False,
    ) -> BaseService:
        service.stop(timeout=timeout, force=force)
        return service

    def perform_start_model(
        self,
        service: BaseService,
        timeout: int = DEFAULT_TIMEOUT,
    ) -> BaseService:
        service.start(timeout=timeout)
        return service

    def perform_delete_model(
        self,
        service: BaseService,
        timeout: int = DEFAULT_TIMEOUT,
        force: bool = False,
    ) -> None:
        service = _modeld_service(service)
        if self._retiring is not None:
            # ZenML deletes the old service before deploying the new one: keep it serving until then.
            self._retiring.append(service)
            return
        service.remove(timeout=timeout, force=force)

    # ---------------------------------------------------------------- helpers

    def _completed(self, config: ModeldDeploymentConfig) -> ModeldDeploymentConfig:
        """Record which daemon, interpreter, folder and PATH serve it, so ZenML's record alone can restart it."""
        from daemon.paths import Paths

        update: dict[str, str] = {}
        if not config.modeld_home:
            paths = Paths(self.config.home, self.config.socket)
            update.update(modeld_home=str(paths.home), modeld_socket=str(paths.socket))
        filled = config.to_modeld().with_client_defaults()
        if config.working_dir is None:
            update["working_dir"] = filled.working_dir
        if config.python is None and filled.model_type != "command":
            update["python"] = sys.executable
        if config.search_path is None and filled.search_path:
            update["search_path"] = filled.search_path
        return config.model_copy(update=update) if update else config

    def _claim_retiring(self, config: ModeldDeploymentConfig) -> ModeldDeploymentService | None:
        for old in self._retiring or []:
            same_model = (old.config.pipeline_name, old.config.pipeline_step_name, old.config.model_name) == (
                config.pipeline_name,
                config.pipeline_step_name,
                config.model_name,
            )
            if same_model and old.config.modeld_home == config.modeld_home:
                return old
        return None

    def _register_again(self, old: ModeldDeploymentService) -> None:
        """Give a service whose ZenML record was deleted, but that still serves, a record again."""
        client = Client()
        old.status.modeld_uuid = old.modeld_uuid  # the new record's id differs: keep the link explicit
        old.update_status()
        try:
            response = client.create_service(config=old.config, service_type=old.SERVICE_TYPE)
            client.update_service(
                id=response.id,
                service_source=old.model_dump().get("type"),
                admin_state=old.admin_state,
                status=old.status.model_dump(),
                endpoint=old.endpoint.model_dump(),
                prediction_url=old.get_prediction_url(),
                health_check_url=old.get_healthcheck_url(),
            )
        except Exception as exc:  # noqa: BLE001  (the deploy's own error is the one to raise; say what is left behind)
            logger.error(
                "The previous version still serves as modeld service %s, but ZenML could not record it again (%s); "
                "see `modeld ls`.",
                old.modeld_uuid,
                exc,
            )
            return
        logger.warning(
            "The new version did not take over; the previous one keeps serving (modeld service %s), now ZenML service %s.",
            old.modeld_uuid,
            response.id,
        )


def _modeld_config(config: ServiceConfig) -> ModeldDeploymentConfig:
    if not isinstance(config, ModeldDeploymentConfig):
        raise TypeError(f"the modeld model deployer deploys a ModeldDeploymentConfig, not a {type(config).__name__}")
    return config


def _modeld_service(service: BaseService) -> ModeldDeploymentService:
    if not isinstance(service, ModeldDeploymentService):
        raise TypeError(f"the modeld model deployer manages ModeldDeploymentService, not {type(service).__name__}")
    return service
