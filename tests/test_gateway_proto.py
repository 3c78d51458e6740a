"""The gateway prototype's framing and routing, without processes (daemon/gateway/http1.py, routes.py).

The end-to-end checks (real backends, curl, the bench) are scripts/gateway_proto/bench.py and the
curl lines in docs/gateway-design.md; the product's tests/test_gateway.py replaces them.
"""

from __future__ import annotations

import json

import pytest

from daemon.gateway import http1
from daemon.gateway.routes import BY_BODY, Answer, Entry, Forward, Table

CHUNKED = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nx-trailer: 1\r\n\r\n"


def test_chunked_end_is_found_across_every_split() -> None:
    body = CHUNKED + b"GET /next"  # a pipelined request follows
    for cut in range(len(body) + 1):
        scanner = http1.ChunkedScanner()
        first = scanner.feed(body[:cut])
        if first >= 0:
            assert first == len(CHUNKED)
            continue
        second = scanner.feed(body[cut:])
        assert second == len(CHUNKED) - cut, cut


def test_a_whole_chunked_body_is_decoded() -> None:
    assert http1.dechunk(CHUNKED) == b"Wikipedia in\r\n\r\nchunks."
    assert http1.dechunk(b"0\r\n\r\n") == b""


@pytest.mark.parametrize(
    "bad",
    [
        b"zz\r\n",
        # sizes int(x, 16) would take, which a next hop may read otherwise (request smuggling)
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"+5\r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"5_0\r\n" + b"x" * 80 + b"\r\n0\r\n\r\n",
        b" 5\r\nhello\r\n0\r\n\r\n",
        b"\r\n",  # no size at all
        b"5\nhello\r\n0\r\n\r\n",  # a size line ended by a bare LF
        b"5\r\nhelloXY0\r\n\r\n",  # chunk data not followed by CRLF
        b"5\r\nhello\r\n0\r\nx-a: 1\rx-b: 2\r\n\r\n",  # a bare CR in a trailer
        b"1234567890abcdef0\r\n",  # a size past 2^64
    ],
)
def test_bad_chunk_framing_is_refused(bad: bytes) -> None:
    with pytest.raises(http1.BadMessage):
        for cut in (len(bad), 1):  # in one read, then split after the first byte
            scanner = http1.ChunkedScanner()
            scanner.feed(bad[:cut])
            scanner.feed(bad[cut:])


def test_chunk_sizes_as_the_rfc_writes_them_are_read() -> None:
    for size_line in (b"5", b"05", b"5;name=value", b"5 ;name", b"5\t;name=\"quoted\""):
        body = size_line + b"\r\nhello\r\n0\r\n\r\n"
        assert http1.ChunkedScanner().feed(body) == len(body) and http1.dechunk(body) == b"hello", size_line


