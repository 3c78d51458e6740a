"""Turning a source path (``package.module.ClassName``) into a checked flavor.

Flavors are chosen by import strings and resolved lazily, as uvicorn picks
its protocol classes. Every way a source can be wrong becomes one
:class:`~daemon.exceptions.FlavorError` that says what to fix. Checking a
flavor reads ``name``, ``type`` and ``config_class`` but never
``implementation_class``: that property imports the implementation, whose
dependencies may not be installed where the flavor is registered.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from daemon.exceptions import FlavorError
from deployers.base import (
    BaseModelDeployer,
    BaseModelDeployerConfig,
    BaseModelDeployerFlavor,
    StackComponentType,
)


def source_of(cls: type) -> str:
    """The source path that :func:`import_source` turns back into ``cls``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _split(source: str) -> tuple[str, str]:
    """``pkg.mod.Class`` or ``pkg.mod:Outer.Class`` → (module, attribute path)."""
    if ":" in source:
        module, _, attr = source.partition(":")
    else:
        module, _, attr = source.rpartition(".")
    parts = module.split(".") + attr.split(".")
    if not module or not attr or not all(part.isidentifier() for part in parts):
        raise FlavorError(
            f"invalid source path {source!r}: expected 'package.module.ClassName' (dotted Python identifiers, the class last)"
        )
    return module, attr


def import_source(source: str) -> Any:
    """Import the module of ``source`` and return the object it names."""
    module_name, attr = _split(source.strip())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise FlavorError(
            f"cannot import module {module_name!r} (from {source!r}): {type(exc).__name__}: {exc}; "
            "is it installed, or on PYTHONPATH?"
        ) from exc
    except Exception as exc:  # a module that breaks on import, whatever the way
        raise FlavorError(f"importing module {module_name!r} (from {source!r}) failed: {type(exc).__name__}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise FlavorError(f"module {module_name!r} has no {attr!r} (from {source!r})") from None
    return obj


def _read(flavor: BaseModelDeployerFlavor, prop: str, source: str) -> Any:
    try:
        return getattr(flavor, prop)
    except Exception as exc:
        raise FlavorError(f"flavor {source!r}: reading its {prop} failed: {type(exc).__name__}: {exc}") from exc


def load_flavor(source: str) -> BaseModelDeployerFlavor:
    """Import, instantiate and check the flavor class named by ``source``."""
    cls = import_source(source)
    if not (inspect.isclass(cls) and issubclass(cls, BaseModelDeployerFlavor)):
        what = f"class {cls.__qualname__}" if inspect.isclass(cls) else f"a {type(cls).__name__}"
        raise FlavorError(f"{source!r} is {what}, not a subclass of deployers.BaseModelDeployerFlavor")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise FlavorError(f"flavor {source!r} is abstract: it does not implement {missing}")
    try:
        flavor = cls()
    except Exception as exc:
        raise FlavorError(f"flavor {source!r} cannot be instantiated: {type(exc).__name__}: {exc}") from exc
    check_flavor(flavor, source)
    return flavor


def check_flavor(flavor: BaseModelDeployerFlavor, source: str) -> None:
    """Refuse a flavor whose name, type or config class is unusable."""
    name = _read(flavor, "name", source)
    if not isinstance(name, str) or not name.strip():
        raise FlavorError(f"flavor {source!r} has an empty name (got {name!r}); its `name` must be a non-empty string")
    if name != name.strip() or any(ch.isspace() for ch in name):
        raise FlavorError(f"flavor {source!r} has a name with whitespace ({name!r})")
    kind = _read(flavor, "type", source)
    if kind != StackComponentType.MODEL_DEPLOYER:
        raise FlavorError(
            f"flavor {source!r} has type {kind!r}; a model deployer flavor must have type "
            f"{StackComponentType.MODEL_DEPLOYER.value!r}"
        )
    config_class = _read(flavor, "config_class", source)
    if not (inspect.isclass(config_class) and issubclass(config_class, BaseModelDeployerConfig)):
        raise FlavorError(
            f"flavor {source!r}: config_class {config_class!r} is not a subclass of deployers.BaseModelDeployerConfig"
        )


def implementation_of(flavor: BaseModelDeployerFlavor, what: str = "") -> type[BaseModelDeployer]:
    """The flavor's implementation class: the only place it gets imported.

    ``what`` names the caller's object in messages (default: the flavor).
    """
    what = what or f"flavor {flavor.name!r}"
    try:
        impl = flavor.implementation_class
    except Exception as exc:  # ImportError above all: its dependencies are missing here
        raise FlavorError(f"{what}: cannot load its implementation: {type(exc).__name__}: {exc}") from exc
    if not (inspect.isclass(impl) and issubclass(impl, BaseModelDeployer)):
        raise FlavorError(f"{what}: implementation_class {impl!r} is not a subclass of deployers.BaseModelDeployer")
    if inspect.isabstract(impl):
        missing = ", ".join(sorted(impl.__abstractmethods__))
        raise FlavorError(f"{what}: implementation {source_of(impl)} does not implement {missing}")
    return impl
