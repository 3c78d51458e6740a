"""The ``modeld`` command.

Habits of docker, supervisorctl and ZenML's CLI: subcommands, ``--help``
with examples, ``--json`` for data, tables for people. Errors are one line
on stderr and an exit code chosen in one place (:data:`EXIT_CODES`), never
a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, get_args, get_origin
from uuid import UUID

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from daemon import exceptions as exc
from daemon.client import DaemonClient, VersionMismatchWarning, ensure_daemon
from daemon.filters import FIND_FILTERS
from daemon.models import BaseService, ServiceConfig
from daemon.paths import Paths

EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (exc.ServiceNotFound, 4),
    (exc.DeployError, 5),
    (exc.StopError, 5),
    (exc.DaemonNotRunning, 3),
    (exc.DaemonStartError, 3),
    (exc.DaemonAlreadyRunning, 3),
    (exc.RequestError, 2),
    (exc.FlavorError, 2),
    (exc.ModeldError, 1),
]

EPILOG = """\
examples:
  modeld deploy --model-name iris --model-uri examples/iris.py:model --pipeline-name train
  modeld deploy --model-name echo --model-type command --health-path / -- python3 -m http.server {port} --bind {host}
  modeld ls --running
  modeld logs 3f2a -n 50 -f
  curl --unix-socket "$MODELD_HOME/modeld.sock" http://modeld/v1/services

