"""The gateway's edges, against a gateway process and raw-socket backends written here to misbehave.

The gateway runs as the daemon runs it (``python -m daemon.gateway``), on a listening socket this
test binds and hands over (``--fd``), with a static table (``--route``) instead of a home, so a
backend can be a thread here that closes, answers or records exactly as a case needs. The routing
table's polling mode runs over a real folder of records.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.gateway.home import HomeTable
from daemon.gateway.routes import Table

REPO = Path(__file__).resolve().parent.parent
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


def read_head(conn: socket.socket, buf: bytearray) -> bytes | None:
    """One request head from ``conn`` (the rest stays in ``buf``); None at EOF."""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    buf[:] = rest
    return head


def read_exactly(conn: socket.socket, buf: bytearray, n: int) -> bytes:
    while len(buf) < n:
        data = conn.recv(65536)
        assert data, "the body ended early"
        buf += data
    body = bytes(buf[:n])
    del buf[:n]
    return body


def fields(head: bytes) -> dict[str, str]:
    lines = head.decode().split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


class Backend:
    """A listening socket (TCP on 127.0.0.1, or ``sock``) served by a thread: ``serve(conn, n)``
    handles the n-th connection."""

    def __init__(self, serve: Callable[[socket.socket, int], None], port: int = 0, sock: socket.socket | None = None):
        self.sock = socket.create_server(("127.0.0.1", port)) if sock is None else sock
        self.port = self.sock.getsockname()[1] if sock is None else 0
        self.serve = serve
        self.connections = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._one, args=(conn, self.connections), daemon=True).start()

    def _one(self, conn: socket.socket, n: int) -> None:
        with conn:
            try:
                self.serve(conn, n)
            except OSError:
                pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept: a socket closed under it would stay bound
        self.sock.close()


@pytest.fixture
def gateway() -> Iterator[Callable[..., int]]:
    """Starts gateway processes routing ``name`` to a backend port; yields their port."""
    started: list[subprocess.Popen[bytes]] = []

    def start(routes: dict[str, int], *flags: str, route_extra: str | dict[str, str] = "") -> int:
        sock = socket.create_server(("127.0.0.1", 0))
        extra = route_extra if isinstance(route_extra, dict) else {name: route_extra for name in routes}
        args = [f"--route=name={name},addr=127.0.0.1:{port}" + (f",{extra[name]}" if extra.get(name) else "")
                for name, port in routes.items()]
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.gateway", "--fd", str(sock.fileno()), *args, *flags],
            cwd=REPO, pass_fds=[sock.fileno()], stdout=subprocess.DEVNULL, start_new_session=True,
        )
        started.append(proc)
        port: int = sock.getsockname()[1]
        sock.close()  # the gateway holds it; clients wait in its backlog until it accepts
        return port

    yield start
    for proc in started:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def exchange(port: int, requests: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Send each request on one keep-alive connection, in turn; the (head, body) of each response."""
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        buf = bytearray()
        for request in requests:
            conn.sendall(request)
            head = read_head(conn, buf)
            assert head is not None, f"the gateway closed the connection; answered so far: {out}"
            length = 0 if request.startswith(b"HEAD ") else int(fields(head).get("content-length", "0"))
            out.append((head, read_exactly(conn, buf, length)))
    return out


def test_a_head_request_gets_no_body_from_the_gateway_itself_nor_through_it(gateway):
    def serve(conn: socket.socket, n: int) -> None:
        buf = bytearray()
        while (head := read_head(conn, buf)) is not None:
            conn.sendall(OK[: -2] if head.startswith(b"HEAD ") else OK)

    backend = Backend(serve)
    try:
        port = gateway({"m": backend.port})
        answers = exchange(port, [
            b"HEAD /v1/models HTTP/1.1\r\nhost: x\r\n\r\n",  # answered by the gateway
            b"HEAD /v1/models/nope:predict HTTP/1.1\r\nhost: x\r\n\r\n",  # its 404
            b"HEAD /v1/services/m/x HTTP/1.1\r\nhost: x\r\n\r\n",  # the server's
            b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n",  # read right after: no stray body before it
        ])
        assert [h.split(b"\r\n")[0] for h, _ in answers] == [
            b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found", b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK"
        ]
        assert int(fields(answers[0][0])["content-length"]) == len(answers[3][1]) > 0
        assert json.loads(answers[3][1])["object"] == "list"
    finally:
        backend.close()


