"""The ``modeld`` command, run as a user would (``python -m deployers.cli`` in a subprocess).

Data goes to stdout (tables, or JSON with ``--json``); errors are one line on
stderr starting with ``modeld:`` and a documented exit code, never a traceback.
Tests of the command's own logic (name resolution, error lines, exit codes)
run it in this process on an in-memory transport instead, with no daemon.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import psutil
import pytest

from conftest import REPO, http_get, modeld, port_open, predict
from daemon.client import DaemonClient, InMemoryTransport, Request, Response, json_response
from daemon.exceptions import (
    Conflict, DaemonAlreadyRunning, DaemonStartError, DeployError, Forbidden, InternalError, InvalidRequest,
    MethodNotAllowed, NotFound, PayloadTooLarge, ProtocolError, ServiceNotFound, StillStarting, StopError, StorageError,
)
from daemon.config import ServiceConfig
from daemon.models import LocalModelService
from daemon.paths import Paths
from daemon.daemon_process import daemon_pid
from daemon.testing import pid_alive, wait_for
from deployers.cli import connect, main

UUID_RE = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
SETOSA = [[5.0, 3.4, 1.5, 0.2]]


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The stdout of a command that must succeed."""
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr  # (stdout may hold a server's last_error, as data)
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], code: int, *mentions: str) -> str:
    """Check a failed command: exit ``code``, one ``modeld:`` line on stderr, no traceback; the line."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("modeld:"), lines[0]
    for text in mentions:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def usage_error(result: subprocess.CompletedProcess[str], *mentions: str) -> None:
    """An argparse error: exit 2, usage and the reason on stderr, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    for text in mentions:
        assert text in result.stderr, (text, result.stderr)


# -------------------------------------------------------------------- daemon


@pytest.mark.slow
@pytest.mark.long
def test_daemon_start_status_stop(home):
    result = modeld("daemon", "status", home=home)
    assert result.returncode == 3
    assert "not running" in result.stdout

    out = ok(modeld("daemon", "start", home=home))
    pid = daemon_pid(Paths(home))
    assert pid is not None and f"running (pid {pid})" in out
    out = ok(modeld("daemon", "start", home=home))  # a no-op when it runs
    assert f"pid {pid}" in out

    out = ok(modeld("daemon", "status", home=home))
    assert "running" in out and f"pid {pid}" in out and "services: none" in out
    info = json.loads(ok(modeld("daemon", "status", "--json", home=home)))
    assert info["running"] is True and info["pid"] == pid and info["problems"] == []

    out = ok(modeld("daemon", "stop", home=home))
    assert f"stopped (pid {pid})" in out
    wait_for(lambda: not pid_alive(pid), 5, what="the daemon to exit")

    result = modeld("daemon", "status", home=home)
    assert result.returncode == 3
    assert "not running" in result.stdout
    assert json.loads(modeld("daemon", "status", "--json", home=home).stdout)["running"] is False
    out = ok(modeld("daemon", "stop", home=home))
    assert "not running" in out


# ------------------------------------------------------------------ services


