"""Fuzz the daemon's control socket with bad input and plausible configs; prints one JSON line.

    python scripts/fuzz.py [--count 10000] [--configs 200] [--seed 1] [--home DIR]

Every route of ``daemon.api.Api`` (taken from its route table, so none is
missed) gets malformed JSON, wrong types, unknown fields, huge bodies, path
traversal and unicode in uuids, bad query parameters, wrong methods; and
raw garbage bytes go to the socket on connections of their own. The
generator is a seeded ``random.Random``: the same seed gives the same
inputs. Every input is meant to be refused, so the checks are strict:

- an HTTP input gets a 4xx with ``{"error": {"type", "message"}}`` whose
  message names the problem (the field, parameter or value at fault);
- garbage gets the same, or a closed connection;
- the daemon stays the same process and keeps answering;
- nothing under the home changes (every file's content, inode and mtime,
  the daemon's log excepted).

Without ``--home`` it starts a daemon in a temp home, deploys one real
service (so its uuid is fuzzed too: a bad ``?timeout=`` on its stop must
not stop it), fuzzes, and stops everything. The output has ``inputs`` (how
many were sent), ``by_kind``, ``failures`` (the first few, with the input)
and ``seconds``.

Then ``--configs N`` (default 200) plausible configs are deployed, every one
valid JSON: a known-good base (the built-in server with examples/iris.py, or
a small command server) with one field of ``ServiceConfig``, of its restart
policy or of the deploy request changed to a boundary, non-finite (``1e999``),
huge, unicode or wrong-type value. Both answers can be right, and are checked:

- no answer is a 5xx;
- a refusal is a 4xx JSON error naming the field, and nothing is created;
- an accepted config's server is healthy when the call returns, the service
  reads back with the config the deploy answered, and it stops;
- after the last one the daemon is restarted: every accepted config is listed
  again, identical (secret values masked), the client can parse every record,
  and nothing was set aside.

Its report is under ``configs``: ``inputs``, ``accepted`` and
``accepted_fraction`` (at least 20 %, so the paths after validation run too),
``statuses``, ``by_field``, ``accepted_by_field`` and ``failures``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import socket
import sys
import time
import uuid as uuidlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from daemon.testing import COMMAND_SERVER, IRIS, REPO, UnixHTTP, free_port, wait_for
from daemon.models import ServiceState

# ---------------------------------------------------------------- the routes


def route_table() -> list[tuple[str, str, dict[str, type]]]:
    """(method, path template with {uuid}, accepted query parameters) for every route of the API, from
    the route table and each route's spec (the one the API checks a query against)."""
    from daemon.api import Api
    from daemon.openapi import openapi_path, spec_of

    api = Api(manager=None, request_shutdown=lambda stop: None)  # type: ignore[arg-type]
    routes = []
    for method, pattern, handler in api.routes:
        template = openapi_path(pattern)
        assert re.fullmatch(r"[/a-z0-9{}.]+", template), f"a route the fuzzer cannot fill in: {pattern.pattern}"
        spec = spec_of(handler)
        assert spec is not None, f"a route without a spec: {pattern.pattern}"
        routes.append((method, template, dict(spec.query)))
    return routes


# ------------------------------------------------------------- the generator

UNICODE = "éü中文日本語🙂🚀\u202e\u200b\ufeffΩ≈ç√∫Ǆǅ\u0301ß\U0001f4a9ﬁ"
TRAVERSAL = [
    "..", "../daemon", "../..", "..%2F..%2Fetc%2Fpasswd", "%2e%2e", "%2E%2E%2F", "..%5c..%5c", ".%00.", "x%00y",
    "%2e%2e%2fservices", "....//....//", "..;/", "%252e%252e", "~", ".", "%2f", "%c0%ae%c0%ae", "%ff%fe",
    "%e2%80%ae", "00000000-0000-0000-0000-00000000000g", "{uuid}", "' OR 1=1 --", "$(id)", "`id`", "%0d%0aX-Y: z",
]
METHODS = ["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS", "TRACE", "FOO", "get", "CONNECTX"]
PATHS_404 = ["/", "/v1", "/v2/services", "/v1/nothing", "/v1/services/x/y/z", "/v1//services", "/v1/daemon/",
             "/V1/SERVICES", "/v1/services/", "/v1/daemon/shutdown/now", "/%2e%2e/v1/daemon", "//", "/v1/services/a/restart"]


def rand_text(rng: random.Random, n: int | None = None) -> str:
    n = rng.randint(1, 24) if n is None else n
    alphabet = "abcXYZ019-_.:/ " + UNICODE + "\"'\\{}[]<>&=?#%+;"
    return "".join(rng.choice(alphabet) for _ in range(n))


def bad_value(rng: random.Random, kind: type) -> str:
    """A query value that ``kind`` refuses, whatever the random part: it starts with a letter none accepts."""
    fixed = {
        bool: ["maybe", "2", "truee", "nope", "-1", "t", "y", "🙂", "%00", "tru"],
        float: ["soon", "-1", "nan", "inf", "-inf", "1e999", "NaN", "", " ", "1,5", "0x10", "--1", "½"],
        int: ["-3", "1.5", "ten", "", "1e3", "-0.0", "0x1f", "inf", "nan", "½"],
        uuidlib.UUID: ["nope", "../etc", "1234", "", "%2e%2e", "g" * 32],
        str: [],
        ServiceState: ["nope", "", "ACTIVE", "active ", "scaled-to-zero"],
    }[kind]
    if fixed and rng.random() < 0.6:
        return rng.choice(fixed)
    return "q" + rand_text(rng)


def encode(text: str) -> str:
    return quote(text, safe="")


@dataclass
class Case:
    kind: str
    raw: bytes
    mentions: list[str] = field(default_factory=list)  # one of these must appear in the error message
    statuses: tuple[int, ...] = ()  # allowed statuses; () = any 4xx
    garbage: bool = False  # may be answered by a closed connection
    route: str = ""  # "METHOD /template" of the route it aims at, if any