def test_a_reused_backend_connection_that_closes_unanswered_is_retried_once_on_a_new_one(gateway):
    """HTTP/1.1's keep-alive race: the server closes an idle connection as the gateway reuses it."""
    seen: list[tuple[int, bytes]] = []

    def serve(conn: socket.socket, n: int) -> None:
        buf = bytearray()
        while (head := read_head(conn, buf)) is not None:
            body = read_exactly(conn, buf, int(fields(head).get("content-length", "0")))
            seen.append((n, body))
            if len([s for s in seen if s[0] == n]) > 1:
                return  # a second request on this connection: closed unanswered, as a server timing it out would
            conn.sendall(OK)

    backend = Backend(serve)
    try:
        port = gateway({"m": backend.port}, "--no-spare")
        post = b"POST /v1/models/m:predict HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s"
        answers = exchange(port, [post % (5, b"first"), post % (6, b"second")])
        assert [h.split(b"\r\n")[0] for h, _ in answers] == [b"HTTP/1.1 200 OK"] * 2
        # The second request reached the server twice: on the reused connection, then on a new one.
        assert seen == [(1, b"first"), (1, b"second"), (2, b"second")]
    finally:
        backend.close()


def test_a_fresh_backend_connection_that_closes_unanswered_is_a_502_not_a_retry(gateway):
    seen: list[int] = []

    def serve(conn: socket.socket, n: int) -> None:
        read_head(conn, bytearray())
        seen.append(n)  # and closed unanswered

    backend = Backend(serve)
    try:
        port = gateway({"m": backend.port}, "--no-spare")
        [(head, body)] = exchange(port, [b"GET /v1/services/m/health HTTP/1.1\r\nhost: x\r\n\r\n"])
        assert head.startswith(b"HTTP/1.1 502 ") and json.loads(body)["error"]["type"] == "BadGateway", (head, body)
        assert seen == [1]
    finally:
        backend.close()


def test_the_timeout_counts_from_each_request_on_a_kept_alive_connection(gateway):
    """One timer serves a connection's requests (proxy.Downstream.watch): a request sent after an
    earlier one was answered still gets the whole timeout, then its 504."""

    def serve(conn: socket.socket, n: int) -> None:
        buf = bytearray()
        while (head := read_head(conn, buf)) is not None:
            if b" /slow " in head:
                conn.recv(1)  # never answered: until the gateway lets go of this connection
                return
            time.sleep(0.6)  # answered within the timeout, but past half of it
            conn.sendall(OK)

    backend = Backend(serve)
    try:
        port = gateway({"m": backend.port}, "--no-spare", "--timeout", "1")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            buf = bytearray()
            conn.sendall(b"GET /v1/services/m/fast HTTP/1.1\r\nhost: x\r\n\r\n")
            head = read_head(conn, buf)
            assert head is not None and head.startswith(b"HTTP/1.1 200 "), head
            read_exactly(conn, buf, 2)
            sent = time.monotonic()  # ~0.6 s after the first request: its deadline is ~0.4 s away
            conn.sendall(b"GET /v1/services/m/slow HTTP/1.1\r\nhost: x\r\n\r\n")
            head = read_head(conn, buf)
            took = time.monotonic() - sent
            assert head is not None and head.startswith(b"HTTP/1.1 504 "), head
            assert 0.9 < took < 5, took
    finally:
        backend.close()