@pytest.mark.slow
@pytest.mark.long
def test_service_lifecycle(home):
    out = ok(modeld("deploy", "--model-name", "iris", "--model-uri", "examples/iris.py:model", "--pipeline-name", "p",
                    home=home))
    uuid = UUID_RE.search(out).group(0)
    assert "active" in out
    url = re.search(r"prediction url: (\S+)", out).group(1)
    assert url.endswith("/v1/models/iris:predict")
    assert predict(url, SETOSA) == (200, {"predictions": ["setosa"]})

    table = ok(modeld("ls", home=home))
    assert table.splitlines()[0].split()[:4] == ["UUID", "NAME", "TYPE", "STATE"]
    row = next(line for line in table.splitlines() if line.startswith(uuid[:8]))
    assert "iris" in row and "active" in row and " p " in f" {row} "

    listed = json.loads(ok(modeld("ls", "--json", home=home)))
    assert isinstance(listed, list) and [s["uuid"] for s in listed] == [uuid]
    assert listed[0]["config"]["pipeline_name"] == "p"

    assert uuid[:8] in ok(modeld("ls", "--model-name", "iris", home=home))
    result = modeld("ls", "--model-name", "nope", home=home)
    assert result.returncode == 0 and result.stdout == "" and "no services match" in result.stderr
    assert uuid[:8] in ok(modeld("ls", "--running", home=home))

    out = ok(modeld("info", uuid[:6], home=home))
    fields = dict(line.split(None, 1) for line in out.splitlines() if line.strip())
    assert fields["UUID"] == uuid
    assert fields["PREDICTION_URL"] == url
    assert fields["STATE"] == "active"
    info = json.loads(ok(modeld("info", uuid, "--json", home=home)))
    assert info["uuid"] == uuid and info["endpoint"]["model_name"] == "iris"

    log_path = home / "services" / uuid / "service.log"
    with open(log_path, "a") as f:
        f.write("".join(f"cli line {i}\n" for i in range(10)))
    out = ok(modeld("logs", uuid, "-n", "5", home=home))
    assert out.splitlines() == [f"cli line {i}" for i in range(5, 10)]

    pid = info["status"]["pid"]
    out = ok(modeld("stop", uuid[:8], home=home))
    assert uuid in out and "inactive" in out
    assert not pid_alive(pid)
    result = modeld("ls", "--running", home=home)
    assert result.returncode == 0 and uuid[:8] not in result.stdout

    out = ok(modeld("start", uuid, home=home))
    assert uuid in out and "active" in out
    assert predict(url, SETOSA) == (200, {"predictions": ["setosa"]})

    out = ok(modeld("rm", uuid[:8], "--force", home=home))
    assert f"{uuid} deleted" in out
    assert json.loads(ok(modeld("ls", "--json", home=home))) == []
    assert not (home / "services" / uuid).exists()


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_command_server_after_double_dash(home):
    out = ok(modeld("deploy", "--model-name", "echo", "--health-path", "/", "--",
                    "python3", "-m", "http.server", "{port}", "--bind", "{host}", home=home))
    uuid = UUID_RE.search(out).group(0)
    base = re.search(r"url: (http://\S+)", out).group(1)
    assert http_get(int(base.rsplit(":", 1)[1]), "/") == 200

    listed = json.loads(ok(modeld("ls", "--json", "--model-type", "command", home=home)))
    assert [s["uuid"] for s in listed] == [uuid]
    command = listed[0]["config"]["command"]
    assert command == ["python3", "-m", "http.server", "{port}", "--bind", "{host}"]

    port = listed[0]["endpoint"]["port"]
    ok(modeld("rm", uuid, "--force", home=home))
    wait_for(lambda: not port_open(port), 10, what="the command server's port to close")


@pytest.mark.slow
@pytest.mark.long
def test_env_key_alone_takes_the_value_from_the_callers_environment(home, monkeypatch):
    # A secret given as --env KEY never sits in the CLI's command line (readable by every local user in /proc).
    monkeypatch.setenv("API_KEY", "sk-from-env-7731")
    monkeypatch.delenv("MODELD_TEST_UNSET", raising=False)
    out = ok(modeld("deploy", "--model-name", "iris", "--model-uri", "examples/iris.py:model", "--json",
                    "--env", "API_KEY", "--env", "PLAIN=shown", home=home))
    shown = json.loads(out)
    assert shown["config"]["env"] == {"API_KEY": "********", "PLAIN": "shown"}
    assert psutil.Process(shown["status"]["pid"]).environ()["API_KEY"] == "sk-from-env-7731"
    assert "sk-from-env-7731" not in out
    usage_error(modeld("deploy", "--model-name", "x", "--model-uri", "examples/iris.py:model",
                       "--env", "MODELD_TEST_UNSET", home=home), "--env MODELD_TEST_UNSET", "not set")
    ok(modeld("daemon", "stop", "--all", home=home))


# -------------------------------------------------------------------- errors