@pytest.mark.parametrize(
    ("head", "why"),
    [
        (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\rInjected: yes", "bare CR"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\nInjected: yes", "bare CR or LF"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\0b", "NUL"),
        (b"GET / HTTP/1.1", "needs one Host"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b", "more than one Host"),
        (b"GET / HTTP/1.0\r\nHost: a\r\nHost: a", "more than one Host"),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked", "Transfer-Encoding in an HTTP/1.0"),
        (b"GET / HTTP/1.2\r\nHost: h", "bad request line"),
    ],
)
def test_request_heads_the_rfc_says_to_refuse_are_refused(head: bytes, why: str) -> None:
    with pytest.raises(http1.BadMessage, match=why):
        http1.parse_request(head)


def test_an_http_1_0_request_needs_no_host() -> None:
    assert http1.parse_request(b"GET / HTTP/1.0").get(b"host") is None


def test_hop_by_hop_fields_and_those_named_in_connection_are_dropped() -> None:
    head = http1.parse_request(
        b"POST /x HTTP/1.1\r\nHost: a\r\nConnection: close, X-Secret\r\nX-Secret: s\r\nKeep-Alive: 5\r\n"
        b"TE: trailers\r\nUpgrade: h2c\r\nExpect: 100-continue\r\nContent-Length: 3\r\nX-Kept: k"
    )
    out = http1.forward_fields(head)
    assert head.close and head.length == 3
    assert out == b"host: a\r\ncontent-length: 3\r\nx-kept: k\r\n\r\n"


def test_framing_is_checked() -> None:
    with pytest.raises(http1.BadMessage):
        http1.parse_request(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4")
    with pytest.raises(http1.BadMessage):
        http1.parse_request(b"POST / HTTP/1.1\r\nContent-Length : 3")  # whitespace before the colon (smuggling)
    with pytest.raises(http1.BadMessage):
        http1.parse_request(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip")
    head = http1.parse_request(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3")
    assert head.chunked and head.length is None
    assert http1.parse_request(b"GET / HTTP/1.0").close
    assert not http1.parse_request(b"GET / HTTP/1.0\r\nConnection: keep-alive").close


def test_field_names_checked_once_are_still_checked_in_every_other_spelling() -> None:
    for _ in range(2):  # the second time from the names already seen (http1._NAMES)
        head = http1.parse_request(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nX-A:  b ")
        assert head.length == 3 and http1.forward_fields(head) == b"host: h\r\ncontent-length: 3\r\nx-a: b\r\n\r\n"
        for bad in (b"Content-Length : 3", b" Content-Length: 3", b"Content-Length", b"X A: b", b": b"):
            with pytest.raises(http1.BadMessage):
                http1.parse_request(b"POST / HTTP/1.1\r\n" + bad)
    for i in range(2 * http1.NAMES_KEPT):  # many names: each still parsed, the memory of them bounded
        assert http1.parse_request(b"GET / HTTP/1.1\r\nHost: h\r\nX-%d: v" % i).headers == [(b"host", b"h"), (b"x-%d" % i, b"v")]
    assert len(http1._NAMES) <= http1.NAMES_KEPT


def _table() -> Table:
    return Table(
        [
            Entry("u1", "iris", "127.0.0.1", 1),
            Entry("u2", "twin", "127.0.0.1", 2),
            Entry("u3", "twin", "127.0.0.1", 3),
            Entry("u4", "down", "127.0.0.1", 4, state="error", last_error="exit code 1"),
        ]
    )


def test_routes_by_name_by_uuid_and_by_body() -> None:
    t = _table()
    assert t.resolve(b"POST", b"/v1/models/iris:predict") == Forward(t.by_uuid["u1"], b"/v1/models/iris:predict")
    assert t.resolve(b"GET", b"/v1/services/u3/health?x=1") == Forward(t.by_uuid["u3"], b"/health?x=1")
    assert t.resolve(b"POST", b"/v1/chat/completions") is BY_BODY
    assert t.resolve_body(b'{"messages": [], "model": "iris"}') == t.by_uuid["u1"]


def _answer(result: object) -> tuple[int, dict[str, object]]:
    assert isinstance(result, Answer)
    return result.status, result.body


def test_errors() -> None:
    t = _table()
    status, body = _answer(t.resolve(b"POST", b"/v1/models/nope:predict"))
    assert status == 404 and body["error"]["models"] == ["down", "iris", "twin"]  # type: ignore[index]
    status, body = _answer(t.resolve(b"POST", b"/v1/models/twin:predict"))
    assert status == 409 and body["error"]["uuids"] == ["u2", "u3"]  # type: ignore[index]
    status, body = _answer(t.resolve(b"POST", b"/v1/models/down:predict"))
    assert status == 503 and body["error"]["state"] == "error" and body["error"]["last_error"] == "exit code 1"  # type: ignore[index]
    status, _ = _answer(t.resolve_body(b"[1]"))
    assert status == 400


def test_model_objects_speak_both_protocols() -> None:
    t = _table()
    status, body = _answer(t.resolve(b"GET", b"/v1/models"))
    assert status == 200 and body["object"] == "list" and len(body["data"]) == 4  # type: ignore[arg-type]
    status, body = _answer(t.resolve(b"GET", b"/v1/models/down"))
    assert status == 200 and body["id"] == body["name"] == "down" and body["object"] == "model" and body["ready"] is False
    encoded = Answer(404, {"error": {}}).encode(close=True)
    assert encoded.startswith(b"HTTP/1.1 404 Not Found\r\n") and b"connection: close" in encoded
    assert json.loads(encoded.split(b"\r\n\r\n", 1)[1]) == {"error": {}}


def test_the_gateway_imports_only_the_standard_library_and_uvloop() -> None:
    """The gateway stays small and quick to start: the standard library, and uvloop's event loop (where
    installed: a Linux dependency, imported in loop_factory only)."""
    import ast
    import sys
    from pathlib import Path

    folder = Path(http1.__file__).parent
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            for name in names:
                assert name.split(".")[0] in sys.stdlib_module_names or name == "uvloop", (path.name, name)


def test_on_demand_entries_from_records_wait_or_answer_as_their_state_says() -> None:
    from daemon.gateway.home import entry_of

    def entry(state: str, desired: str = "running", **config: object) -> Entry:
        record = {"uuid": "u", "desired_state": desired, "status": {"state": state},
                  "config": {"model_name": "m", **config}, "endpoint": {"host": "0.0.0.0", "port": 9}}
        return entry_of(record)

    command = {"model_type": "command", "idle_timeout": 30, "startup_timeout": None}
    e = entry("scaled_to_zero", **command)
    assert (e.model_type, e.idle_timeout, e.startup_timeout) == ("command", 30.0, float("inf"))
    assert e.waits and e.counted and not e.forwarded_asleep and Table.usable(e) is e
    builtin = entry("scaled_to_zero", model_type="pickle", idle_timeout=30)
    assert builtin.forwarded_asleep and not builtin.counted
    assert entry("active", command=["x"]).model_type == "command"  # (an old record: inferred as the daemon infers it)
    assert entry("active", model_type="command").counted is False  # no idle_timeout: the gateway writes nothing
    # Starting or stopping: waited for on demand only; a stop the user asked for is today's 503.
    assert entry("pending_startup", **command).waits and entry("pending_shutdown", **command).waits
    for e in (entry("pending_startup", model_type="command"), entry("pending_shutdown", "stopped", **command),
              entry("scaled_to_zero", "stopped", **command), entry("error", **command)):
        answer = Table.usable(e)
        assert isinstance(answer, Answer) and answer.status == 503, e


def test_model_names_are_percent_decoded_and_may_hold_a_colon() -> None:
    t = Table([Entry("u1", "sp ace", "127.0.0.1", 1), Entry("u2", "m:predict", "127.0.0.1", 2), Entry("u3", "ünï", "127.0.0.1", 3)])
    assert t.resolve(b"POST", b"/v1/models/sp%20ace:predict") == Forward(t.by_uuid["u1"], b"/v1/models/sp%20ace:predict")
    assert t.resolve(b"POST", b"/v1/models/%C3%BCn%C3%AF:predict") == Forward(t.by_uuid["u3"], b"/v1/models/%C3%BCn%C3%AF:predict")
    status, body = _answer(t.resolve(b"GET", b"/v1/models/m:predict"))  # the whole is a name: its model object
    assert status == 200 and body["id"] == "m:predict"
    status, body = _answer(t.resolve(b"HEAD", b"/v1/models/sp%20ace"))  # HEAD is answered here too (no wake)
    assert status == 200 and body["id"] == "sp ace"
