"""The commands on services: deploy, ls, info, start, stop, unload, rm and logs."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from uuid import uuid4

from daemon import exceptions as exc
from daemon.client import DaemonClient
from daemon.config import ServiceConfig, replace_key
from daemon.filters import FIND_FILTERS
from daemon.models import BaseService
from deployers.cli import connect
from deployers.cli.connect import resolve
from deployers.cli.errors import UsageError, one_line
from deployers.cli.options import deploy_config
from deployers.cli.output import duration, print_json, table
from deployers.cli.progress import progress, shown


def summary(svc: BaseService) -> list[str]:
    c = svc.config
    return [
        str(svc.uuid)[:8],
        c.name or c.model_name or "-",
        c.model_type,
        str(svc.status.state),
        str(svc.status.pid or "-"),
        svc.endpoint.unix_socket or (svc.endpoint.service_url if svc.endpoint.port else "-"),
        c.pipeline_name or "-",
        c.pipeline_step_name or "-",
    ]


def cmd_deploy(args: argparse.Namespace) -> int:
    try:
        config = deploy_config(args)
    except ValueError as error:  # pydantic's ValidationError is a ValueError
        raise UsageError(_validation_line(error)) from error
    client = connect.client(args)
    started = time.monotonic()
    # The progress line follows the service by uuid: a new service's is chosen here (the API takes
    # one); a replace's is the daemon's pick, which ``find`` makes as it does.
    uuid = args.uuid or (None if args.replace else uuid4())

    def find(watcher: DaemonClient) -> BaseService | None:
        if uuid is not None:
            return watcher.get(uuid)
        same = [
            s
            for s in watcher.find(
                pipeline_name=config.pipeline_name, pipeline_step_name=config.pipeline_step_name, model_name=config.model_name
            )
            if replace_key(s.config) == replace_key(config)
        ]
        return max(same, key=lambda s: s.created_at) if same else None  # the newest, as the daemon replaces

    what = config.name or config.model_name or config.model_uri or config.command[0]
    svc = progress(
        args,
        f"{'replacing' if args.replace and (uuid or shown(args) and find(client)) else 'deploying'} {what}",
        lambda: client.deploy(config, replace=args.replace, timeout=args.timeout, uuid=uuid),
        find,
    )
    print_deployed(args, svc, config, time.monotonic() - started)
    return 0


def print_deployed(args: argparse.Namespace, svc: BaseService, config: ServiceConfig, took: float) -> None:
    if args.json:
        print_json(svc.model_dump(mode="json"))
    else:
        print(f"{svc.uuid} {svc.status.state} in {took:.2f}s")
        print(
            f"prediction url: {svc.endpoint.prediction_url}"
            if config.model_type != "command" or config.prediction_path
            else f"url: {svc.endpoint.service_url}"
        )


def _validation_line(error: Exception) -> str:
    errors = getattr(error, "errors", None)
    if callable(errors):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in errors())
    return str(error)


def cmd_ls(args: argparse.Namespace) -> int:
    client = connect.client(args)
    filters = {name: getattr(args, name) for name in FIND_FILTERS}
    service_uuid = resolve(client, args.uuid) if args.uuid else None
    found = client.find(running=args.running, service_uuid=service_uuid, **filters, state=args.state)
    print_found(args, found, bool(any(filters.values()) or args.running or service_uuid or args.state))
    return 0


def print_found(args: argparse.Namespace, found: list[BaseService], given: bool) -> None:
    """``ls``'s output: the table (or JSON) of ``found``; ``given``: whether any filter was."""
    if args.json:
        print_json([s.model_dump(mode="json") for s in found])
    elif found:
        table([summary(s) for s in found], ["UUID", "NAME", "TYPE", "STATE", "PID", "URL", "PIPELINE", "STEP"])
    else:
        print("no services" + (" match" if given else ""), file=sys.stderr)


def cmd_info(args: argparse.Namespace) -> int:
    from deployers.local.deployer import LocalDaemonModelDeployer

    client = connect.client(args)
    svc = client.get(resolve(client, args.uuid))
    if args.json:
        print_json(svc.model_dump(mode="json"))
        return 0
    print_info(svc, LocalDaemonModelDeployer.get_model_server_info(svc))
    return 0


