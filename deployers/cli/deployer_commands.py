"""The service commands through a registered deployer (``modeld --deployer NAME ...``), and ``redeploy``.

Each is its ``service_commands`` twin made of :class:`~deployers.base.BaseModelDeployer`'s methods
only (deploy_model, find_model_server, get_model_server_info, start/stop/delete_model_server,
get_logs, redeploy_all), so it works on any flavor, and prints what its twin prints with the
same exit codes: the printing is the twin's own functions, and on a terminal the same progress line
is drawn, from another instance of the deployer. What the interface lacks is done here:
``ls --project`` and ``--state`` match the services ``find_model_server`` gives (its signature is
ZenML's, without them); ``start --all`` starts each that is not running, one at a time.
``deploy --uuid`` is refused (deploy_model takes none).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from daemon import exceptions as exc
from daemon.config import replace_key
from daemon.filters import FIND_FILTERS, SEED_FILTERS
from daemon.models import BaseService, DesiredState, ServiceState
from deployers.base import BaseModelDeployer, RedeployError
from deployers.cli import connect
from deployers.cli.connect import resolve_among
from deployers.cli.errors import UsageError
from deployers.cli.options import deploy_config
from deployers.cli.output import print_json, printable
from deployers.cli.progress import draw, shown
from deployers.cli.service_commands import _validation_line, print_deployed, print_found, print_info, print_started


def whole(seconds: float) -> int:
    """A --timeout for the interface, which takes whole seconds: rounded up, so it never cuts a wait short."""
    return math.ceil(seconds)


def one(deployer: BaseModelDeployer, uuid: UUID) -> BaseService:
    """The service ``uuid``, or ServiceNotFound in the words the daemon uses."""
    found = deployer.find_model_server(service_uuid=uuid)
    if not found:
        raise exc.ServiceNotFound(f"no service with uuid {uuid}")
    return found[0]


def named(deployer: BaseModelDeployer, ref: str) -> UUID:
    return resolve_among(deployer.find_model_server, ref)


Find = Callable[[BaseModelDeployer], BaseService | None]


def watched(
    args: argparse.Namespace, deployer: BaseModelDeployer, label: str, call: Callable[[], BaseService], find: Find
) -> BaseService:
    """``call``, with the progress line of the plain commands on a terminal (see ``progress``): the
    state and last log line of the service ``find`` gives, asked of a deployer of its own (another
    instance of the same flavor and config: a deployer's client is not shared across threads)."""
    if not shown(args):
        return call()
    try:
        watcher = type(deployer)(config=deployer.config, name=deployer.name)
    except Exception:  # noqa: BLE001  (a flavor made otherwise: no progress line, the call all the same)
        return call()

    def peek() -> tuple[str, str]:
        try:
            svc = find(watcher)
            if svc is None:
                return "waiting", ""
            try:
                last = "".join(watcher.get_logs(svc.uuid, tail=1)).strip()
            except exc.ModeldError:  # (a flavor without logs)
                last = ""
            return str(svc.status.state), printable(last)
        except exc.ModeldError:
            return "waiting", ""

    where = f"modeld --deployer {deployer.name} ls"
    return draw(label, call, peek, f"interrupted; deployer {deployer.name!r} goes on with it (see `{where}`)")


def deploy(args: argparse.Namespace, deployer: BaseModelDeployer) -> int:
    try:
        config = deploy_config(args)
    except ValueError as error:  # pydantic's ValidationError is a ValueError
        raise UsageError(_validation_line(error)) from error
    if args.uuid:
        raise UsageError("--uuid: with --deployer the deployer picks the uuid (deploy_model takes none); leave it out")
    started, since = time.monotonic(), time.time()

    def find(watcher: BaseModelDeployer, new: bool = True) -> BaseService | None:
        # The deployer picks the uuid: the newest service of the same key (the one replaced, or made now).
        same = [
            s
            for s in watcher.find_model_server(
                pipeline_name=config.pipeline_name, pipeline_step_name=config.pipeline_step_name, model_name=config.model_name
            )
            if replace_key(s.config) == replace_key(config) and (args.replace or not new or s.created_at >= since - 1)
        ]
        return max(same, key=lambda s: s.created_at) if same else None

    what = config.name or config.model_name or config.model_uri or config.command[0]
    replacing = args.replace and shown(args) and find(deployer, new=False) is not None
    svc = watched(
        args,
        deployer,
        f"{'replacing' if replacing else 'deploying'} {what}",
        lambda: deployer.deploy_model(config, replace=args.replace, timeout=whole(args.timeout)),
        find,
    )
    print_deployed(args, svc, config, time.monotonic() - started)
    return 0


def ls(args: argparse.Namespace, deployer: BaseModelDeployer) -> int:
    filters: dict[str, Any] = {name: getattr(args, name) for name in FIND_FILTERS}
    service_uuid = named(deployer, args.uuid) if args.uuid else None
    found = deployer.find_model_server(
        running=args.running, service_uuid=service_uuid, **{name: filters[name] for name in SEED_FILTERS}
    )
    rest = {name: value for name, value in filters.items() if name not in SEED_FILTERS and value is not None}
    found = [
        s
        for s in found
        if all(getattr(s.config, name) == value for name, value in rest.items())
        and (args.state is None or str(s.status.state) == args.state)
    ]
    print_found(args, found, bool(any(filters.values()) or args.running or service_uuid or args.state))
    return 0


def info(args: argparse.Namespace, deployer: BaseModelDeployer) -> int:
    svc = one(deployer, named(deployer, args.uuid))
    if args.json:
        print_json(svc.model_dump(mode="json"))
    else:
        print_info(svc, deployer.get_model_server_info(svc))
    return 0


def start(args: argparse.Namespace, deployer: BaseModelDeployer) -> int:
    if args.all:
        if args.uuid:
            raise UsageError("give a service or --all, not both")
        started: list[BaseService] = []
        failed: dict[str, Exception] = {}
        for svc in deployer.find_model_server():
            if svc.desired_state == DesiredState.RUNNING and svc.status.state == ServiceState.ACTIVE:
                continue  # as the daemon's start --all: every other one is started
            try:
                deployer.start_model_server(svc.uuid, timeout=whole(args.timeout))
                started.append(one(deployer, svc.uuid))
            except exc.ServiceNotFound:
                continue  # deleted meanwhile
            except exc.ModeldError as error:
                failed[str(svc.uuid)] = error
        return print_started(args, started, failed)
    if not args.uuid:
        raise UsageError("start which service? give its uuid, prefix or name, or --all")
    uuid = named(deployer, args.uuid)

    def call() -> BaseService:
        deployer.start_model_server(uuid, timeout=whole(args.timeout))
        return one(deployer, uuid)

    svc = watched(args, deployer, f"starting {str(uuid)[:8]}", call, lambda w: one(w, uuid))
    print_json(svc.model_dump(mode="json")) if args.json else print(f"{svc.uuid} {svc.status.state} {svc.endpoint.service_url}")
    return 0


def stop(args: argparse.Namespace, deployer: BaseModelDeployer) -> int:
    uuid = named(deployer, args.uuid)

    def call() -> BaseService:
        deployer.stop_model_server(uuid, timeout=whole(args.timeout), force=args.force)
        return one(deployer, uuid)

    svc = watched(args, deployer, f"stopping {str(uuid)[:8]}", call, lambda w: one(w, uuid))
    print_json(svc.model_dump(mode="json")) if args.json else print(f"{svc.uuid} {svc.status.state}")
    return 0


def rm(args: argparse.Namespace, deployer: BaseModelDeployer) -> int:
    uuid = named(deployer, args.uuid)
    deployer.delete_model_server(uuid, timeout=whole(args.timeout), force=args.force)
    print_json({"deleted": str(uuid)}) if args.json else print(f"{uuid} deleted")
    return 0


def logs(args: argparse.Namespace, deployer: BaseModelDeployer) -> int:
    uuid = named(deployer, args.uuid)
    # Lines come with their newline (so they are written as they are), but a flavor may give them
    # without, as ZenML's services do: a line without one gets it when another line follows, and at
    # the end when an earlier one lacked it too (a last line alone without one: the log ends mid-line).
    unended = stripping = False
    try:
        for line in deployer.get_logs(uuid, follow=args.follow, tail=args.n):
            stripping |= unended
            sys.stdout.write(("\n" if unended else "") + line)
            sys.stdout.flush()
            unended = not line.endswith("\n")
    except KeyboardInterrupt:
        pass
    if unended and stripping:
        print()
    return 0


def redeploy(args: argparse.Namespace, deployer: BaseModelDeployer) -> int:
    if not args.all:
        raise UsageError("redeploy which services? give --all (every service whose desired state is running)")
    none = "nothing to redeploy: every service whose desired state is running serves"
    try:
        started = deployer.redeploy_all(timeout=whole(args.timeout))
    except RedeployError as error:
        return print_started(args, error.started, error.failed, none)
    return print_started(args, started, {}, none)


def cmd_redeploy(args: argparse.Namespace) -> int:
    """``modeld redeploy --all`` without --deployer: the local daemon's, through the local deployer."""
    from deployers.local.deployer import LocalDaemonModelDeployer

    return redeploy(args, LocalDaemonModelDeployer(client=connect.client(args)))
