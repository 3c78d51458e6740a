"""The file ``modeld apply`` reads and ``modeld export`` writes: a set of services as TOML.

::

    project = "laptop"                 # stored in each service's ServiceConfig.project

    [services.iris]                    # NAME: the service's name; model_name defaults to it
    model_uri = "models/iris.py:model" # relative paths resolve against this file's folder
    env = {LEVEL = "debug", API_KEY = {from_env = "API_KEY"}}

    [services.iris.restart]
    max_restarts = 3

A table's keys are :class:`~daemon.config.ServiceConfig`'s fields (``name`` and ``project`` come
from the table's name and the top-level ``project``). An env value ``{from_env = "KEY"}`` is read
from the environment of the process that applies the file.

Invariants:

* :func:`read_desired` validates the whole file, or raises one :class:`ApplyFileError` naming the
  file, and each service and field that is wrong: nothing is applied from a file that does not
  validate;
* :func:`dump_toml` writes what ``tomllib`` reads back as the same values (tested by round trip),
  and never a secret env value: those are written ``{from_env = "KEY"}``.
"""

from __future__ import annotations

import math
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..config import PICKLE_SUFFIXES, ServiceConfig
from ..exceptions import InvalidRequest

FROM_ENV = "from_env"
# Filled in by the client when unset (its interpreter, its folder, its PATH): when a file leaves
# them unset they are not compared, so applying it from another shell or venv changes nothing.
CLIENT_DEFAULTS = ("python", "working_dir", "search_path")
MAX_FILE_BYTES = 16 << 20  # the largest file apply reads (a file of 1,000 services is ~100 KiB)
_IDENTITY = ("name", "project")  # from the table's name and the top-level key, never from a table


class ApplyFileError(InvalidRequest):
    """A file to apply that cannot be read or does not validate (a 400; the CLI's exit code 2)."""


@dataclass
class Desired:
    """A validated file: its services by name, and which fields each one set (the others are defaults)."""

    source: str
    project: str
    services: dict[str, ServiceConfig]
    given: dict[str, set[str]] = field(default_factory=dict)


def service_key(config: ServiceConfig) -> str:
    """The name a service has in a file: its name, else its model name (a service deployed without a name)."""
    return config.name or config.model_name


