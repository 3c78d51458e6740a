"""HTTP/1.1 message framing for the gateway: heads parsed by hand, bodies delimited, never decoded.

The gateway forwards bytes; it parses only what it needs to route and to find where each message
ends (RFC 9112 §6: Content-Length, chunked, or the close of the connection for a response).
Chunked bodies are forwarded as they came (chunk framing included) and only scanned for their
end, so a body is never copied whole nor re-framed.

Hop-by-hop fields (RFC 9110 §7.6.1): ``Connection`` and every field it names, plus the fixed
list below, describe one connection and are dropped before a message is forwarded; the gateway
sets its own framing (``Transfer-Encoding``/``Content-Length`` are kept as the message's own
framing, since the body bytes are forwarded unchanged) and its own connection handling.

Standard library only: this runs in the gateway's own process.
"""

from __future__ import annotations

import re

# RFC 9110 §7.6.1 names Proxy-Connection, Keep-Alive, TE, Transfer-Encoding, Upgrade; Trailer
# and Proxy-Authenticate/-Authorization are the rest of RFC 2616's list that proxies still drop.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"upgrade",
        b"expect",  # the gateway answers 100-continue itself (see proxy.py)
    }
)
VIA = b"via: 1.1 modeld\r\n"  # added to every message the gateway forwards (RFC 9110 §7.6.3)
MAX_HEAD = 64 * 1024  # bytes of request line + header fields (uvicorn/h11 also allow 64 KiB)
MAX_CHUNK_LINE = 4096


class BadMessage(Exception):
    """A message the gateway cannot frame; the connection ends (400 if nothing was answered yet)."""


class Head:
    """One parsed head. ``headers`` keeps the original lines for forwarding; names lower-cased."""

    __slots__ = (
        "first",
        "method",
        "target",
        "version",
        "status",
        "headers",
        "length",
        "chunked",
        "close",
        "drop",
        "kept",
        "expect",
    )

    def __init__(self) -> None:
        self.first = b""
        self.method = b""
        self.target = b""
        self.version = b""
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []  # (lower-cased name, value)
        self.length: int | None = None
        self.chunked = False
        self.close = False  # the peer asked to close after this message (or speaks HTTP/1.0)
        self.drop: frozenset[bytes] = HOP_BY_HOP
        self.kept: list[bytes] = []  # forward_fields's lines while ``drop`` is HOP_BY_HOP, made as parsed
        self.expect: bytes | None = None  # the first Expect field's value (hop-by-hop: the gateway answers it)

    def get(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


_NOTED = HOP_BY_HOP | {b"content-length", b"transfer-encoding", b"connection"}  # fields parsing looks at


# Field names as written -> (lower-cased, its forwarded line's start), each checked once: a
# connection's next message (and other clients') use the same few names. Bounded: long or many
# odd names are checked every time.
_NAMES: dict[bytes, tuple[bytes, bytes]] = {}
NAMES_KEPT = 512
NAME_KEPT_MAX = 64


def _name(name: bytes, line: bytes) -> tuple[bytes, bytes]:
    if not name or name != name.strip() or b" " in name:
        raise BadMessage(f"bad header line {line[:80]!r}")
    key = name.lower()
    known = (key, key + b": ")
    if len(name) <= NAME_KEPT_MAX and len(_NAMES) < NAMES_KEPT:
        _NAMES[name] = known
    return known


def _parse_fields(head: Head, lines: list[bytes]) -> None:
    connection_tokens: set[bytes] = set()
    headers, kept = head.headers, head.kept
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep:
            raise BadMessage(f"bad header line {line[:80]!r}")
        key, start = _NAMES.get(name) or _name(name, line)
        value = value.strip()
        headers.append((key, value))
        if key not in _NOTED:
            kept.append(start + value + b"\r\n")  # (forward_fields's form)
            continue
        if key == b"content-length":
            if not value.isdigit() or (head.length is not None and head.length != int(value)):
                raise BadMessage("bad or conflicting content-length")
            head.length = int(value)
            kept.append(start + value + b"\r\n")
        elif key == b"transfer-encoding":
            codings = [c.strip().lower() for c in value.split(b",")]
            if codings[-1] != b"chunked":
                raise BadMessage("a transfer-encoding other than chunked last")  # RFC 9112 §6.3
            head.chunked = True
            kept.append(start + value + b"\r\n")
        elif key == b"connection":
            connection_tokens.update(t.strip().lower() for t in value.split(b","))
        elif key == b"expect" and head.expect is None:
            head.expect = value
    both = head.chunked and head.length is not None
    if head.chunked:
        # RFC 9112 §6.3: chunked wins over content-length, and an intermediary must drop the
        # content-length before forwarding (a next hop that framed by it would be smuggled to).
        head.length = None
        head.drop = head.drop | {b"content-length"}
    if head.version == b"HTTP/1.0":
        head.close = b"keep-alive" not in connection_tokens
    else:
        head.close = b"close" in connection_tokens
    if both:
        # RFC 9112 §6.1: a message with both may be an attempt at smuggling (a hop before this one
        # that framed it by its content-length saw other messages after it): nothing more is read
        # from that connection once it is answered.
        head.close = True
    if connection_tokens - {b"close", b"keep-alive"}:
        head.drop = head.drop | connection_tokens


def parse_request(data: bytes) -> Head:
    """The request head in ``data`` (which ends with the blank line, excluded).

    Refused (``BadMessage``), as RFC 9112 says a server must: a CR, LF or NUL anywhere but in the
    CRLFs that end the lines (§2.2, RFC 9110 §5.5: a next hop that read a bare CR or LF as a line's
    end would see other fields); an HTTP/1.1 request with no Host, and any with more than one (§3.2);
    an HTTP/1.0 request with a Transfer-Encoding (§6.1: its framing is faulty).
    """
    lines = data.split(b"\r\n")
    if b"\0" in data or data.count(b"\r") != len(lines) - 1 or data.count(b"\n") != len(lines) - 1:
        raise BadMessage("a bare CR or LF, or a NUL, in the request head")
    head = Head()
    head.first = lines[0]
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise BadMessage(f"bad request line {lines[0][:80]!r}")
    head.method, head.target, head.version = parts
    _parse_fields(head, lines[1:])
    hosts = sum(1 for key, _ in head.headers if key == b"host")
    if hosts > 1 or (hosts == 0 and head.version == b"HTTP/1.1"):
        raise BadMessage("an HTTP/1.1 request needs one Host field" if hosts == 0 else "more than one Host field")
    if head.version == b"HTTP/1.0" and head.get(b"transfer-encoding") is not None:
        raise BadMessage("Transfer-Encoding in an HTTP/1.0 request")
    return head


def parse_response(data: bytes) -> Head:
    lines = data.split(b"\r\n")
    head = Head()
    head.first = lines[0]
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise BadMessage(f"bad status line {lines[0][:80]!r}")
    head.version = parts[0]
    head.status = int(parts[1])
    _parse_fields(head, lines[1:])
    return head


def forward_fields(head: Head, extra: bytes = b"") -> bytes:
    """The head's fields without the hop-by-hop ones, each line ending in CRLF, then ``extra``."""
    drop = head.drop
    if drop is HOP_BY_HOP:  # nothing beyond the fixed list dropped: the lines parsing kept
        return b"".join(head.kept) + extra + b"\r\n"
    out = [b"%s: %s\r\n" % (k, v) for k, v in head.headers if k not in drop]
    out.append(extra)
    out.append(b"\r\n")
    return b"".join(out)


# RFC 9112 §7.1: chunk-size is 1*HEXDIG, then chunk extensions (";" ...), the line ending in CRLF.
# Stricter than int(x, 16), which also takes "+5", " 5", "0x5" and "5_0": a next hop that read such
# a size otherwise than the gateway would frame the body otherwise too (request smuggling).
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n\x00]*)?")


