"""What the API accepts it can keep; one home and one port, however they are spelled.

Issue 9, sections 5 and 6, with real daemons, real servers and real sockets:

- non-finite numbers (``1e999`` is valid JSON for infinity) in every float field, the deploy
  request's and the query's timeouts; env names that are empty or hold ``=`` or NUL; env
  entries and argv items over the kernel's MAX_ARG_STRLEN; hosts that are neither an IP
  address nor a name that resolves: a 400 naming the dotted field, with nothing created;
- huge finite numbers, unicode, and every host spelling that works: accepted, served, and the
  same after a daemon restart;
- port claims (kept for life too) conflict exactly as the kernel's binds would: the model in
  daemon/addresses.py is checked against real binds, then the daemon's claims;
- MODELD_HOME through a symlink, ``..``, a relative path or a trailing slash is one home.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import modeld, predict
from daemon import DaemonClient, ServiceConfig, ServiceState
from daemon.addresses import Address, literal_address
from daemon.exceptions import Conflict, InvalidRequest
from daemon.linux import tagged_processes
from daemon.config import MAX_ARG_STRLEN
from daemon.paths import Paths
from daemon.sockets import MAX_SOCKET_PATH
from daemon.process import exec_limit
from daemon.testing import COMMAND_SERVER, IRIS, REPO, UnixHTTP, pid_alive, reap_home, wait_for

SETOSA = [[5.0, 3.4, 1.5, 0.2]]
FLOAT_FIELDS = ("startup_timeout", "stop_timeout", "restart.backoff_initial", "restart.backoff_max", "restart.healthy_reset")

IPV6 = socket.has_ipv6
try:
    with socket.socket(socket.AF_INET6) as _s:
        _s.bind(("::1", 0))
except OSError:
    IPV6 = False
needs_ipv6 = pytest.mark.skipif(not IPV6, reason="no IPv6 loopback on this machine")


# ------------------------------------------------------------------ helpers


def call(home: Path, method: str, target: str, body: bytes | None = None, timeout: float = 120) -> tuple[int, Any]:
    """One raw request on the daemon's socket: (status, parsed JSON)."""
    conn = UnixHTTP(home / "modeld.sock", timeout)
    try:
        conn.request(method, target, body=body, headers={"content-type": "application/json"} if body is not None else {})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def deploy_raw(home: Path, config_json: str, extra: str = "") -> tuple[int, Any]:
    """POST a deploy whose config is JSON text as given (``1e999`` stays as written)."""
    return call(home, "POST", "/v1/services", f'{{"config": {config_json}, "timeout": 60{extra}}}'.encode())


def builtin(**fields: Any) -> dict[str, Any]:
    return {"model_name": "iris", "model_uri": IRIS, "python": sys.executable, "working_dir": str(REPO),
            "pipeline_name": "input", "stop_timeout": 5, **fields}


def command(tmp: Path, *extra: str, **fields: Any) -> dict[str, Any]:
    (tmp / "srv.py").write_text(COMMAND_SERVER)
    return {"model_name": "web", "command": [sys.executable, "srv.py", "{port}", "{host}", *extra], "health_path": "/",
            "working_dir": str(tmp), "pipeline_name": "input", "stop_timeout": 5, **fields}


def with_field(config: dict[str, Any], dotted: str, raw_value: str) -> str:
    """``config`` as JSON text with ``dotted`` (``restart.backoff_max``) set to the raw JSON ``raw_value``."""
    marker = "\x00value\x00"
    head, _, rest = dotted.partition(".")
    config = dict(config)
    if rest:
        config[head] = {rest: marker}
    else:
        config[head] = marker
    return json.dumps(config).replace(json.dumps(marker), raw_value)


def refused(answer: tuple[int, Any], field: str) -> str:
    status, data = answer
    assert status == 400, answer
    assert data["error"]["type"] == "InvalidRequest", data
    message = data["error"]["message"]
    assert field in message, (field, message)
    return message


