"""Where a server listens: a config's ``host`` as the address bound, and which binds share a port.

``host`` stays as the user wrote it (service.json keeps it); the :class:`Address` is what the
daemon binds, probes and claims ports on. An IP address is itself. A name is resolved by
:func:`resolve`, off the event loop (``loop.getaddrinfo`` runs in a thread), preferring IPv4
as a bind of the name always did, so ``localhost`` is 127.0.0.1.

Two listening sockets on one TCP port conflict as Linux decides it (SO_REUSEADDR makes no
difference to listeners), whichever binds first; tests/test_input.py checks every pair below
against real binds:

- an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) is the IPv4 address ``a.b.c.d``;
- two IPv4 addresses conflict if they are equal or either is 0.0.0.0;
- two IPv6 addresses conflict if they are equal or either is ``::`` (v6-only or not);
- an IPv4 and an IPv6 address conflict only if the IPv6 one is ``::`` and not v6-only.

A socket is v6-only when ``net.ipv6.bindv6only`` says so: nothing in modeld sets
IPV6_V6ONLY, and a command server is taken to bind as the system default does.

The client imports this module (through the model's syntax check of ``host``): it costs the
client ``re`` and ``socket`` only, and no name is ever looked up at import or in the client.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

RESOLVE_TIMEOUT = 10.0  # seconds a name may take to resolve before the deploy is refused
MAX_HOSTNAME = 253
_HOSTNAME = re.compile(r"[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*\.?")
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


def ip_literal(text: str) -> tuple[int, int] | None:
    """(4 or 6, the address as an integer) if ``text`` is an IP address as bind takes one, else None.

    An IPv4-mapped IPv6 address is its IPv4 address. An IPv6 zone (``fe80::1%eth0``) is allowed.
    """
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except (OSError, ValueError):
        pass
    address, percent, zone = text.partition("%")
    if percent and not zone:
        return None
    try:
        packed = socket.inet_pton(socket.AF_INET6, address)
    except (OSError, ValueError):
        return None
    if packed.startswith(_V4_MAPPED):
        return 4, int.from_bytes(packed[12:], "big")
    return 6, int.from_bytes(packed, "big")


def host_syntax_error(host: str) -> str | None:
    """Why ``host`` can be neither an IP address nor a host name (no lookup is made); None if it can."""
    if ip_literal(host) is not None:
        return None
    if len(host) <= MAX_HOSTNAME + 1 and _HOSTNAME.fullmatch(host):
        return None
    if host.startswith("[") and host.endswith("]") and ip_literal(host[1:-1]) is not None:
        return f"write the address {host[1:-1]!r} without brackets"
    shown = repr(host) if len(host) <= 80 else repr(host[:80]) + f"... ({len(host)} characters)"
    return (
        f"must be an IP address or a host name (letters, digits, '-', '_', '.', at most {MAX_HOSTNAME} "
        f"characters; an international name in its xn-- form), not {shown}"
    )


_v6only_default: bool | None = None


def v6only_default() -> bool:
    """Whether an IPv6 socket is v6-only unless it says otherwise (net.ipv6.bindv6only)."""
    global _v6only_default
    if _v6only_default is None:
        try:
            with open("/proc/sys/net/ipv6/bindv6only", "rb") as f:
                _v6only_default = f.read().strip() == b"1"
        except OSError:
            _v6only_default = False
    return _v6only_default


@dataclass(frozen=True)
class Address:
    """What a service's ``host`` binds: ``ip`` is "" when the name did not resolve (``error`` says why)."""

    host: str  # as the config says
    ip: str = ""  # what is bound and probed: the host itself if it is an IP address
    family: int = 0  # 4 or 6; an IPv4-mapped address is 4
    value: int = 0  # the address as an integer; 0 is the wildcard of its family
    error: str = ""

    @classmethod
    def of_ip(cls, host: str, ip: str) -> Address | None:
        parsed = ip_literal(ip)
        return cls(host, ip, *parsed) if parsed is not None else None

    @property
    def resolved(self) -> bool:
        return bool(self.ip)

    def conflicts(self, other: Address) -> bool:
        """Whether listeners on one port at both addresses could not coexist (see the module docstring)."""
        if not (self.resolved and other.resolved):
            return self.host == other.host  # nothing better is known of a name that does not resolve
        if self.family == other.family:
            return self.value == other.value or self.value == 0 or other.value == 0
        six = self if self.family == 6 else other
        return six.value == 0 and not v6only_default()


def literal_address(host: str) -> Address | None:
    """The address of a host that is an IP address (no lookup), else None.

    ``""`` is 0.0.0.0, as ``bind`` took it: the API refuses it now, but a record stored before
    keeps the meaning its server was started with.
    """
    return Address.of_ip(host, host or "0.0.0.0")


async def resolve(host: str, timeout: float = RESOLVE_TIMEOUT) -> Address:
    """The address ``host`` binds; for a name one lookup, in a thread, IPv4 first.

    Never raises: a name that does not resolve gives an Address whose ``error`` says why.
    """
    import asyncio  # here, not at the top: the client imports this module, and asyncio costs it ~40 ms

    found = literal_address(host)
    if found is not None:
        return found
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), timeout)
    except TimeoutError:
        return Address(host, error=f"{host!r} did not resolve within {timeout:g}s")
    except (OSError, UnicodeError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        return Address(host, error=f"{host!r} does not resolve ({reason})")
    for family in (socket.AF_INET, socket.AF_INET6):
        for info in infos:
            if info[0] == family:
                address = Address.of_ip(host, str(info[4][0]))
                if address is not None:
                    return address
    return Address(host, error=f"{host!r} resolves to no IPv4 or IPv6 address")
