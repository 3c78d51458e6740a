"""The gateway's framing against clients that send what RFC 9112 says to refuse or to treat apart:
HTTP/1.0 clients, heads with bare CRs or NULs, chunk sizes other parsers read otherwise, heads and
bodies past the caps. A gateway process (``python -m daemon.gateway``) in front of raw-socket
backends written here, which record exactly what reaches them (see test_gateway_edges.py)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading

import pytest
from test_gateway_edges import Backend, exchange, fields, gateway, read_exactly, read_head  # noqa: F401  (gateway: a fixture)

STREAM = [b"data: one\n\n", b"data: two\n\n"]


def recording(seen: list[bytes]) -> Backend:
    """A backend that records every byte it receives and answers each request as a conforming
    server would: chunked to HTTP/1.1, and to HTTP/1.0 the body ended by closing."""

    def serve(conn: socket.socket, n: int) -> None:
        buf = bytearray()
        while (head := read_head(conn, buf)) is not None:
            seen.append(head)
            length = int(fields(head).get("content-length", "0"))
            body = read_exactly(conn, buf, length)
            seen.append(body)
            if head.split(b"\r\n")[0].endswith(b"HTTP/1.0"):
                conn.sendall(b"HTTP/1.0 200 OK\r\ncontent-type: text/event-stream\r\n\r\n" + b"".join(STREAM))
                return  # the end of the body: the close
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in STREAM)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")

    return Backend(serve)


def whole_answer(port: int, request: bytes, timeout: float = 10) -> bytes:
    """What the gateway sends back until it closes the connection (the request sent whole first)."""
    out = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(request)
        while data := conn.recv(65536):
            out += data
    return bytes(out)


def test_an_http_1_0_client_gets_a_body_it_can_read_and_a_host_is_added_for_the_server(gateway):
    """An HTTP/1.0 request (which may have no Host) goes on as HTTP/1.0 with the server's address as
    its Host, so the server ends its answer by closing and never chunks it (RFC 9112 §6.1)."""
    seen: list[bytes] = []
    backend = recording(seen)
    try:
        port = gateway({"m": backend.port})
        answer = whole_answer(port, b"GET /v1/services/m/stream HTTP/1.0\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 ") and "transfer-encoding" not in fields(head), head
        assert body == b"".join(STREAM)
        request = next(h for h in seen if h.startswith(b"GET /stream "))
        assert request.startswith(b"GET /stream HTTP/1.0\r\n") and fields(request)["host"] == f"127.0.0.1:{backend.port}"
        # An HTTP/1.1 client on the same route still gets the stream chunked, its Host passed on as it came.
        [(head11, _)] = exchange(port, [b"GET /v1/services/m/health HTTP/1.1\r\nhost: mine\r\n\r\n"])
        assert fields(head11)["transfer-encoding"] == "chunked"
        assert fields(next(h for h in seen if h.startswith(b"GET /health ")))["host"] == "mine"
    finally:
        backend.close()


def test_an_http_1_0_client_that_asks_to_keep_the_connection_is_told_it_is_kept(gateway):
    def serve(conn: socket.socket, n: int) -> None:
        buf = bytearray()
        while read_head(conn, buf) is not None:
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")

    backend = Backend(serve)
    try:
        port = gateway({"m": backend.port})
        request = b"GET /v1/services/m/x HTTP/1.0\r\nconnection: keep-alive\r\n\r\n"
        answers = exchange(port, [request, request])  # both on one connection
        assert all(fields(head).get("connection") == "keep-alive" and body == b"{}" for head, body in answers), answers
    finally:
        backend.close()


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET /v1/services/m/x HTTP/1.1\r\nhost: h\r\nx-a: a\rinjected: yes\r\n\r\n",  # a bare CR in a value
        b"GET /v1/services/m/x HTTP/1.1\r\nhost: h\r\nx-a: a\x00b\r\n\r\n",  # a NUL
        b"GET /v1/services/m/x HTTP/1.1\r\nx-a: a\r\n\r\n",  # HTTP/1.1 with no Host
        b"GET /v1/services/m/x HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",  # two Hosts
        b"POST /v1/services/m/x HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        # chunk sizes int(x, 16) reads but a C parser stops early on: the rest is a request of its own there
        b"POST /v1/services/m/x HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n5_0\r\n"
        + b"GET /SMUGGLED HTTP/1.1\r\nhost: h\r\n\r\n".ljust(80, b"x") + b"\r\n0\r\n\r\n",
        b"POST /v1/services/m/x HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
        b"POST /v1/services/m/x HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
    ],
)
def test_what_rfc_9112_says_to_refuse_is_a_400_and_nothing_of_it_reaches_a_server_as_a_request(gateway, request_head):
    seen: list[bytes] = []
    backend = recording(seen)
    try:
        port = gateway({"m": backend.port})
        answer = whole_answer(port, request_head)
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert not any(b"SMUGGLED" in h or b"injected" in h for h in seen), seen
        [(head, _)] = exchange(port, [b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n"])  # and it goes on
        assert head.startswith(b"HTTP/1.1 200 ")
    finally:
        backend.close()


def test_a_head_over_the_cap_is_a_431_the_client_reads_whole_or_sent_in_parts(gateway):
    backend = recording([])
    try:
        port = gateway({"m": backend.port})
        big = b"GET /v1/models/m HTTP/1.1\r\nhost: h\r\nx-big: %s\r\n\r\n" % (b"a" * 131_000)
        for parts in (1, 40):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                step = -(-len(big) // parts)
                with contextlib.suppress(OSError):  # (the gateway may have answered before the last part)
                    for i in range(0, len(big), step):
                        conn.sendall(big[i : i + step])
                answer = bytearray()
                while data := conn.recv(65536):
                    answer += data
            assert answer.startswith(b"HTTP/1.1 431 "), (parts, bytes(answer[:200]))
            assert json.loads(bytes(answer).partition(b"\r\n\r\n")[2])["error"]["type"] == "RequestHeaderFieldsTooLarge"
    finally:
        backend.close()


def test_a_body_over_the_cap_gets_a_413_the_client_reads_while_it_is_still_sending(gateway):
    """The gateway answers 413 as soon as it knows, then reads and drops what the client goes on
    sending until it stops: closing with unread bytes would reset the connection, and the answer with it."""

    def reads(conn: socket.socket, n: int) -> None:  # a server that answers once it has the whole body
        while conn.recv(65536):
            pass

    backend = Backend(reads)
    try:
        port = gateway({"m": backend.port}, "--max-body", "100000")
        for target in (b"/v1/chat/completions", b"/v1/models/m:predict"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(b"POST %s HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n" % target)
                chunk = b"1000\r\n" + b"x" * 4096 + b"\r\n"
                done = threading.Event()

                def send(conn: socket.socket = conn) -> None:
                    with contextlib.suppress(OSError):
                        for _ in range(75):  # 300 KiB, three times the cap
                            conn.sendall(chunk)
                        conn.sendall(b"0\r\n\r\n")
                    done.set()

                sender = threading.Thread(target=send)
                sender.start()
                answer = bytearray()
                while data := conn.recv(65536):
                    answer += data
                sender.join(10)
            assert answer.startswith(b"HTTP/1.1 413 "), (target, bytes(answer[:200]))
    finally:
        backend.close()
