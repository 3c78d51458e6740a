"""``GET /metrics`` (issue 14): a real daemon, real servers and the gateway, the text read with
``prometheus_client``'s own parser (a client no one here wrote).

Request counts are checked exactly: a built-in server counts what comes to it directly
(``via="direct"``), the gateway what it forwards (``via="gateway"``), and nothing is counted twice
or left out, while the daemon's health probes go on meanwhile and are not counted.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import iris_config
from daemon import DaemonClient, ServiceConfig, ServiceState
from daemon.exceptions import DeployError
from daemon.testing import UnixHTTP, server_script, wait_for

Sample = tuple[str, frozenset[tuple[str, str]]]
SERVES = server_script("PORT, BODY = int(sys.argv[1]), b'{}'\n")  # 200 on every GET


def parse(text: str) -> dict[Sample, float]:
    """Every sample, by name and labels; the parser raises on text that is not the format."""
    found: dict[Sample, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, frozenset(s.labels.items()))] = s.value
    return found


def value(samples: dict[Sample, float], name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels``; 0 if it is not there (a counter not yet moved)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape(client: DaemonClient) -> dict[Sample, float]:
    return parse(client.metrics())


def ids(svc: Any) -> dict[str, str]:
    return {"uuid": str(svc.uuid), "model_name": svc.config.model_name}


def post(port: int, path: str, body: object) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def get(port: int, path: str, method: str = "GET") -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.getheader("content-type") or "", response.read()
    finally:
        conn.close()


def gateway_port(client: DaemonClient) -> int:
    url = client.daemon_info()["gateway_url"]
    assert url, "no gateway"
    port = urlsplit(url).port
    assert port
    return port


# ------------------------------------------------------------------ exits and restarts


def test_a_kill_9_counts_one_restart_and_one_exit_by_signal(client, home):
    svc = client.deploy(iris_config(), replace=False, timeout=60)
    before = scrape(client)
    pid = client.get(svc.uuid).status.pid
    assert pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: (s := client.get(svc.uuid)).status.pid not in (None, pid) and s.is_running, 30, what="the restart")
    after = scrape(client)
    assert value(after, "modeld_service_restarts_total", **ids(svc)) == value(before, "modeld_service_restarts_total", **ids(svc)) + 1
    for reason in ("signal", "exit", "liveness", "idle"):
        rose = value(after, "modeld_service_exits_total", **ids(svc), reason=reason) - value(
            before, "modeld_service_exits_total", **ids(svc), reason=reason
        )
        assert rose == (1 if reason == "signal" else 0), reason
    assert value(after, "modeld_service_last_exit_code", **ids(svc)) == -signal.SIGKILL
    assert value(after, "modeld_service_up", **ids(svc)) == 1
    started = value(after, "modeld_service_start_time_seconds", **ids(svc))
    assert started > value(before, "modeld_service_start_time_seconds", **ids(svc)) > 0
    assert value(after, "modeld_service_memory_bytes", **ids(svc)) > 1024 * 1024  # a Python server and its model
    assert value(after, "modeld_service_cpu_seconds_total", **ids(svc)) > 0
    assert value(after, "process_resident_memory_bytes") > 0 and value(after, "process_open_fds") > 0
    assert value(after, "modeld_event_loop_lag_seconds") >= 0


CRASH_LOOP = 'if [ -e "$1" ]; then exit 3; fi; : > "$1"; exec "$2" -m http.server "$3" --bind 127.0.0.1'


def test_every_exit_is_counted_once_whatever_the_state_even_before_the_first_health_answer(client, home, tmp_path):
    # A server that exits before it ever answers: the deploy fails, its exit is counted all the same.
    (tmp_path / "dies.py").write_text("import sys; sys.exit(4)\n")
    dies = ServiceConfig(model_name="dies", model_type="command", command=[sys.executable, str(tmp_path / "dies.py")], health_path="/")
    with pytest.raises(DeployError, match="exited with code 4"):
        client.deploy(dies, timeout=30)
    (svc,) = client.find(model_name="dies")
    samples = scrape(client)
    assert value(samples, "modeld_service_exits_total", **ids(svc), reason="exit") == 1
    assert value(samples, "modeld_service_last_exit_code", **ids(svc)) == 4

    # Healthy once, then killed; each restart exits (code 3) before its first health answer, until
    # supervision gives up: one exit counted per server, as many as the exited events.
    loop = client.deploy(ServiceConfig(
        model_name="loop", model_type="command", health_path="/",
        command=["/bin/sh", "-c", CRASH_LOOP, "sh", str(tmp_path / "ran"), sys.executable, "{port}"],
        restart={"max_restarts": 2, "backoff_initial": 0, "backoff_max": 0},
    ), timeout=60)
    since = client.daemon_info()["events"]["seq"]
    assert loop.status.pid
    os.kill(loop.status.pid, signal.SIGKILL)
    wait_for(lambda: client.get(loop.uuid).status.state == ServiceState.ERROR, 30, what="supervision to give up")
    exited = [e for e in client.events(since=since, follow=False) if e["type"] == "exited"]
    samples = scrape(client)
    assert value(samples, "modeld_service_exits_total", **ids(loop), reason="signal") == 1
    assert value(samples, "modeld_service_exits_total", **ids(loop), reason="exit") == 2 == len(exited) - 1
    assert value(samples, "modeld_service_last_exit_code", **ids(loop)) == 3


@pytest.mark.slow
def test_the_last_exit_code_of_a_restarted_server_is_kept_across_a_daemon_restart(client, home):
    svc = client.deploy(iris_config(), replace=False, timeout=60)
    pid = svc.status.pid
    assert pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: (s := client.get(svc.uuid)).status.pid not in (None, pid) and s.is_running, 30, what="the restart")
    assert value(scrape(client), "modeld_service_last_exit_code", **ids(svc)) == -signal.SIGKILL
    daemon_id = client.daemon_info()["events"]["daemon_id"]
    client.shutdown()  # the server stays; the next call starts a daemon that adopts it
    wait_for(lambda: not (home / "modeld.sock").exists(), 10, what="the daemon to exit")
    assert client.daemon_info()["events"]["daemon_id"] != daemon_id
    samples = scrape(client)
    assert value(samples, "modeld_service_up", **ids(svc)) == 1
    assert value(samples, "modeld_service_last_exit_code", **ids(svc)) == -signal.SIGKILL


def test_an_idle_stop_and_a_wake_are_counted(client, home):
    svc = client.deploy(iris_config(idle_timeout=0.5), replace=False, timeout=60)
    wait_for(lambda: client.get(svc.uuid).status.state == ServiceState.SCALED_TO_ZERO, 20, what="the idle stop")
    stopped = scrape(client)
    assert value(stopped, "modeld_service_exits_total", **ids(svc), reason="idle") == 1
    assert value(stopped, "modeld_service_exits_total", **ids(svc), reason="signal") == 0  # a stop asked for: no crash
    assert value(stopped, "modeld_service_up", **ids(svc)) == 0
    assert value(stopped, "modeld_services", state="scaled_to_zero") == 1
    assert post(svc.endpoint.port, "/v1/models/iris:predict", {"instances": [[1, 2, 3, 4]]}) == 200  # wakes it
    woken = scrape(client)
    assert value(woken, "modeld_service_wakes_total", **ids(svc)) == 1
    assert value(woken, "modeld_service_requests_total", **ids(svc), via="direct", code="200") == 1


def test_the_daemons_own_answer_to_a_direct_request_whose_wake_failed_is_counted(client, home, tmp_path):
    """A scaled-to-zero built-in service's socket is the daemon's while it wakes the server; when the
    wake fails, the daemon answers the waiting requests (503), and counts them as the server would."""
    model = tmp_path / "breaks.py"
    model.write_text("def model(instances):\n    return ['ok' for _ in instances]\n")
    svc = client.deploy(iris_config(model_name="breaks", model_uri=f"{model}:model", idle_timeout=0.5), timeout=60)
    wait_for(lambda: client.get(svc.uuid).status.state == ServiceState.SCALED_TO_ZERO, 20, what="the idle stop")
    model.write_text("raise RuntimeError('the weights are gone')\n")
    assert post(svc.endpoint.port, "/v1/models/breaks:predict", {"instances": [[1]]}) == 503
    samples = scrape(client)
    assert value(samples, "modeld_service_requests_total", **ids(svc), via="direct", code="503") == 1
    assert value(samples, "modeld_service_request_duration_seconds_count", **ids(svc), via="direct") == 1


@pytest.mark.slow
def test_a_client_that_left_during_a_wake_that_timed_out_is_counted_499(client, home, tmp_path, monkeypatch):
    monkeypatch.setenv("MODELD_WAKE_TIMEOUT", "1")
    slow, model = tmp_path / "slow", tmp_path / "slowload.py"
    model.write_text(
        f"import os, time\nif os.path.exists({str(slow)!r}):\n    time.sleep(4)\n"
        "def model(instances):\n    return ['ok' for _ in instances]\n"
    )
    svc = client.deploy(iris_config(model_name="slowload", model_uri=f"{model}:model", idle_timeout=0.5), timeout=60)
    wait_for(lambda: client.get(svc.uuid).status.state == ServiceState.SCALED_TO_ZERO, 20, what="the idle stop")
    slow.touch()
    body = b'{"instances": [[1]]}'
    request = b"POST /v1/models/slowload:predict HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    leaving = socket.create_connection(("127.0.0.1", svc.endpoint.port), timeout=10)
    leaving.sendall(request)
    staying = socket.create_connection(("127.0.0.1", svc.endpoint.port), timeout=10)
    staying.sendall(request)
    leaving.close()  # gone before the wake's end
    answer = staying.recv(65536)
    staying.close()
    assert answer.startswith(b"HTTP/1.1 504 "), answer
    samples = scrape(client)
    assert value(samples, "modeld_service_requests_total", **ids(svc), via="direct", code="504") == 1
    assert value(samples, "modeld_service_requests_total", **ids(svc), via="direct", code="499") == 1


# ------------------------------------------------------------------ requests


@pytest.fixture
def gateway_on(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELD_GATEWAY", "127.0.0.1:0")


@pytest.mark.usefixtures("gateway_on")
@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_requests_through_the_gateway_and_direct_are_each_counted_once(client, home):
    iris = client.deploy(iris_config(), replace=False, timeout=60)
    (home / "s.py").write_text(SERVES)
    command = client.deploy(
        ServiceConfig(model_type="command", model_name="cmd", command=[sys.executable, str(home / "s.py"), "{port}"], health_path="/"),
        replace=False,
        timeout=60,
    )
    port = gateway_port(client)
    before = scrape(client)
    n_gateway, m_direct, k_command, missing = 7, 5, 3, 2
    for _ in range(n_gateway):
        assert post(port, "/v1/models/iris:predict", {"instances": [[1, 2, 3, 4]]}) == 200
    for _ in range(missing):  # a 404 from the server, through the gateway
        assert get(port, f"/v1/services/{iris.uuid}/no/such/path")[0] == 404
    for _ in range(m_direct):
        assert post(iris.endpoint.port, "/v1/models/iris:predict", {"instances": [[1, 2, 3, 4]]}) == 200
    for _ in range(k_command):
        assert get(port, f"/v1/services/{command.uuid}/anything")[0] == 200
    # The daemon's probes go on: the counts must not move with them.
    beat = client.daemon_info()["settings"]["health_interval"]
    wait_for(lambda: value(scrape(client), "modeld_service_probe_duration_seconds_count", **ids(iris))
             >= value(before, "modeld_service_probe_duration_seconds_count", **ids(iris)) + 2, 10 * beat + 10, what="two probes")
    after = scrape(client)

    def rose(name: str, svc: Any, **labels: str) -> float:
        return value(after, name, **ids(svc), **labels) - value(before, name, **ids(svc), **labels)

    assert rose("modeld_service_requests_total", iris, via="gateway", code="200") == n_gateway
    assert rose("modeld_service_requests_total", iris, via="gateway", code="404") == missing
    assert rose("modeld_service_requests_total", iris, via="direct", code="200") == m_direct
    assert rose("modeld_service_requests_total", iris, via="direct", code="404") == 0
    assert rose("modeld_service_requests_total", command, via="gateway", code="200") == k_command
    assert rose("modeld_service_request_duration_seconds_count", iris, via="gateway") == n_gateway + missing
    assert rose("modeld_service_request_duration_seconds_count", iris, via="direct") == m_direct
    assert rose("modeld_service_request_duration_seconds_count", command, via="gateway") == k_command
    assert rose("modeld_service_request_duration_seconds_sum", iris, via="direct") > 0
    # Every request under the +Inf bucket, and the buckets cumulative.
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in after.items()
        if name == "modeld_service_request_duration_seconds_bucket" and ("via", "direct") in labels and ("uuid", str(iris.uuid)) in labels
    )
    assert buckets[-1] == (float("inf"), value(after, "modeld_service_request_duration_seconds_count", **ids(iris), via="direct"))
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))

    # The same text on the gateway's port, read by the same parser.
    status, kind, body = get(port, "/metrics")
    assert status == 200 and kind.startswith("text/plain; version=0.0.4"), (status, kind)
    on_gateway = parse(body.decode())
    assert value(on_gateway, "modeld_service_requests_total", **ids(iris), via="gateway", code="200") == value(
        after, "modeld_service_requests_total", **ids(iris), via="gateway", code="200"
    )
    assert get(port, "/metrics", method="HEAD")[:2] == (200, kind)
    assert get(port, "/metrics", method="POST")[0] == 405

    # A deleted service's counters go with it.
    client.delete(command.uuid, timeout=30)
    assert not list((home / "run" / "requests").glob(f"{command.uuid}.*"))
    assert value(scrape(client), "modeld_service_up", **ids(command)) == 0
    assert ("modeld_service_up", frozenset(ids(command).items())) not in scrape(client)


SLOW = """import os, time
def model(instances):
    seconds, marker = instances
    open(marker, "w").close()  # (the request is under way: the test may leave)
    time.sleep(seconds)
    return [seconds]
