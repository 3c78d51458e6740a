"""The find filters: the one list of ``ServiceConfig`` fields a find can match exactly.

Everything that offers find's filters takes them from here: the API's query
parameters (``daemon/api.py``) and its index (``daemon/views.py``), ``modeld ls`` (its options, their
help and choices come from the fields), and the keyword arguments of
``DaemonClient.find`` and ``find_model_server``, which spell them out for
readers and type checkers and are held to this list by ``tests/test_schema.py``.
Besides these, a find takes ``running`` (active services only, ZenML's meaning),
``service_uuid`` and ``state`` (services in that state, e.g. ``scaled_to_zero``). The ZenML-shaped
deployer APIs leave out ``state`` and ``project`` (``SEED_FILTERS``): ZenML's ``find_model_server``
has no such keywords.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

from .models import ServiceState

# Each a ServiceConfig field matched for equality; the API keeps an index on each.
FIND_FILTERS = (
    "pipeline_name",
    "pipeline_run_id",
    "pipeline_step_name",
    "model_name",
    "model_uri",
    "model_type",
    "project",
)
# Those ZenML's find_model_server takes (its signature is the seed's, deployers/base.py): not project.
SEED_FILTERS = tuple(name for name in FIND_FILTERS if name != "project")

# What the API's GET /v1/services takes, with the type each query parameter is read as.
FIND_PARAMS: dict[str, type[Any]] = {
    "running": bool,
    "service_uuid": UUID,
    **{name: str for name in FIND_FILTERS},
    "state": ServiceState,
}


def filters_given(arguments: Mapping[str, Any], names: tuple[str, ...] = FIND_FILTERS) -> dict[str, Any]:
    """The find filters among a call's arguments (``filters_given(locals())`` in a method that spells
    them out; ``names``: ``SEED_FILTERS`` in a ZenML-shaped one), in ``FIND_FILTERS``' order: a filter
    its signature lacks fails at once (KeyError)."""
    return {name: arguments[name] for name in names}
