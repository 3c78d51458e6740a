"""Where this checkout is (the daemon's cwd and PYTHONPATH in tests) and the example model the tests deploy."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
IRIS = str(REPO / "examples" / "iris.py") + ":model"