def nothing_created(client: DaemonClient, home: Path, known: int = 0) -> None:
    assert len(client.find()) == known
    assert len([p for p in (home / "services").iterdir() if not p.name.startswith(".")]) == known


def restart_daemon(client: DaemonClient, home: Path) -> None:
    pid = client.daemon_info()["pid"]
    client.shutdown(stop_services=False)
    wait_for(lambda: not pid_alive(pid), 30, what=f"daemon {pid} to exit")
    assert client.daemon_info()["pid"] != pid  # auto-started again


def service_json_config(home: Path, uuid: object) -> dict[str, Any]:
    return json.loads((home / "services" / str(uuid) / "service.json").read_text())["config"]


# ------------------------------------------------------- what the API accepts


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_the_seen_infinities_are_refused_naming_the_field_and_ls_keeps_working(client, home):
    client.daemon_info()
    # The examples, exactly.
    refused(deploy_raw(home, with_field(builtin(), "startup_timeout", "1e999")), "config.startup_timeout:")
    refused(deploy_raw(home, with_field(builtin(), "stop_timeout", "1e999")), "config.stop_timeout:")
    refused(deploy_raw(home, with_field(builtin(), "restart.backoff_max", "1e999")), "config.restart.backoff_max:")
    # The class: every float field, both infinities, NaN and Infinity as JSON strings (which
    # pydantic would parse), and the deploy request's own timeout.
    for field, value in itertools.product(FLOAT_FIELDS, ("1e999", "-1e999", '"NaN"', '"Infinity"', '"-inf"', '"nan"')):
        refused(deploy_raw(home, with_field(builtin(), field, value)), f"config.{field}:")
    for value in ("1e999", "-1e999", '"NaN"', '"Infinity"'):
        message = refused(deploy_raw(home, json.dumps(builtin()), f', "timeout": {value}'), "timeout:")
        assert message.startswith("timeout:"), message
    refused(deploy_raw(home, with_field(builtin(), "restart.max_restarts", "1e999")), "config.restart.max_restarts:")
    refused(deploy_raw(home, with_field(builtin(), "port", "1e999")), "config.port:")
    nothing_created(client, home)

    # `modeld ls` parses every record with the model: it works, before and after a restart,
    # and the restarted daemon set nothing aside.
    assert modeld("ls", home=home).returncode == 0
    restart_daemon(client, home)
    assert client.daemon_info()["problems"] == []
    ls = modeld("ls", "--json", home=home)
    assert ls.returncode == 0 and json.loads(ls.stdout) == [], ls


def test_query_timeouts_must_be_finite(client, home, tmp_path):
    svc = client.deploy(ServiceConfig(**command(tmp_path)), timeout=60)
    for route, value in itertools.product(("start", "stop"), ("inf", "-inf", "nan", "NaN", "1e999", "infinity", "-1")):
        status, data = call(home, "POST", f"/v1/services/{svc.uuid}/{route}?timeout={value}")
        assert status == 400 and "'timeout'" in data["error"]["message"], (route, value, data)
    status, data = call(home, "DELETE", f"/v1/services/{svc.uuid}?timeout=1e999")
    assert status == 400 and "'timeout'" in data["error"]["message"], data
    after = client.get(svc.uuid)
    assert (after.status.state, after.status.pid) == (ServiceState.ACTIVE, svc.status.pid)
    # A huge finite timeout is fine: in the daemon, and in the client (a socket cannot wait
    # 1e12 s: the client waits without a timeout instead of raising OverflowError).
    status, data = call(home, "POST", f"/v1/services/{svc.uuid}/stop?timeout=1e308")
    assert status == 200 and data["status"]["state"] == "inactive", data
    assert client.start(svc.uuid, timeout=1e12).status.state == ServiceState.ACTIVE


