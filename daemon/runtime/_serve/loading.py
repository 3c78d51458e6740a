"""Model loading: from a model URI and type to the callable that predicts.

``python``: ``package.module:attr`` or ``path/to/file.py:attr`` (``:model`` if no
attribute is given); ``pickle``: a ``.pkl``/``.pickle`` file, or ``.joblib`` if joblib
is installed. A class is instantiated; the result's ``predict`` is used if it has
one, else the object itself, called once per request with the list of instances.
This runs the model's own code, after the server's sockets are set up.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType
    from typing import Any

    # The model's predict: called with the request's "instances" (a list of decoded JSON values, each
    # whatever the client sent) and returning whatever the model returns (made JSON by the app).
    Predict = Callable[[list[Any]], Any]

DEFAULT_ATTR = "model"


def _import_file(path: str) -> ModuleType:
    import importlib.util

    if not os.path.isfile(path) and os.path.isfile(path + ".py"):
        path += ".py"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path}")
    stem = os.path.splitext(os.path.basename(path))[0]
    # Register under the stem (so pickling/dataclasses of its classes work),
    # unless that would shadow a module that is already imported.
    name = stem if stem.isidentifier() and stem not in sys.modules else f"_modeld_model_{abs(hash(path))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Like running the file as a script: its siblings are importable.
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(1, folder)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _load_python(uri: str) -> object:
    target, sep, attr = uri.rpartition(":")
    if not sep:
        target, attr = uri, DEFAULT_ATTR
    if not target:
        raise ValueError("expected 'package.module:attr' or 'path/to/file.py:attr'")
    if not attr:
        raise ValueError(f"empty attribute name after ':' (expected e.g. '{target}:{DEFAULT_ATTR}')")
    if target.endswith(".py") or "/" in target or os.sep in target:
        module = _import_file(os.path.abspath(target))
    else:
        import importlib

        module = importlib.import_module(target)
    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            hint = f" (pass the object as '{target}:attr')" if not sep else ""
            raise AttributeError(f"'{target}' has no attribute '{attr}'{hint}") from None
    return obj


def _load_pickle(uri: str) -> object:
    path = uri.removeprefix("file://")
    path = os.path.abspath(path)
    if path.endswith(".joblib"):
        try:
            import joblib  # type: ignore[import-not-found]  # optional (.joblib models only), not installed to type-check
        except ImportError as exc:
            raise ModuleNotFoundError(
                f"loading .joblib models needs the 'joblib' package, which is not installed for {sys.executable}"
            ) from exc
        return joblib.load(path)
    import pickle

    with open(path, "rb") as f:
        return pickle.load(f)


def load_model(uri: str, model_type: str) -> Predict:
    """Return a callable taking the list of instances and returning predictions."""
    obj = _load_python(uri) if model_type == "python" else _load_pickle(uri)
    if isinstance(obj, type):
        obj = obj()
    predict: object = getattr(obj, "predict", None)
    if callable(predict):
        return predict
    if callable(obj):
        return obj
    raise TypeError(f"model object of type {type(obj).__name__} is neither callable nor has a .predict() method")
