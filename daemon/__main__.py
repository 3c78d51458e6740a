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
        import uvicorn.config  # noqa: F401
    finally:
        sys.modules["ssl"] = None  # type: ignore[assignment]  # None in sys.modules: import raises


_without_tls()

from .daemon_process import main  # noqa: E402

sys.exit(main())
