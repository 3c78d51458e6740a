"""The flavor and deployer registries, kept as JSON in the modeld home.

    $MODELD_HOME/flavors.json     {"<flavor>": {"source", "config_source", "registered_at"}}
    $MODELD_HOME/deployers.json   {"<deployer>": {"flavor", "config", "registered_at"}}

The built-in flavors, ``local`` and ``ray``, and a ``local`` deployer
(default settings) always exist and are not stored; none can be overridden
or deleted. ``ray`` needs the ``ray`` extra only when a deployer of it is
used: its config is validated without importing ray. ``config`` holds only the values the user set, validated and in
JSON form, so a flavor's later defaults apply when the deployer is loaded.

What gets imported when, as ZenML's guide lays out: registering a flavor
imports the flavor class; registering a deployer imports its config class
too, to validate the values; only :meth:`FlavorRegistry.get_deployer`
imports the implementation. So both can be registered where the
implementation's dependencies are missing.

Writes are atomic (temp file, fsync, rename) under ``<file>.lock``, so
concurrent ``modeld`` commands never lose each other's changes; reads take
no lock since a renamed file is always whole.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypedDict

from pydantic import ValidationError

from daemon.exceptions import FlavorError, StorageError
from daemon.paths import Paths, default_home
from deployers.base import BaseModelDeployer, BaseModelDeployerConfig, BaseModelDeployerFlavor
from deployers.local.flavor import LOCAL_FLAVOR, LocalDaemonModelDeployerConfig, LocalDaemonModelDeployerFlavor
from deployers.ray.flavor import RAY_FLAVOR, RayServeModelDeployerConfig, RayServeModelDeployerFlavor
from deployers.sources import implementation_of, load_flavor, source_of

__all__ = [
    "BUILTIN_DEPLOYER",
    "DeployerInfo",
    "FlavorInfo",
    "FlavorRegistry",
    "default_home",
    "get_deployer",
    "parse_key_values",
]

BUILTIN_DEPLOYER = "local"
LOCK_TIMEOUT = 30.0  # seconds; only another modeld command editing the same file holds it
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# The flavors that ship with modeld, by name: known without registration, never overridden.
BUILTIN_FLAVORS: dict[str, type[BaseModelDeployerFlavor]] = {
    LOCAL_FLAVOR: LocalDaemonModelDeployerFlavor,
    RAY_FLAVOR: RayServeModelDeployerFlavor,
}


class FlavorInfo(TypedDict):
    name: str
    source: str
    config_source: str
    builtin: bool
    registered_at: float | None


class DeployerInfo(TypedDict):
    name: str
    flavor: str
    config: dict[str, Any]
    builtin: bool
    registered_at: float | None


def parse_key_values(items: Iterable[str]) -> dict[str, str]:
    """``["a=1", "b=x=y"]`` → ``{"a": "1", "b": "x=y"}``, as given on a command line."""
    values: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise FlavorError(f"expected key=value, got {item!r}")
        if key in values:
            raise FlavorError(f"setting {key!r} given twice")
        values[key] = value
    return values


def _validation_message(exc: ValidationError, config_class: type[BaseModelDeployerConfig]) -> str:
    """One line naming every bad field, from pydantic's list of errors."""
    problems = []
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"]) or "config"
        if err["type"] == "extra_forbidden":
            known = ", ".join(config_class.model_fields) or "none"
            problems.append(f"{field}: unknown setting (known: {known})")
        elif err["type"] == "missing":
            problems.append(f"{field}: required")
        else:
            problems.append(f"{field}: {err['msg']} (got {err['input']!r})")
    return "; ".join(problems)


def _validate_config(flavor: BaseModelDeployerFlavor, values: Mapping[str, Any], what: str) -> BaseModelDeployerConfig:
    config_class: type[BaseModelDeployerConfig] = flavor.config_class
    try:
        return config_class.model_validate(dict(values))
    except ValidationError as exc:
        raise FlavorError(f"invalid config for {what}: {_validation_message(exc, config_class)}") from exc
    except Exception as exc:  # a custom validator may raise anything
        raise FlavorError(f"invalid config for {what}: {type(exc).__name__}: {exc}") from exc