"""


def leave_before_the_answer(port: int, path: str, marker: Path, seconds: float = 0.5) -> None:
    """A predict that takes ``seconds``, whose client goes away once the model is working on it."""
    body = json.dumps({"instances": [seconds, str(marker)]}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (path.encode(), len(body), body))
        wait_for(marker.exists, 20, what="the model to be working on the request")
    marker.unlink()


def raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        return sock.recv(65536)


@pytest.mark.usefixtures("gateway_on")
@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_a_client_gone_is_499_and_the_gateways_own_answers_are_counted(client, home, tmp_path, monkeypatch):
    monkeypatch.setenv("MODELD_GATEWAY_TIMEOUT", "1")
    monkeypatch.setenv("MODELD_GATEWAY_MAX_BODY", "1000")
    (tmp_path / "slow.py").write_text(SLOW)
    svc = client.deploy(iris_config(model_name="slow", model_uri=f"{tmp_path / 'slow.py'}:model"), replace=False, timeout=60)
    port, marker = gateway_port(client), tmp_path / "working"
    predict = b"/v1/models/slow:predict"

    def count(via: str, code: str) -> float:
        return value(scrape(client), "modeld_service_requests_total", **ids(svc), via=via, code=code)

    # The client leaves while the model works: 499, not the 200 the server then answers to no one.
    leave_before_the_answer(svc.endpoint.port, predict.decode(), marker)
    wait_for(lambda: count("direct", "499") == 1, 20, what="a 499 counted by the server")
    leave_before_the_answer(port, predict.decode(), marker)
    wait_for(lambda: count("gateway", "499") == 1, 20, what="a 499 counted by the gateway")
    assert count("direct", "200") == 0 and count("gateway", "200") == 0

    # The gateway's own answers for the service: 504 (no answer within its timeout), 413 (by
    # content-length, and a chunked body past the cap), 503 (stopped).
    body = json.dumps({"instances": [2, str(marker)]}).encode()
    assert raw(port, b"POST %s HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n%s" % (predict, len(body), body)).startswith(
        b"HTTP/1.1 504")
    assert raw(port, b"POST %s HTTP/1.1\r\nhost: t\r\ncontent-length: 5000\r\n\r\n" % predict).startswith(b"HTTP/1.1 413")
    chunk = b"x" * 1500
    assert raw(port, b"POST %s HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (
        predict, len(chunk), chunk)).startswith(b"HTTP/1.1 413")
    client.stop(svc.uuid, timeout=30)
    status, _, _ = get(port, f"/v1/services/{svc.uuid}/v1/models/slow")
    assert status == 503
    wait_for(lambda: count("gateway", "503") == 1, 10, what="the 503 counted")
    samples = scrape(client)
    assert value(samples, "modeld_service_requests_total", **ids(svc), via="gateway", code="504") == 1
    assert value(samples, "modeld_service_requests_total", **ids(svc), via="gateway", code="413") == 2
    assert value(samples, "modeld_service_requests_total", **ids(svc), via="gateway", code="499") == 1


@pytest.mark.usefixtures("gateway_on")
def test_metrics_refuses_an_unknown_query_parameter_on_the_gateway_as_on_the_socket(client, home):
    port = gateway_port(client)
    status, kind, body = get(port, "/metrics?x=1")
    assert status == 400 and kind == "application/json", (status, kind, body)
    assert "unknown query parameter 'x'" in json.loads(body)["error"]["message"]
    assert get(port, "/metrics")[0] == 200  # and the connection's next scrape is served as before


# ------------------------------------------------------------------ states


def test_services_by_state_are_what_find_returns(client, home):
    running = client.deploy(iris_config(model_name="a"), replace=False, timeout=60)
    stopped = client.deploy(iris_config(model_name="b"), replace=False, timeout=60)
    client.deploy(iris_config(model_name="c"), replace=False, timeout=60)
    client.stop(stopped.uuid, timeout=30)
    samples = scrape(client)
    for state in ServiceState:
        assert value(samples, "modeld_services", state=state.value) == len(client.find(state=state)), state
    assert value(samples, "modeld_services", state="active") == 2
    assert value(samples, "modeld_service_up", **ids(running)) == 1
    assert value(samples, "modeld_service_up", **ids(stopped)) == 0
    assert ("modeld_service_start_time_seconds", frozenset(ids(stopped).items())) not in samples  # no server: no start time


def test_bad_requests_get_clear_errors_and_the_daemon_goes_on(client, home):
    client.daemon_info()  # (started)

    def ask(method: str, url: str) -> tuple[int, str]:
        conn = UnixHTTP(home / "modeld.sock")
        try:
            conn.request(method, url)
            response = conn.getresponse()
            return response.status, json.loads(response.read())["error"]["message"]
        finally:
            conn.close()

    status, message = ask("GET", "/metrics?x=1")
    assert status == 400 and "unknown query parameter 'x'" in message
    status, message = ask("POST", "/metrics")
    assert status == 405 and "POST is not allowed on /metrics" in message
    assert value(scrape(client), "modeld_services", state="active") == 0


def test_a_label_value_with_quotes_and_newlines_is_escaped(client, home):
    name = 'a "quoted"\\ name'
    svc = client.deploy(iris_config(model_name=name), replace=False, timeout=60)
    assert value(scrape(client), "modeld_service_up", uuid=str(svc.uuid), model_name=name) == 1


def test_a_server_counts_requests_in_its_file_without_a_system_call_per_request(tmp_path):
    """The writer's end alone: the counts a reader sees, and a file of another layout started afresh."""
    from daemon.runtime._serve import counters

    path = str(tmp_path / "requests" / "x.direct")
    writer = counters.RequestCounters(path)
    for status, seconds in ((200, 0.001), (200, 0.2), (503, 7.0), (700, 0.0)):
        writer.observe(status, seconds)
    found = counters.read(path)
    assert found is not None
    assert found.codes == {"200": 2, "503": 1, "other": 1}
    assert sum(found.buckets) == 4 and found.buckets[0] == 2 and found.buckets[-1] == 0
    assert found.sum == pytest.approx(7.201)
    writer.close()
    again = counters.RequestCounters(path)  # a restarted server goes on counting
    again.observe(200, 0.0)
    again.close()
    assert counters.read(path).codes["200"] == 3  # type: ignore[union-attr]
    with open(path, "r+b") as f:
        f.write(b"\x00" * 8)  # another layout (magic): read as none, restarted from zero by a writer
    assert counters.read(path) is None
    counters.RequestCounters(path).close()
    assert counters.read(path) == counters.Counts({}, [0] * (len(counters.BOUNDS) + 1), 0.0)