def request(method: str, target: str, body: bytes | None = None, headers: dict[str, str] | None = None,
            chunk: int = 0) -> bytes:
    """Raw HTTP/1.1 request bytes; ``chunk`` > 0 sends the body chunked, in pieces of that size."""
    lines = [f"{method} {target} HTTP/1.1", "host: modeld"]
    hdrs = dict(headers or {})
    if body is not None and chunk:
        hdrs.setdefault("content-type", "application/json")
        hdrs["transfer-encoding"] = "chunked"
        pieces = [body[i:i + chunk] for i in range(0, len(body), chunk)]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    elif body is not None:
        hdrs.setdefault("content-type", "application/json")
        hdrs.setdefault("content-length", str(len(body)))
    lines += [f"{k}: {v}" for k, v in hdrs.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + (body or b"")


class Generator:
    def __init__(self, seed: int, real_uuids: list[str]):
        self.rng = random.Random(seed)
        self.routes = route_table()
        self.real = real_uuids

    def uuid_for(self, template: str) -> tuple[str, list[str], tuple[int, ...]]:
        """A uuid part for a path: (text, mentions, statuses)."""
        rng = self.rng
        r = rng.random()
        if "{uuid}" not in template:
            return "", [], ()
        if r < 0.35:
            bad = rng.choice(TRAVERSAL)
            return bad, [], (400, 404)
        if r < 0.55:
            text = rand_text(rng)
            return encode(text), [], (400, 404)
        if r < 0.65:
            return "a" * rng.choice([37, 300, 5000]), ["is not a service uuid"], (400,)
        return "", [], ()  # a good one: a real uuid or an unknown one, with something else bad

    def query(self, params: dict[str, type], needs_bad: bool) -> tuple[str, list[str]]:
        """A query string; with ``needs_bad`` at least one parameter is refused. (string, mentions)."""
        rng = self.rng
        parts: list[tuple[str, str]] = []
        mentions: list[str] = []
        good_names = list(params)
        rng.shuffle(good_names)
        chosen = good_names[: rng.randint(0, len(good_names))]
        if "follow" in params and "follow" not in chosen:
            chosen.append("follow")  # (always false: a stream that follows never ends; events follow by default)
        for name in chosen:
            kind = params[name]
            if kind is bool and name == "follow":
                parts.append((name, "false"))
            elif kind is bool:
                parts.append((name, rng.choice(["false", "0", "no"])))  # never a true stop_services or force
            elif kind is float:
                parts.append((name, rng.choice(["5", "0.5", "30"])))
            elif kind is int:
                parts.append((name, rng.choice(["0", "3", "10"])))
            elif kind is uuidlib.UUID:
                parts.append((name, str(uuidlib.UUID(int=rng.getrandbits(128)))))
            elif kind is ServiceState:
                parts.append((name, rng.choice(list(ServiceState)).value))
            else:
                parts.append((name, rand_text(rng)))
        if needs_bad or rng.random() < 0.5:
            typed = [n for n, k in params.items() if k is not str]
            if typed and rng.random() < 0.6:
                name = rng.choice(typed)
                parts = [p for p in parts if p[0] != name]
                parts.append((name, bad_value(rng, params[name])))
                mentions.append(repr(name))
            else:
                name = "x_" + rand_text(rng, rng.randint(1, 8))
                parts.append((name, rand_text(rng)))
                mentions.append("unknown query parameter")
        rng.shuffle(parts)
        # The refused parameter must come last among its name (the API keeps the last value of a name).
        text = "&".join(f"{encode(k)}={encode(v)}" for k, v in parts)
        return text, mentions

    def http_case(self) -> Case:
        rng = self.rng
        r = rng.random()
        if r < 0.06:
            return self.wrong_method()
        if r < 0.1:
            path = rng.choice(PATHS_404) + (f"?{encode(rand_text(rng))}=1" if rng.random() < 0.3 else "")
            return Case("unknown-route", request(rng.choice(["GET", "POST", "DELETE"]), path), ["no route"], (404,))
        if r < 0.4:  # the route with the richest input gets the most
            return self.deploy_body()
        method, template, params = rng.choice(self.routes)
        part, mentions, statuses = self.uuid_for(template)
        bad_uuid = bool(statuses)
        if "{uuid}" in template and not part:
            part = rng.choice(self.real) if self.real and rng.random() < 0.6 else str(uuidlib.uuid4())
        query, q_mentions = self.query(params, needs_bad=not bad_uuid)
        target = template.replace("{uuid}", part) + (f"?{query}" if query else "")
        body = None
        if rng.random() < 0.2:
            body = rng.choice([b"{}", b"{nope", rand_text(rng).encode(), bytes(rng.getrandbits(8) for _ in range(30))])
        if bad_uuid:
            # The path is judged first (400: not a uuid, or 404: no such route).
            return Case("bad-uuid", request(method, target, body), mentions, statuses, route=f"{method} {template}")
        unknown = part not in self.real if "{uuid}" in template else False
        if unknown and not q_mentions:
            return Case("unknown-uuid", request(method, target, body), [part], (404,), route=f"{method} {template}")
        # Query parameters are checked before the service is looked up: a 400 naming the parameter.
        return Case("bad-query", request(method, target, body), q_mentions, (400,), route=f"{method} {template}")

    def wrong_method(self) -> Case:
        rng = self.rng
        method, template, _ = rng.choice(self.routes)
        allowed = {m for m, t, _ in self.routes if t == template}
        other = rng.choice([m for m in ("GET", "POST", "DELETE", "PUT", "PATCH") if m not in allowed])
        part = rng.choice(self.real) if self.real else str(uuidlib.uuid4())
        return Case("wrong-method", request(other, template.replace("{uuid}", part)), [other], (405,))

    # ------------------------------------------------------------- deploy bodies

    GOOD = {"model_name": "fz", "model_uri": IRIS, "pipeline_name": "fuzz"}
    WRONG = {
        str: [123, 1.5, True, None, [], {}, ["a"], {"a": 1}],
        int: ["eighty", "", [], {}, 1.5, None, "1e3", "٣x", 70000, -1],
        float: ["soon", "", [], {}, None, "nan", -1],
        bool: ["perhaps", 2, [], {}, None, "truee", 1.5],
        dict: [[], "A=1", 7, ["A", "1"], {"A": 1}, {"A": None}, {"A": ["x"]}],
        list: ["python3 -m http.server", 7, {}, {"0": "x"}, [1, 2], [None]],
    }
    CONFIG_TYPES: dict[str, type] = {
        "name": str, "description": str, "pipeline_name": str, "pipeline_run_id": str, "pipeline_step_name": str,
        "model_name": str, "model_uri": str, "host": str, "health_path": str, "prediction_path": str,
        "python": str, "working_dir": str, "search_path": str, "service_type": str, "project": str,
        "port": int, "startup_timeout": float, "stop_timeout": float, "env": dict, "secret_env": list, "command": list,
    }

    def deploy_body(self) -> Case:
        rng = self.rng
        config: dict[str, Any] = dict(self.GOOD)
        if rng.random() < 0.4:  # unicode in the valid fields: never the reason, never a problem
            config["description"] = rand_text(rng, 40)
            config["pipeline_run_id"] = rand_text(rng)
        body: dict[str, Any] = {"config": config}
        r = rng.random()
        mentions: list[str]
        status: tuple[int, ...] = (400,)
        if r < 0.3:  # wrong type of a config field
            name = rng.choice(list(self.CONFIG_TYPES))
            config[name] = rng.choice(self.WRONG[self.CONFIG_TYPES[name]])
            mentions = [f"config.{name}", "config"]
            kind = "wrong-type"
        elif r < 0.4:  # wrong type around the config
            name, kind_t = rng.choice([("replace", bool), ("timeout", float), ("uuid", str), ("config", str)])
            choices = ["not-a-uuid", "../x", "..%2F", 123, [], {}, "g" * 32] if name == "uuid" else self.WRONG[kind_t]
            value = rng.choice(choices)
            if name == "config":
                body["config"] = value
            else:
                body[name] = value
            mentions = [name]
            kind = "wrong-type"
        elif r < 0.5:  # a bad value: refused model_type, restart policy, relative paths, NUL, names with /
            choice = rng.randrange(6)
            if choice == 0:
                config["model_type"] = rand_text(rng)
                mentions = ["config.model_type"]
            elif choice == 1:
                config["restart"] = rng.choice([{"mode": "sometimes"}, {"max_restarts": -1}, {"backoff_max": "x"}, {"colour": 1}, []])
                mentions = ["config.restart"]
            elif choice == 2:
                config["health_path"] = rng.choice(["health", "/he alth", "", "x/"])
                mentions = ["config.health_path"]
            elif choice == 3:
                config["model_uri"] = config["model_uri"] + "\x00" + rand_text(rng)
                mentions = ["NUL"]
            elif choice == 4:
                config["model_name"] = rand_text(rng, 3) + "/" + rand_text(rng, 3)
                mentions = ["config.model_name"]
            else:
                config["port"] = rng.choice([65536, -5, 10**30])
                mentions = ["config.port"]
            kind = "bad-value"
        elif r < 0.62:  # unknown fields
            name = "x_" + rand_text(rng, rng.randint(1, 10))
            where = rng.random()
            if where < 0.5:
                config[name] = rand_text(rng)
                mentions = [f"config.{name}"]
            elif where < 0.8:
                body[name] = rng.choice([1, "x", None, {}])
                mentions = [name]
            else:
                config["restart"] = {name: 1}
                mentions = [f"config.restart.{name}"]
            kind = "unknown-field"
        elif r < 0.7:  # a config that cannot run: refused before anything is created
            choice = rng.randrange(3)
            missing = f"/nonexistent-{rng.getrandbits(32):x}"
            if choice == 0:
                config["model_uri"] = f"{missing}/model.py:model"
                mentions = ["model file", "does not exist"]
            elif choice == 1:
                config["working_dir"] = missing
                mentions = ["working_dir"]
            else:
                body["config"] = {"model_name": "fz", "model_type": "command", "command": [missing + "/srv", "{port}"], "health_path": "/"}
                mentions = ["command"]
            kind = "cannot-run"
        elif r < 0.8:  # not JSON: cut short, garbled, bytes that are not UTF-8
            raw = json.dumps(body).encode()
            choice = rng.randrange(4)
            if choice == 0:
                raw = raw[: rng.randrange(1, len(raw) - 1)]
            elif choice == 1:
                i = rng.randrange(len(raw))
                raw = raw[:i] + rng.choice([b"{", b"}", b"\"", b",", b"\\", b"\xff", b"\x00", b":"]) + raw[i:]
                try:  # the insertion may still be JSON (inside a string): then it is the wrong schema
                    json.loads(raw)
                    raw = raw + b"}"
                except ValueError:
                    pass
            elif choice == 2:
                raw = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200)))
            else:
                raw = rng.choice([b"", b"   ", b"null", b"[]", b"42", b'"s"', b"true", b"{}", b"[{}]", b"NaN"])
            chunk = rng.choice([0, 0, 0, 1, 7, 64])
            return Case("malformed-json", request("POST", "/v1/services", raw, chunk=chunk), [], (400,), route="POST /v1/services")
        elif r < 0.83:  # too big: declared, or sent
            if rng.random() < 0.7:
                raw = request("POST", "/v1/services", b"{}", {"content-length": str(rng.choice([1024 * 1024 + 1, 10**9, 10**15]))})[:-2]
                return Case("huge-declared", raw, ["larger than"], (413,), garbage=True, route="POST /v1/services")
            big = json.dumps({"config": {**config, "description": "x" * (1024 * 1024 + 10)}}).encode()
            # Chunked, so that no declared length gives it away: the cap is met while reading.
            raw = request("POST", "/v1/services", big, chunk=rng.choice([4096, 65536, 1 << 20]))
            return Case("huge-body", raw, ["larger than"], (413,), garbage=True, route="POST /v1/services")
        else:  # missing config, or a body that is JSON of the wrong shape
            body = rng.choice([{}, {"replace": True}, {"configs": config}, [config], {"config": None}, {"config": [config]}])
            mentions = ["config", "body"]
            kind = "wrong-schema"
        query = ""
        if rng.random() < 0.05:
            query = "?x_" + encode(rand_text(rng, 4)) + "=1"
            mentions = ["unknown query parameter"]
        raw = json.dumps(body, ensure_ascii=rng.random() < 0.5).encode()
        return Case(kind, request("POST", "/v1/services" + query, raw), mentions, status, route="POST /v1/services")

    # ------------------------------------------------------------------ garbage

    def garbage_case(self) -> Case:
        rng = self.rng
        choice = rng.randrange(9)
        good = request("GET", "/v1/daemon")
        if choice == 0:
            raw = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 400)))
        elif choice == 1:
            raw = good[: rng.randrange(1, len(good) - 2)]  # cut short: never a whole request
        elif choice == 2:
            raw = f"{rng.choice(METHODS)} {rand_text(rng)} HTTP/1.1\r\n\r\n".encode("utf-8", "replace")
        elif choice == 3:
            raw = b"GET /v1/daemon?x_garbled=1 HTTP/1.1\r\nhost: m\r\n" + rand_text(rng).encode() + b"\r\n\r\n"
        elif choice == 4:
            raw = b"POST /v1/services HTTP/1.1\r\nhost: m\r\ncontent-length: " + rng.choice([b"-1", b"abc", b"1, 2", b"99999999999999999999999"]) + b"\r\n\r\n{}"
        elif choice == 5:
            raw = b"POST /v1/services HTTP/1.1\r\nhost: m\r\ntransfer-encoding: chunked\r\n\r\n" + rng.choice([b"zz\r\n", b"5\r\nabc\r\n", b"-1\r\n"])
        elif choice == 6:
            raw = b"GET /v1/daemon?x_big=1 HTTP/1.1\r\nhost: m\r\nx-big: " + b"a" * rng.choice([20_000, 100_000]) + b"\r\n\r\n"
        elif choice == 7:
            raw = b"GET /v1/services/" + "".join(rng.choice(UNICODE) for _ in range(5)).encode() + b" HTTP/1.1\r\nhost: m\r\n\r\n"
        else:
            raw = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(rng.getrandbits(8) for _ in range(60))  # a TLS hello
        return Case("garbage", raw, [], (), garbage=True)

    def case(self) -> Case:
        return self.garbage_case() if self.rng.random() < 0.04 else self.http_case()


