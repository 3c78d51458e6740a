"""The parser of every ``modeld`` command, and :func:`main`, which runs one and maps its error to an exit code."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from typing import Any

from daemon import exceptions as exc
from daemon.client import VersionMismatchWarning
from daemon.filters import FIND_FILTERS
from daemon.models import ServiceConfig, ServiceState
from deployers.cli import target
from deployers.cli.apply_commands import cmd_apply, cmd_export
from deployers.cli.daemon_commands import cmd_daemon_run, cmd_daemon_start, cmd_daemon_status, cmd_daemon_stop
from deployers.cli.deployer_commands import cmd_redeploy
from deployers.cli.errors import EXIT_CODES, one_line
from deployers.cli.event_commands import add_events_options, cmd_events
from deployers.cli.login_commands import cmd_daemon_install, cmd_daemon_uninstall
from deployers.cli.options import choices_of, deploy_options, flag_of
from deployers.cli.registry_commands import (
    cmd_deployer_list,
    cmd_deployer_register,
    cmd_deployer_rm,
    cmd_flavor_list,
    cmd_flavor_register,
)
from deployers.cli.service_commands import cmd_deploy, cmd_info, cmd_logs, cmd_ls, cmd_rm, cmd_start, cmd_stop, cmd_unload
from deployers.cli.top import add_top_options, cmd_top
from deployers.cli.values import count, seconds

EPILOG = """\
examples:
  modeld deploy --model-name iris --model-uri examples/iris.py:model --pipeline-name train
  modeld deploy --model-name echo --model-type command --health-path / -- python3 -m http.server {port} --bind {host}
  modeld ls --running
  modeld apply -f models.toml --dry-run
  modeld logs 3f2a -n 50 -f
  modeld events -f
  modeld top
  curl --unix-socket "$MODELD_HOME/modeld.sock" http://modeld/v1/services
  modeld deployer register other --flavor local home=/srv/modeld
  modeld --deployer other ls            (or MODELD_DEPLOYER=other modeld ls)
  modeld --deployer other redeploy --all

one CLI for every deployer: with --deployer NAME (or $MODELD_DEPLOYER), deploy, ls, info, start, stop,
rm, logs and redeploy go through that registered deployer (see `modeld deployer list`), whatever its
flavor, with the same output and exit codes; without it they use the local daemon. The commands only a
local daemon has (daemon, top, events, apply, export, unload) go to a local-flavor deployer's daemon,
and are refused for any other flavor. NAME `local` is the local daemon itself.

