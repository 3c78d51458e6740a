"""The ``ray`` model deployer: the ZenML interface over Ray Serve, with modeld's records as the truth.

Each service is one Serve application named by its uuid, at route prefix ``/<uuid>``
(Serve matches prefixes at ``/`` boundaries), so its prediction URL is
``http://<proxy>/<uuid>/v1/models/<name>:predict``. No daemon runs for Ray: the records
(:mod:`deployers.ray.records`) hold each service's config, desired state and last observed
state, and ``find`` answers from them; a refresh asks Serve. Every call that talks to the
cluster is bounded by its timeout, connecting included (:mod:`deployers.ray.cluster`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import ClassVar, Dict, List, Optional, Type
from uuid import UUID

from daemon.config import ServiceConfig, replace_key
from daemon.exceptions import DeployError, ModeldError, StopError
from daemon.models import BaseService, DesiredState, ServiceState
from daemon.paths import default_home
from deployers.base import DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT, BaseModelDeployer, RedeployError
from deployers.ray import cluster, serving
from deployers.ray.cluster import Deadline
from deployers.ray.flavor import ClusterUnreachable, RayServeModelDeployerConfig, RayServeModelDeployerFlavor
from deployers.ray.records import RayModelService, Records, observed

POLL = 0.05  # seconds between two looks at serve.status()
GIVEN_UP = "its deploy failed"  # the desired reason of a service _given_up
RESTORE_SUBMIT = 5.0  # seconds past the deadline a failed replace may take to hand the previous version back
REFRESH_TIMEOUT = 10.0  # seconds a find with a uuid waits for Ray before answering from the record


class RayServeModelDeployer(BaseModelDeployer):
    """Deploys model servers as Ray Serve applications on a Ray cluster."""

    FLAVOR: ClassVar[Type[RayServeModelDeployerFlavor]] = RayServeModelDeployerFlavor

    config: RayServeModelDeployerConfig

    def __init__(self, config: RayServeModelDeployerConfig | None = None, name: str = "ray") -> None:
        super().__init__(config if config is not None else RayServeModelDeployerConfig(), name)
        self.records = Records(self.config.home or default_home() / "ray" / name)

    # -- checks and helpers -------------------------------------------------

    check = staticmethod(serving.checked)  # refuse what a cluster cannot do (serving.checked)

    def _connect(self, deadline: Deadline) -> None:
        cluster.connect(self.config.address, self.config.namespace, deadline)
        cluster.ensure_serve(self.config.address, self.config.proxy_host, self.config.proxy_port, deadline)

    def _submit(self, service: RayModelService, deadline: Deadline) -> None:
        """Hand the application to Serve (``serve.run``'s non-blocking form, within the deadline)."""
        from ray import serve

        def run() -> None:  # building it may upload the model file (ship_model): within the deadline too
            app = serving.application(service, self.config, str(self.records.path(service.uuid).parent / "ship"))
            serve._run(app, _blocking=False, name=serving.app_name(service), route_prefix=serving.route_prefix(service))

        cluster.bounded(
            run,
            deadline.left(),
            f"handing {service.uuid} to Ray Serve on {self.config.address}",
            DeployError,
        )

    def _wait(self, uuids: list[UUID], deadline: Deadline, stopping: bool = False) -> dict[UUID, tuple[ServiceState, str]]:
        """Poll Serve until each application runs or failed (``stopping``: is gone), or the deadline passes."""
        pending = set(uuids)
        seen: dict[UUID, tuple[ServiceState, str]] = {}
        while True:
            try:
                apps = cluster.applications(self.config.address, deadline)
            except ModeldError:
                if not seen or deadline.left() > 1.0:
                    raise
                return seen  # (the deadline ran out during a look: what was seen last says how far it got)
            for uuid in list(pending):
                app = apps.get(str(uuid))
                seen[uuid] = serving.state_of(app)
                if stopping:
                    if app is None:
                        pending.discard(uuid)
                elif seen[uuid][0] in (ServiceState.ACTIVE, ServiceState.SCALED_TO_ZERO, ServiceState.ERROR):
                    pending.discard(uuid)
            if not pending or deadline.left() < 2 * POLL:
                return seen
            time.sleep(min(POLL, deadline.left()))

    def _observe(self, uuid: UUID, state: ServiceState, error: str | None, asked_at: float | None = None) -> RayModelService:
        """Record what Serve said; ``asked_at``: when it was asked, so that an answer older than the record's
        last observation (a refresh racing a deploy, in another thread or process) never overwrites it."""

        def change(service: RayModelService) -> None:
            if asked_at is not None and service.observed_at is not None and service.observed_at > asked_at:
                return
            observed(service, state, error)

        return self.records.update(uuid, change)

    def _deploy(self, services: list[RayModelService], deadline: Deadline) -> list[RayModelService]:
        """Submit every service, then wait for all of them; record what was seen. Raises on the first failure."""
        self._connect(deadline)
        for service in services:
            self._submit(service, deadline)
        seen = self._wait([s.uuid for s in services], deadline)
        done = []
        for service in services:
            state, error = seen.get(service.uuid, (ServiceState.PENDING_STARTUP, ""))
            if state not in (ServiceState.ACTIVE, ServiceState.SCALED_TO_ZERO, ServiceState.ERROR):
                error = f"not running after {deadline.timeout:g}s (Serve says {state}); it may still come up"
            done.append(self._observe(service.uuid, state, error))
        return done

    # -- the deployer interface ---------------------------------------------

    def deploy_model(
        self,
        config: ServiceConfig,
        replace: bool = False,
        timeout: int = DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT,
    ) -> BaseService:
        deadline = Deadline(timeout)
        config = self.check(config)
        self._connect(deadline)  # first: an unreachable cluster, or one whose proxy differs, leaves no record
        with self.records.locked():
            key = replace_key(config)
            match = next((s for s in self.records.all() if replace_key(s.config) == key), None) if replace else None
            if match is not None:
                service = match.model_copy(deep=True)
                service.config, service.version = config, match.version + 1
            else:
                service = RayModelService(config=config, cluster=self.config.address)
            service.desired_state, service.desired_reason = DesiredState.RUNNING, ""
            service.endpoint = serving.endpoint(service, self.config)
            observed(service, ServiceState.PENDING_STARTUP, "")
            self.records.write(service)
        try:
            return self._started(service, deadline, restorable=match is not None)
        except ModeldError as exc:
            if match is None:
                raise
            self._restore(match, exc, deadline)
            raise  # (not reached: _restore raises)

    def _restore(self, previous: RayModelService, failure: ModeldError, deadline: Deadline) -> None:
        """A replace whose new version failed: the previous version's record and application back (with one
        replica Serve stops the old one to start the new), as the local daemon keeps the previous one serving.
        Within the call's deadline, but for handing the previous version to Serve (``RESTORE_SUBMIT`` s at
        most past it): a service is never left on the version that failed because the time ran out."""
        self.records.write(previous)
        try:
            (back,) = self._deploy([previous], Deadline(max(deadline.left(), RESTORE_SUBMIT)))
        except ModeldError as again:
            raise DeployError(
                f"{failure.headline}; and the previous version (version {previous.version}) could not be deployed "
                f"again: {again.headline}",
                log_excerpt=failure.log_excerpt,
            ) from failure
        if back.status.state not in (ServiceState.ACTIVE, ServiceState.SCALED_TO_ZERO):
            raise DeployError(
                f"{failure.headline}; and the previous version (version {previous.version}), handed back to Ray Serve, "
                f"is {back.status.state}: {back.status.last_error.splitlines()[-1] if back.status.last_error else 'no message'}",
                log_excerpt=failure.log_excerpt,
            ) from failure
        raise DeployError(
            f"the new version failed and the previous version (version {previous.version}) serves again: {failure.headline}",
            log_excerpt=failure.log_excerpt,
        ) from failure

    def _started(self, service: RayModelService, deadline: Deadline, restorable: bool = False) -> RayModelService:
        """Deploy ``service`` (its record written) and wait for it; ``restorable``: a replace, whose caller
        brings the previous version back if this one fails."""
        try:
            (done,) = self._deploy([service], deadline)
        except ModeldError as exc:
            self._observe(service.uuid, ServiceState.ERROR, exc.message)
            raise
        if done.status.state == ServiceState.ERROR:
            if not restorable:
                raise self._given_up(done, deadline)
            raise DeployError(serving.failed_message(done))
        if done.status.state not in (ServiceState.ACTIVE, ServiceState.SCALED_TO_ZERO):
            raise DeployError(f"{service.uuid} ({service.config.model_name}): {done.status.last_error}")
        return done

    def _not_serving(self, services: list[RayModelService], deadline: Deadline) -> list[RayModelService]:
        """Those of ``services`` Serve does not run now; the others' records get what Serve says of them."""
        asked_at = time.time()
        apps = cluster.applications(self.config.address, deadline)
        rest = []
        for service in services:
            state, error = serving.state_of(apps.get(str(service.uuid)))
            if state in (ServiceState.ACTIVE, ServiceState.SCALED_TO_ZERO):
                self._observe(service.uuid, state, error, asked_at)
            else:
                rest.append(service)
        return rest

    def _given_up(self, service: RayModelService, deadline: Deadline) -> DeployError:
        """A deploy or start whose model Serve could not run: its application deleted (Serve would go on
        retrying a model that cannot load) and its desired state stopped, as the local daemon's after a
        failed deploy or start (so ``redeploy_all`` does not try it again, nor a refresh call it missing)."""
        self._forget_app(service, Deadline(min(10.0, max(deadline.left(), 1.0))))

        def stopped(s: RayModelService) -> None:
            s.desired_state, s.desired_reason = DesiredState.STOPPED, GIVEN_UP

        self.records.update(service.uuid, stopped)
        return DeployError(serving.failed_message(service))

    def _forget_app(self, service: RayModelService, deadline: Deadline) -> None:
        from ray import serve

        try:
            cluster.bounded(lambda: serve.delete(serving.app_name(service), _blocking=False), deadline.left(), "serve.delete")
        except ModeldError:
            pass  # the record says error; a later stop or delete tries again

    @staticmethod
    def get_model_server_info(
        service: BaseService,
    ) -> Dict[str, Optional[str]]:
        # The same keys as the local deployer's; Serve replicas have no pid or log path of modeld's.
        return {
            "UUID": str(service.uuid),
            "PREDICTION_URL": service.endpoint.prediction_url,
            "HEALTH_CHECK_URL": service.endpoint.health_check_url,
            "PORT": str(service.endpoint.port) if service.endpoint.port else None,
            "MODEL_URI": service.config.model_uri or None,
            "MODEL_NAME": service.config.model_name or None,
            "MODEL_TYPE": service.config.model_type,
            "SERVICE_PATH": service.service_path or None,
            "LOG_PATH": None,
            "PID": None,
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
        refresh: Optional[bool] = None,
        timeout: float = REFRESH_TIMEOUT,
    ) -> List[BaseService]:
        """From the records; ``refresh`` (default: only when ``service_uuid`` is given) asks Serve first,
        within ``timeout`` (an implicit refresh that cannot reach the cluster answers from the records)."""
        wanted = {
            "pipeline_name": pipeline_name,
            "pipeline_run_id": pipeline_run_id,
            "pipeline_step_name": pipeline_step_name,
            "model_name": model_name,
            "model_uri": model_uri,
            "model_type": model_type,
        }
        wanted = {k: v for k, v in wanted.items() if v is not None}
        uuid = str(service_uuid) if service_uuid is not None else None
        found: list[RayModelService] = [s for s in [self.records.find(uuid)] if s is not None] if uuid else self.records.all()
        for key, value in wanted.items():  # one pass per filter: 1,000 records in well under a millisecond each
            found = [s for s in found if getattr(s.config, key) == value]
        if found and (refresh or (refresh is None and uuid)):
            try:
                found = self.refresh(found, timeout)
            except ClusterUnreachable:
                if refresh:
                    raise
        return [s for s in found if not running or s.status.state == ServiceState.ACTIVE]

    def refresh(self, services: list[RayModelService], timeout: float = REFRESH_TIMEOUT) -> list[RayModelService]:
        """Ask Serve for the state of each service and record it (with ``observed_at``)."""
        deadline = Deadline(timeout)
        cluster.connect(self.config.address, self.config.namespace, deadline)
        asked_at = time.time()
        apps = cluster.applications(self.config.address, deadline)
        fresh = []
        for service in services:
            state, error = serving.state_of(apps.get(str(service.uuid)))
            error_now: str | None = error
            if state == ServiceState.INACTIVE and service.desired_state == DesiredState.RUNNING:
                error_now = "not on the cluster (a new head?): start_model_server or redeploy_all deploys it from its record"
            elif service.desired_reason == GIVEN_UP and state in (ServiceState.INACTIVE, ServiceState.PENDING_SHUTDOWN):
                state, error_now = ServiceState.ERROR, None  # a deploy given up (_given_up): its error stays
            try:
                fresh.append(self._observe(service.uuid, state, error_now, asked_at))
            except ModeldError:
                continue  # deleted meanwhile
        return fresh

    def stop_model_server(
        self,
        uuid: UUID,
        timeout: int = DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT,
        force: bool = False,
    ) -> None:
        """Delete the Serve application and keep the record, desired state stopped (Serve has no stop).
        ``force`` does not wait for Serve to finish removing it."""
        deadline = Deadline(timeout)
        service = self.records.get(uuid)
        from ray import serve

        self._connect(deadline)
        cluster.bounded(
            lambda: serve.delete(serving.app_name(service), _blocking=False),
            deadline.left(),
            f"deleting {uuid} from Ray Serve on {self.config.address}",
            StopError,
        )
        # (only now: a stop that could not reach the cluster changes nothing, and redeploy_all still deploys it)
        service = self.records.update(uuid, lambda s: setattr(s, "desired_state", DesiredState.STOPPED))
        if force:
            self._observe(service.uuid, ServiceState.PENDING_SHUTDOWN, "")
            return
        seen = self._wait([service.uuid], deadline, stopping=True)
        state, _ = seen.get(service.uuid, (ServiceState.INACTIVE, ""))
        if state != ServiceState.INACTIVE:
            self._observe(service.uuid, state, "")
            raise StopError(f"{uuid}: Ray Serve still removing it after {deadline.timeout:g}s (it says {state})")
        self._observe(service.uuid, ServiceState.INACTIVE, "")

    def start_model_server(
        self,
        uuid: UUID,
        timeout: int = DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT,
    ) -> None:
        """Deploy the service again from its record (after a stop, or on a new head)."""
        deadline = Deadline(timeout)
        record = self.records.get(uuid)
        self.check(record.config)
        self._connect(deadline)
        if record.desired_state == DesiredState.RUNNING and not self._not_serving([record], deadline):
            return  # Serve runs it already: a start is nothing to do (as the local daemon's)

        def running(service: RayModelService) -> None:
            service.desired_state, service.desired_reason = DesiredState.RUNNING, ""
            service.endpoint = serving.endpoint(service, self.config)
            observed(service, ServiceState.PENDING_STARTUP, "")

        self._started(self.records.update(uuid, running), deadline)

    def delete_model_server(
        self,
        uuid: UUID,
        timeout: int = DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT,
        force: bool = False,
    ) -> None:
        """Delete the Serve application, then the record; ``force`` forgets the record even when
        the cluster cannot be reached (the application, if any, is then left there)."""
        self.records.get(uuid)
        try:
            self.stop_model_server(uuid, timeout=timeout, force=force)
        except ModeldError:
            if not force:
                raise
        self.records.remove(uuid)

    def redeploy_all(self, timeout: int = DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT) -> List[BaseService]:
        """Deploy again every service whose desired state is running (after a new head: nothing of Serve
        survives it), all handed to Serve at once and waited for together within ``timeout``; one already
        serving is left as it is (Serve sees the same application). Returns them, running; when some fail,
        the others are still deployed and :class:`~deployers.base.RedeployError` names the failed ones."""
        deadline = Deadline(timeout)
        wanted = [s for s in self.records.all() if s.desired_state == DesiredState.RUNNING]
        if not wanted:
            return []
        self._connect(deadline)
        wanted = self._not_serving(wanted, deadline)
        if not wanted:
            return []
        failed: dict[str, Exception] = {}
        submitted = []
        for service in wanted:
            try:
                self.check(service.config)
                service = self.records.update(service.uuid, lambda s: observed(s, ServiceState.PENDING_STARTUP, ""))
                self._submit(service, deadline)
                submitted.append(service)
            except (ModeldError, OSError) as exc:
                failed[str(service.uuid)] = exc
                self._observe(service.uuid, ServiceState.ERROR, str(exc))
        seen = self._wait([s.uuid for s in submitted], deadline) if submitted else {}
        started: list[BaseService] = []
        for service in submitted:
            state, error = seen.get(service.uuid, (ServiceState.PENDING_STARTUP, ""))
            if state not in (ServiceState.ACTIVE, ServiceState.SCALED_TO_ZERO, ServiceState.ERROR):
                error = f"not running after {deadline.timeout:g}s (Serve says {state}); it may still come up"
            done = self._observe(service.uuid, state, error)
            if state in (ServiceState.ACTIVE, ServiceState.SCALED_TO_ZERO):
                started.append(done)
            elif state == ServiceState.ERROR:
                failed[str(service.uuid)] = self._given_up(done, deadline)
            else:
                failed[str(service.uuid)] = DeployError(f"{service.uuid} ({service.config.model_name}): {error}")
        if failed:
            names = "; ".join(
                f"{uuid}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}" for uuid, exc in failed.items()
            )
            raise RedeployError(f"{len(failed)} of {len(wanted)} services not redeployed: {names}", started, failed)
        return started

    def get_logs(self, uuid: UUID, follow: bool = False, tail: Optional[int] = None) -> Iterator[str]:
        """The replica log files of the service, where the head (this driver's node) is local."""
        from deployers.ray.logs import replica_logs

        self.records.get(uuid)
        cluster.connect(self.config.address, self.config.namespace, Deadline(REFRESH_TIMEOUT))
        gone = lambda: self.records.find(uuid) is None  # noqa: E731  (a follow ends when the service is deleted)
        return replica_logs(str(uuid), cluster.session_dir(), self.config.address, follow=follow, tail=tail, gone=gone)

    def disconnect(self, timeout: float = 30.0) -> None:
        """End this process's connection to the cluster (``ray.shutdown``); the next call connects again."""
        cluster.disconnect(timeout)