# ------------------------------------------------------------------- the wire


def check(case: Case, answer: tuple[int, dict[str, str], bytes] | None) -> str | None:
    """What is wrong with the answer to ``case``; None if it is right."""
    if answer is None:
        return None if case.garbage else "the connection closed without an answer"
    status, headers, body = answer
    if not 400 <= status < 500:
        return f"status {status}, not a 4xx"
    if case.statuses and status not in case.statuses:
        return f"status {status}, expected {case.statuses}"
    if headers.get("content-type") != "application/json":
        return f"content-type {headers.get('content-type')!r}, not JSON"
    try:
        data = json.loads(body)
        message = data["error"]["message"]
        kind = data["error"]["type"]
    except (ValueError, KeyError, TypeError):
        return f"not a JSON error: {body[:200]!r}"
    if set(data) != {"error"} or not isinstance(message, str) or not message or not kind:
        return f"not a JSON error: {body[:200]!r}"
    if case.mentions and not any(m in message for m in case.mentions):
        return f"message does not name the problem ({case.mentions}): {message[:300]!r}"
    return None


# -------------------------------------------------------------- the home tree


def snapshot(home: Path) -> dict[str, tuple[Any, ...]]:
    """Every file and folder under ``home`` but the daemon's log: kind, mode, and for files inode, mtime, sha256."""
    tree: dict[str, tuple[Any, ...]] = {}
    for root, dirs, files in os.walk(home):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, home)
            if rel == "daemon.log":
                continue
            st = os.lstat(path)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                tree[rel] = ("file", st.st_mode, st.st_ino, st.st_mtime_ns, digest)
            else:
                tree[rel] = ("other", st.st_mode)
    return tree


