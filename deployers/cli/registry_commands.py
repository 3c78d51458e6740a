"""The commands on the flavor registry: ``modeld flavor register|list`` and ``modeld deployer register|list|rm``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from daemon.paths import Paths
from deployers.cli.output import print_json, table


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
        print_json(flavors)
    else:
        table([[f["name"], f["source"], "yes" if f.get("builtin") else "no"] for f in flavors], ["NAME", "SOURCE", "BUILT-IN"])
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
        print_json(deployers)
    else:
        table([[d["name"], d["flavor"], json.dumps(d.get("config", {}))] for d in deployers], ["NAME", "FLAVOR", "CONFIG"])
    return 0


def cmd_deployer_rm(args: argparse.Namespace) -> int:
    _registry(args).delete_deployer(args.name)
    print(json.dumps({"removed": args.name}) if args.json else f"deployer {args.name!r} removed")
    return 0