def read_desired(source: str | os.PathLike[str] | Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Desired:
    """The file at ``source`` (or a mapping shaped like one, relative paths then against the working
    directory), validated whole; ApplyFileError naming the file, the service and the field."""
    environ = os.environ if environ is None else environ
    if isinstance(source, Mapping):
        return _validate(dict(source), "<dict>", Path.cwd(), environ)
    path = Path(source).expanduser().absolute()
    try:
        data = tomllib.loads(_read(path).decode())
    except tomllib.TOMLDecodeError as exc:
        raise ApplyFileError(f"{path}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ApplyFileError(f"{path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    return _validate(data, str(path), path.parent, environ)


_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}  # fmt: skip


def _read(path: Path) -> bytes:
    """The bytes of the regular file at ``path``, of at most MAX_FILE_BYTES: a device (/dev/zero) would
    be read without end and a FIFO would block for a writer, so neither is read (opened without
    blocking, then checked); ApplyFileError naming the file and the cap."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise ApplyFileError(f"{path}: {what}, not a regular file: apply reads a TOML file; nothing was applied")
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)  # (a file that grows meanwhile stops at the cap too)
    if len(data) > MAX_FILE_BYTES:
        raise ApplyFileError(
            f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB, the most apply reads (a set of services is far "
            "smaller); nothing was applied"
        )
    return data


def _validate(data: dict[str, Any], source: str, base: Path, environ: Mapping[str, str]) -> Desired:
    problems: list[str] = []
    unknown = sorted(set(data) - {"project", "services"})
    if unknown:
        problems.append(f"{unknown[0]}: unknown key (a file has a top-level project and [services.NAME] tables)")
    project = data.get("project", "")
    if not isinstance(project, str):
        problems.append(f"project: must be a string, not {type(project).__name__}")
        project = ""
    tables = data.get("services", {})
    if not isinstance(tables, dict):
        problems.append("services: must be tables, [services.NAME]")
        tables = {}
    services: dict[str, ServiceConfig] = {}
    given: dict[str, set[str]] = {}
    for name, table in tables.items():
        where = f"services.{_key(name)}"
        if not isinstance(table, dict):
            problems.append(f"{where}: must be a table of ServiceConfig's fields")
            continue
        if not name:
            problems.append(f"{where}: a service's name cannot be empty")
            continue
        fields = dict(table)
        for key in _IDENTITY:
            if key in fields:
                problems.append(
                    f"{where}.{key}: not a key of a service's table (it is the table's name or the top-level project)"
                )
                fields.pop(key)
        fields = _resolved(fields, base)
        env = fields.get("env")
        if isinstance(env, dict):
            fields["env"] = {k: _env_value(v, f"{where}.env.{k}", environ, problems) for k, v in env.items()}
        fields.setdefault("model_name", name)
        try:
            services[name] = ServiceConfig(**fields, name=name, project=project)
        except ValidationError as exc:
            problems.extend(_located(where, exc))
            continue
        given[name] = set(fields)
        missing = _missing_model(services[name])
        if missing:
            problems.append(f"{where}.model_uri: {missing}")
    if problems:
        raise ApplyFileError(f"{source}: " + "; ".join(problems) + "; nothing was applied")
    return Desired(source, project, services, given)


def _missing_model(config: ServiceConfig) -> str | None:
    """What is wrong with the file a python or pickle model_uri names (already made absolute against
    the file's folder), checked here so that a typo fails the file rather than its service mid-apply."""
    parts = model_file(config.model_uri, config.model_type)
    if parts is None or os.path.isfile(parts[1]):
        return None
    path = parts[1]
    return f"{path}: no such file" if not os.path.exists(path) else f"{path}: not a file"


def _env_value(value: Any, where: str, environ: Mapping[str, str], problems: list[str]) -> Any:
    if not isinstance(value, dict):
        return value  # a string, or what ServiceConfig refuses by its own location
    if set(value) != {FROM_ENV} or not isinstance(value[FROM_ENV], str):
        problems.append(f'{where}: a value is a string or {{{FROM_ENV} = "KEY"}}')
        return ""
    key = value[FROM_ENV]
    if key not in environ:
        problems.append(f"{where}: {FROM_ENV} = {key!r}, but {key} is not set in the environment of this apply")
        return ""
    return environ[key]


def _located(where: str, exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")
        out.append(f"{where}.{loc}: {message}" if loc else f"{where}: {message}")
    return out


def _resolved(fields: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative paths of a table against the file's folder: working_dir, python (a path, not a bare
    name), a python model's ``file.py:attr``, a pickle file, and a command's program when it is a
    relative path (``./serve.sh``) that exists there."""

    def under(text: str) -> str:
        return str(base / text) if text and not os.path.isabs(os.path.expanduser(text)) else os.path.expanduser(text)

    out = dict(fields)
    for key in ("working_dir",):
        if isinstance(out.get(key), str) and out[key]:
            out[key] = under(out[key])
    if isinstance(out.get("python"), str) and "/" in out["python"]:
        out["python"] = under(out["python"])
    uri, command = out.get("model_uri"), out.get("command")
    kind = out.get("model_type") or (
        "command" if command else "pickle" if isinstance(uri, str) and uri.endswith(PICKLE_SUFFIXES) else "python"
    )
    if isinstance(uri, str) and uri and isinstance(kind, str):
        out["model_uri"] = anchored(uri, kind, base)
    if isinstance(command, list) and command and isinstance(command[0], str):
        program = command[0]
        if "/" in program and not os.path.isabs(program) and (base / program).exists():
            out["command"] = [str(base / program), *command[1:]]
    return out


def model_file(uri: str, model_type: str) -> tuple[str, str, str] | None:
    """The file a python or pickle ``model_uri`` names, as ``(before, path, after)`` with ``uri ==
    before + path + after`` (``file://`` before a pickle's path, ``:attr`` after a python file's);
    None when it names none: a ``package.module:attr`` (imported by name), a command, no uri."""
    if model_type == "pickle":
        before = "file://" if uri.startswith("file://") else ""
        path, after = uri[len(before) :], ""
    elif model_type == "python":
        target, sep, attr = uri.rpartition(":")
        path, after = (target, sep + attr) if sep else (uri, "")
        before = ""
        if not (path.endswith(".py") or "/" in path):
            return None
    else:
        return None
    return (before, path, after) if path else None


def anchored(uri: str, model_type: str, base: str | os.PathLike[str]) -> str:
    """``uri`` with the (``~``-expanded) file it names made absolute against ``base`` (as the model
    server, started in ``base``, reads it); a uri naming no file, as it is."""
    parts = model_file(uri, model_type)
    if parts is None:
        return uri
    before, path, after = parts
    path = os.path.expanduser(path)
    return before + (path if os.path.isabs(path) else os.path.join(base, path)) + after


# ------------------------------------------------------------------ writing


def export_text(project: str, configs: list[ServiceConfig]) -> str:
    """The TOML of ``configs`` (all of ``project``), as ``apply`` reads it back: the fields that
    differ from their defaults; secret env values as ``{from_env = "KEY"}``."""
    defaults = ServiceConfig.model_construct()
    lines = ["# written by `modeld export`; `modeld apply -f FILE` makes the daemon's services match it"]
    if project:
        lines.append(f"project = {_value(project)}")
    for config in configs:
        name = service_key(config)
        table: dict[str, Any] = {}
        for key in type(config).model_fields:
            value = getattr(config, key)
            if key in _IDENTITY or (value == name if key == "model_name" else value == getattr(defaults, key, None)):
                continue  # (a model_name other than the name is written, "" too: the file's default is the name)
            if key == "env":
                value = {k: ({FROM_ENV: k} if config.is_secret(k) else v) for k, v in value.items()}
            table[key] = value.model_dump() if isinstance(value, BaseModel) else value
        nested = {k: v for k, v in table.items() if isinstance(v, dict) and k != "env"}  # restart: its own table
        if "restart" in nested:
            nested["restart"] = {k: v for k, v in nested["restart"].items() if v != getattr(defaults.restart, k)}
        lines += ["", f"[services.{_key(name)}]"]
        lines += [f"{_key(k)} = {_value(v)}" for k, v in table.items() if k not in nested and v is not None]
        for sub, values in nested.items():
            lines += ["", f"[services.{_key(name)}.{_key(sub)}]"]
            lines += [f"{_key(k)} = {_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


_BARE = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _key(key: str) -> str:
    return key if _BARE.fullmatch(key) else _string(key)


def _string(text: str) -> str:
    """A TOML basic string: the escapes it has, \\uXXXX for the other control characters."""
    out = []
    for c in text:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04X}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _value(value: Any) -> str:
    """A TOML value: the types a ServiceConfig holds (str, bool, int, float, lists and tables of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} cannot be written (a config holds finite numbers)")
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(str(k))} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {type(value).__name__}")
