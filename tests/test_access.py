"""Access: who can reach the daemon and the model servers, and what they are shown.

The second user is real: a forked child that switches to uid 65534 (nobody) with
``os.setuid``, which needs root. The tests that do this are marked ``needs_root``:
for anyone else they skip, saying so, and under CI (which runs as root) they fail
rather than skip, since a skipped access test proves nothing. What needs no second
user (modes, no TCP port, curl over a server's socket) is tested apart, for everyone.
Secrets are looked for everywhere text goes: API answers, the CLI, errors, the
daemon's log and every file of the home.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from conftest import iris_config, modeld
from daemon import DeployError, InvalidRequest, ServiceConfig, ServiceState
from daemon.exceptions import Conflict

SETOSA = [[5.0, 3.4, 1.5, 0.2]]
CURL = shutil.which("curl") or "/usr/bin/curl"
needs_root_for_another_uid = pytest.mark.needs_root("to switch a child to another uid")


def as_nobody(sock_path: str | Path, request: bytes = b"GET /v1/services HTTP/1.1\r\nHost: modeld\r\n\r\n") -> bytes:
    """Connect to ``sock_path`` from a forked child running as uid 65534; what it read, or ``<error ...>``."""
    assert os.geteuid() == 0, "as_nobody switches a forked child to uid 65534: mark the test needs_root_for_another_uid"
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only os-level calls, always _exit
        code = 1
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            data = b""
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(10)
                    s.connect(str(sock_path))
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        s.sendall(request)  # the daemon may refuse (answer and close) before reading
                    while True:
                        try:
                            chunk = s.recv(65536)
                        except ConnectionResetError:
                            break
                        if not chunk:
                            break
                        data += chunk
            except OSError as exc:
                data = f"<error {exc.errno}>".encode()
            os.write(write_fd, data[:4096] or b"<nothing>")
            code = 0
        except BaseException as exc:  # noqa: BLE001 - report anything to the parent
            with contextlib.suppress(Exception):
                os.write(write_fd, f"<child failed: {exc!r}>".encode())
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        chunks = []
        while chunk := os.read(read_fd, 65536):
            chunks.append(chunk)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(read_fd)
    answer = b"".join(chunks)
    assert os.waitstatus_to_exitcode(status) == 0, answer
    return answer


@contextlib.contextmanager
def opened(*paths_and_modes: tuple[Path, int]):
    """Loosen the modes of some paths for a moment (to test the next layer of defence), then restore them."""
    saved = [(path, stat.S_IMODE(os.stat(path).st_mode)) for path, _ in paths_and_modes]
    try:
        for path, mode in paths_and_modes:
            os.chmod(path, mode)
        yield
    finally:
        for path, mode in saved:
            os.chmod(path, mode)


def not_private(home: Path) -> list[str]:
    """Everything under ``home`` that its group or other users could read, write or enter."""
    found = []
    for root, dirs, files in os.walk(home):
        for name in [".", *dirs, *files]:
            path = os.path.join(root, name)
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            if mode & 0o077:
                found.append(f"{oct(mode)} {os.path.relpath(path, home)}")
    return found


# -------------------------------------------------------------------- tests


@pytest.mark.slow
def test_socket_and_state_are_private(client, home):
    svc = client.deploy(iris_config(), timeout=60)
    client.deploy(iris_config(model_name="private", bind_unix=True), timeout=60)
    modeld("ls", home=home)  # the CLI's own files too (autostart lock, registries it reads)
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    sock = os.stat(home / "modeld.sock")
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(home / "services" / str(svc.uuid) / "service.json").st_mode) == 0o600
    assert not_private(home) == []


@needs_root_for_another_uid
def test_peer_of_another_uid_is_refused(client, home):
    client.daemon_info()
    sock_path = home / "modeld.sock"
    # First defence: the folder (0700) and the socket (0600) keep another user out.
    assert as_nobody(sock_path).startswith(b"<error 13>")  # EACCES
    # Second: with both opened up, the daemon itself checks the peer's uid (SO_PEERCRED).
    with opened((home, 0o755), (sock_path, 0o777)):
        answer = as_nobody(sock_path)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split()[1] == b"403", answer
    assert json.loads(body)["error"]["type"] == "Forbidden"
    assert "refused a connection from uid 65534" in (home / "daemon.log").read_text()
    assert client.find() == []  # the daemon keeps serving its own user


def test_model_servers_bind_loopback_unless_told_otherwise(client):
    svc = client.deploy(iris_config(), timeout=60)
    web = client.deploy(ServiceConfig(model_name="web", health_path="/",
                                      command=[sys.executable, "-m", "http.server", "{port}", "--bind", "{host}"]), timeout=60)
    for s in (svc, web):
        assert s.config.host == s.endpoint.host == "127.0.0.1"
        listening = {c.laddr for c in psutil.Process(s.status.pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        assert listening == {("127.0.0.1", s.endpoint.port)}, listening


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_a_model_server_on_a_private_unix_socket(client, home):
    out = modeld("deploy", "--model-name", "iris", "--model-uri", iris_config().model_uri, "--unix-socket", "--json", home=home)
    assert out.returncode == 0, out.stderr
    svc = client.get(json.loads(out.stdout)["uuid"])
    path = svc.endpoint.unix_socket
    assert svc.status.state == ServiceState.ACTIVE and svc.config.bind_unix
    assert path == str(home / "services" / str(svc.uuid) / "model.sock") and svc.endpoint.port == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert svc.endpoint.prediction_url.startswith("http+unix://%2F")
    # No TCP port at all: only Unix sockets.
    assert psutil.Process(svc.status.pid).net_connections("tcp") == []

    curl = [CURL, "-sS", "--unix-socket", path, "http://localhost/v1/models/iris:predict", "-d", json.dumps({"instances": SETOSA})]
    assert json.loads(subprocess.run(curl, capture_output=True, text=True, timeout=30).stdout) == {"predictions": ["setosa"]}
    info = modeld("info", str(svc.uuid), home=home).stdout
    assert f"UNIX_SOCKET       {path}" in info and f"curl --unix-socket {path} http://localhost/v1/models/iris:predict" in info

    # Kept for life: a replace hands over on the same socket; the mode cannot switch to TCP.
    v2 = client.deploy(iris_config(model_name="iris", pipeline_name="", pipeline_step_name="", bind_unix=True,
                                   model_uri=str(Path(iris_config().model_uri.rsplit(":", 1)[0]).with_name("iris_v2.py")) + ":model"),
                       replace=True, timeout=60)
    assert v2.uuid == svc.uuid and v2.endpoint.unix_socket == path and v2.version == 2
    with pytest.raises(Conflict):
        client.deploy(iris_config(model_name="iris", pipeline_name="", pipeline_step_name=""), replace=True, timeout=60)
    with pytest.raises(ValueError, match="bind_unix works with the built-in"):
        ServiceConfig(model_name="cmd", command=["sleep", "1"], bind_unix=True)
    refused = modeld("deploy", "--model-name", "cmd", "--unix-socket", "--", "sleep", "1", home=home)
    assert refused.returncode == 2 and "bind_unix works with the built-in" in refused.stderr, refused.stderr


@needs_root_for_another_uid
def test_another_user_cannot_reach_a_model_servers_unix_socket(client, home):
    svc = client.deploy(iris_config(bind_unix=True), timeout=60)
    path = svc.endpoint.unix_socket
    assert as_nobody(path).startswith(b"<error 13>")  # EACCES
    # Even with the folders opened up to it: the socket itself is 0600.
    with opened((home, 0o755), (home / "services", 0o755), (Path(path).parent, 0o755)):
        assert as_nobody(path).startswith(b"<error 13>")
    # (and its owner still gets an answer through it)
    curl = [CURL, "-sS", "--unix-socket", path, "http://localhost/v1/models/iris:predict", "-d", json.dumps({"instances": SETOSA})]
    assert json.loads(subprocess.run(curl, capture_output=True, text=True, timeout=30).stdout) == {"predictions": ["setosa"]}


SECRETS = {"API_KEY": "sk-live-4f8a9c2e", "HF_TOKEN": "hf_Zq81mXkPq", "DB_PASSWORD": "pw-orange-42",
           "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI", "GCP_CREDENTIALS": "gcp-cred-77a1", "CUSTOM": "custom-hidden-99"}


@pytest.mark.slow
@pytest.mark.long
def test_secret_env_values_are_never_shown(client, home, tmp_path):
    env = {**SECRETS, "PLAIN": "plain-visible-1"}
    model = tmp_path / "secretive.py"
    model.write_text(textwrap.dedent("""
        def model(instances):
            return instances
    """))
    deployed = client.deploy(iris_config(model_name="sec", model_uri=f"{model}:model", env=env, secret_env=["CUSTOM"]), timeout=60)
    # The server gets the real values.
    server_env = psutil.Process(deployed.status.pid).environ()
    assert {k: server_env[k] for k in env} == env

    # A server that prints its secrets and dies: the error, last_error and the log lines quoted mask them.
    leaky = tmp_path / "leaky.py"
    leaky.write_text("import os\nprint('token is', os.environ['HF_TOKEN'], 'key', os.environ['API_KEY'], flush=True)\nraise SystemExit(2)\n")
    with pytest.raises(DeployError) as excinfo:
        client.deploy(ServiceConfig(model_name="leaky", health_path="/", env=SECRETS, secret_env=["CUSTOM"],
                                    command=[sys.executable, str(leaky), "{port}"]), timeout=30)
    assert "token is ******** key ********" in str(excinfo.value), excinfo.value
    # Errors that name the config (a missing file, a refused field) do not quote env values either.
    errors = [str(excinfo.value)]
    for bad in ({"model_uri": str(tmp_path / "missing.py") + ":model"}, {"working_dir": str(tmp_path / "nowhere")}):
        with pytest.raises(InvalidRequest) as refused:
            client.deploy(iris_config(model_name="bad", env=env, **bad), timeout=10)
        errors.append(str(refused.value))
    bad_cli = modeld("deploy", "--model-name", "x", *[f"--env={k}={v}" for k, v in SECRETS.items()], "--port", "99999", home=home)
    assert bad_cli.returncode == 2
    errors.append(bad_cli.stdout + bad_cli.stderr)

    shown = [
        *(s.model_dump_json() for s in (deployed, client.get(deployed.uuid), *client.find())),
        json.dumps(client.daemon_info()),
        *(modeld(*args, home=home).stdout for args in (
            ("info", str(deployed.uuid)), ("info", str(deployed.uuid), "--json"), ("ls",), ("ls", "--json"),
            ("info", "leaky"), ("info", "leaky", "--json"), ("daemon", "status"))),
        *errors,
    ]
    assert any("plain-visible-1" in text for text in shown)  # ordinary values are shown
    assert any("********" in text for text in shown)
    # The whole home, as text: the daemon's log, service logs (modeld's lines), pid files, everything
    # but service.json, which keeps the values to restart the server after a daemon or machine restart,
    # and the leaky server's own log, which holds what that server printed (its business, shown by `logs`).
    (leaky_svc,) = client.find(model_name="leaky")
    own_output = home / "services" / str(leaky_svc.uuid) / "service.log"
    for path in home.rglob("*"):
        if path.is_file() and path.name != "service.json" and path != own_output:
            shown.append(f"{path}: " + path.read_bytes().decode(errors="replace"))
    assert SECRETS["HF_TOKEN"] in own_output.read_text()  # (so the check above had something to find)
    for key, value in SECRETS.items():
        assert [text[:300] for text in shown if value in text] == [], key
    for path in home.glob("services/*/service.json"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_scrub_masks_nested_secrets_whole_and_the_previous_versions_too():
    new = ServiceConfig(model_name="m", model_uri="m.py:model", env={"A_KEY": "abcd", "B_TOKEN": "abcdefgh", "SHORT_KEY": "ab"})
    old = ServiceConfig(model_name="m", model_uri="m.py:model", env={"A_KEY": "rotated-old-value"})
    text = "new abcdefgh and abcd, old rotated-old-value, short ab"
    assert new.scrub(text, old) == "new ******** and ********, old ********, short ab"
    assert new.scrub(text) == "new ******** and ********, old rotated-old-value, short ab"


def test_a_log_tail_that_starts_mid_line_drops_that_line(tmp_path):
    from daemon.logs import tail_text

    log = tmp_path / "service.log"
    log.write_text("x" * 50 + "SECRETVALUE-tail\n" + "line two\n")
    assert tail_text(log, max_bytes=20) == "line two"
    assert tail_text(log).splitlines()[0].endswith("SECRETVALUE-tail")


def test_servers_keep_the_umask_the_daemon_was_started_with(client, home, tmp_path):
    # The daemon itself runs under 077; the files a model server writes get its user's usual modes.
    # The first deploy starts cold, the later ones are forked from the warm fork server: both checked.
    previous = os.umask(0o022)  # the daemon is auto-started by the first call below, under this umask
    try:
        client.daemon_info()
    finally:
        os.umask(previous)
    model = tmp_path / "writer.py"
    model.write_text(textwrap.dedent("""
        import os, sys
        open(os.path.join(os.getcwd(), f"written-{os.getpid()}"), "w").close()
        def model(instances):
            return instances
    """))
    for name in ("w1", "w2", "w3"):
        client.deploy(iris_config(model_name=name, model_uri=f"{model}:model", working_dir=str(tmp_path)), timeout=60)
    written = sorted(tmp_path.glob("written-*"))
    assert len(written) == 3
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {oct(0o644)}