def print_info(svc: BaseService, info: dict[str, str | None]) -> None:
    """``info``'s lines: the deployer's ``get_model_server_info``, then what every service has."""
    width = max((len(k) for k in info), default=0)
    for key, value in info.items():
        print(f"{key.ljust(width)}  {value if value is not None else '-'}")
    given = {
        "PROJECT": svc.config.project or None,
        "UNIX_SOCKET": svc.endpoint.unix_socket or None,
        # (a command server without a prediction_path: its base URL, no KServe body to show)
        "CURL": svc.endpoint.curl_example()
        if info.get("PREDICTION_URL") and (svc.endpoint.kserve or svc.endpoint.prediction_path)
        else None,
    }
    extra: dict[str, str | int | None] = {k: v for k, v in given.items() if v is not None}
    extra.update({"RESTARTS": str(svc.status.restarts), "EXIT_CODE": svc.status.exit_code, "VERSION": str(svc.version)})
    extra["DESIRED"] = str(svc.desired_state) + (f" ({svc.desired_reason})" if svc.desired_reason else "")
    if svc.status.last_error:
        extra["LAST_ERROR"] = one_line(svc.status.last_error)
    observed = getattr(svc, "observed_at", None)  # a deployer whose records keep the state last asked (ray)
    if observed is not None:
        extra["OBSERVED"] = (
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(observed))} ({duration(max(0.0, time.time() - observed))} ago)"
        )
    for key, item in extra.items():
        print(f"{key.ljust(width)}  {item if item is not None else '-'}")


def cmd_start(args: argparse.Namespace) -> int:
    client = connect.client(args)
    if args.all:
        if args.uuid:
            raise UsageError("give a service or --all, not both")
        started, failed = client.start_all(timeout=args.timeout)
        return print_started(args, started, failed)
    if not args.uuid:
        raise UsageError("start which service? give its uuid, prefix or name, or --all")
    uuid = resolve(client, args.uuid)
    svc = progress(args, f"starting {str(uuid)[:8]}", lambda: client.start(uuid, timeout=args.timeout), lambda w: w.get(uuid))
    print_json(svc.model_dump(mode="json")) if args.json else print(f"{svc.uuid} {svc.status.state} {svc.endpoint.service_url}")
    return 0


def print_started(
    args: argparse.Namespace,
    started: list[BaseService],
    failed: Mapping[str, Exception],
    none: str = "every service runs already",
) -> int:
    """``start --all``'s output (and ``redeploy --all``'s; ``none``: the line when there was nothing
    to start): its exit code, 5 when some failed."""
    if args.json:
        print_json(
            {
                "started": [s.model_dump(mode="json") for s in started],
                "failed": {uuid: getattr(error, "message", str(error)) for uuid, error in failed.items()},
            }
        )
    else:
        for svc in started:
            print(f"{svc.uuid} {svc.status.state} {svc.endpoint.service_url}")
        for failed_uuid, error in failed.items():
            print(
                f"modeld: {failed_uuid}: {one_line(error if isinstance(error, exc.ModeldError) else str(error))}", file=sys.stderr
            )
        if not started and not failed:
            print(none, file=sys.stderr)
    return 5 if failed else 0


def cmd_stop(args: argparse.Namespace) -> int:
    client = connect.client(args)
    uuid = resolve(client, args.uuid)
    svc = progress(
        args,
        f"stopping {str(uuid)[:8]}",
        lambda: client.stop(uuid, timeout=args.timeout, force=args.force),
        lambda w: w.get(uuid),
    )
    print_json(svc.model_dump(mode="json")) if args.json else print(f"{svc.uuid} {svc.status.state}")
    return 0


def cmd_unload(args: argparse.Namespace) -> int:
    client = connect.client(args)
    uuid = resolve(client, args.uuid)
    svc = client.unload(uuid)
    print_json(svc.model_dump(mode="json")) if args.json else print(f"{svc.uuid} {svc.status.state}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    client = connect.client(args)
    uuid = resolve(client, args.uuid)
    client.delete(uuid, timeout=args.timeout, force=args.force)
    print_json({"deleted": str(uuid)}) if args.json else print(f"{uuid} deleted")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    client = connect.client(args)
    uuid = resolve(client, args.uuid)
    try:
        for chunk in client.logs(uuid, tail=args.n, follow=args.follow):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    return 0
