"""The public API of both packages: sorted ``__all__``, every name importable, nothing heavy at import.

``daemon`` exports the service model, the client and the whole exception tree, and no plumbing;
every error a client can receive is a class under ``ModeldError`` that survives the wire.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys

import pytest

import daemon
import daemon.client
import deployers
from daemon import exceptions

from daemon.testing import REPO


def test_daemon_exports() -> None:
    assert daemon.__all__ == sorted(daemon.__all__)
    for name in daemon.__all__:
        assert getattr(daemon, name) is not None, name
    for name in ("ServiceState", "ServiceConfig", "ServiceStatus", "ServiceEndpoint", "BaseService", "DaemonClient"):
        assert name in daemon.__all__
    assert [m.value for m in daemon.ServiceState] == ["inactive", "pending_startup", "active", "pending_shutdown", "error", "scaled_to_zero"]
    # Plumbing is imported from its module, not from the package.
    for name in ("Paths", "default_home", "Manager", "Store"):
        assert name not in daemon.__all__
        with pytest.raises(AttributeError):
            getattr(daemon, name)


def test_service_config_is_still_importable_from_models() -> None:
    """ServiceConfig and RestartPolicy live in daemon.config; daemon.models, where flavors and users
    have imported them from, re-exports the very same classes."""
    import daemon.config
    import daemon.models

    for name in ("ServiceConfig", "RestartPolicy"):
        assert getattr(daemon.models, name) is getattr(daemon.config, name) is getattr(daemon, name), name


def test_the_whole_exception_tree_is_exported_and_closed() -> None:
    """Every ModeldError class of daemon.exceptions is in ERRORS (so the client maps its type back) and in daemon."""
    defined = {name: cls for name, cls in vars(exceptions).items()
               if inspect.isclass(cls) and issubclass(cls, exceptions.ModeldError)}
    assert defined == exceptions.ERRORS
    assert len({cls.status_code for cls in defined.values()} - set(range(400, 600))) == 0
    for name, cls in defined.items():
        assert name in daemon.__all__ and getattr(daemon, name) is cls, name
    assert issubclass(daemon.StillStarting, daemon.DeployError)
    assert issubclass(daemon.ForkServerError, OSError)  # as it was before it joined the tree
    assert {"Forbidden", "NotFound", "MethodNotAllowed", "InternalError", "StillStarting", "ForkServerError"} <= set(defined)


@pytest.mark.parametrize("cls", sorted(exceptions.ERRORS.values(), key=lambda c: c.__name__))
def test_every_error_survives_the_wire(cls: type[exceptions.ModeldError]) -> None:
    import json

    plain = cls("what went wrong")
    assert plain.to_dict() == {"type": cls.__name__, "message": "what went wrong"}  # as before: no new field unless needed
    error = cls("the server exited; last log lines:\nloading\nkaboom")
    wire = json.loads(json.dumps({"error": error.to_dict()}))
    assert wire["error"] == {"type": cls.__name__, "message": "the server exited; last log lines:\nloading\nkaboom",
                             "log_excerpt": "loading\nkaboom"}
    back = exceptions.error_from_dict(cls.status_code, wire)
    assert type(back) is cls
    assert (back.message, back.log_excerpt, back.headline) == (error.message, "loading\nkaboom", "the server exited")


def test_an_unknown_error_type_falls_back_by_status() -> None:
    """A newer daemon's type this client does not know: a 4xx is a RequestError, anything else a ServiceError."""
    unknown = {"error": {"type": "SomethingNew", "message": "m"}}
    assert type(exceptions.error_from_dict(418, unknown)) is exceptions.RequestError
    assert type(exceptions.error_from_dict(500, unknown)) is exceptions.ServiceError
    assert type(exceptions.error_from_dict(500, {"no": "error"})) is exceptions.ProtocolError


def test_client_exports() -> None:
    assert daemon.client.__all__ == sorted(daemon.client.__all__)
    for name in daemon.client.__all__:
        assert getattr(daemon.client, name) is not None, name
    assert daemon.DaemonClient is daemon.client.DaemonClient
    assert daemon.VersionMismatchWarning is daemon.client.VersionMismatchWarning


def test_deployers_exports() -> None:
    assert deployers.__all__ == sorted(deployers.__all__)
    for name in deployers.__all__:
        assert getattr(deployers, name) is not None, name
    assert deployers.DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT == 300


def test_daemon_package_import_is_lazy() -> None:
    """``python -m daemon`` and the model server must not pay for pydantic on import of the package."""
    code = "import sys, daemon; print('pydantic' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_harness_exports() -> None:
    """``daemon.testing`` is one harness to its users, whichever of its modules holds a name."""
    import daemon.testing

    assert daemon.testing.__all__ == sorted(daemon.testing.__all__)
    for name in daemon.testing.__all__:
        assert getattr(daemon.testing, name) is not None, name


def test_client_import_costs_no_asyncio() -> None:
    """Every `modeld` command imports the client; its in-memory transport for tests must not pull asyncio in."""
    code = "import sys, daemon.client, deployers.cli; print('asyncio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_model_server_imports_stay_lean() -> None:
    """The built-in server imports neither pydantic, filelock, psutil nor the daemon package: only the
    standard library and what uvicorn imports itself, in every module of its package (listed from the
    folder, so a new module is covered too) and through every name the package exports."""
    third_party = (
        "stdlib = set(sys.stdlib_module_names) | set(sys.builtin_module_names)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} - stdlib - {'__main__', '_modeld_serve'}))"
    )
    code = (
        "import importlib, pkgutil, runpy, sys; sys.argv=['serve.py','--help']\n"
        "try:\n    runpy.run_path('daemon/runtime/serve.py', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "pkg = sys.modules['_modeld_serve']\n"
        "names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__))\n"
        "for name in names:\n    importlib.import_module('_modeld_serve.' + name)\n"
        "for name in pkg.__all__:\n    getattr(pkg, name)\n"
        "print(names)\n"
        "print(sorted(m for m in ('pydantic','filelock','psutil','daemon') if m in sys.modules))\n" + third_party
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    modules, heavy, imported = out.stdout.strip().splitlines()[-3:]
    assert modules == str(sorted(p.stem for p in (REPO / "daemon/runtime/_serve").glob("*.py") if p.stem != "__init__"))
    assert heavy == "[]"
    baseline = "import sys, uvicorn, uvicorn.server, uvicorn.config\n" + third_party
    uvicorn_alone = subprocess.run([sys.executable, "-c", baseline], cwd=REPO, capture_output=True, text=True, check=True)
    assert set(ast.literal_eval(imported)) <= set(ast.literal_eval(uvicorn_alone.stdout.strip().splitlines()[-1]))
