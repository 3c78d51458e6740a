"""What a new user meets in the first hour (issue 13, part 3): progress while the CLI waits, a
command server that finds programs on the deploying client's PATH, a command service's
PREDICTION_URL, and a Unix-socket service's row in ``modeld ls``. Real daemons, real servers,
a real pseudo-terminal."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from daemon import BaseService, DaemonClient, ServiceConfig
from daemon.testing import REPO, wait_for
from tests.conftest import http_get, modeld

# A server that says what it does, then takes its time before it listens: a deploy waits on it.
SLOW_SERVER = """import http.server, sys, time
print("loading weights (step 1 of 1)", flush=True)
time.sleep(float(sys.argv[2]))
print("listening", flush=True)
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
"""
COLUMNS = 72
PROGRESS = re.compile(r"\r([^\r\n\x1b]*)\x1b\[K")  # one drawing of the progress line


def on_terminal(*args: str, home: Path, env: dict[str, str] | None = None, timeout: float = 90) -> tuple[int, str]:
    """Run ``modeld ARGS`` with stdin, stdout and stderr on a pseudo-terminal COLUMNS wide; (exit code, all it wrote)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, COLUMNS, 0, 0))
    full_env = {**os.environ, "MODELD_HOME": str(home), **(env or {})}
    full_env.pop("COLUMNS", None)  # the width is the terminal's
    proc = subprocess.Popen(
        [sys.executable, "-m", "deployers.cli", *args], cwd=REPO, env=full_env,
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every end of the terminal closed, the command is done
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, b"".join(chunks).decode(errors="replace")


def after_progress(out: str) -> list[str]:
    """The lines written after the progress line was erased for the last time."""
    return out[out.rindex("\x1b[K") + 3 :].replace("\r\n", "\n").strip().splitlines()


def slow_command(seconds: float = 1.5) -> list[str]:
    return ["--health-path", "/", "--", sys.executable, "-c", SLOW_SERVER, "{port}", str(seconds)]


@pytest.mark.slow  # servers that take their time, so that there is progress to show
def test_progress_is_drawn_in_place_on_a_terminal(home: Path, client: DaemonClient) -> None:
    client.daemon_info()  # running already: the line shows the server, not the daemon starting
    code, out = on_terminal("deploy", "--model-name", "slow", *slow_command(), home=home)
    assert code == 0, out
    lines = PROGRESS.findall(out)
    drawn = [line for line in lines if line]
    assert drawn, f"no progress line on the terminal: {out!r}"
    assert all(line.startswith("deploying slow: ") for line in drawn), drawn
    # the elapsed time grows, the state is the service's, and the server's last log line is shown
    times = [float(re.match(r"deploying slow: +([\d.]+)s", line).group(1)) for line in drawn]  # type: ignore[union-attr]
    assert times == sorted(times) and times[-1] >= 1.0, times
    assert any("pending_startup" in line and "loading weights (step 1 of 1)" in line for line in drawn), drawn
    # one line, cut to the terminal's width, never a newline in between: it is drawn over itself
    assert all(len(line) <= COLUMNS - 1 for line in drawn), drawn
    assert "\n" not in out[out.index("\rdeploying slow") : out.rindex("\r\x1b[K")], out
    # erased once done, before the result, which reads as it does when piped
    assert lines[-1] == "", lines
    result = after_progress(out)
    assert re.fullmatch(r"[0-9a-f-]{36} active in [\d.]+s", result[0]), result
    assert result[1].startswith("url: http://127.0.0.1:"), result
    uuid = result[0].split()[0]

    # start and replace show it too
    client.stop(uuid)
    code, out = on_terminal("start", uuid, home=home)
    assert code == 0, out
    drawn = [line for line in PROGRESS.findall(out) if line]
    assert drawn and all(line.startswith(f"starting {uuid[:8]}: ") for line in drawn), out
    assert any("loading weights" in line for line in drawn), drawn

    code, out = on_terminal("deploy", "--model-name", "slow", "--replace", *slow_command(), home=home)
    assert code == 0, out
    drawn = [line for line in PROGRESS.findall(out) if line]
    assert drawn and all(line.startswith("replacing slow: ") for line in drawn), out
    assert after_progress(out)[0].startswith(f"{uuid} active in "), out  # replaced in place


@pytest.mark.slow  # servers that take their time, so that there is progress to show
def test_a_long_log_line_is_cut_to_the_terminal(home: Path, client: DaemonClient) -> None:
    """A server's line longer than the terminal, with colour codes and a \\r of its own, stays one line."""
    client.daemon_info()
    noisy = SLOW_SERVER.replace(
        'print("loading weights (step 1 of 1)", flush=True)',
        'print("\\x1b[32mprogress\\x1b[0m " + "漢" * 100 + "\\rtail", flush=True)',
    )
    code, out = on_terminal("deploy", "--model-name", "noisy", "--health-path", "/", "--",
                            sys.executable, "-c", noisy, "{port}", "1.5", home=home)
    assert code == 0, out
    drawn = [line for line in PROGRESS.findall(out) if "progress" in line]
    assert drawn, out
    for line in drawn:
        cells = sum(2 if "\u4e00" <= c <= "\u9fff" else 1 for c in line)
        assert cells <= COLUMNS - 1, (cells, line)
        assert "\x1b" not in line and "[32m" not in line


@pytest.mark.slow  # servers that take their time, so that there is progress to show
def test_no_progress_when_piped_or_with_json(home: Path, client: DaemonClient) -> None:
    client.daemon_info()
    result = modeld("deploy", "--model-name", "piped", *slow_command(), home=home)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", repr(result.stderr)
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and re.fullmatch(r"[0-9a-f-]{36} active in [\d.]+s", lines[0]), lines
    assert lines[1].startswith("url: http://127.0.0.1:"), lines

    code, out = on_terminal("deploy", "--model-name", "json", "--json", *slow_command(), home=home)
    assert code == 0, out
    assert "\x1b[K" not in out and "deploying" not in out, out
    assert json.loads(out)["status"]["state"] == "active"


# ------------------------------------------------------------- the deploying client's PATH


@pytest.mark.slow
def test_a_command_finds_programs_on_the_deploying_clients_path(home: Path, client: DaemonClient, tmp_path: Path) -> None:
    """The daemon runs with a PATH without ``tools``; the client that deploys has it: the server's
    argv[0] and the program its shell starts are both found there."""
    client.daemon_info()  # the daemon's PATH is this test's, which has no tools/
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "md-serve").write_text('#!/bin/sh\nmd-helper "$@"\n')  # a child, looked up by name
    (tools / "md-helper").write_text(
        f"#!{sys.executable}\nimport http.server, sys\n"
        "http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()\n"
    )
    for name in ("md-serve", "md-helper"):
        (tools / name).chmod(0o755)
    daemon_path = os.environ["PATH"]
    assert str(tools) not in daemon_path
    client_path = f"{tools}:{daemon_path}"

    env = {**os.environ, "MODELD_HOME": str(home), "PATH": client_path}
    result = subprocess.run(
        [sys.executable, "-m", "deployers.cli", "deploy", "--model-name", "tools", "--health-path", "/", "--json",
         "--", "md-serve", "{port}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=90,
    )
    assert result.returncode == 0, result.stderr
    svc = BaseService.model_validate(json.loads(result.stdout))
    assert svc.config.search_path == client_path
    assert http_get(svc.endpoint.port, "/") == 200

    # The config's env, when it sets PATH, wins; without tools/ on it, md-serve is not found.
    refused = subprocess.run(
        [sys.executable, "-m", "deployers.cli", "deploy", "--model-name", "tools2", "--health-path", "/",
         "--env", f"PATH={daemon_path}", "--", "md-serve", "{port}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=90,
    )
    assert refused.returncode == 2 and "'md-serve' not found on PATH" in refused.stderr, refused.stderr


def test_search_path_is_filled_from_the_client_and_checked() -> None:
    config = ServiceConfig(model_name="m", command=["x"]).with_client_defaults()
    assert config.search_path == os.environ["PATH"]
    assert ServiceConfig(model_name="m", command=["x"], search_path="/opt/bin").with_client_defaults().search_path == "/opt/bin"
    with pytest.raises(ValueError, match="search_path"):
        ServiceConfig(model_name="m", command=["x"], search_path="/bin\x00")
    with pytest.raises(ValueError, match="MAX_ARG_STRLEN"):
        ServiceConfig(model_name="m", command=["x"], search_path="p" * 200_000)


# ------------------------------------------------------------- what ls and info show


@pytest.mark.slow
def test_a_command_service_reports_its_base_url_as_prediction_url(home: Path, client: DaemonClient) -> None:
    svc = client.deploy(ServiceConfig(model_name="plain", health_path="/",
                                      command=[sys.executable, "-m", "http.server", "{port}", "--bind", "{host}"]))
    base = f"http://127.0.0.1:{svc.endpoint.port}"
    assert svc.endpoint.prediction_url == base
    out = modeld("info", str(svc.uuid), home=home).stdout
    assert re.search(rf"^PREDICTION_URL +{re.escape(base)}$", out, re.M), out
    assert "CURL" not in out, out  # no KServe body to show for a server that does not speak it
    assert json.loads(modeld("info", str(svc.uuid), "--json", home=home).stdout)["endpoint"]["prediction_url"] == base

    mlflow = client.deploy(ServiceConfig(model_name="mlflow", health_path="/", prediction_path="/invocations",
                                         command=[sys.executable, "-m", "http.server", "{port}", "--bind", "{host}"]))
    assert mlflow.endpoint.prediction_url == f"http://127.0.0.1:{mlflow.endpoint.port}/invocations"
    # a record written before endpoint.kserve existed reads back the same
    record = json.loads(svc.model_dump_json())
    del record["endpoint"]["kserve"]
    assert BaseService.model_validate(record).endpoint.prediction_url == base


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_ls_shows_a_unix_socket_services_socket(home: Path) -> None:
    result = modeld("deploy", "--model-name", "private", "--model-uri", "examples/iris.py:model", "--unix-socket", "--json",
                    home=home)
    assert result.returncode == 0, result.stderr
    socket_path = json.loads(result.stdout)["endpoint"]["unix_socket"]
    assert socket_path.endswith("/model.sock")
    listing = modeld("ls", home=home).stdout
    row = next(line for line in listing.splitlines() if " private " in line)
    assert socket_path in row.split(), listing
    assert wait_for(lambda: Path(socket_path).exists(), timeout=5, what="the socket")


def test_a_relative_working_dir_is_the_deploying_clients(home: Path, client: DaemonClient, tmp_path: Path) -> None:
    """`--working-dir data` from a shell in /x means /x/data, as every other relative path of a deploy:
    not the daemon's working directory, and still the same folder after the daemon restarts elsewhere."""
    client.daemon_info()  # the daemon's working directory is the test's, not tmp_path
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "marker.txt").write_text("here\n")
    env = {**os.environ, "MODELD_HOME": str(home)}
    result = subprocess.run(
        [sys.executable, "-m", "deployers.cli", "deploy", "--model-name", "reldir", "--health-path", "/marker.txt",
         "--working-dir", "data", "--json", "--", sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"],
        cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=90,
    )
    assert result.returncode == 0, result.stderr
    svc = BaseService.model_validate(json.loads(result.stdout))
    assert svc.config.working_dir == str(tmp_path / "data")
    assert http_get(svc.endpoint.port, "/marker.txt") == 200  # served from tmp_path/data