def diff(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    changes = [f"new: {p}" for p in sorted(set(after) - set(before))]
    changes += [f"gone: {p}" for p in sorted(set(before) - set(after))]
    changes += [f"changed: {p}" for p in sorted(set(before) & set(after)) if before[p] != after[p]]
    return changes


# ------------------------------------------------------------------- the run


def daemon_info(sock_path: str) -> dict[str, Any]:
    conn = UnixHTTP(sock_path, timeout=10.0)
    try:
        answer = conn.exchange(request("GET", "/v1/daemon"))
    finally:
        conn.close()
    assert answer is not None and answer[0] == 200, answer
    return json.loads(answer[2])


def fuzz(home: Path, count: int = 10_000, seed: int = 1, real_uuids: list[str] | None = None,
         max_failures: int = 20) -> dict[str, Any]:
    """Send ``count`` bad inputs to the daemon of ``home``; a report (see the module docstring)."""
    sock_path = str(home / "modeld.sock")
    gen = Generator(seed, real_uuids or [])
    pid = daemon_info(sock_path)["pid"]
    before = snapshot(home)
    conn = UnixHTTP(sock_path, timeout=10.0)
    by_kind: Counter[str] = Counter()
    routes_hit: Counter[str] = Counter()
    failures: list[dict[str, Any]] = []
    started = time.monotonic()
    for i in range(count):
        case = gen.case()
        by_kind[case.kind] += 1
        if case.route:
            routes_hit[case.route] += 1
        if case.garbage:  # on a connection of its own, closed for writing after it
            one = UnixHTTP(sock_path, timeout=10.0)
            try:
                answer = one.exchange(case.raw, half_close=True)
            except socket.timeout:
                answer = (0, {}, b"<timed out: no answer and no close>")
            finally:
                one.close()
        else:
            try:
                answer = conn.exchange(case.raw)
            except socket.timeout:
                conn.close()
                answer = (0, {}, b"<timed out>")
        problem = check(case, answer)
        if problem is not None:
            failures.append({"i": i, "kind": case.kind, "problem": problem, "input": case.raw[:400].decode("latin-1")})
            if len(failures) >= max_failures:
                break
    conn.close()
    seconds = time.monotonic() - started
    info = daemon_info(sock_path)
    after = snapshot(home)
    changes = diff(before, after)
    if info["pid"] != pid:
        failures.append({"problem": f"the daemon changed: pid {pid} then {info['pid']}"})
    if changes:
        failures.append({"problem": "the home changed", "changes": changes[:50]})
    return {
        "inputs": sum(by_kind.values()),
        "seed": seed,
        "seconds": round(seconds, 2),
        "inputs_per_second": round(sum(by_kind.values()) / seconds) if seconds else None,
        "by_kind": dict(sorted(by_kind.items())),
        "by_route": {f"{m} {t}": routes_hit[f"{m} {t}"] for m, t, _ in route_table()},
        "failures": failures,
    }


# ----------------------------------------------------------- config fuzzing
#
# Plausible configs, every one valid JSON: a known-good base (the built-in server with
# examples/iris.py, or a small `command` server) with one field of ServiceConfig, of its
# restart policy or of the deploy request changed to a boundary, non-finite, huge, unicode or
# wrong-type value. Both answers are fine, a 4xx naming the field or a 200 with the server
# healthy; a 5xx never is. See fuzz_configs.

MAX_ARG = 128 * 1024 - 1  # bytes of one argv item or env entry the kernel takes (MAX_ARG_STRLEN less its NUL)


class Raw:
    """A JSON number written as is (``1e999``: valid JSON for infinity, which json.dumps cannot write)."""

    def __init__(self, text: str):
        self.text = text


INF, NEG_INF = Raw("1e999"), Raw("-1e999")


def dumps(body: Any) -> bytes:
    raws: list[str] = []

    def default(value: Any) -> str:
        if isinstance(value, Raw):
            raws.append(value.text)
            return f"\x00raw{len(raws) - 1}\x00"
        raise TypeError(type(value).__name__)

    text = json.dumps(body, default=default, ensure_ascii=False)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x00raw{i}\x00"), raw)
    return text.encode()


@dataclass
class Mutation:
    field: str  # dotted: a config field ("restart.backoff_max"), or a field of the deploy request ("request.timeout")
    value: Any  # or a callable of the generator, for values made fresh (a free port, a unique name)
    base: str = "any"  # "builtin", "command" or "any": the base the field means something for
    mentions: tuple[str, ...] = ()  # what a refusal must name; default: the field's last part


class ConfigGenerator:
    """Mutations of a good config, one field at a time, each a plausible thing to send."""

    STRING_CAPS = {"name": 200, "description": 10_000, "pipeline_name": 1000, "pipeline_run_id": 1000,
                   "pipeline_step_name": 1000, "model_name": 200, "project": 200}
    WRONG = [5, 1.5, True, None, [], {}, ["x"], {"a": 1}]

    def __init__(self, seed: int, workdir: Path):
        self.rng = random.Random(seed)
        self.workdir = workdir  # a folder with a unicode name, to run servers in
        self.table = self._table()
        self.order: list[Mutation] = []

    def unicode(self, n: int) -> str:
        return "".join(self.rng.choice(UNICODE) for _ in range(n))

    def base(self, kind: str) -> dict[str, Any]:
        tag = f"fz{self.rng.getrandbits(32):08x}"
        if kind == "builtin":
            return {"model_name": tag, "model_uri": IRIS, "model_type": "python", "pipeline_name": "fuzz-configs",
                    "python": sys.executable, "working_dir": str(REPO), "stop_timeout": 5}
        return {"model_name": tag, "pipeline_name": "fuzz-configs", "command": [sys.executable, "-c", COMMAND_SERVER, "{port}", "{host}"],
                "health_path": "/", "working_dir": str(self.workdir), "stop_timeout": 5}

    def _table(self) -> list[Mutation]:
        t: list[Mutation] = []
        add = t.append
        for name, cap in self.STRING_CAPS.items():
            add(Mutation(name, lambda g, cap=cap: "a" * cap))
            add(Mutation(name, lambda g, cap=cap: "a" * (cap + 1)))
            add(Mutation(name, lambda g, cap=cap: g.unicode(min(cap, 40))))
            add(Mutation(name, lambda g: "x" * 200_000))
            add(Mutation(name, lambda g: g.rng.choice(self.WRONG)))
        for value in ("", "ü🙂" * 50, "t" * 200_000, 5, None):
            add(Mutation("service_type", value))
        add(Mutation("name", "bell\x07"))
        add(Mutation("model_name", "a/b"))
        add(Mutation("model_name", ""))
        add(Mutation("description", "line\nbreak\ttab \u202e\u200b"))
        # model_uri and model_type (the built-in server)
        add(Mutation("model_uri", "examples/iris.py:model", "builtin"))
        add(Mutation("model_uri", "./examples/../examples/iris.py:model", "builtin"))
        add(Mutation("model_uri", lambda g: f"/nonexistent-{g.unicode(6)}.py:model", "builtin", ("model_uri", "model file")))
        add(Mutation("model_uri", lambda g: "/" + "m" * 4095, "builtin", ("model_uri", "model file")))
        add(Mutation("model_uri", lambda g: "/" + "m" * 5000, "builtin"))
        add(Mutation("model_uri", lambda g: IRIS + "\x00", "builtin", ("NUL",)))
        add(Mutation("model_uri", lambda g: g.rng.choice(self.WRONG), "builtin"))
        for value in ("command", "PYTHON", "", 5, None):
            add(Mutation("model_type", value, "builtin"))
        # command (the command server): long, many and unicode items, substitution that grows
        add(Mutation("command", lambda g: [*g.base("command")["command"], "x" * (MAX_ARG - 1000)], "command"))
        add(Mutation("command", lambda g: [*g.base("command")["command"], "x" * (MAX_ARG + 1)], "command"))
        add(Mutation("command", lambda g: [*g.base("command")["command"], *(g.unicode(8) for _ in range(2000))], "command"))
        add(Mutation("command", lambda g: [*g.base("command")["command"], "", " ", "{model_uri}{port}{host}"], "command"))
        add(Mutation("command", lambda g: [*g.base("command")["command"], "{model_uri}" * 12_000], "command"))
        add(Mutation("command", lambda g: [*g.base("command")["command"], "nul\x00"], "command", ("NUL",)))
        # Past exec's whole argument space (ARG_MAX; 2 MiB with an 8 MiB stack): 9 bytes per empty item.
        add(Mutation("command", lambda g: [*g.base("command")["command"], *[""] * 240_000], "command"))
        add(Mutation("command", lambda g: [f"/nonexistent/{g.unicode(5)}", "{port}"], "command"))
        add(Mutation("command", [], "command", ("command", "model_uri")))  # no argv: not a command server then
        for value in ("python3 -m http.server", [1, 2], [None], {"0": "x"}):
            add(Mutation("command", value, "command"))
        # paths of the HTTP routes
        for value in ("/x", "/ünïcödé/🙂", "/a?b=c", "/%20", "/" + "p" * 4095):
            add(Mutation("health_path", value, "command"))
        for value in ("health", "/a b", "", "/" + "p" * 4096, 5):
            add(Mutation("health_path", value, "command"))
        for value in ("", "/invocations", "/预测", "/" + "p" * 4095, "x", "/a b", "/" + "p" * 4096, []):
            add(Mutation("prediction_path", value))
        # host: addresses, names, and what is neither
        for value in ("127.0.0.1", "localhost", "127.1", "0.0.0.0", "::", "::1", "::ffff:127.0.0.1", "0"):
            add(Mutation("host", value, "any", ("host", "listen")))
            add(Mutation("host", value, "any", ("host", "listen")))
        for value in ("", " ", "[::1]", "nonexistent.invalid", "ü.example", "a" * 254, "a..b", "127.0.0.1:80",
                      "http://localhost", "::1 ", 5, None):
            add(Mutation("host", value, "any", ("host",)))
        # port
        add(Mutation("port", lambda g: free_port(), "any", ("port", "listen")))
        add(Mutation("port", lambda g: free_port(), "command", ("port", "listen")))
        add(Mutation("port", lambda g: float(free_port()), "any", ("port", "listen")))
        add(Mutation("port", 0, "any", ("port", "listen")))
        for value in (65536, -1, 1.5, 10**30, "eighty", Raw("1e999")):
            add(Mutation("port", value))
        # bind_unix
        add(Mutation("bind_unix", True, "builtin"))
        add(Mutation("bind_unix", "true", "builtin"))
        for value in ("maybe", 2, None, []):
            add(Mutation("bind_unix", value, "builtin"))
        add(Mutation("bind_unix", True, "command"))
        # env and secret_env
        add(Mutation("env", lambda g: {"FZ_BIG": "v" * (MAX_ARG - len("FZ_BIG="))}))
        add(Mutation("env", lambda g: {"FZ_BIG": "v" * (MAX_ARG - len("FZ_BIG=") + 1)}))
        add(Mutation("env", lambda g: {"FZ_HUGE": "v" * 200_000}))
        add(Mutation("env", lambda g: {f"FZ_{i}": g.unicode(4) for i in range(2000)}))
        add(Mutation("env", lambda g: {"FZ_ÜNÏ": g.unicode(30), "API_KEY": "s3cret-" + g.unicode(8), "FZ_EMPTY": ""}))
        for value in ({"": "x"}, {"A=B": "1"}, {"=": ""}, {"FZ\x00": "x"}, {"FZ": "x\x00y"}, {"FZ": 5}, {"FZ": None},
                      ["FZ=1"], "FZ=1", 5):
            add(Mutation("env", value))
        for value in (["FZ_A"], ["x" * 100_000], ["ü🙂"], [], ["A=B"]):
            add(Mutation("secret_env", value))
        for value in ([5], "FZ_A", {"a": 1}):
            add(Mutation("secret_env", value))
        # python and working_dir
        # The same interpreter spelled another way (realpath would leave a venv, and uvicorn with it).
        add(Mutation("python", os.path.join(os.path.dirname(sys.executable), "..", "bin", os.path.basename(sys.executable)), "builtin"))
        add(Mutation("python", "", "builtin"))
        for value in ("/nonexistent/python", "p" * 5000, "/" + "p" * 4095, 5):
            add(Mutation("python", value, "builtin"))
        add(Mutation("working_dir", lambda g: str(g.workdir)))
        add(Mutation("working_dir", "/"))
        add(Mutation("working_dir", ""))  # the daemon's own (a client fills in its own; curl does not)
        for value in ("/nonexistent-dir", "w" * 5000, "/" + "w" * 4095, "/tmp\x00", 5):
            add(Mutation("working_dir", value, "any", ("working_dir", "NUL")))
        # search_path: the PATH servers resolve programs with (a client fills in its own; curl does not)
        add(Mutation("search_path", os.environ.get("PATH", os.defpath)))
        add(Mutation("search_path", "/nonexistent-dir"))
        add(Mutation("search_path", ""))
        for value in ("p" * 200_000, "/usr/bin\x00", 5):
            add(Mutation("search_path", value, "any", ("search_path", "NUL")))
        # numbers: the restart policy, the timeouts, and the deploy request's own
        for name in ("restart.backoff_initial", "restart.backoff_max", "restart.healthy_reset", "stop_timeout"):
            for value in (0, 1e-300, 1e308, 10**30, 3):
                add(Mutation(name, value))
            for value in (INF, NEG_INF, "NaN", "Infinity", "-inf", -1, -1e-300, "soon", [], None):
                add(Mutation(name, value))
        for value in (60, 3600, 1e9, 1e308, 10**30):
            add(Mutation("startup_timeout", value))
        for value in (0, -5, INF, NEG_INF, "NaN", "Infinity", "soon", None):
            add(Mutation("startup_timeout", value))
        for value in (None, 60, 3600, 1e9, 1e308, 10**30):
            add(Mutation("idle_timeout", value))
        for value in (0, -5, INF, NEG_INF, "NaN", "Infinity", "soon", []):
            add(Mutation("idle_timeout", value))
        for value in (0, 1, 10**30, 10**100, "7"):
            add(Mutation("restart.max_restarts", value))
        for value in (-1, 1.5, INF, "NaN", "many", None):
            add(Mutation("restart.max_restarts", value))
        for value in ("always", "never", "on-failure"):
            add(Mutation("restart.mode", value))
        for value in ("sometimes", "", 5):
            add(Mutation("restart.mode", value))
        add(Mutation("restart", {}))
        add(Mutation("restart", []))
        for value in (1, 2, 10**6, "3"):
            add(Mutation("restart.liveness_failures", value))
        for value in (0, -1, 10**7, 1.5, INF, "NaN", None):
            add(Mutation("restart.liveness_failures", value))
        for value in (True, False, "yes"):
            add(Mutation("restart.on_unhealthy", value))
        for value in (2, "maybe", None, []):
            add(Mutation("restart.on_unhealthy", value))
        # what a stop runs first (it must not hang: each accepted service is stopped), and the log limits
        for value in ([], ["true"], ["true", "{name}", "{uuid}", "{port}", "{host}", "{model_uri}", "ü🙂"],
                      ["/nonexistent/stopper"], [""]):
            add(Mutation("stop_command", value, "command"))
        add(Mutation("stop_command", lambda g: ["true", "x" * (MAX_ARG - 1000)], "command"))
        add(Mutation("stop_command", lambda g: ["true", "x" * (MAX_ARG + 1)], "command"))
        for value in ("docker stop x", [5], ["nul\x00"], {"a": 1}, None):
            add(Mutation("stop_command", value, "command"))
        for value in (4096, 65536, 10 * 1024 * 1024, 1 << 40, "4096"):
            add(Mutation("log_max_bytes", value))
        for value in (0, 4095, -1, (1 << 40) + 1, 10**30, 1.5, INF, "10M", None):
            add(Mutation("log_max_bytes", value))
        for value in (0, 1, 1000, "2"):
            add(Mutation("log_backups", value))
        for value in (-1, 1001, 10**30, 2.5, INF, "two", None):
            add(Mutation("log_backups", value))
        for value in (60, 1e308, 10**30):
            add(Mutation("request.timeout", value))
        for value in (0, -1, INF, NEG_INF, "NaN", "Infinity", "soon", None):
            add(Mutation("request.timeout", value))
        add(Mutation("request.uuid", lambda g: str(uuidlib.UUID(int=g.rng.getrandbits(128)))))
        for value in ("nope", "../x", 5):
            add(Mutation("request.uuid", value))
        add(Mutation("request.replace", "maybe"))
        add(Mutation("x_ünknown", 1))
        return t

    def case(self) -> tuple[Mutation, str, bytes]:
        """(the mutation, the base it was applied to, the request body)."""
        if not self.order:  # every mutation once, in a seeded order (one of each field first), then again
            shuffled = list(self.table)
            self.rng.shuffle(shuffled)
            seen: set[str] = set()
            firsts = [m for m in shuffled if not (m.field in seen or seen.add(m.field))]
            rest = [m for m in shuffled if all(m is not f for f in firsts)]
            self.order = rest + firsts[::-1]  # (popped from the end)
        mutation = self.order.pop()
        kind = mutation.base if mutation.base != "any" else self.rng.choice(["builtin", "command"])
        config = self.base(kind)
        body: dict[str, Any] = {"config": config, "timeout": 60}
        value = mutation.value(self) if callable(mutation.value) else mutation.value
        head, _, rest = mutation.field.partition(".")
        if head == "request":
            body[rest] = value
        elif head == "restart" and rest:
            config["restart"] = {rest: value}
        else:
            config[mutation.field] = value
        return mutation, kind, dumps(body)


def _answer(conn: UnixHTTP, method: str, target: str, body: bytes | None = None) -> tuple[int, Any]:
    try:
        answer = conn.exchange(request(method, target, body))
    except socket.timeout:
        conn.close()
        return 0, "<timed out>"
    if answer is None:
        return 0, "<connection closed without an answer>"
    status, _headers, raw = answer
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw[:300].decode("latin-1")


def _message(data: Any) -> str:
    try:
        return str(data["error"]["message"])
    except (TypeError, KeyError):
        return ""


def restart_daemon(home: Path, timeout: float = 60.0) -> None:
    """Stop the daemon of ``home`` (its servers keep running) and start a new one."""
    from daemon import DaemonClient

    client = DaemonClient(home=home, auto_start=False)
    try:
        client.shutdown(stop_services=False)
    finally:
        client.close()
    wait_for(lambda: not (home / "daemon.pid").exists() and not (home / "modeld.sock").exists(), timeout, 0.02,
             what=f"the daemon of {home} to stop")
    client = DaemonClient(home=home)  # auto-starts a new daemon
    try:
        client.daemon_info()
    finally:
        client.close()


def fuzz_configs(home: Path, count: int = 200, seed: int = 1, restart: bool = True, max_failures: int = 20) -> dict[str, Any]:
    """Deploy ``count`` plausible configs to the daemon of ``home``; a report.

    Each accepted config's server must come up healthy (the call answers 200 with the service
    active), be listed with the config the deploy answered, and stop. Each refusal must be a
    4xx JSON error naming the field, and leave nothing behind. No answer may be a 5xx. With
    ``restart``, the daemon is then restarted, and every accepted config must be listed again,
    identical (secret values masked), with no record set aside.
    """
    import shutil
    import tempfile

    sock_path = str(home / "modeld.sock")
    workdir = Path(tempfile.mkdtemp(prefix="mdfzw-")) / "目录 🙂"
    workdir.mkdir()
    gen = ConfigGenerator(seed, workdir)
    conn = UnixHTTP(sock_path, timeout=180.0)
    status, listing = _answer(conn, "GET", "/v1/services")
    assert status == 200, (status, listing)
    known = len(listing["services"])
    accepted: dict[str, dict[str, Any]] = {}  # uuid -> the (masked) config the deploy answered
    by_field: Counter[str] = Counter()
    accepted_by_field: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    failures: list[dict[str, Any]] = []
    started = time.monotonic()

    def fail(mutation: Mutation | None, problem: str, body: bytes = b"") -> None:
        failures.append({"field": mutation.field if mutation else "", "problem": problem[:600],
                         "input": body[:300].decode("utf-8", "replace")})

    try:
        for _ in range(count):
            if len(failures) >= max_failures:
                break
            mutation, kind, body = gen.case()
            by_field[mutation.field] += 1
            status, data = _answer(conn, "POST", "/v1/services", body)
            statuses[status] += 1
            if status == 200:
                uuid = str(data.get("uuid"))
                if data.get("status", {}).get("state") != "active":
                    fail(mutation, f"accepted, but the service is {data.get('status', {}).get('state')!r}, not active", body)
                accepted[uuid] = data["config"]
                accepted_by_field[mutation.field] += 1
                got_status, got = _answer(conn, "GET", f"/v1/services/{uuid}")
                if got_status != 200 or got.get("config") != data["config"]:
                    fail(mutation, f"GET of the accepted service answered {got_status} and another config", body)
                stop_status, stopped = _answer(conn, "POST", f"/v1/services/{uuid}/stop?timeout=30")
                if stop_status != 200:
                    fail(mutation, f"stop of the accepted service answered {stop_status}: {_message(stopped)}", body)
            elif 400 <= status < 500:
                message = _message(data)
                mentions = mutation.mentions or (mutation.field.rsplit(".", 1)[-1],)
                if not message:
                    fail(mutation, f"status {status} without a JSON error: {data!r}", body)
                elif not any(m in message for m in mentions):
                    fail(mutation, f"the refusal does not name the field ({mentions}): {message[:300]}", body)
            else:
                fail(mutation, f"status {status} ({kind} base): {_message(data) or data!r}", body)
            if status != 200:  # nothing created, nothing left in pending or error
                list_status, listing = _answer(conn, "GET", "/v1/services")
                if list_status != 200 or len(listing["services"]) != known + len(accepted):
                    fail(mutation, f"after a refusal, the listing answered {list_status} with "
                                   f"{len(listing['services']) if list_status == 200 else '?'} services, not {known + len(accepted)}", body)
                    known = len(listing["services"]) - len(accepted) if list_status == 200 else known
        conn.close()
        if restart and accepted:
            restart_daemon(home)
            conn = UnixHTTP(sock_path, timeout=60.0)
            status, listing = _answer(conn, "GET", "/v1/services")
            info_status, info = _answer(conn, "GET", "/v1/daemon")
            conn.close()
            if status != 200:
                fail(None, f"after the restart the listing answered {status}: {listing!r}")
            else:
                listed = {s["uuid"]: s for s in listing["services"]}
                for uuid, config in accepted.items():
                    if uuid not in listed:
                        fail(None, f"accepted service {uuid} is gone after the restart")
                    elif listed[uuid]["config"] != config:
                        diff = {k: (v, listed[uuid]["config"].get(k)) for k, v in config.items() if listed[uuid]["config"].get(k) != v}
                        fail(None, f"service {uuid} came back with another config: {str(diff)[:400]}")
            if info_status != 200 or info.get("problems"):
                fail(None, f"after the restart the daemon reports problems: {info.get('problems') if info_status == 200 else info}")
            # What `modeld ls` does: the client parses every service with the model.
            from daemon import DaemonClient

            client = DaemonClient(home=home, auto_start=False)
            try:
                parsed = {str(s.uuid) for s in client.find()}
            except Exception as exc:  # the traceback `modeld ls` would print
                fail(None, f"the client cannot read the listing: {type(exc).__name__}: {exc}")
                parsed = set()
            finally:
                client.close()
            if not set(accepted) <= parsed:
                fail(None, f"{len(set(accepted) - parsed)} accepted services missing from the client's listing")
    finally:
        conn.close()
        shutil.rmtree(workdir.parent, ignore_errors=True)
    inputs = sum(by_field.values())
    return {
        "inputs": inputs,
        "accepted": len(accepted),
        "accepted_fraction": round(len(accepted) / inputs, 3) if inputs else 0.0,
        "seed": seed,
        "seconds": round(time.monotonic() - started, 2),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "fields": len(by_field),
        "by_field": dict(sorted(by_field.items())),
        "accepted_by_field": dict(sorted(accepted_by_field.items())),
        "failures": failures,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10_000, help="bad inputs (default 10000)")
    parser.add_argument("--configs", type=int, default=None,
                        help="plausible configs to deploy (default 200; 0 with --home, whose daemon they would restart)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--home", help="fuzz the daemon already running for this home (default: start one in a temp home)")
    args = parser.parse_args()
    if args.home:
        home = Path(args.home)
        services = json.loads(UnixHTTP(str(home / "modeld.sock"), timeout=10.0).exchange(request("GET", "/v1/services"))[2])["services"]  # type: ignore[index]
        report = fuzz(home, args.count, args.seed, [s["uuid"] for s in services])
        if args.configs:
            report["configs"] = fuzz_configs(home, args.configs, args.seed)
        print(json.dumps(report))
        return 1 if report["failures"] or report.get("configs", {}).get("failures") else 0
    import shutil
    import tempfile

    from daemon import DaemonClient, ServiceConfig

    home = Path(tempfile.mkdtemp(prefix="mdfz", dir="/tmp"))
    os.environ["MODELD_HOME"] = str(home)
    client = DaemonClient(home=home)
    try:
        svc = client.deploy(ServiceConfig(model_name="iris", model_uri=IRIS, pipeline_name="fuzz"), timeout=60)
        report = fuzz(home, args.count, args.seed, [str(svc.uuid)])
        configs = 200 if args.configs is None else args.configs
        if configs:
            report["configs"] = fuzz_configs(home, configs, args.seed)
    finally:
        client.shutdown(stop_services=True)
        client.close()
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not (home / "daemon.pid").exists(), 30, 0.05, what="the daemon to stop")
        shutil.rmtree(home, ignore_errors=True)
    print(json.dumps(report))
    return 1 if report["failures"] or report.get("configs", {}).get("failures") else 0


if __name__ == "__main__":
    sys.exit(main())