def test_a_chunked_openai_request_is_routed_by_its_body_and_sent_on_with_a_length(gateway):
    got: list[tuple[dict[str, str], bytes]] = []

    def serve(conn: socket.socket, n: int) -> None:
        buf = bytearray()
        while (head := read_head(conn, buf)) is not None:
            f = fields(head)
            got.append((f, read_exactly(conn, buf, int(f.get("content-length", "0")))))
            conn.sendall(OK)

    chosen, other = Backend(serve), Backend(serve)
    try:
        port = gateway({"llm": chosen.port, "other": other.port})
        payload = json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": "llm"}).encode()
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(payload[i : i + 7]), payload[i : i + 7]) for i in range(0, len(payload), 7))
        request = (
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
            b"content-length: 5\r\n\r\n" + chunks + b"0\r\n\r\n"  # (a content-length beside chunked is dropped)
        )
        [(head, _)] = exchange(port, [request])
        assert head.startswith(b"HTTP/1.1 200 ") and fields(head)["via"] == "1.1 modeld"
        [(sent, body)] = got
        assert body == payload and sent["content-length"] == str(len(payload)) and "transfer-encoding" not in sent
        assert sent["via"] == "1.1 modeld" and sent["x-forwarded-for"] == "127.0.0.1"
        assert other.connections == 0
    finally:
        chosen.close()
        other.close()


