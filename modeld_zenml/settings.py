"""modeld's settings as fields of the ZenML deployment config, made from ``daemon.config.ServiceConfig``.

ZenML's own ``ServiceConfig`` has a service's identity (``service_name``,
``description``, ``pipeline_name``, ``pipeline_step_name``, ``model_name``);
every other field of modeld's ``ServiceConfig`` becomes a field of
``ModeldDeploymentConfig`` here, with modeld's description, so a new modeld
setting reaches ZenML without being written down again. This module imports
no ZenML: the fields are made, and tested, without it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional, TypeVar, cast

from pydantic import BaseModel, Field

from daemon.config import ServiceConfig

M = TypeVar("M", bound=BaseModel)

# modeld's fields that ZenML's ServiceConfig has already, by the name ZenML gives them.
FROM_ZENML = {
    "name": "service_name",
    "description": "description",
    "pipeline_name": "pipeline_name",
    "pipeline_step_name": "pipeline_step_name",
    "model_name": "model_name",
}
# Not a setting of a ZenML deployment: ZenML names its service types itself.
LEFT_OUT = ("service_type",)
# Always recorded as modeld types them ("" when not given). Every other setting is None unless
# given, which leaves modeld's default (so a default changed in modeld applies to ZenML's records).
RECORDED = ("pipeline_run_id", "model_uri")


def run_settings(config: type[ServiceConfig] = ServiceConfig) -> dict[str, tuple[Any, Any]]:
    """The fields, ``{name: (annotation, FieldInfo)}``, that ZenML's deployment config adds for modeld."""
    fields: dict[str, tuple[Any, Any]] = {}
    for name, field in config.model_fields.items():
        if name in FROM_ZENML or name in LEFT_OUT:
            continue
        if name in RECORDED:
            fields[name] = (field.annotation, Field(field.get_default(call_default_factory=True), description=field.description))
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            annotation = dict[str, Any]  # a nested model (restart) is kept as given, a dict; modeld validates it
        # Optional[], not "annotation | None": an annotation may be None or a string, which have no "|".
        fields[name] = (Optional[annotation], Field(None, description=field.description))  # noqa: UP045
    return fields


def with_run_settings(base: type[M], name: str, module: str, config: type[ServiceConfig] = ServiceConfig) -> type[M]:
    """A subclass of ``base`` with the fields of :func:`run_settings`, made as a class statement makes it
    (through ``base``'s metaclass: ZenML's typed models name themselves from ``__module__`` and ``__qualname__``)."""
    fields = run_settings(config)
    namespace: dict[str, Any] = {
        "__module__": module,
        "__qualname__": name,
        "__doc__": f"modeld's run settings, made from {config.__name__}'s fields (modeld_zenml/settings.py).",
        "__annotations__": {key: annotation for key, (annotation, _) in fields.items()},
        **{key: info for key, (_, info) in fields.items()},
    }
    metaclass: type[type] = type(base)
    # A subclass of base, which mypy cannot see through a metaclass called by hand.
    return cast("type[M]", metaclass(name, (base,), namespace))


def modeld_fields(zenml_config: Any, settings: Iterable[str]) -> dict[str, Any]:
    """The keyword arguments of modeld's ServiceConfig that a ZenML deployment config describes."""
    fields = {name: getattr(zenml_config, zenml_name) for name, zenml_name in FROM_ZENML.items()}
    fields.update({key: getattr(zenml_config, key) for key in settings if getattr(zenml_config, key) is not None})
    return fields
