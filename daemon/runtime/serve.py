"""modeld built-in model server (KServe V1 data plane).

Run by the daemon as a script, by file path, under the user's interpreter:

    python /abs/path/daemon/runtime/serve.py --model-uri URI --model-type {python,pickle}
        [--model-name NAME] (--fd N | --host H --port P)
        [--unix PATH] [--fd-socket PATH] [--drain SECONDS]

Only the standard library and uvicorn are imported here: every import adds
start-up latency, and the daemon's own package is not importable from the
user's interpreter.

Exit codes: 0 after a graceful stop (SIGTERM/SIGINT), 2 for bad arguments or
sockets, 3 when the model cannot be loaded.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up (type checkers treat it as True)
if TYPE_CHECKING:
    from types import ModuleType

# Running as a script puts this file's directory on sys.path[0]; the user's
# code must instead resolve against the working directory the daemon gave us.
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == _HERE:
    del sys.path[0]
sys.path.insert(0, os.getcwd())


def load() -> ModuleType:
    """The server package, _serve/ beside this file, under the name ``_modeld_serve``.

    A script run by path is compiled on every start (~6 ms of a ~100 ms spawn);
    modules loaded from their files use their cached bytecode. This file stays small.
    The daemon's package is not importable here, so the package is loaded by its path;
    its modules import one another relatively.
    """
    from importlib.util import module_from_spec, spec_from_file_location

    folder = os.path.join(_HERE, "_serve")
    spec = spec_from_file_location("_modeld_serve", os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
    # Never None here: __init__.py has a source loader.
    assert spec is not None and spec.loader is not None
    module = module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    if sys.argv[1:2] == ["--fork-server"]:  # started by the daemon for warm starts, see _serve/forkserver.py
        sys.exit(load().fork_server(int(sys.argv[2])))
    sys.exit(load().main())