def test_a_chunked_body_forwarded_as_it_comes_loses_a_smuggled_content_length(gateway):
    got: list[bytes] = []

    def serve(conn: socket.socket, n: int) -> None:
        buf = bytearray()
        head = read_head(conn, buf)
        if head is None:
            return  # (the gateway's spare connection, closed unused)
        while not buf.endswith(b"0\r\n\r\n"):
            buf += conn.recv(65536)
        got.append(head + b"\r\n\r\n" + bytes(buf))
        conn.sendall(OK)

    backend = Backend(serve)
    try:
        port = gateway({"m": backend.port})
        request = (
            b"POST /v1/models/m:predict HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        )
        [(head, _)] = exchange(port, [request])
        assert head.startswith(b"HTTP/1.1 200 ")
        [raw] = got
        sent = fields(raw.partition(b"\r\n\r\n")[0])
        assert sent["transfer-encoding"] == "chunked" and "content-length" not in sent
        assert raw.endswith(b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")

        # RFC 9112 §6.1: after a request with both, the connection closes once answered, so a request
        # a front proxy framing by content-length took for part of the body is never served.
        smuggled = b"GET /v1/models/m:predict HTTP/1.1\r\nhost: x\r\n\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(request + smuggled)
            buf = bytearray()
            head = read_head(conn, buf)
            assert head is not None and head.startswith(b"HTTP/1.1 200 ") and fields(head)["connection"] == "close"
            read_exactly(conn, buf, int(fields(head)["content-length"]))
            while chunk := conn.recv(65536):  # then the end of the connection, and nothing more
                buf += chunk
            assert buf == b""
        assert len(got) == 2 and not any(b"GET " in raw for raw in got)
    finally:
        backend.close()


def test_a_chunked_body_that_cannot_be_framed_is_a_400_and_the_gateway_goes_on(gateway):
    def serve(conn: socket.socket, n: int) -> None:
        if read_head(conn, bytearray()) is not None:
            conn.sendall(OK)

    backend = Backend(serve)
    try:
        port = gateway({"m": backend.port})
        for target in (b"/v1/chat/completions", b"/v1/models/m:predict"):
            bad = b"POST %s HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n" % target
            [(head, body)] = exchange(port, [bad])
            assert head.startswith(b"HTTP/1.1 400 ") and "chunk size" in json.loads(body)["error"]["message"], target
        [(head, _)] = exchange(port, [b"GET /v1/services/m/health HTTP/1.1\r\nhost: x\r\n\r\n"])
        assert head.startswith(b"HTTP/1.1 200 ")
    finally:
        backend.close()


def record(home: Path, uuid: str, name: str, port: int) -> None:
    folder = home / "services" / uuid
    folder.mkdir(parents=True, exist_ok=True)
    data = {"uuid": uuid, "config": {"model_name": name}, "status": {"state": "active"},
            "endpoint": {"host": "127.0.0.1", "port": port}}
    (folder / "service.json.tmp").write_text(json.dumps(data))
    (folder / "service.json.tmp").rename(folder / "service.json")


@pytest.mark.parametrize("watch", ["auto", "poll"])
def test_the_routing_table_follows_the_records_by_inotify_or_by_polling(tmp_path, watch):
    (tmp_path / "services").mkdir()
    record(tmp_path, "u1", "iris", 1001)

    async def scenario() -> list[str]:
        tables: list[Table] = []
        table = HomeTable(tmp_path, tables.append, watch=watch)
        table.start()
        assert table.mode == ("inotify" if watch == "auto" else "poll")

        async def until(condition: Callable[[], bool], what: str) -> None:
            try:
                async with asyncio.timeout(5):
                    while not condition():
                        await asyncio.sleep(0.01)
            except TimeoutError:
                raise AssertionError(f"the table did not follow {what} within 5 s ({table.mode})") from None

        await until(lambda: bool(tables) and "iris" in tables[-1].by_name, "the first record")
        record(tmp_path, "u2", "wine", 1002)
        await until(lambda: "wine" in tables[-1].by_name, "a new record")
        record(tmp_path, "u1", "iris", 2001)
        await until(lambda: tables[-1].by_uuid["u1"].port == 2001, "a changed record")
        (tmp_path / "services" / "u2" / "service.json").unlink()
        (tmp_path / "services" / "u2").rmdir()
        await until(lambda: "wine" not in tables[-1].by_name, "a deleted record")
        return sorted(tables[-1].by_name)

    assert asyncio.run(scenario()) == ["iris"]


# ---------------------------------------------------------------------------- on demand (issue 12)


class StandInDaemon:
    """A stand-in for the daemon's control socket, ONLY to test the gateway's own wake protocol.

    It answers ``POST /v1/services/{uuid}/start`` as ``answer(path)`` says, after ``delay`` seconds
    (``answer`` returns the response bytes, or None to never answer), and records each call's path
    and when it was answered. The daemon's real side of a wake (the start itself, the records it
    writes) is tested end to end in tests/test_gateway.py once it exists.
    """

    def __init__(self, path: Path, answer: Callable[[str], bytes | None], delay: float = 0.0):
        self.path = path
        self.answer = answer
        self.delay = delay
        self.calls: list[str] = []
        self.answered_at: list[float] = []
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.listen(16)
        self.server = Backend(self._one, sock=sock)

    def _one(self, conn: socket.socket, _n: int) -> None:
        head = read_head(conn, bytearray())
        if head is None:
            return
        path = head.split(b" ")[1].decode()
        self.calls.append(path)
        time.sleep(self.delay)
        reply = self.answer(path)
        if reply is None:
            time.sleep(60)
            return
        self.answered_at.append(time.monotonic())
        conn.sendall(reply)

    def close(self) -> None:
        self.server.close()


def daemon_reply(status: int, payload: object) -> bytes:
    body = json.dumps(payload).encode()
    return b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (
        status, len(body), body
    )


def answering(seen: list[tuple[float, bytes]]) -> Callable[[socket.socket, int], None]:
    """A backend that answers every request with OK, noting when and what it got."""

    def serve(conn: socket.socket, n: int) -> None:
        buf = bytearray()
        while (head := read_head(conn, buf)) is not None:
            body = read_exactly(conn, buf, int(fields(head).get("content-length", "0")))
            seen.append((time.monotonic(), head.split(b"\r\n")[0] + b" " + body))
            conn.sendall(OK)

    return serve


def status_of(head: bytes) -> int:
    return int(head.split(b" ")[1])


def at_once(port: int, requests: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Each request on its own connection, all at once; their answers in order."""
    results: list[tuple[bytes, bytes] | BaseException] = [ValueError("no answer")] * len(requests)

    def one(i: int) -> None:
        try:
            results[i] = exchange(port, [requests[i]])[0]
        except BaseException as exc:  # (reported below)
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]


def test_a_scaled_to_zero_command_service_is_woken_by_one_start_call_for_all_its_waiting_requests(gateway, tmp_path):
    seen: list[tuple[float, bytes]] = []
    backend = Backend(answering(seen))
    daemon = StandInDaemon(tmp_path / "d.sock", lambda path: daemon_reply(200, {"uuid": "m"}), delay=0.5)
    try:
        port = gateway(
            {"m": backend.port}, "--daemon-socket", str(daemon.path), "--wake-timeout", "7.5",
            route_extra="state=scaled_to_zero,type=command,idle=60",
        )
        post = b"POST /v1/models/m:predict HTTP/1.1\r\nhost: x\r\ncontent-length: 8\r\n\r\n{\"a\": %d}"
        answers = at_once(port, [post % i for i in range(8)] + [b"GET /v1/services/m/x HTTP/1.1\r\nhost: x\r\n\r\n"])
        assert [status_of(h) for h, _ in answers] == [200] * 9, answers
        assert daemon.calls == ["/v1/services/m/start?timeout=7.5"]
        # None reached the server before the start call was answered; each reached it once, body whole.
        assert len(seen) == 9 and min(t for t, _ in seen) >= daemon.answered_at[0]
        assert sorted(r for _, r in seen if r.startswith(b"POST")) == sorted(
            b"POST /v1/models/m:predict HTTP/1.1 {\"a\": %d}" % i for i in range(8)
        )
    finally:
        backend.close()
        daemon.close()


def test_a_wake_that_takes_longer_than_the_wake_timeout_is_a_504(gateway, tmp_path):
    backend = Backend(answering([]))
    daemon = StandInDaemon(tmp_path / "d.sock", lambda path: None)  # the start never returns
    try:
        port = gateway({"m": backend.port}, "--daemon-socket", str(daemon.path), "--wake-timeout", "0.5",
                       route_extra="state=scaled_to_zero,type=command,idle=60")
        exchange(port, [b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n"])  # (the gateway is up: its start is not timed)
        started = time.monotonic()
        [(head, body)] = exchange(port, [b"GET /v1/services/m/x HTTP/1.1\r\nhost: x\r\n\r\n"])
        waited = time.monotonic() - started
        assert status_of(head) == 504 and json.loads(body)["error"]["type"] == "GatewayTimeout", (head, body)
        assert 0.5 <= waited < 3, waited
        message = json.loads(body)["error"]["message"]  # the wait the client saw, not only the setting
        found = re.search(r"within 0\.5 s \(wake_timeout; answered after (\d+\.\d) s\)", message)
        assert found and 0.5 <= float(found.group(1)) <= waited + 0.1, (message, waited)
        assert daemon.calls == ["/v1/services/m/start?timeout=0.5"] and backend.connections == 0
    finally:
        backend.close()
        daemon.close()


def test_without_a_wake_timeout_a_wake_waits_the_services_startup_timeout(gateway, tmp_path):
    daemon = StandInDaemon(tmp_path / "d.sock", lambda path: None)
    backend = Backend(answering([]))
    try:
        port = gateway({"m": backend.port}, "--daemon-socket", str(daemon.path),
                       route_extra="state=scaled_to_zero,type=command,idle=60,startup=0.4")
        [(head, body)] = exchange(port, [b"GET /v1/services/m/x HTTP/1.1\r\nhost: x\r\n\r\n"])
        assert status_of(head) == 504 and "0.4 s" in json.loads(body)["error"]["message"], body
        assert daemon.calls == ["/v1/services/m/start?timeout=0.4"]
    finally:
        backend.close()
        daemon.close()


def test_a_wake_that_fails_is_a_503_with_the_daemons_message(gateway, tmp_path):
    why = "service m: the server exited with code 1 before answering its health probe"
    daemon = StandInDaemon(tmp_path / "d.sock", lambda path: daemon_reply(500, {"error": {"type": "DeployError", "message": why}}))
    backend = Backend(answering([]))
    try:
        port = gateway({"m": backend.port}, "--daemon-socket", str(daemon.path),
                       route_extra="state=scaled_to_zero,type=command,idle=60")
        upload = b"POST /v1/models/m:predict HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"
        answers = at_once(port, [upload, b"GET /v1/services/m/x HTTP/1.1\r\nhost: x\r\n\r\n"])
        for head, body in answers:
            error = json.loads(body)["error"]
            assert status_of(head) == 503 and error["type"] == "ServiceUnavailable" and why in error["message"], body
            assert error["state"] == "scaled_to_zero"
        assert 1 <= len(daemon.calls) <= 2 and backend.connections == 0  # (the second may come after the first failed)
    finally:
        backend.close()
        daemon.close()


def test_no_daemon_to_wake_a_command_service_is_a_503_that_says_so(gateway, tmp_path):
    backend = Backend(answering([]))
    try:
        port = gateway({"m": backend.port}, "--daemon-socket", str(tmp_path / "none.sock"),
                       route_extra="state=scaled_to_zero,type=command,idle=60")
        [(head, body)] = exchange(port, [b"GET /v1/services/m/x HTTP/1.1\r\nhost: x\r\n\r\n"])
        assert status_of(head) == 503 and "the daemon is not running" in json.loads(body)["error"]["message"], body
    finally:
        backend.close()


def test_a_scaled_to_zero_built_in_service_is_forwarded_and_the_model_lists_do_not_wake_anything(gateway, tmp_path):
    seen: list[tuple[float, bytes]] = []
    builtin, command = Backend(answering(seen)), Backend(answering(seen))
    daemon = StandInDaemon(tmp_path / "d.sock", lambda path: daemon_reply(200, {}))
    try:
        port = gateway({"iris": builtin.port, "llm": command.port}, "--daemon-socket", str(daemon.path),
                       route_extra={"iris": "state=scaled_to_zero,type=python,idle=60",
                                    "llm": "state=scaled_to_zero,type=command,idle=60"})
        answers = exchange(port, [
            b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n",
            b"GET /v1/models/llm HTTP/1.1\r\nhost: x\r\n\r\n",
            b"GET /v1/models/iris HTTP/1.1\r\nhost: x\r\n\r\n",
        ])
        assert [status_of(h) for h, _ in answers] == [200] * 3
        listed = {m["id"]: m for m in json.loads(answers[0][1])["data"]}
        for one in (listed["llm"], listed["iris"], json.loads(answers[1][1]), json.loads(answers[2][1])):
            assert one["ready"] is False and one["state"] == "scaled_to_zero", one
        assert daemon.calls == [] and builtin.connections == command.connections == 0
        # A built-in server's socket is the daemon's, which wakes it on the connection: sent on at once.
        [(head, _)] = exchange(port, [b"POST /v1/models/iris:predict HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"])
        assert status_of(head) == 200 and daemon.calls == [] and len(seen) == 1
    finally:
        builtin.close()
        command.close()
        daemon.close()


@pytest.mark.slow
def test_a_starting_service_is_waited_for_only_if_it_is_on_demand(gateway, tmp_path):
    backend = Backend(answering([]))
    try:
        port = gateway({"plain": backend.port, "lazy": backend.port}, "--wake-timeout", "1.5",
                       route_extra={"plain": "state=pending_startup", "lazy": "state=pending_startup,idle=60"})
        exchange(port, [b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n"])  # (the gateway is up: its start is not timed)
        started = time.monotonic()
        [(head, body)] = exchange(port, [b"GET /v1/services/plain/x HTTP/1.1\r\nhost: x\r\n\r\n"])
        assert status_of(head) == 503 and time.monotonic() - started < 1.0, body  # today's answer, at once
        started = time.monotonic()
        [(head, body)] = exchange(port, [b"GET /v1/services/lazy/x HTTP/1.1\r\nhost: x\r\n\r\n"])
        assert status_of(head) == 504 and time.monotonic() - started >= 1.5, body  # woken by someone else: waited for
        assert backend.connections == 0
    finally:
        backend.close()


def on_demand_record(home: Path, port: int, state: str, **config: object) -> None:
    """services/u1/service.json of a command service named m with an idle_timeout, written as the daemon writes it."""
    folder = home / "services" / "u1"
    folder.mkdir(parents=True, exist_ok=True)
    data = {"uuid": "u1", "desired_state": "running", "status": {"state": state},
            "config": {"model_name": "m", "model_type": "command", "idle_timeout": 60.0, **config},
            "endpoint": {"host": "127.0.0.1", "port": port}}
    (folder / "service.json.tmp").write_text(json.dumps(data))
    (folder / "service.json.tmp").rename(folder / "service.json")


def waking_daemon(home: Path, port: int, seen: list[tuple[float, bytes]]) -> StandInDaemon:
    """A stand-in daemon whose start opens the server again on ``port`` and records it active, as a wake does."""
    woken: list[Backend] = []

    def start(path: str) -> bytes:
        woken.append(Backend(answering(seen), port=port))
        on_demand_record(home, port, "active")
        return daemon_reply(200, {"uuid": "u1"})

    daemon = StandInDaemon(home / "modeld.sock", start)
    daemon.woken = woken  # type: ignore[attr-defined]
    return daemon


def test_a_request_that_races_an_idle_stop_is_sent_again_after_the_wake(gateway, tmp_path):
    """The server is stopped as the request reaches it: the record says pending_shutdown, the
    connection (a fresh one) closes unanswered, the port closes, the record says scaled_to_zero.
    The gateway waits, wakes it, and sends the request again; the client sees only the 200."""
    got: list[bytes] = []
    seen: list[tuple[float, bytes]] = []

    def stopping(conn: socket.socket, n: int) -> None:
        buf = bytearray()
        head = read_head(conn, buf)
        if head is None:
            return
        got.append(head)
        on_demand_record(tmp_path, old.port, "pending_shutdown")  # (the daemon writes it before the signal)
        old.close()
        conn.close()
        time.sleep(0.2)
        on_demand_record(tmp_path, old.port, "scaled_to_zero")

    old = Backend(stopping)
    on_demand_record(tmp_path, old.port, "active")
    daemon = waking_daemon(tmp_path, old.port, seen)
    try:
        port = gateway({}, "--home", str(tmp_path), "--no-spare", "--wake-timeout", "10")
        post = b"POST /v1/models/m:predict HTTP/1.1\r\nhost: x\r\ncontent-length: 7\r\n\r\n{\"x\":1}"
        [(head, body)] = exchange(port, [post])
        assert status_of(head) == 200, (head, body)
        assert len(got) == 1 and daemon.calls == ["/v1/services/u1/start?timeout=10.0"]
        assert [r for _, r in seen] == [b"POST /v1/models/m:predict HTTP/1.1 {\"x\":1}"]
    finally:
        daemon.close()
        for b in daemon.woken:  # type: ignore[attr-defined]
            b.close()


def test_a_refused_connection_to_a_service_just_scaled_to_zero_is_sent_again_after_the_wake(gateway, tmp_path):
    """The table still says active (polled every 0.5 s here) when the record already says
    scaled_to_zero and the port is closed: the refused connect reads the records again and wakes it."""
    seen: list[tuple[float, bytes]] = []
    closed = socket.create_server(("127.0.0.1", 0))
    free = closed.getsockname()[1]
    closed.close()
    on_demand_record(tmp_path, free, "active")
    daemon = waking_daemon(tmp_path, free, seen)
    try:
        port = gateway({}, "--home", str(tmp_path), "--no-spare", "--watch", "poll")
        [(head, body)] = exchange(port, [b"GET /v1/models/m HTTP/1.1\r\nhost: x\r\n\r\n"])
        assert json.loads(body)["state"] == "active", body
        on_demand_record(tmp_path, free, "scaled_to_zero")
        [(head, body)] = exchange(port, [b"GET /v1/services/u1/x HTTP/1.1\r\nhost: x\r\n\r\n"])
        assert status_of(head) == 200, (head, body)
        assert len(daemon.calls) == 1 and len(seen) == 1
    finally:
        daemon.close()
        for b in daemon.woken:  # type: ignore[attr-defined]
            b.close()


def activity_of(home: Path, uuid: str = "u1") -> tuple[float, int, int]:
    data = (home / "run" / "activity" / uuid).read_bytes()
    assert len(data) == 16
    return struct.unpack("<dII", data)


def wait_until(condition: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.01)


def test_the_gateway_writes_a_command_services_activity_and_gives_back_every_count(gateway, tmp_path):
    release = threading.Event()

    def held(conn: socket.socket, n: int) -> None:
        buf = bytearray()
        while (head := read_head(conn, buf)) is not None:
            if b"/hang" in head:
                time.sleep(30)  # never answers: its client goes away
                return
            release.wait(10)
            conn.sendall(OK)

    backend = Backend(held)
    on_demand_record(tmp_path, backend.port, "active")
    (tmp_path / "services" / "u2").mkdir()  # no idle_timeout: no activity file
    (tmp_path / "services" / "u2" / "service.json").write_text(json.dumps({
        "uuid": "u2", "status": {"state": "active"}, "endpoint": {"host": "127.0.0.1", "port": backend.port},
        "config": {"model_name": "plain", "model_type": "command"}}))
    (tmp_path / "services" / "u3").mkdir()  # a built-in server writes its own
    (tmp_path / "services" / "u3" / "service.json").write_text(json.dumps({
        "uuid": "u3", "status": {"state": "active"}, "endpoint": {"host": "127.0.0.1", "port": backend.port},
        "config": {"model_name": "iris", "model_type": "python", "idle_timeout": 60}}))
    try:
        port = gateway({}, "--home", str(tmp_path))
        before = time.time()
        first = threading.Thread(target=exchange, args=(port, [b"GET /v1/services/u1/a HTTP/1.1\r\nhost: x\r\n\r\n"]))
        first.start()
        wait_until(lambda: (tmp_path / "run" / "activity" / "u1").exists() and activity_of(tmp_path)[1] == 1, "in_flight 1")
        last, in_flight, requests = activity_of(tmp_path)
        assert requests == 1 and last >= before
        assert os.stat(tmp_path / "run" / "activity" / "u1").st_mode & 0o777 == 0o600
        release.set()
        first.join(10)
        wait_until(lambda: activity_of(tmp_path)[1] == 0, "in_flight back to 0")
        assert activity_of(tmp_path)[0] >= last and activity_of(tmp_path)[2] == 1
        # A client that goes away before its answer gives its count back too.
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(b"GET /v1/services/u1/hang HTTP/1.1\r\nhost: x\r\n\r\n")
            wait_until(lambda: activity_of(tmp_path)[1:] == (1, 2), "the second request counted")
        wait_until(lambda: activity_of(tmp_path)[1] == 0, "in_flight back to 0 after the client left")
        for other in ("plain", "iris"):
            [(head, _)] = exchange(port, [b"GET /v1/models/%s:x HTTP/1.1\r\nhost: x\r\n\r\n" % other.encode()])
            assert status_of(head) == 200
        assert sorted(os.listdir(tmp_path / "run" / "activity")) == ["u1"]
    finally:
        release.set()
        backend.close()


def test_a_chunked_body_over_the_cap_after_an_early_answer_cuts_the_client_and_logs_no_error(tmp_path):
    """A backend that answers before it has read the body (its head, then its body a moment later), and a
    chunked body that goes over the gateway's cap after that: the client's response is cut (no 413 after
    a 200 has begun), the backend's late bytes go nowhere, and the gateway logs no error for it."""

    def serve(conn: socket.socket, n: int) -> None:
        if read_head(conn, bytearray()) is None:
            return  # (a spare connection, closed unused)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nok")
        cut.wait(10)
        with contextlib.suppress(OSError):
            conn.sendall(b"ok")
        late.set()

    cut, late = threading.Event(), threading.Event()
    backend = Backend(serve)
    sock = socket.create_server(("127.0.0.1", 0))
    log = tmp_path / "gateway.err"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.gateway", "--fd", str(sock.fileno()), f"--route=name=m,addr=127.0.0.1:{backend.port}",
             "--max-body", "1000", "--no-spare"],
            cwd=REPO, pass_fds=[sock.fileno()], stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
        )
    port = sock.getsockname()[1]
    sock.close()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"POST /v1/models/m:predict HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
            buf = bytearray()
            head = read_head(conn, buf)
            assert head is not None and head.startswith(b"HTTP/1.1 200 ")
            with contextlib.suppress(OSError):
                for _ in range(10):
                    conn.sendall(b"200\r\n" + b"x" * 512 + b"\r\n")  # 5 KiB: over the cap of 1000 bytes
            with contextlib.suppress(OSError):
                while chunk := conn.recv(65536):
                    buf += chunk
            assert b"413" not in bytes(buf) and len(buf) < 4  # cut: not the whole 4-byte body, and no 413 after it
        cut.set()
        assert late.wait(10)  # the backend's late bytes are sent after the cut; then one more request goes through
        [(head, _)] = exchange(port, [b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n"])
        assert head.startswith(b"HTTP/1.1 200 ") and proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        backend.close()
    assert "Traceback" not in log.read_text() and "Fatal error" not in log.read_text(), log.read_text()
