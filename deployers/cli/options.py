"""``modeld deploy``'s options, made from ``ServiceConfig``'s fields, and the config read back from them.

`modeld deploy` has one option per ServiceConfig field (and per field of a nested model, such
as restart), made from the field: --field-name, its type, its description as help and its
default shown. DEPLOY_OVERRIDES says, beside nothing else, where a field is spelled or read
otherwise; a new field needs no entry unless it wants one (tests/test_schema.py adds one).
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from types import NoneType, UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from daemon.models import ServiceConfig
from deployers.cli.errors import UsageError
from deployers.cli.values import seconds, size


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
UNITS: dict[str, Callable[[str], Any]] = {"seconds": seconds, "bytes": size}


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
    annotation: Any = _not_none(field.annotation)  # an optional field's option takes its value's type
    default = field.get_default(call_default_factory=True)
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    unit = extra.get("unit")
    if not isinstance(unit, str):  # json_schema_extra's "unit" is a name (one of UNITS) or absent
        unit = None
    description = field.description or ""
    read = None
    flag = flag_of(name)
    if annotation is bool:  # a flag that sets the other value than the default
        kwargs.update(action="store_const", const=not default, metavar=None)
        flag = "--no-" + flag[2:] if default else flag
        del kwargs["metavar"]
    elif choices_of(annotation):
        kwargs.update(choices=choices_of(annotation), metavar=None)
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


def _not_none(annotation: Any) -> Any:
    """``X`` for ``X | None`` (or ``Optional[X]``); any other annotation as it is."""
    if get_origin(annotation) in (Union, UnionType):
        rest = [arg for arg in get_args(annotation) if arg is not NoneType]
        if len(rest) == 1:
            return rest[0]
    return annotation


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


def choices_of(annotation: Any) -> list[str] | None:
    return [str(a) for a in get_args(annotation)] if get_origin(annotation) is Literal else None


def flag_of(name: str) -> str:
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


def deploy_config(args: argparse.Namespace, config: type[ServiceConfig] = ServiceConfig) -> ServiceConfig:
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
            fields[name] = field.annotation(**fields[name])  # type: ignore[misc]  # annotation is a model class (checked above)
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