state lives in $MODELD_HOME (default $XDG_STATE_HOME/modeld); the daemon starts by itself on first use.
"""


def build_parser(config: type[ServiceConfig] = ServiceConfig) -> argparse.ArgumentParser:
    """The parser of every command; ``config``: the class whose fields are ``deploy``'s options."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--home", default=argparse.SUPPRESS, help="state folder (default: $MODELD_HOME or $XDG_STATE_HOME/modeld)"
    )
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print data as JSON")
    common.add_argument(
        "--deployer",
        metavar="NAME",
        default=argparse.SUPPRESS,
        help="go through this registered deployer, of any flavor (default: $MODELD_DEPLOYER, else the local daemon); "
        "see the end of `modeld --help`",
    )

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
    p.add_argument("--timeout", type=seconds, default=60, help="seconds to wait (default 60)")
    add("status", cmd_daemon_status, "is the daemon running; version, pid, counts, problems found on disk", dsub)
    p = add("run", cmd_daemon_run, "run the daemon in the foreground (for systemd, containers, debugging)", dsub)
    p.add_argument("--apply", metavar="FILE", help="apply this file once the daemon serves (see `modeld apply`)")
    p = add("install", cmd_daemon_install, "start the daemon at login: write and enable a systemd user unit", dsub)
    p.add_argument("--dry-run", action="store_true", help="print the unit, write nothing")
    add("uninstall", cmd_daemon_uninstall, "stop starting the daemon at login: disable and remove the unit", dsub)

    p = add(
        "deploy",
        cmd_deploy,
        "deploy a model (or replace the running version with --replace)",
        epilog="For a command server give its argv after --; {port}, {host} and {model_uri} are filled in.",
        usage="modeld deploy [options] [-- COMMAND ARG ...]",
    )
    for option in deploy_options(config):
        p.add_argument(*option.flags, **option.kwargs)
    p.add_argument(
        "--replace", action="store_true", help="update in place the service of the same name, pipeline, step and model"
    )
    p.add_argument("--timeout", type=seconds, default=300, help="seconds to wait for the server to be healthy (default 300)")
    p.add_argument("--uuid", help="the uuid to give the service")

    p = add("ls", cmd_ls, "list services, with the find filters")
    p.add_argument("--running", action="store_true", help="only services that are active")
    p.add_argument("--state", choices=[s.value for s in ServiceState], help="only services in this state (e.g. scaled_to_zero)")
    p.add_argument("--uuid", help="service uuid (or prefix)")
    for name in FIND_FILTERS:
        p.add_argument(
            flag_of(name),
            choices=choices_of(ServiceConfig.model_fields[name].annotation),
            help=f"only services whose {name} is this",
        )

    p = add("info", cmd_info, "show one service: URLs, state, pid, paths")
    p.add_argument("uuid", help="service uuid (or a unique prefix, or a unique name)")
    p = add("start", cmd_start, "start a stopped service (or restart a hung one) and wait until it is healthy")
    p.add_argument("uuid", nargs="?", help="service uuid (or a unique prefix, or a unique name)")
    p.add_argument(
        "--all", action="store_true", help="start every service that is not running (e.g. after `modeld daemon stop --all`)"
    )
    p.add_argument("--timeout", type=seconds, default=300, help="seconds to wait for it to be healthy (default 300)")
    p = add("unload", cmd_unload, "scale a service to zero now: its server stops, and its next request wakes it")
    p.add_argument("uuid", help="service uuid (or a unique prefix, or a unique name)")
    for name, func, helptext in (
        ("stop", cmd_stop, "stop a service: SIGTERM to its process group, SIGKILL after a grace period"),
        ("rm", cmd_rm, "stop a service and delete it with its files"),
    ):
        p = add(name, func, helptext)
        p.add_argument("uuid", help="service uuid (or a unique prefix, or a unique name)")
        p.add_argument(
            "--timeout",
            type=seconds,
            default=300,
            help="grace period before SIGKILL, if shorter than the service's stop_timeout (default: that, 10 s)",
        )
        p.add_argument("--force", action="store_true", help="SIGKILL at once")

    p = add("apply", cmd_apply, "make the services match a TOML file: create what is missing, replace in place what changed")
    p.add_argument("-f", "--file", required=True, help='the file: project = "..." and [services.NAME] tables')
    p.add_argument("--prune", action="store_true", help="also delete the services of the file's project that it lacks")
    p.add_argument("--dry-run", action="store_true", help="print the plan (create, replace, delete, unchanged); change nothing")
    p.add_argument("--timeout", type=seconds, default=300, help="seconds each deploy or replace may take (default 300)")
    p = add("export", cmd_export, "write the services as a file `modeld apply` takes (secret env values as from_env)")
    p.add_argument("--project", help="only this project's services (default: all, which must be of one project)")
    p.add_argument("-o", "--output", help="write it to this file (default: stdout)")

    p = add(
        "redeploy",
        cmd_redeploy,
        "start again every service whose desired state is running but that is not serving (redeploy_all)",
        epilog="After a reboot or a cluster that lost its services: with --deployer NAME, that deployer's. "
        "Scaled-to-zero services serve on demand and are left as they are.",
    )
    p.add_argument("--all", action="store_true", help="every such service (required: the only form for now)")
    p.add_argument("--timeout", type=seconds, default=300, help="seconds the whole redeploy may take (default 300)")

    p = add("logs", cmd_logs, "print a service's log (stdout and stderr of its server)")
    p.add_argument("uuid", help="service uuid (or a unique prefix, or a unique name)")
    p.add_argument("-n", "--tail", dest="n", type=count, help="only the last N lines")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")

    p = add("events", cmd_events, "print the daemon's events: exits (with code or signal), restarts, health, deploys")
    add_events_options(p)
    p = add("top", cmd_top, "a live view of the services (state, uptime, restarts, memory, CPU, requests/s) and events")
    add_top_options(p)

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
            code = int(target.command(args)(args))
        except KeyboardInterrupt:
            print("modeld: interrupted", file=sys.stderr)
            code = 130
        except exc.ModeldError as error:
            print(f"modeld: {one_line(error)}", file=sys.stderr)
            code = next(c for cls, c in EXIT_CODES if isinstance(error, cls))
        except BrokenPipeError:
            code = 0
        except OSError as error:  # the last resort: still one line, never a traceback
            print(f"modeld: {error.strerror or error}" + (f": {error.filename}" if error.filename else ""), file=sys.stderr)
            code = 1
        for w in caught:
            print(f"modeld: warning: {w.message}", file=sys.stderr)
    return code
