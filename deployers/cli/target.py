"""``--deployer NAME`` (or ``$MODELD_DEPLOYER``): which deployer a command goes through.

Without one (or with the built-in ``local``), every command runs as it always has, on the local
daemon of ``--home``. With one, registered in ``--home``'s registry:

- deploy, ls, info, start, stop, rm, logs and redeploy go through its BaseModelDeployer methods
  (``deployer_commands``), with the same output and exit codes;
- the commands only a local daemon has (daemon, top, events, apply, export, unload) run on the
  daemon of a ``local``-flavor deployer (its ``home``), and are refused for any other flavor;
- ``flavor`` and ``deployer`` manage the registry itself: they refuse an explicit ``--deployer``
  and ignore ``$MODELD_DEPLOYER``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from daemon import exceptions as exc
from deployers.base import BaseModelDeployer
from deployers.cli import deployer_commands as via, service_commands as plain
from deployers.cli.deployer_commands import cmd_redeploy
from deployers.cli.errors import UsageError
from deployers.cli.registry_commands import (
    cmd_deployer_list,
    cmd_deployer_register,
    cmd_deployer_rm,
    cmd_flavor_list,
    cmd_flavor_register,
)

ENV = "MODELD_DEPLOYER"
BUILTIN_DEPLOYER = "local"  # deployers.registry's: the local daemon itself (a test holds them equal)
Command = Callable[[argparse.Namespace], int]

VIA_DEPLOYER: dict[Command, Callable[[argparse.Namespace, BaseModelDeployer], int]] = {
    plain.cmd_deploy: via.deploy,
    plain.cmd_ls: via.ls,
    plain.cmd_info: via.info,
    plain.cmd_start: via.start,
    plain.cmd_stop: via.stop,
    plain.cmd_rm: via.rm,
    plain.cmd_logs: via.logs,
    cmd_redeploy: via.redeploy,
}
ANY_DEPLOYER = "deploy, ls, info, start, stop, rm, logs and redeploy"
REGISTRY: set[Command] = {cmd_flavor_register, cmd_flavor_list, cmd_deployer_register, cmd_deployer_list, cmd_deployer_rm}


def command(args: argparse.Namespace) -> Command:
    """What runs ``args``' command: its own function, or its twin over the deployer named."""
    func: Command = args.func
    given = getattr(args, "deployer", None)
    name = given if given is not None else os.environ.get(ENV, "")
    if func in REGISTRY:
        if given:
            raise UsageError(f"--deployer: `modeld {_words(args)}` manages the registry and uses no deployer; leave it out")
        return func
    if not name or name == BUILTIN_DEPLOYER:
        return func
    # Only with a deployer named: the plain commands import nothing more than they did.
    from deployers.local.deployer import LocalDaemonModelDeployer
    from deployers.registry import FlavorRegistry

    registry = FlavorRegistry(args.home)
    try:
        deployer = registry.get_deployer(name)
    except exc.ModeldError as error:
        if given is None:  # say where a name the user did not type came from
            error.args = (f"${ENV}={name}: {error.args[0] if error.args else error}", *error.args[1:])
        raise
    twin = VIA_DEPLOYER.get(func)
    if twin is not None:
        return lambda a: twin(a, deployer)
    if isinstance(deployer, LocalDaemonModelDeployer):  # a daemon of this machine: these commands go to it
        if deployer.config.socket:
            raise UsageError(
                f"`modeld {_words(args)}` with deployer {name!r}: it sets socket={deployer.config.socket}, "
                "and this command reaches a daemon by its home; give --home instead"
            )
        if deployer.config.home is not None:
            args.home = deployer.config.home
        return func
    flavor = next((d["flavor"] for d in registry.list_deployers() if d["name"] == name), "?")
    raise UsageError(
        f"`modeld {_words(args)}` works on the local daemon only, and deployer {name!r} is of flavor {flavor!r}; "
        f"through any deployer: {ANY_DEPLOYER}"
        + (f" (the deployer came from ${ENV}; unset it for the local daemon)" if given is None else "")
    )


def _words(args: argparse.Namespace) -> str:
    """The command as typed: ``daemon status``, ``top``."""
    words = [args.command_name]
    words += [getattr(args, f"{args.command_name}_command", None) or ""]
    return " ".join(w for w in words if w)