@pytest.mark.slow
@pytest.mark.long
def test_errors_are_one_line_with_exit_codes(home, tmp_path):
    # Usage errors are caught before any daemon is needed.
    result = modeld("deploy", "--model-name", "iris", "--model-uri", "examples/iris.py:model", "--port", "notanumber",
                    home=home)
    usage_error(result, "--port", "invalid int value")
    one_line_error(modeld("deploy", "--model-name", "iris", home=home), 2, "model_uri")
    one_line_error(modeld("deploy", "--model-uri", "examples/iris.py:model", "--env", "NOEQUALS", home=home), 2, "--env")
    usage_error(modeld("ls", "--", "python3", home=home), "--")
    usage_error(modeld("frobnicate", home=home), "frobnicate")
    assert daemon_pid(Paths(home)) is None

    unknown = "00000000-0000-4000-8000-000000000000"
    for command in (("info", unknown), ("stop", unknown), ("start", unknown), ("rm", unknown), ("logs", unknown),
                    ("info", "zzzz")):
        one_line_error(modeld(*command, home=home), 4)

    broken = tmp_path / "broken_model.py"
    broken.write_text('raise RuntimeError("kaboom: the weights are missing")\n')
    line = one_line_error(modeld("deploy", "--model-name", "broken", "--model-uri", f"{broken}:model", home=home), 5)
    assert "kaboom: the weights are missing" in line

    # The failed deploy is kept, in error, and the daemon still works.
    listed = json.loads(ok(modeld("ls", "--json", home=home)))
    assert [s["status"]["state"] for s in listed] == ["error"]


@pytest.mark.slow
def test_help(home):
    out = ok(modeld("--help", home=home))
    assert "examples:" in out and "modeld deploy" in out and "curl --unix-socket" in out
    for command in ("deploy", "ls", "logs", "daemon", "flavor"):
        assert command in out
    out = ok(modeld("deploy", "--help", home=home))
    assert "--model-uri" in out and "--port" in out and "-- COMMAND" in out and "{port}" in out
    out = ok(modeld("daemon", "--help", home=home))
    for action in ("start", "stop", "status", "run"):
        assert action in out
    out = ok(modeld("daemon", "stop", "--help", home=home))
    assert "--all" in out
    assert daemon_pid(Paths(home)) is None


# ------------------------------------------------------------ flavors, deployers


@pytest.mark.slow
@pytest.mark.long
def test_flavors_and_deployers(home):
    out = ok(modeld("flavor", "list", home=home))
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [r[0] for r in rows] == ["local", "ray"] and rows[0][-1] == rows[1][-1] == "yes"

    source = "tests.flavor_fixtures.memory_flavor.InMemoryModelDeployerFlavor"
    out = ok(modeld("flavor", "register", source, home=home))
    assert "'memory'" in out
    flavors = json.loads(ok(modeld("flavor", "list", "--json", home=home)))
    assert {f["name"]: f["source"] for f in flavors} == {"local": flavors[0]["source"], "ray": flavors[1]["source"], "memory": source}
    assert "memory" in ok(modeld("flavor", "list", home=home))

    for bad in ("tests.flavor_fixtures.bad_flavors.NotAFlavor", "no_such_package_xyz.Flavor", "not a source",
                "tests.flavor_fixtures.bad_flavors.LocalImpostorFlavor"):
        one_line_error(modeld("flavor", "register", bad, home=home), 2)
    assert [f["name"] for f in json.loads(ok(modeld("flavor", "list", "--json", home=home)))] == ["local", "ray", "memory"]

    out = ok(modeld("deployer", "register", "mine", "--flavor", "local", "home=/tmp/x", home=home))
    assert "'mine'" in out
    out = ok(modeld("deployer", "register", "mem", "--flavor", "memory", "capacity=3", home=home))
    deployers = {d["name"]: d for d in json.loads(ok(modeld("deployer", "list", "--json", home=home)))}
    assert deployers["mine"]["flavor"] == "local" and deployers["mine"]["config"] == {"home": "/tmp/x"}
    assert deployers["mem"]["config"] == {"capacity": 3}

    one_line_error(modeld("deployer", "register", "bad", "--flavor", "local", "nosuchkey=1", home=home), 2, "nosuchkey")
    one_line_error(modeld("deployer", "register", "bad", "--flavor", "memory", "capacity=lots", home=home), 2, "capacity")
    one_line_error(modeld("deployer", "register", "bad", "--flavor", "nosuchflavor", home=home), 2, "nosuchflavor")
    one_line_error(modeld("deployer", "register", "bad", "--flavor", "local", "novalue", home=home), 2, "novalue")
    names = [d["name"] for d in json.loads(ok(modeld("deployer", "list", "--json", home=home)))]
    assert "bad" not in names and {"mine", "mem"} <= set(names)

    ok(modeld("deployer", "rm", "mine", home=home))
    assert "mine" not in ok(modeld("deployer", "list", home=home))
    # None of this needed the daemon.
    assert daemon_pid(Paths(home)) is None


