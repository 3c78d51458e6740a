"""``python -m daemon``: run the modeld daemon in the foreground (what auto-start spawns)."""

import sys
import types


def _without_tls() -> None:
    """Keep OpenSSL out of the daemon: it speaks HTTP on a Unix socket only, never TLS.

    ``ssl`` costs ~5 MiB of the daemon's ~40 MiB RSS (libcrypto and libssl mapped, the
    module's objects), and hashlib's OpenSSL backend alone ~3.6 MiB. asyncio and http.client
    run without it (they catch the ImportError). uvicorn's config module reads two constants at import; it is given them by a stand-in
    module seen by that import alone (the daemon's uvicorn is never configured for TLS).
    """
    if "_hashlib" not in sys.modules:
        # hashlib without OpenSSL: its own built-in SHA-2 and the rest (what hashlib falls back to);
        # hmac too. pydantic 2.14 imports ``secrets`` (so hmac, hashlib and OpenSSL) at import.
        sys.modules["_hashlib"] = None  # type: ignore[assignment]
    if "ssl" in sys.modules:  # imported already (embedded use): nothing to save
        return
    sys.modules["ssl"] = None  # type: ignore[assignment]  # `import ssl` raises ImportError
    import asyncio  # noqa: F401  (imported now, it settles on ssl = None)

    stand_in = types.ModuleType("ssl", "stand-in for uvicorn.config's import-time constants")
    stand_in.PROTOCOL_TLS_SERVER = 17  # type: ignore[attr-defined]  # the values ssl has
    stand_in.CERT_NONE = 0  # type: ignore[attr-defined]  # a plain module given ssl's attribute
    sys.modules["ssl"] = stand_in
    try:
        _uvicorn_without_its_command_line()
        import uvicorn.config  # noqa: F401
    finally:
        sys.modules["ssl"] = None  # type: ignore[assignment]  # None in sys.modules: import raises


def _uvicorn_without_its_command_line() -> None:
    """uvicorn's package ``__init__`` imports ``uvicorn.main``, its command line, and with it click: 3.5 MiB
    of the daemon's RSS for code it never runs. The package is made here without running its ``__init__``
    and given the two names the daemon (and uvicorn's own lifespan modules) take from it: Config, Server."""
    if "uvicorn" in sys.modules:
        return
    import importlib.util

    spec = importlib.util.find_spec("uvicorn")
    if spec is None or spec.submodule_search_locations is None:
        return  # (not installed as a package: the import below says so)
    package = importlib.util.module_from_spec(spec)
    sys.modules["uvicorn"] = package
    from uvicorn.config import Config

    package.Config = Config  # type: ignore[attr-defined]  # (before uvicorn.lifespan, which imports it from there)
    from uvicorn.server import Server

    package.Server = Server  # type: ignore[attr-defined]


_without_tls()

from .daemon_process import main  # noqa: E402

sys.exit(main())