state lives in $MODELD_HOME (default $XDG_STATE_HOME/modeld); the daemon starts by itself on first use.
"""


class UsageError(exc.RequestError):
    pass


def _client(args: argparse.Namespace, auto_start: bool = True, timeout: float | None = None) -> DaemonClient:
    """Every client the command makes comes from here (tests replace it with one on an in-memory transport)."""
    return DaemonClient(home=args.home, auto_start=auto_start, timeout=timeout)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    for row in (headers, *rows):
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip())


def _resolve(client: DaemonClient, ref: str) -> UUID:
    """A full uuid, a unique name, or a unique prefix of a uuid (as docker accepts short ids)."""
    try:
        return UUID(ref)
    except ValueError:
        pass
    services = client.find()
    # As docker does: an exact name first, then a uuid prefix.
    matches = [s.uuid for s in services if ref in (s.config.name, s.config.model_name)]
    if not matches:
        matches = [s.uuid for s in services if str(s.uuid).startswith(ref.lower())]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise exc.ServiceNotFound(f"no service whose uuid starts with {ref!r} or whose name is {ref!r}; see `modeld ls`")
    raise UsageError(f"{ref!r} matches {len(matches)} services; give the uuid (see `modeld ls`)")


def _summary(svc: BaseService) -> list[str]:
    c = svc.config
    return [
        str(svc.uuid)[:8],
        c.name or c.model_name or "-",
        c.model_type,
        str(svc.status.state),
        str(svc.status.pid or "-"),
        svc.endpoint.base_url if svc.endpoint.port else "-",
        c.pipeline_name or "-",
        c.pipeline_step_name or "-",
    ]


# -------------------------------------------------------------------- daemon


def cmd_daemon_start(args: argparse.Namespace) -> int:
    paths = Paths(args.home)
    try:
        ensure_daemon(paths)
    except exc.StorageError as error:
        raise exc.DaemonStartError(f"cannot start the daemon: {error.message}") from error
    info = _client(args, auto_start=False).daemon_info()
    if args.json:
        _print_json({"running": True, **info})
    else:
        print(f"modeld daemon running (pid {info['pid']}) on {info['socket']}")
    return 0


def cmd_daemon_stop(args: argparse.Namespace) -> int:
    client = _client(args, auto_start=False)
    if not client.is_running():
        print("modeld daemon is not running")
        return 0
    from daemon.daemon_process import daemon_pid

    pid = client.daemon_info()["pid"]
    client.shutdown(stop_services=args.all)
    deadline = time.monotonic() + args.timeout
    # The socket closes first; the process exits after it has stopped (with --all) the servers.
    while time.monotonic() < deadline and (client.is_running() or daemon_pid(client.paths) == pid):
        time.sleep(0.02)
    if client.is_running() or daemon_pid(client.paths) == pid:
        raise exc.StopError(f"the daemon (pid {pid}) did not stop within {args.timeout:g}s")
    print(f"modeld daemon stopped (pid {pid})" + ("; every model server stopped" if args.all else "; model servers keep running"))
    return 0


def cmd_daemon_status(args: argparse.Namespace) -> int:
    client = _client(args, auto_start=False)
    try:
        info = client.daemon_info()
    except exc.DaemonNotRunning:
        if args.json:
            _print_json({"running": False, "home": str(client.paths.home)})
        else:
            print(f"modeld daemon is not running (home {client.paths.home})")
        return 3
    if args.json:
        _print_json({"running": True, **info})
        return 0
    counts = info["counts"]
    print(f"modeld {info['version']} running, pid {info['pid']}, home {info['home']}")
    note = f" ({info['containment_note']})" if info.get("containment_note") else ""
    print(f"containment: {info.get('containment', 'unknown')}{note}")
    print(
        "services: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v and k != "total")
        if counts["total"]
        else "services: none"
    )
    for problem in info["problems"]:
        aside = f" (set aside as {problem['set_aside_as']})" if problem.get("set_aside_as") else ""
        print(f"problem: {problem['path']}: {problem['message']}{aside}")
    return 0


def cmd_daemon_run(args: argparse.Namespace) -> int:
    from daemon.daemon_process import run

    try:
        return run(Paths(args.home))
    except exc.StorageError as error:
        raise exc.DaemonStartError(f"cannot start the daemon: {error.message}") from error


# ------------------------------------------------------------------ services


def _deploy_config(args: argparse.Namespace, config: type[ServiceConfig] = ServiceConfig) -> ServiceConfig:
    """The config the deploy options describe: only the fields given, so every other one takes its default."""
    fields: dict[str, Any] = {}
    for option in deploy_options(config):
        value = getattr(args, option.dest)
        if value is not None and option.read:
            value = option.read(value)
        if value is None:
            continue
        *groups, name = option.path
        place = fields
        for group in groups:
            place = place.setdefault(group, {})
        place[name] = value
    for name, field in config.model_fields.items():  # a nested model (restart) from the options given of it
        if isinstance(fields.get(name), dict) and _model_class(field.annotation):
            fields[name] = field.annotation(**fields[name])  # type: ignore[misc]
    return config(**fields)


def _env_item(item: str) -> tuple[str, str]:
    """``KEY=VALUE``, or ``KEY`` alone to take the value from this shell's environment (like ``docker run -e``),
    so that a secret never sits in the command line, which every local user can read in /proc."""
    if "=" in item:
        return _key_value(item, "--env")
    if not item:
        raise UsageError("--env takes KEY=VALUE or KEY, not an empty string")
    if item not in os.environ:
        raise UsageError(f"--env {item}: {item} is not set in this environment (give KEY=VALUE, or export it first)")
    return item, os.environ[item]


def _key_value(item: str, option: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UsageError(f"{option} takes KEY=VALUE, not {item!r}")
    return key, value


def _progress(
    args: argparse.Namespace, label: str, call: Callable[[], BaseService], find: Callable[[DaemonClient], BaseService | None]
) -> BaseService:
    """Run a slow call; on a terminal, show the service's state, the time and its latest log line meanwhile.

    Piped output and --json stay quiet.
    """
    if args.json or not sys.stderr.isatty():
        return call()
    value: list[BaseService] = []
    error: list[BaseException] = []

    def work() -> None:
        try:
            value.append(call())
        except BaseException as exc:  # handed to the main thread, which raises it
            error.append(exc)

    worker = threading.Thread(target=work, daemon=True)
    started = time.monotonic()
    worker.start()
    watcher = _client(args, auto_start=False, timeout=5)
    width = shutil.get_terminal_size((100, 20)).columns - 1
    try:
        while worker.is_alive():
            worker.join(0.25)
            try:
                svc = find(watcher)
                state = str(svc.status.state) if svc else "starting"
                last = "".join(watcher.logs(svc.uuid, tail=1)).strip() if svc else ""
            except exc.ModeldError:
                state, last = "starting the daemon", ""
            line = f"{label}: {state} {time.monotonic() - started:5.1f}s" + (f"  | {last}" if last else "")
            sys.stderr.write("\r" + line[:width].ljust(width))
            sys.stderr.flush()
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        raise exc.ModeldError("interrupted; the daemon goes on with it (see `modeld ls`)") from None
    finally:
        watcher.close()
    sys.stderr.write("\r" + " " * width + "\r")
    if error:
        raise error[0]
    return value[0]


def cmd_deploy(args: argparse.Namespace) -> int:
    try:
        config = _deploy_config(args)
    except ValueError as error:  # pydantic's ValidationError is a ValueError
        raise UsageError(_validation_line(error)) from error
    client = _client(args)
    started = time.monotonic()

    def find(watcher: DaemonClient) -> BaseService | None:
        if args.uuid:
            return watcher.get(args.uuid)
        same = watcher.find(
            pipeline_name=config.pipeline_name, pipeline_step_name=config.pipeline_step_name, model_name=config.model_name
        )
        return max(same, key=lambda s: s.status.updated_at) if same else None

    svc = _progress(
        args,
        f"deploying {config.model_name or config.model_uri or config.command[0]}",
        lambda: client.deploy(config, replace=args.replace, timeout=args.timeout, uuid=args.uuid),
        find,
    )
    if args.json:
        _print_json(svc.model_dump(mode="json"))
    else:
        print(f"{svc.uuid} {svc.status.state} in {time.monotonic() - started:.2f}s")
        print(
            f"prediction url: {svc.endpoint.prediction_url}"
            if config.model_type != "command"
            else f"url: {svc.endpoint.base_url}"
        )
    return 0


def _validation_line(error: Exception) -> str:
    errors = getattr(error, "errors", None)
    if callable(errors):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in errors())
    return str(error)


def cmd_ls(args: argparse.Namespace) -> int:
    client = _client(args)
    filters = {name: getattr(args, name) for name in FIND_FILTERS}
    service_uuid = _resolve(client, args.uuid) if args.uuid else None
    found = client.find(running=args.running, service_uuid=service_uuid, **filters)
    if args.json:
        _print_json([s.model_dump(mode="json") for s in found])
    elif found:
        _table([_summary(s) for s in found], ["UUID", "NAME", "TYPE", "STATE", "PID", "URL", "PIPELINE", "STEP"])
    else:
        print("no services" + (" match" if any(filters.values()) or args.running or service_uuid else ""), file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from deployers.local.deployer import LocalDaemonModelDeployer

    client = _client(args)
    svc = client.get(_resolve(client, args.uuid))
    if args.json:
        _print_json(svc.model_dump(mode="json"))
        return 0
    info = LocalDaemonModelDeployer.get_model_server_info(svc)
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key.ljust(width)}  {value if value is not None else '-'}")
    given = {
        "UNIX_SOCKET": svc.endpoint.unix_socket or None,
        "CURL": svc.endpoint.curl_example() if info.get("PREDICTION_URL") else None,
    }
    extra: dict[str, str | int | None] = {k: v for k, v in given.items() if v is not None}
    extra.update({"RESTARTS": str(svc.status.restarts), "EXIT_CODE": svc.status.exit_code, "VERSION": str(svc.version)})
    extra["DESIRED"] = str(svc.desired_state) + (f" ({svc.desired_reason})" if svc.desired_reason else "")
    if svc.status.last_error:
        extra["LAST_ERROR"] = _one_line(svc.status.last_error)
    for key, item in extra.items():
        print(f"{key.ljust(width)}  {item if item is not None else '-'}")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.all:
        if args.uuid:
            raise UsageError("give a service or --all, not both")
        started, failed = client.start_all(timeout=args.timeout)
        if args.json:
            _print_json(
                {
                    "started": [s.model_dump(mode="json") for s in started],
                    "failed": {uuid: error.message for uuid, error in failed.items()},
                }
            )
        else:
            for svc in started:
                print(f"{svc.uuid} {svc.status.state} {svc.endpoint.base_url}")
            for failed_uuid, error in failed.items():
                print(f"modeld: {failed_uuid}: {_one_line(error)}", file=sys.stderr)
            if not started and not failed:
                print("every service runs already", file=sys.stderr)
        return 5 if failed else 0
    if not args.uuid:
        raise UsageError("start which service? give its uuid, prefix or name, or --all")
    uuid = _resolve(client, args.uuid)
    svc = _progress(args, f"starting {str(uuid)[:8]}", lambda: client.start(uuid, timeout=args.timeout), lambda w: w.get(uuid))
    _print_json(svc.model_dump(mode="json")) if args.json else print(f"{svc.uuid} {svc.status.state} {svc.endpoint.base_url}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    client = _client(args)
    uuid = _resolve(client, args.uuid)
    svc = _progress(
        args,
        f"stopping {str(uuid)[:8]}",
        lambda: client.stop(uuid, timeout=args.timeout, force=args.force),
        lambda w: w.get(uuid),
    )
    _print_json(svc.model_dump(mode="json")) if args.json else print(f"{svc.uuid} {svc.status.state}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    client = _client(args)
    uuid = _resolve(client, args.uuid)
    client.delete(uuid, timeout=args.timeout, force=args.force)
    _print_json({"deleted": str(uuid)}) if args.json else print(f"{uuid} deleted")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    client = _client(args)
    uuid = _resolve(client, args.uuid)
    try:
        for chunk in client.logs(uuid, tail=args.n, follow=args.follow):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    return 0


# ------------------------------------------------------------ flavors, deployers


def _registry(args: argparse.Namespace) -> Any:
    from deployers.registry import FlavorRegistry

    # As `python -m` does, let a flavor in the current folder be found by its source path.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())

    return FlavorRegistry(Paths(args.home).home)


def cmd_flavor_register(args: argparse.Namespace) -> int:
    flavor = _registry(args).register_flavor(args.source)
    name = flavor["name"]
    print(
        json.dumps({"registered": name, "source": args.source}) if args.json else f"flavor {name!r} registered from {args.source}"
    )
    return 0


def cmd_flavor_list(args: argparse.Namespace) -> int:
    flavors = _registry(args).list_flavors()
    if args.json:
        _print_json(flavors)
    else:
        _table([[f["name"], f["source"], "yes" if f.get("builtin") else "no"] for f in flavors], ["NAME", "SOURCE", "BUILT-IN"])
    return 0


def cmd_deployer_register(args: argparse.Namespace) -> int:
    from deployers.registry import parse_key_values

    registry = _registry(args)
    registry.register_deployer(args.name, args.flavor, parse_key_values(args.values))
    print(
        json.dumps({"registered": args.name, "flavor": args.flavor})
        if args.json
        else f"deployer {args.name!r} registered with flavor {args.flavor!r}"
    )
    return 0


def cmd_deployer_list(args: argparse.Namespace) -> int:
    deployers = _registry(args).list_deployers()
    if args.json:
        _print_json(deployers)
    else:
        _table([[d["name"], d["flavor"], json.dumps(d.get("config", {}))] for d in deployers], ["NAME", "FLAVOR", "CONFIG"])
    return 0


def cmd_deployer_rm(args: argparse.Namespace) -> int:
    _registry(args).delete_deployer(args.name)
    print(json.dumps({"removed": args.name}) if args.json else f"deployer {args.name!r} removed")
    return 0


# -------------------------------------------------------------------- parser


def build_parser(config: type[ServiceConfig] = ServiceConfig) -> argparse.ArgumentParser:
    """The parser of every command; ``config``: the class whose fields are ``deploy``'s options."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--home", default=argparse.SUPPRESS, help="state folder (default: $MODELD_HOME or $XDG_STATE_HOME/modeld)"
    )
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print data as JSON")

    parser = argparse.ArgumentParser(
        prog="modeld",
        description="Deploy, supervise and keep track of model servers on this machine.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    # No set_defaults here: the options are shared with every subcommand through `common`, and a
    # default set on them would let a subcommand overwrite `modeld --home X ls` with None.
    sub = parser.add_subparsers(dest="command_name", metavar="COMMAND", required=True)

    def add(
        name: str,
        func: Callable[[argparse.Namespace], int],
        help: str,
        parent: argparse._SubParsersAction[argparse.ArgumentParser] = sub,
        **kw: Any,
    ) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help, parents=[common], **kw)
        p.set_defaults(func=func)
        return p

    daemon = sub.add_parser("daemon", help="start, stop or inspect the daemon", description="Manage the modeld daemon.")
    dsub = daemon.add_subparsers(dest="daemon_command", metavar="ACTION", required=True)
    add("start", cmd_daemon_start, "start the daemon in the background (a no-op if it runs)", dsub)
    p = add("stop", cmd_daemon_stop, "stop the daemon; model servers keep running unless --all", dsub)
    p.add_argument(
        "--all",
        action="store_true",
        help="stop every model server too; they stay stopped (also when a later call starts the daemon) "
        "until `modeld start --all`, a start or a deploy of each",
    )
    p.add_argument("--timeout", type=_seconds, default=60, help="seconds to wait (default 60)")
    add("status", cmd_daemon_status, "is the daemon running; version, pid, counts, problems found on disk", dsub)
    add("run", cmd_daemon_run, "run the daemon in the foreground (for systemd, containers, debugging)", dsub)

    p = add(
        "deploy",
        cmd_deploy,
        "deploy a model (or replace the running version with --replace)",
        epilog="For a command server give its argv after --; {port}, {host} and {model_uri} are filled in.",
        usage="modeld deploy [options] [-- COMMAND ARG ...]",
    )
    for option in deploy_options(config):
        p.add_argument(*option.flags, **option.kwargs)
    p.add_argument("--replace", action="store_true", help="update the service of the same pipeline, step and model in place")
    p.add_argument("--timeout", type=_seconds, default=300, help="seconds to wait for the server to be healthy (default 300)")
    p.add_argument("--uuid", help="the uuid to give the service")

    p = add("ls", cmd_ls, "list services, with the find filters")
    p.add_argument("--running", action="store_true", help="only services that are active")
    p.add_argument("--uuid", help="service uuid (or prefix)")
    for name in FIND_FILTERS:
        p.add_argument(
            _flag(name), choices=_choices(ServiceConfig.model_fields[name].annotation), help=f"only services whose {name} is this"
        )

    p = add("info", cmd_info, "show one service: URLs, state, pid, paths")
    p.add_argument("uuid", help="service uuid (or a unique prefix, or a unique name)")
    p = add("start", cmd_start, "start a stopped service (or restart a hung one) and wait until it is healthy")
    p.add_argument("uuid", nargs="?", help="service uuid (or a unique prefix, or a unique name)")
    p.add_argument(
        "--all", action="store_true", help="start every service that is not running (e.g. after `modeld daemon stop --all`)"
    )
    p.add_argument("--timeout", type=_seconds, default=300, help="seconds to wait for it to be healthy (default 300)")
    for name, func, helptext in (
        ("stop", cmd_stop, "stop a service: SIGTERM to its process group, SIGKILL after a grace period"),
        ("rm", cmd_rm, "stop a service and delete it with its files"),
    ):
        p = add(name, func, helptext)
        p.add_argument("uuid", help="service uuid (or a unique prefix, or a unique name)")
        p.add_argument(
            "--timeout",
            type=_seconds,
            default=300,
            help="grace period before SIGKILL, if shorter than the service's stop_timeout (default: that, 10 s)",
        )
        p.add_argument("--force", action="store_true", help="SIGKILL at once")

    p = add("logs", cmd_logs, "print a service's log (stdout and stderr of its server)")
    p.add_argument("uuid", help="service uuid (or a unique prefix, or a unique name)")
    p.add_argument("-n", "--tail", dest="n", type=_count, help="only the last N lines")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")

    flavor = sub.add_parser("flavor", help="register and list model-deployer flavors", description="Model-deployer flavors.")
    fsub = flavor.add_subparsers(dest="flavor_command", metavar="ACTION", required=True)
    p = add("register", cmd_flavor_register, "register a flavor class by its source path, e.g. my_pkg.flavors.MyFlavor", fsub)
    p.add_argument("source")
    add("list", cmd_flavor_list, "list the flavors", fsub)

    deployer = sub.add_parser(
        "deployer", help="register and list model deployers", description="Model deployers (a flavor plus its config)."
    )
    dpsub = deployer.add_subparsers(dest="deployer_command", metavar="ACTION", required=True)
    p = add("register", cmd_deployer_register, "register a deployer: modeld deployer register NAME --flavor F key=value …", dpsub)
    p.add_argument("name")
    p.add_argument("--flavor", required=True)
    p.add_argument("values", nargs="*", metavar="KEY=VALUE")
    add("list", cmd_deployer_list, "list the registered deployers", dpsub)
    p = add("rm", cmd_deployer_rm, "remove a registered deployer", dpsub)
    p.add_argument("name")
    return parser


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds >= 0")
    return value