@pytest.mark.slow
def test_huge_finite_numbers_are_kept_and_nothing_overflows(client, home, tmp_path):
    client.daemon_info()
    config = command(tmp_path, startup_timeout=1e308, stop_timeout=1e308,
                     restart={"max_restarts": 10**30, "backoff_initial": 1e308, "backoff_max": 1e308, "healthy_reset": 1e308})
    status, data = call(home, "POST", "/v1/services", json.dumps({"config": config, "timeout": 1e308}).encode())
    assert status == 200 and data["status"]["state"] == "active", data
    uuid, pid = data["uuid"], data["status"]["pid"]
    assert data["config"]["restart"]["max_restarts"] == 10**30 and data["config"]["startup_timeout"] == 1e308
    # A crash: the first restart is at once, whatever the backoff.
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: (s := client.get(uuid)).status.state == ServiceState.ACTIVE and s.status.pid != pid, 30,
             interval=0.05, what="the restart")
    assert client.stop(uuid, timeout=10).status.state == ServiceState.INACTIVE  # the call's timeout, not 1e308 s
    restart_daemon(client, home)
    assert client.daemon_info()["problems"] == []
    assert client.get(uuid).config.model_dump(mode="json") == data["config"] == service_json_config(home, uuid)


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_env_names_and_sizes_argv_sizes(client, home, tmp_path):
    client.daemon_info()
    base = command(tmp_path)
    entry = MAX_ARG_STRLEN - 1  # bytes of NAME=VALUE, the NUL aside
    for env, what in [
        ({"A=B": "1"}, "'A=B' contains '='"),
        ({"": "x"}, "cannot be empty"),
        ({"=": ""}, "contains '='"),
        ({"A\x00B": "x"}, "NUL"),
        ({"A": "x\x00y"}, "NUL"),
        ({"FZ_BIG": "v" * (entry - len("FZ_BIG=") + 1)}, f"at most {entry} bytes"),
        ({"FZ_BIG": "v" * 200_000}, "MAX_ARG_STRLEN"),
        ({"FZ_BIG": "é" * (entry // 2)}, "MAX_ARG_STRLEN"),  # bytes, not characters
    ]:
        message = refused(deploy_raw(home, json.dumps({**base, "env": env})), "config.env:")
        assert what in message, (env.keys(), message)
    # A secret is never quoted, even in the refusal of its own size.
    message = refused(deploy_raw(home, json.dumps({**base, "env": {"API_KEY": "s3cret-" * 30_000}})), "config.env:")
    assert "s3cret" not in message
    # argv items: the same limit, {model_uri} and {host} filled in at their longest.
    refused(deploy_raw(home, json.dumps(command(tmp_path, "a" * (entry + 1)))), "config.command:")
    refused(deploy_raw(home, json.dumps(command(tmp_path, "{model_uri}" * 200, model_uri="m" * 1000))), "config.command:")
    refused(deploy_raw(home, json.dumps(command(tmp_path, "nul\x00"))), "config.command:")
    # exec's whole argument space (ARG_MAX): each string and a pointer to it. Empty items
    # cost 9 bytes each in 3 bytes of JSON: a body under the 1 MiB cap can pass it.
    many = exec_limit() // 9 + 1000
    if many * 3 < 1000 * 1000:
        body = json.dumps({"config": command(tmp_path, *[""] * many)}, separators=(",", ":")).encode()
        message = refused(call(home, "POST", "/v1/services", body), "config.command:")
        assert "ARG_MAX" in message, message
    nothing_created(client, home)

    # At the limit exactly: accepted, and exec gives the server all of it.
    at_limit = command(tmp_path, "a" * (entry - 100), env={"FZ_BIG": "v" * (entry - len("FZ_BIG=")), "ÜNÏ_名": "🙂"},
                       secret_env=["x" * 100_000, "名"])
    status, data = call(home, "POST", "/v1/services", json.dumps({"config": at_limit}).encode())
    assert status == 200 and data["status"]["state"] == "active", data
    log = wait_for(lambda: "env" in (text := (home / "services" / data["uuid"] / "service.log").read_text()) and text, 10)
    assert f"env {entry - len('FZ_BIG=')} arg {entry - 100}" in log  # type: ignore[operator]
    restart_daemon(client, home)
    again = client.get(data["uuid"])
    assert again.status.state == ServiceState.ACTIVE and again.status.pid == data["status"]["pid"]
    assert again.config.model_dump(mode="json") == data["config"]


def test_bad_hosts_are_refused_naming_the_field(client, home):
    client.daemon_info()
    for host in ("", " ", "[::1]", "[127.0.0.1]", "nonexistent.invalid", "ü.example", "a" * 254, "127.0.0.1:80",
                 "http://localhost", "::1 ", "a..b", "fe80::1%", "local\x00host"):
        refused(deploy_raw(home, json.dumps(builtin(host=host))), "config.host:")
    for value in ("5", "null", "[]", '{"a": 1}'):
        refused(deploy_raw(home, with_field(builtin(), "host", value)), "config.host:")
    nothing_created(client, home)


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_every_host_spelling_that_works_is_kept_as_written(client, home, tmp_path):
    """The stored host is what the user wrote; the bind, the probe, the claim and {host} use the address it resolves to."""
    client.daemon_info()
    hosts = {"localhost": "127.0.0.1", "127.1": "127.0.0.1", "0": "0.0.0.0", "0.0.0.0": "0.0.0.0",
             "::ffff:127.0.0.1": "::ffff:127.0.0.1"}
    if IPV6:
        hosts.update({"::1": "::1", "::": "::"})
    deployed = {}
    for i, host in enumerate(hosts):
        status, data = call(home, "POST", "/v1/services", json.dumps({"config": builtin(host=host, model_name=f"m{i}")}).encode())
        assert status == 200 and data["config"]["host"] == host and data["endpoint"]["host"] == host, data
        deployed[host] = data
        reach = {"0.0.0.0": "127.0.0.1", "::": "::1", "::ffff:127.0.0.1": "127.0.0.1"}.get(hosts[host], hosts[host])
        socket.create_connection((reach, data["endpoint"]["port"]), timeout=5).close()
    assert predict(deployed["localhost"]["endpoint"]["prediction_url"], SETOSA) == (200, {"predictions": ["setosa"]})
    # A command server is given the address: it binds what the daemon claims and probes.
    web = client.deploy(ServiceConfig(**command(tmp_path, host="localhost")), timeout=60)
    assert psutil.Process(web.status.pid).cmdline()[3] == "127.0.0.1"
    assert web.config.host == "localhost"

    restart_daemon(client, home)
    for host, data in deployed.items():
        again = client.get(data["uuid"])
        assert (again.status.state, again.status.pid) == (ServiceState.ACTIVE, data["status"]["pid"]), host
        assert again.config.model_dump(mode="json") == data["config"] == service_json_config(home, data["uuid"])
    assert client.get(web.uuid).status.state == ServiceState.ACTIVE


@pytest.mark.slow
def test_records_from_before_the_checks_still_load(client, home, tmp_path):
    """A record an earlier version accepted (a host of "", an env name with '=', an infinity stored
    as null) is not set aside, and its live server is not stopped: the checks are for input. The
    client reads it too."""
    svc = client.deploy(ServiceConfig(**builtin()), timeout=60)
    stopped = client.deploy(ServiceConfig(**command(tmp_path, model_name="old")), timeout=60)
    client.stop(stopped.uuid, timeout=10)
    pid = client.daemon_info()["pid"]
    client.shutdown(stop_services=False)
    wait_for(lambda: not pid_alive(pid), 30, what="the daemon to exit")
    # (null: how 1e999 was stored, the bug; read back as the largest float, which waits as long)
    nulls = {"startup_timeout": None, "stop_timeout": None, "restart": {"backoff_max": None, "healthy_reset": None}}
    for uuid, legacy in ((svc.uuid, {"host": "", **nulls}), (stopped.uuid, {"env": {"A=B": "1", "": "x"}, "host": "[::1]"})):
        path = home / "services" / str(uuid) / "service.json"
        record = json.loads(path.read_text())
        record["config"].update(legacy)
        path.write_text(json.dumps(record))
    assert client.daemon_info()["problems"] == []
    again = client.get(svc.uuid)
    assert (again.status.state, again.status.pid, again.config.host) == (ServiceState.ACTIVE, svc.status.pid, "")
    assert again.config.startup_timeout == again.config.restart.backoff_max == sys.float_info.max
    assert predict(svc.endpoint.prediction_url, SETOSA) == (200, {"predictions": ["setosa"]})
    assert client.get(stopped.uuid).config.env == {"A=B": "1", "": "x"}
    ls = modeld("ls", "--json", home=home)
    assert ls.returncode == 0 and len(json.loads(ls.stdout)) == 2, ls
    # Taken as input again, the same config is refused.
    with pytest.raises(ValueError, match="host"):
        ServiceConfig(**builtin(host=""))


# ------------------------------------------------------------------ ports


ADDRESSES = ["127.0.0.1", "127.0.0.2", "0.0.0.0", "::ffff:127.0.0.1", "::ffff:127.0.0.2", "::ffff:0.0.0.0", "::", "::1"]


def kernel_refuses(first: str, second: str) -> bool:
    """Whether a listener on ``second`` cannot bind the port a listener on ``first`` holds (real sockets)."""

    def listener(host: str, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(8)
        except OSError:
            sock.close()
            raise
        return sock

    # A port free on every address (a dual-stack wildcard bind needs that): an ephemeral port free on
    # ``first`` alone may be held on ``second``'s address by another process, which is no conflict of the pair.
    with socket.socket(socket.AF_INET6) as probe:
        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        probe.bind(("::", 0))
        port = probe.getsockname()[1]
    with listener(first, port) as held:
        try:
            listener(second, held.getsockname()[1]).close()
        except OSError as exc:
            assert exc.errno == errno.EADDRINUSE, exc
            return True
        return False


@needs_ipv6
def test_port_conflicts_are_the_kernels():
    """The claim model (daemon/addresses.py) against real binds, for every pair, in both orders."""
    for a, b in itertools.product(ADDRESSES, repeat=2):
        first, second = literal_address(a), literal_address(b)
        assert first is not None and second is not None
        assert first.conflicts(second) == kernel_refuses(a, b) == kernel_refuses(b, a), (a, b)
    # A name is claimed at the address it resolved to; one that did not resolve, by its spelling.
    assert Address("localhost", "127.0.0.1", 4, 0x7F000001).conflicts(literal_address("0.0.0.0"))  # type: ignore[arg-type]
    assert not Address("nowhere").conflicts(literal_address("0.0.0.0"))  # type: ignore[arg-type]
    assert Address("nowhere").conflicts(Address("nowhere"))


@pytest.mark.slow
def test_a_port_kept_for_life_conflicts_by_address_not_spelling(client, home, tmp_path):
    """The seen case: a stopped service keeps 127.0.0.1:P; a new one on 0.0.0.0:P must not get it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    kept = client.deploy(ServiceConfig(**command(tmp_path, host="127.0.0.1", port=port)), timeout=60)
    client.stop(kept.uuid, timeout=10)
    clashing = ["0.0.0.0", "localhost", "127.1", "::ffff:127.0.0.1", "0"] + (["::"] if IPV6 else [])
    for host in clashing:
        for config in (command(tmp_path, host=host, port=port, model_name="other"), builtin(host=host, port=port)):
            status, data = call(home, "POST", "/v1/services", json.dumps({"config": config, "timeout": 30}).encode())
            assert status == 409 and f"belongs to service {kept.uuid}" in data["error"]["message"], (host, data)
    assert len(client.find()) == 1

    # Addresses the kernel lets share the port are no conflict, and the kept one still starts.
    sharing = ["127.0.0.2"] + (["::1"] if IPV6 else [])
    others = [client.deploy(ServiceConfig(**command(tmp_path, host=h, port=port, model_name=f"s{i}")),
                            timeout=60) for i, h in enumerate(sharing)]
    assert all(o.endpoint.port == port and o.status.state == ServiceState.ACTIVE for o in others)
    started = client.start(kept.uuid, timeout=60)
    assert started.status.state == ServiceState.ACTIVE and started.endpoint.port == port

    # A built-in server's port, kept while it is stopped, is claimed the same way.
    iris = client.deploy(ServiceConfig(**builtin(host="127.0.0.3")), timeout=60)
    client.stop(iris.uuid, timeout=10)
    status, data = call(home, "POST", "/v1/services", json.dumps(
        {"config": command(tmp_path, host="0.0.0.0", port=iris.endpoint.port, model_name="x"), "timeout": 30}).encode())
    assert status == 409 and f"belongs to service {iris.uuid}" in data["error"]["message"], data


def test_a_replace_onto_a_conflicting_address_is_refused(client, home, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    kept = client.deploy(ServiceConfig(**command(tmp_path, host="127.0.0.1", port=port)), timeout=60)
    client.stop(kept.uuid, timeout=10)
    web = client.deploy(ServiceConfig(**command(tmp_path, host="127.0.0.2", port=port, model_name="b")),
                        timeout=60)
    new = ServiceConfig(**command(tmp_path, host="0.0.0.0", model_name="b"))
    with pytest.raises(Conflict, match=f"port {port} on 0.0.0.0 belongs to service {kept.uuid}"):
        client.deploy(new, replace=True, timeout=30)
    after = client.get(web.uuid)
    assert (after.status.state, after.status.pid, after.config.host) == (ServiceState.ACTIVE, web.status.pid, "127.0.0.2")


# ------------------------------------------------------------------- homes


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_one_home_however_spelled(home, tmp_path, monkeypatch):
    link = Path(str(home) + "-link")
    link.symlink_to(home)
    dotted = home.parent / "x" / ".." / home.name
    try:
        for spelling in (link, dotted, str(home) + "/", str(link) + "/./"):
            assert Paths(spelling).home == home, spelling
        monkeypatch.chdir(home.parent)
        assert Paths(home.name).home == home
        monkeypatch.setenv("MODELD_HOME", home.name)
        assert Paths().home == home and Paths().socket == home / "modeld.sock"
        monkeypatch.setenv("MODELD_HOME", str(link))
        monkeypatch.setenv("MODELD_SOCKET", str(link / "modeld.sock"))
        assert Paths().socket == home / "modeld.sock"
        monkeypatch.delenv("MODELD_SOCKET")

        # A daemon started through the symlink: everything it names is the canonical home.
        via_link = DaemonClient(home=link)
        (tmp_path / "srv.py").write_text(COMMAND_SERVER)
        iris = via_link.deploy(ServiceConfig(**builtin()), timeout=60)
        web = via_link.deploy(ServiceConfig(**command(tmp_path)), timeout=60)
        info = via_link.daemon_info()
        assert (info["home"], info["socket"]) == (str(home), str(home / "modeld.sock"))
        for pid in (iris.status.pid, web.status.pid):
            assert psutil.Process(pid).environ()["MODELD_HOME"] == str(home)
        via_dots = DaemonClient(home=dotted)
        assert via_dots.daemon_info()["pid"] == info["pid"]  # the same daemon answers
        # A second daemon under another spelling is refused: one lock.
        second = subprocess.run([sys.executable, "-m", "daemon", "--home", str(dotted)], cwd=REPO, capture_output=True,
                                text=True, timeout=60)
        assert second.returncode == 3 and "already running" in second.stderr, second

        # Restarted as `python -m daemon --home <with ..>` (its env naming the symlink), then by the
        # CLI with a relative MODELD_HOME and a trailing slash: the live servers are recognised as
        # this home's, re-adopted, never put in error with "port in use".
        via_link.shutdown(stop_services=False)
        wait_for(lambda: not pid_alive(info["pid"]), 30, what="the daemon to exit")
        with open(home / "daemon.log", "ab") as log:
            daemon = subprocess.Popen([sys.executable, "-m", "daemon", "--home", str(dotted)], cwd=REPO,
                                      env={**os.environ, "MODELD_HOME": str(link)}, stdin=subprocess.DEVNULL,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: (home / "modeld.sock").exists() and DaemonClient(home=link, auto_start=False).daemon_info(), 30,
                     what="the daemon started through `..`")
            for svc in (iris, web):
                again = via_dots.get(svc.uuid)
                assert (again.status.state, again.status.pid) == (ServiceState.ACTIVE, svc.status.pid), again.status
            via_dots.shutdown(stop_services=False)
            assert daemon.wait(30) == 0
        finally:
            if daemon.poll() is None:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait(10)
        ls = subprocess.run([sys.executable, "-m", "deployers.cli", "ls", "--json"], cwd=home.parent, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "MODELD_HOME": home.name + "/", "PYTHONPATH": str(REPO)})
        assert ls.returncode == 0, ls
        listed = {s["uuid"]: s for s in json.loads(ls.stdout)}
        for svc in (iris, web):
            status = listed[str(svc.uuid)]["status"]
            assert (status["state"], status["pid"]) == ("active", svc.status.pid), status
        assert predict(iris.endpoint.prediction_url, SETOSA) == (200, {"predictions": ["setosa"]})
        via_link.close()
        via_dots.close()
    finally:
        link.unlink()


def test_a_server_tagged_with_another_spelling_of_the_home_is_ours(home):
    """Servers started before homes were canonical carry the spelling their daemon was given."""
    link = Path(str(home) + "-link")
    link.symlink_to(home)
    env = {**os.environ, "MODELD_HOME": str(link / "." / ".." / link.name), "MODELD_SERVICE_UUID": "u1", "MODELD_PROCESS": "{}"}
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env, start_new_session=True)
    try:
        found = wait_for(lambda: [p for p in tagged_processes(str(home)) if p.ident.pid == proc.pid], 10,
                         what="the tagged process")
        assert found[0].service_uuid == "u1"  # type: ignore[index]
        assert not [p for p in tagged_processes(str(home.parent / "elsewhere")) if p.ident.pid == proc.pid]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        link.unlink()


def test_a_long_canonical_home_binds_sockets_as_long_homes_do(home, tmp_path):
    """Reached through a short symlink, a long home is the long path: what fits binds, what does not is a clear error."""
    deep = home / ("h" * (MAX_SOCKET_PATH - 50 - len(str(home))))
    deep.mkdir(mode=0o700)
    link = Path(str(home) + "-s")
    link.symlink_to(deep)
    client = DaemonClient(home=link)
    try:
        assert client.daemon_info()["socket"] == str(deep / "modeld.sock")
        svc = client.deploy(ServiceConfig(**builtin()), timeout=60)
        assert predict(svc.endpoint.prediction_url, SETOSA) == (200, {"predictions": ["setosa"]})
        with pytest.raises(InvalidRequest, match=f"bind_unix: the socket path {deep}/services/"):
            client.deploy(ServiceConfig(**builtin(bind_unix=True, model_name="u")), timeout=60)
    finally:
        client.close()
        reap_home(deep)
        link.unlink()
    too_long = home / ("t" * (MAX_SOCKET_PATH - len(str(home))))
    too_long.mkdir(mode=0o700)
    short = Path(str(home) + "-t")
    short.symlink_to(too_long)
    try:
        with pytest.raises(Exception, match=f"socket path {too_long}/modeld.sock is longer than {MAX_SOCKET_PATH} bytes"):
            DaemonClient(home=short).daemon_info()
    finally:
        short.unlink()


def test_the_models_host_check_costs_the_client_no_asyncio():
    """The syntax check of ``host`` lives in daemon/addresses.py, which the client imports: it must stay light."""
    code = ("import sys; from daemon import ServiceConfig; ServiceConfig(model_uri='m.py:m', host='localhost'); "
            "print('asyncio' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False"], out