def test_a_servers_memory_and_cpu_reading_serves_for_max_age_and_a_new_server_is_read_at_once():
    """procstat.usage on real processes: a reading is answered again while it is younger than
    MAX_AGE (what keeps a scrape every second cheap); max_age=0, or a server not read yet, is read anew."""
    import subprocess

    from daemon import procstat

    spin = "import time\nend = time.process_time() + 30\nwhile time.process_time() < end: pass\n"
    busy = subprocess.Popen([sys.executable, "-c", spin])
    other = subprocess.Popen([sys.executable, "-c", spin])
    try:
        kept = procstat.usage([(busy.pid, None)], max_age=0)[0]
        assert kept is not None and kept[0] > 1024 * 1024
        figures = procstat._figures  # (the process's own ticks, not through usage and its readings)
        wait_for(lambda: (f := figures(busy.pid)) is not None and (f[1] + f[2]) / procstat.TICK > kept[1] + 0.05, 10)
        assert procstat.usage([(busy.pid, None)])[0] == kept  # still the reading of a moment ago
        assert not procstat.due([(busy.pid, None)]) and procstat.due([(busy.pid, None), (other.pid, None)])
        both = procstat.usage([(busy.pid, None), (other.pid, None)])
        assert both[0] == kept and both[1] is not None  # the server not read yet is read at once
        fresh = procstat.usage([(busy.pid, None)], max_age=0)[0]
        assert fresh is not None and fresh[1] > kept[1]
    finally:
        for p in (busy, other):
            p.kill()
            p.wait()