class FlavorRegistry:
    """Flavors and deployers registered in one modeld home."""

    def __init__(self, home: str | os.PathLike[str] | None = None) -> None:
        # Remember whether the home was chosen, so a ``local`` deployer without a
        # home of its own talks to this home's daemon, and otherwise keeps the
        # client's defaults (which also honour $MODELD_SOCKET).
        self._explicit_home = home is not None
        self.paths = Paths(home)
        self.home: Path = self.paths.home

    # -- files --------------------------------------------------------------

    def _read(self, path: Path) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read {path}: {exc}; fix or remove the file") from exc
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise StorageError(f"cannot read {path}: expected an object of objects; fix or remove the file")
        return data

    @contextmanager
    def _editing(self, path: Path) -> Iterator[dict[str, dict[str, Any]]]:
        """Yield the file's contents under its lock; write them back if the block succeeds."""
        # Imported here: filelock costs ~70 ms and only writers need it.
        from filelock import FileLock, Timeout

        from daemon.store import atomic_write

        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock = FileLock(f"{path}.lock", timeout=LOCK_TIMEOUT, mode=0o600)
            lock.acquire()
        except Timeout as exc:
            raise StorageError(f"{path}.lock is held by another process for more than {LOCK_TIMEOUT:g}s") from exc
        except OSError as exc:
            raise StorageError(f"cannot lock {path}: {exc.strerror or exc}") from exc
        try:
            data = self._read(path)
            yield data
            atomic_write(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
        finally:
            lock.release()

    # -- flavors ------------------------------------------------------------

    def register_flavor(self, source: str) -> FlavorInfo:
        """Import and check the flavor class at ``source`` and remember it under its name."""
        flavor = load_flavor(source)
        name = flavor.name
        if name in BUILTIN_FLAVORS:
            raise FlavorError(f"flavor {source!r} is named {name!r}, which is built in and cannot be overridden")
        entry = {
            "source": source.strip(),
            "config_source": source_of(flavor.config_class),
            "registered_at": time.time(),
        }
        with self._editing(self.paths.flavors) as flavors:
            flavors[name] = entry
        return self._flavor_info(name, entry)

    def delete_flavor(self, name: str) -> None:
        if name in BUILTIN_FLAVORS:
            raise FlavorError(f"flavor {name!r} is built in and cannot be deleted")
        users = sorted(n for n, d in self._read(self.paths.deployers).items() if d.get("flavor") == name)
        if users:
            raise FlavorError(f"flavor {name!r} is used by deployer(s) {', '.join(users)}; delete them first")
        with self._editing(self.paths.flavors) as flavors:
            if name not in flavors:
                raise self._unknown_flavor(name, flavors)
            del flavors[name]

    def list_flavors(self) -> list[FlavorInfo]:
        infos = [
            FlavorInfo(
                name=name,
                source=source_of(cls),
                config_source=source_of(cls().config_class),
                builtin=True,
                registered_at=None,
            )
            for name, cls in BUILTIN_FLAVORS.items()
        ]
        stored = self._read(self.paths.flavors)
        infos += [self._flavor_info(name, stored[name]) for name in sorted(stored) if name not in BUILTIN_FLAVORS]
        return infos

    def get_flavor(self, name: str) -> BaseModelDeployerFlavor:
        """The flavor registered as ``name``, imported and checked again."""
        if name in BUILTIN_FLAVORS:
            return BUILTIN_FLAVORS[name]()
        stored = self._read(self.paths.flavors)
        if name not in stored:
            raise self._unknown_flavor(name, stored)
        source = str(stored[name].get("source", ""))
        flavor = load_flavor(source)
        if flavor.name != name:
            raise FlavorError(f"flavor {name!r} (from {source!r}) now calls itself {flavor.name!r}; register it again")
        return flavor

    @staticmethod
    def _flavor_info(name: str, entry: dict[str, Any]) -> FlavorInfo:
        return FlavorInfo(
            name=name,
            source=str(entry.get("source", "")),
            config_source=str(entry.get("config_source", "")),
            builtin=False,
            registered_at=entry.get("registered_at"),
        )

    @staticmethod
    def _unknown_flavor(name: str, stored: Mapping[str, Any]) -> FlavorError:
        known = ", ".join([*BUILTIN_FLAVORS, *sorted(n for n in stored if n not in BUILTIN_FLAVORS)])
        return FlavorError(
            f"unknown flavor {name!r}; known flavors: {known} "
            "(register one with `modeld flavor register <package.module.FlavorClass>`)"
        )

    # -- deployers ----------------------------------------------------------

    def register_deployer(self, name: str, flavor: str, values: Mapping[str, Any] | None = None) -> DeployerInfo:
        """Validate ``values`` against the flavor's config and remember the deployer.

        Imports the flavor and its config class, never the implementation.
        Registering an existing name replaces it.
        """
        if not _NAME.match(name):
            raise FlavorError(
                f"invalid deployer name {name!r}: use letters, digits, '_', '.' and '-', starting with a letter or digit"
            )
        if name == BUILTIN_DEPLOYER:
            raise FlavorError(f"deployer {name!r} is built in; register yours under another name")
        flavor_obj = self.get_flavor(flavor)
        config = _validate_config(flavor_obj, values or {}, f"deployer {name!r} (flavor {flavor!r})")
        entry = {
            "flavor": flavor_obj.name,
            "config": config.model_dump(mode="json", exclude_unset=True),
            "registered_at": time.time(),
        }
        with self._editing(self.paths.deployers) as deployers:
            deployers[name] = entry
        return self._deployer_info(name, entry)

    def list_deployers(self) -> list[DeployerInfo]:
        infos = [DeployerInfo(name=BUILTIN_DEPLOYER, flavor=LOCAL_FLAVOR, config={}, builtin=True, registered_at=None)]
        stored = self._read(self.paths.deployers)
        infos += [self._deployer_info(name, stored[name]) for name in sorted(stored) if name != BUILTIN_DEPLOYER]
        return infos

    def get_deployer(self, name: str = BUILTIN_DEPLOYER) -> BaseModelDeployer:
        """A ready deployer; the only call that imports a flavor's implementation."""
        if name == BUILTIN_DEPLOYER:
            flavor: BaseModelDeployerFlavor = LocalDaemonModelDeployerFlavor()
            values: dict[str, Any] = {}
        else:
            stored = self._read(self.paths.deployers)
            if name not in stored:
                known = ", ".join([BUILTIN_DEPLOYER, *sorted(n for n in stored if n != BUILTIN_DEPLOYER)])
                raise FlavorError(f"unknown deployer {name!r}; known deployers: {known}")
            flavor_name = str(stored[name].get("flavor", ""))
            try:
                flavor = self.get_flavor(flavor_name)
            except FlavorError as exc:
                raise FlavorError(f"deployer {name!r}: {exc.message}") from (exc.__cause__ or exc)
            values = dict(stored[name].get("config") or {})
        config = _validate_config(flavor, values, f"deployer {name!r} (flavor {flavor.name!r}, as stored)")
        if isinstance(config, LocalDaemonModelDeployerConfig) and config.home is None and self._explicit_home:
            config = config.model_copy(update={"home": str(self.home)})
        if isinstance(config, RayServeModelDeployerConfig) and config.home is None:
            # Its records: $MODELD_HOME/ray/<deployer name>, in this registry's home.
            config = config.model_copy(update={"home": str(self.home / "ray" / name)})
        implementation = implementation_of(flavor, f"deployer {name!r} (flavor {flavor.name!r})")
        try:
            return implementation(config=config, name=name)
        except Exception as exc:
            raise FlavorError(
                f"deployer {name!r}: {source_of(implementation)}(config=..., name=...) failed: {type(exc).__name__}: {exc}"
            ) from exc

    def delete_deployer(self, name: str) -> None:
        if name == BUILTIN_DEPLOYER:
            raise FlavorError(f"deployer {name!r} is built in and cannot be deleted")
        with self._editing(self.paths.deployers) as deployers:
            if name not in deployers:
                raise FlavorError(f"unknown deployer {name!r}")
            del deployers[name]

    @staticmethod
    def _deployer_info(name: str, entry: dict[str, Any]) -> DeployerInfo:
        return DeployerInfo(
            name=name,
            flavor=str(entry.get("flavor", "")),
            config=dict(entry.get("config") or {}),
            builtin=False,
            registered_at=entry.get("registered_at"),
        )


def get_deployer(name: str = BUILTIN_DEPLOYER, home: str | os.PathLike[str] | None = None) -> BaseModelDeployer:
    """The deployer registered as ``name`` in ``home`` (default: the built-in ``local``)."""
    return FlavorRegistry(home).get_deployer(name)