def test_unusable_home_is_one_line(tmp_path):
    """A home whose socket path is too long, or that cannot be created, is a clear error, not a traceback."""
    too_long = tmp_path / ("x" * 110)
    one_line_error(modeld("ls", home=too_long), 1, "longer than 107 bytes", "MODELD_HOME")
    blocker = tmp_path / "file"
    blocker.write_text("")
    one_line_error(modeld("ls", home=blocker / "home"), 1, "cannot create the modeld home")


# ------------------------------------------------- in memory: no daemon, no socket
#
# What these check is the command's own logic (name resolution, error lines, exit codes);
# the daemon's answers come from an in-memory transport, as a daemon would send them.


def run_in_memory(monkeypatch, capsys, handler, *argv: str) -> tuple[int, str, str, InMemoryTransport]:
    """``modeld *argv`` in this process, every client on ``InMemoryTransport(handler)``: (exit code, stdout, stderr, transport)."""
    transport = InMemoryTransport(handler)
    monkeypatch.setattr(connect, "client", lambda args, auto_start=True, timeout=None: DaemonClient(transport=transport, timeout=timeout))
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err, transport


def _service(uuid: str, name: str) -> dict:
    svc = LocalModelService(uuid=uuid, config=ServiceConfig(model_name=name, model_uri="/tmp/m.py:model",
                                                            python=sys.executable, working_dir="/tmp"))
    return svc.public().model_dump(mode="json")


def test_an_exact_name_wins_over_a_uuid_prefix(monkeypatch, capsys):
    """`modeld rm d` must not delete the service whose uuid starts with d when one is named d."""
    prod, named_d = "dead0000-0000-4000-8000-000000000001", "11110000-0000-4000-8000-000000000002"
    services = {prod: _service(prod, "prod"), named_d: _service(named_d, "d")}

    def daemon(request: Request) -> Response:
        if request.method == "GET" and request.path == "/v1/services":
            return json_response({"services": list(services.values())})
        uuid = request.path.split("/")[3]
        if uuid not in services:
            raise ServiceNotFound(f"no service with uuid {uuid}")
        if request.method == "DELETE":
            return json_response({"deleted": services.pop(uuid)["uuid"]})
        return json_response(services[uuid])

    for ref, expected in (("d", named_d), ("dead", prod), ("1111", named_d), ("prod", prod)):
        code, out, err, _ = run_in_memory(monkeypatch, capsys, daemon, "info", ref, "--json")
        assert (code, err) == (0, "") and json.loads(out)["uuid"] == expected, (ref, code, err)
    code, out, err, transport = run_in_memory(monkeypatch, capsys, daemon, "rm", "d", "--force")
    assert (code, err) == (0, "") and out == f"{named_d} deleted\n"
    assert [(r.method, r.path, r.query) for r in transport.requests][-1] == (
        "DELETE", f"/v1/services/{named_d}", {"timeout": 300.0, "force": "true"})
    assert list(services) == [prod]

    code, _, err, _ = run_in_memory(monkeypatch, capsys, daemon, "info", "zzzz")
    assert code == 4 and err.startswith("modeld: no service whose uuid starts with 'zzzz'")
    services[named_d] = _service(named_d, "prod")  # two services named prod
    code, _, err, _ = run_in_memory(monkeypatch, capsys, daemon, "rm", "prod")
    assert code == 2 and "'prod' matches 2 services" in err
    assert len(services) == 2


