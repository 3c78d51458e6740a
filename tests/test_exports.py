"""The public API of both packages: sorted ``__all__``, every name importable, nothing heavy at import."""

from __future__ import annotations

import subprocess
import sys

import daemon
import deployers

from daemon.testing import REPO


def test_daemon_exports() -> None:
    assert daemon.__all__ == sorted(daemon.__all__)
    for name in daemon.__all__:
        assert getattr(daemon, name) is not None, name
    for name in ("ServiceState", "ServiceConfig", "ServiceStatus", "ServiceEndpoint", "BaseService", "DaemonClient"):
        assert name in daemon.__all__
    assert [m.value for m in daemon.ServiceState] == ["inactive", "pending_startup", "active", "pending_shutdown", "error"]


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


def test_model_server_imports_stay_lean() -> None:
    """The built-in server imports neither pydantic, filelock, psutil nor the daemon package."""
    code = (
        "import runpy, sys; sys.argv=['serve.py','--help']\n"
        "try:\n    runpy.run_path('daemon/runtime/serve.py', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print(sorted(m for m in ('pydantic','filelock','psutil','daemon') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
