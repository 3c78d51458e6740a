"""One model as a Ray Serve deployment: the built-in server's KServe V1 app, in each replica.

The replica loads the model with the built-in server's own loader and answers with its
own ASGI app (``daemon.runtime._serve``), so the same model and request give the same
response on a Ray cluster as from the local daemon. Serve hands the app each request
with the route prefix (``/<uuid>``) still in the path; it is taken off here. The
cluster's nodes need modeld installed (``pip install 'modeld[ray]'``), as they import
this module; the model file itself can travel in the runtime_env (see the deployer).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from ray import serve

from daemon.runtime._serve.app import App
from daemon.runtime._serve.loading import load_model

Asgi = Callable[
    [dict[str, Any], Callable[[], Awaitable[dict[str, Any]]], Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]
]
log = logging.getLogger("ray.serve")


class _ModelReplica:
    def __init__(self, model_name: str, model_uri: str, model_type: str, working_dir: str) -> None:
        if working_dir and os.path.isdir(working_dir):
            # As the built-in server: relative paths resolve against the deploying client's folder, whose modules import.
            os.chdir(working_dir)
            if working_dir not in sys.path:
                sys.path.insert(0, working_dir)
        log.info("modeld: loading %s model %r from %s", model_type, model_name, model_uri)
        self.kserve = App(model_name, load_model(model_uri, model_type))
        log.info("modeld: model %r loaded; serving", model_name)

    def __serve_build_asgi_app__(self) -> Asgi:
        app = self.kserve

        async def without_prefix(
            scope: dict[str, Any],
            receive: Callable[[], Awaitable[dict[str, Any]]],
            send: Callable[[dict[str, Any]], Awaitable[None]],
        ) -> None:
            root, path = scope.get("root_path", ""), scope.get("path", "")
            if root and path.startswith(root):
                scope = {**scope, "path": path[len(root) :] or "/", "root_path": ""}
            await app(scope, receive, send)

        return without_prefix


ModelReplica: type[Any] = serve.ingress()(_ModelReplica)