def _size(text: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    number, unit = (text[:-1], units[text[-1].upper()]) if text and text[-1].upper() in units else (text, 1)
    try:
        value = int(float(number) * unit)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (bytes, or with K, M, G)") from None
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number >= 0")
    return value


# ------------------------------------------------------------- deploy options
#
# `modeld deploy` has one option per ServiceConfig field (and per field of a nested model, such
# as restart), made from the field: --field-name, its type, its description as help and its
# default shown. DEPLOY_OVERRIDES says, beside nothing else, where a field is spelled or read
# otherwise; a new field needs no entry unless it wants one.


def _stop_command(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as error:
        raise UsageError(f"--stop-command: {error}") from None


# Keyed by the field's path (restart.mode). flag: its spelling; read: turns what argparse gives
# into the field's value (None: not given); note: added to the field's description; help: instead
# of it; argv: the argv after `--`; any other key goes to argparse's add_argument.
DEPLOY_OVERRIDES: dict[str, dict[str, Any]] = {
    "service_type": {"help": argparse.SUPPRESS},
    "command": {"argv": True},
    "env": {
        "metavar": "KEY[=VALUE]",
        "read": lambda items: dict(_env_item(item) for item in items),
        "note": "repeatable; KEY alone takes its value from your environment, keeping a secret out of the command line",
    },
    "secret_env": {"metavar": "KEY", "note": "repeatable"},
    "bind_unix": {
        "flag": "--unix-socket",
        "help": "serve a python/pickle model on a Unix socket only you can reach, not on a TCP port",
    },
    "stop_command": {
        "metavar": "'COMMAND ARG ...'",
        "action": "store",
        "read": _stop_command,
        "note": "split as a shell would, run without one",
    },
    "restart.mode": {"flag": "--restart"},
    "restart.backoff_initial": {"flag": "--backoff"},
    "restart.on_unhealthy": {
        "flag": "--no-restart-on-unhealthy",
        "help": "leave a hung server running and report it in error instead of restarting it",
    },
}
UNITS: dict[str, Callable[[str], Any]] = {"seconds": _seconds, "bytes": _size}


@dataclass(frozen=True)
class DeployOption:
    """One option of ``modeld deploy``: the field it sets and how argparse reads it."""

    path: tuple[str, ...]  # ("restart", "max_restarts")
    flags: tuple[str, ...]  # ("command",) for the argv after --
    kwargs: dict[str, Any]
    read: Callable[[Any], Any] | None = None

    @property
    def dest(self) -> str:
        return str(self.kwargs.get("dest", self.flags[0]))


@cache
def deploy_options(config: type[BaseModel] = ServiceConfig) -> tuple[DeployOption, ...]:
    """The options of ``modeld deploy``: one for every field of ``config``, and of its nested models."""
    return tuple(_options(config, ()))


def _options(model: type[BaseModel], prefix: tuple[str, ...]) -> Iterator[DeployOption]:
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        nested = _model_class(field.annotation)
        if nested and ".".join(path) not in DEPLOY_OVERRIDES:
            yield from _options(nested, path)
        else:
            yield _overridden(_deploy_option(path, field))


def _deploy_option(path: tuple[str, ...], field: FieldInfo) -> DeployOption:
    name = path[-1]
    kwargs: dict[str, Any] = {"dest": "config:" + ".".join(path), "default": None, "metavar": name.upper()}
    # A class or a typing form (list[str], Literal[...]): more than pydantic's "type[Any] | None" says.
    annotation: Any = field.annotation
    default = field.get_default(call_default_factory=True)
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    unit = extra.get("unit")
    if not isinstance(unit, str):  # json_schema_extra's "unit" is a name (one of UNITS) or absent
        unit = None
    description = field.description or ""
    read = None
    flag = _flag(name)
    if annotation is bool:  # a flag that sets the other value than the default
        kwargs.update(action="store_const", const=not default, metavar=None)
        flag = "--no-" + flag[2:] if default else flag
        del kwargs["metavar"]
    elif _choices(annotation):
        kwargs.update(choices=_choices(annotation), metavar=None)
    elif get_origin(annotation) is list:
        kwargs.update(action="append")
    elif get_origin(annotation) is dict:
        kwargs.update(action="append", metavar="KEY=VALUE")
        read = lambda items: dict(_key_value(item, flag) for item in items)  # noqa: E731
    elif unit in UNITS:
        kwargs.update(type=UNITS[unit])
        description += "; bytes, or with K, M or G (512K, 10M)" if unit == "bytes" else ""
    elif annotation in (int, float):
        kwargs.update(type=annotation)
    elif annotation is not str:
        raise TypeError(f"{'.'.join(path)}: no command-line form for {annotation}; give it one in DEPLOY_OVERRIDES")
    kwargs["help"] = _help(description, _default_text(default, unit, annotation))
    return DeployOption(path, (flag,), kwargs, read)


def _overridden(option: DeployOption) -> DeployOption:
    over = dict(DEPLOY_OVERRIDES.get(".".join(option.path), {}))
    if over.pop("argv", False):  # main() puts the argv after -- in args.command
        return DeployOption(option.path, ("command",), {"nargs": "*", "help": argparse.SUPPRESS}, lambda argv: argv or None)
    kwargs = dict(option.kwargs)
    flags = (over.pop("flag"),) if "flag" in over else option.flags
    read = over.pop("read", option.read)
    if "note" in over:
        description, paren, default = kwargs["help"].partition(" (default ")
        kwargs["help"] = f"{description}; {over.pop('note')}{paren}{default}"
    kwargs.update(over)
    return DeployOption(option.path, flags, kwargs, read)


def _model_class(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _choices(annotation: Any) -> list[str] | None:
    return [str(a) for a in get_args(annotation)] if get_origin(annotation) is Literal else None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default_text(default: Any, unit: str | None, annotation: Any) -> str:
    """The default as one writes it, or "" when there is none to show (empty, or a flag's)."""
    if annotation is bool or default in ("", None) or default == [] or default == {}:
        return ""
    if unit == "bytes":
        return next(
            (
                f"{default // size}{suffix}"
                for suffix, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10))
                if default % size == 0
            ),
            str(default),
        )
    return f"{default:g}" if isinstance(default, float) else str(default)


def _help(description: str, default: str) -> str:
    text = description.replace("%", "%%")  # argparse formats help with %
    return f"{text} (default {default.replace('%', '%%')})" if default else text


def _split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, command = _split_command(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(own)
    args.home = getattr(args, "home", None)
    args.json = getattr(args, "json", False)
    # argparse gives `values` (nargs="*") nothing when KEY=VALUEs come after --flavor: take them here.
    if extra and getattr(args, "func", None) is cmd_deployer_register and not any(a.startswith("-") for a in extra):
        args.values = [*args.values, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "func", None) is cmd_deploy:
        if args.command:
            parser.error(f"unexpected arguments {args.command}; put a server's argv after --")
        args.command = command
    elif command:
        parser.error("only `modeld deploy` takes arguments after --")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", VersionMismatchWarning)
        try:
            code = int(args.func(args))
        except KeyboardInterrupt:
            print("modeld: interrupted", file=sys.stderr)
            code = 130
        except exc.ModeldError as error:
            print(f"modeld: {_one_line(error)}", file=sys.stderr)
            code = next(c for cls, c in EXIT_CODES if isinstance(error, cls))
        except BrokenPipeError:
            code = 0
        except OSError as error:  # the last resort: still one line, never a traceback
            print(f"modeld: {error.strerror or error}" + (f": {error.filename}" if error.filename else ""), file=sys.stderr)
            code = 1
        for w in caught:
            print(f"modeld: warning: {w.message}", file=sys.stderr)
    return code


def _one_line(error: exc.ModeldError | str) -> str:
    """An error on one line: of the server's log excerpt it carries (``log_excerpt``), only the last line.

    A service's ``last_error`` is text (the status records no excerpt apart): read as the error it was.
    """
    if isinstance(error, str):
        error = exc.ModeldError(error)
    lines = [line.strip() for line in (error.log_excerpt or "").splitlines() if line.strip()]
    head = error.headline
    return f"{head} (last log line: {lines[-1]})" if lines else " ".join(head.split())


if __name__ == "__main__":
    sys.exit(main())