def chunk_size(line: bytes) -> int:
    """The size on a chunk's size line (its CRLF excluded); ``BadMessage`` unless it is well formed."""
    match = _CHUNK_SIZE.fullmatch(line)
    if match is None:
        raise BadMessage(f"bad chunk size {line[:40]!r}")
    return int(match.group(1), 16)


class ChunkedScanner:
    """Finds where a chunked body ends, across any split of its bytes, without copying them; refuses
    (``BadMessage``) a size line that is not 1*HEXDIG [extensions], and lines or chunk data not ended
    by CRLF."""

    SIZE, DATA, TRAILER = 0, 1, 2

    def __init__(self) -> None:
        self.state = self.SIZE
        self.remaining = 0  # bytes of chunk data still to come
        self.crlf = b""  # the CRLF after a chunk's data: what has come of it
        self.line = b""  # a size or trailer line split across reads

    def feed(self, data: bytes | memoryview, start: int = 0) -> int:
        """Consume ``data[start:]``; the offset just past the body's end, or -1 if it goes on."""
        i, n = start, len(data)
        while i < n:
            if self.state == self.DATA:
                if self.remaining:
                    take = min(self.remaining, n - i)
                    i += take
                    self.remaining -= take
                    continue
                take = min(2 - len(self.crlf), n - i)  # the CRLF that ends the chunk's data
                self.crlf += bytes(data[i : i + take])
                i += take
                if not b"\r\n".startswith(self.crlf):
                    raise BadMessage("chunk data not followed by CRLF")
                if len(self.crlf) == 2:
                    self.state, self.crlf = self.SIZE, b""
                continue
            j = bytes(data[i : i + MAX_CHUNK_LINE + 2]).find(b"\n")
            if j < 0:
                self.line += bytes(data[i:])
                if len(self.line) > MAX_CHUNK_LINE:
                    raise BadMessage("chunk size line too long")
                return -1
            line = self.line + bytes(data[i : i + j])
            self.line = b""
            i += j + 1
            if not line.endswith(b"\r"):
                raise BadMessage("a chunk line not ended by CRLF")
            line = line[:-1]
            if self.state == self.SIZE:
                size = chunk_size(line)
                if size == 0:
                    self.state = self.TRAILER
                else:
                    self.state, self.remaining = self.DATA, size
            elif not line:
                return i
            elif b"\r" in line or b"\0" in line:
                raise BadMessage("a bare CR or a NUL in a trailer field")
        return -1


def dechunk(raw: bytes) -> bytes:
    """The payload of a whole chunked body (one ``ChunkedScanner`` found complete); trailers dropped."""
    out: list[bytes] = []
    i = 0
    while True:
        j = raw.index(b"\r\n", i)
        size = chunk_size(raw[i:j])
        if size == 0:
            return b"".join(out)
        out.append(raw[j + 2 : j + 2 + size])
        i = j + 2 + size + 2