@pytest.mark.parametrize("error, code", [
    (ServiceNotFound("no service with uuid x"), 4),
    (DeployError("service x: the server did not start"), 5),
    (StillStarting("service x: not healthy after 1s"), 5),
    (StopError("service x: could not be stopped"), 5),
    (DaemonStartError("the daemon exited"), 3),
    (DaemonAlreadyRunning("a modeld daemon is already running"), 3),
    (InvalidRequest("config.port: bad"), 2),
    (Forbidden("this daemon serves only its own user"), 2),
    (NotFound("no route '/v1/x'"), 2),
    (MethodNotAllowed("PUT is not allowed"), 2),
    (Conflict("uuid taken"), 2),
    (PayloadTooLarge("too large"), 2),
    (InternalError("KeyError: 'x'"), 1),
    (StorageError("disk full"), 1),
    (ProtocolError("the daemon closed the connection"), 1),
])
def test_every_error_from_the_daemon_is_one_line_and_its_exit_code(monkeypatch, capsys, error, code):
    def daemon(request: Request) -> Response:
        raise error

    got, out, err, _ = run_in_memory(monkeypatch, capsys, daemon, "ls")
    assert (got, out, err) == (code, "", f"modeld: {error.message}\n")


def test_a_servers_log_excerpt_is_printed_from_its_own_field(monkeypatch, capsys):
    """The CLI prints the last line of ``log_excerpt``, not of a message it would have to take apart."""
    message = "service x: the server exited with code 1 before it answered its health check; last log lines:\n" \
              "Traceback (most recent call last):\n  ...\nRuntimeError: kaboom: the weights are missing\n"

    def daemon(request: Request) -> Response:
        return json_response({"error": {"type": "DeployError", "message": message,
                                         "log_excerpt": "loading\nRuntimeError: from the field\n"}}, 500)

    code, _, err, _ = run_in_memory(monkeypatch, capsys, daemon, "start", "11110000-0000-4000-8000-000000000002")
    assert code == 5
    assert err == ("modeld: service x: the server exited with code 1 before it answered its health check "
                   "(last log line: RuntimeError: from the field)\n")

    def old_daemon(request: Request) -> Response:  # no log_excerpt field: the excerpt is read from the message
        return json_response({"error": {"type": "DeployError", "message": message}}, 500)

    code, _, err, _ = run_in_memory(monkeypatch, capsys, old_daemon, "start", "11110000-0000-4000-8000-000000000002")
    assert code == 5 and err.endswith("(last log line: RuntimeError: kaboom: the weights are missing)\n")


@pytest.mark.slow
def test_a_deploy_error_quoting_the_servers_log_prints_no_escapes(home, tmp_path):
    """A server's last log line, quoted in a failed deploy's error, is shown without its terminal escapes
    and control characters (a model could colour or reverse the user's terminal)."""
    model = tmp_path / "evil.py"
    model.write_text('raise RuntimeError("\\x1b[41mPWNED\\u202e then reversed\\x07")\n')
    done = modeld("deploy", "--model-name", "evil", "--model-uri", f"{model}:model", "--timeout", "60", home=home, timeout=120)
    assert done.returncode == 5, (done.stdout, done.stderr)
    assert "PWNED" in done.stderr and "then reversed" in done.stderr, done.stderr
    assert not any(c in done.stderr for c in ("\x1b", "\u202e", "\x07")), repr(done.stderr)


def test_ls_keeps_its_columns_aligned_with_wide_names(home, client):
    """Names with emoji and east Asian characters take two cells a character on a terminal: the columns
    after them stay where the others' are (top does the same, see test_top)."""
    import unicodedata

    def cells(text: str) -> int:
        return sum(2 if unicodedata.east_asian_width(c) in ("W", "F") else 0 if unicodedata.combining(c) else 1 for c in text)

    for name in ("ünï😀", "模型服务", "plain"):
        client.deploy(ServiceConfig(model_name=name, model_uri="examples/iris.py:model", working_dir=str(REPO)), timeout=60)
    result = modeld("ls", home=home)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    starts = {cells(line[: line.index(" python ")]) for line in lines[1:]}
    assert len(lines) == 4 and len(starts) == 1 and starts == {cells(lines[0][: lines[0].index("TYPE") - 1])}, result.stdout
