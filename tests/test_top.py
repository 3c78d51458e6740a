"""``modeld top`` (deployers/cli/top.py): run in a real terminal, tmux's, and read off its screen with
``capture-pane``; piped, its one snapshot; its reading of /metrics checked against prometheus_client's."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon import DaemonClient, ServiceConfig
from daemon.testing import REPO, wait_for
from deployers.cli.top import HEADERS, NAME_MAX, cells
from deployers.cli.top_data import parse_metrics

from conftest import in_ci, iris_config, modeld, predict

PROMPT = "top-test$ "


class Tmux:
    """A tmux server of its own (``-L``, a unique socket name; no user config) with one shell, 150x40."""

    def __init__(self) -> None:
        self.name = f"modeld-top-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        env = {k: v for k, v in os.environ.items() if k != "TMUX"}  # inside a tmux already, ours would refuse to start
        self.tmux("new-session", "-d", "-s", "t", "-x", "150", "-y", "40", "sh", env=env)
        self.type(f"PS1='{PROMPT}'; clear", "Enter")

    def tmux(self, *args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            ["tmux", "-L", self.name, "-f", "/dev/null", *args], env=env, capture_output=True, text=True, timeout=10
        )
        assert done.returncode == 0, f"tmux {' '.join(args)}: {done.stderr}"
        return done.stdout

    def type(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "t", *keys)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "t")

    def showing(self, pattern: str) -> str | None:
        """The screen, if it shows the regex ``pattern``."""
        screen = self.screen()
        return screen if re.search(pattern, screen) else None

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.name, "kill-server"], capture_output=True, timeout=10)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        if in_ci():
            pytest.fail("tmux is not installed, and CI is set: `modeld top` must be tested in a real terminal")
        pytest.skip("tmux is not installed: `modeld top` is tested in tmux's terminal (apt-get install tmux)")
    t = Tmux()
    try:
        yield t
    finally:
        t.kill()  # the pane's shell and a `modeld top` still in it get SIGHUP; the home's reaper does the rest


def row_of(screen: str, uuid: object) -> dict[str, str] | None:
    """The service's row on the screen, by column title (columns are two spaces or more apart)."""
    for line in screen.splitlines():
        if line.startswith(str(uuid)[:8]):
            return dict(zip(HEADERS, re.split(r"\s{2,}", line.strip()), strict=False))
    return None


def run_top(tmux: Tmux, home: Path) -> None:
    tmux.type(f"cd {REPO} && MODELD_HOME={home} {sys.executable} -m deployers.cli top; echo top-exited-$?", "Enter")


@pytest.mark.slow
@pytest.mark.long
def test_top_in_a_terminal_shows_a_kill_and_the_restart_then_quits(home: Path, client: DaemonClient, tmux: Tmux) -> None:
    svc = client.deploy(iris_config(), timeout=60)
    run_top(tmux, home)
    row = wait_for(lambda: row_of(tmux.screen(), svc.uuid), timeout=30, what="the service's row on top's screen")
    assert row["NAME"] == "iris" and row["STATE"] == "active" and row["RESTARTS"] == "0", row
    assert row["LAST EVENT"].startswith("healthy"), row

    # Requests per second and CPU: from two scrapes' counters, so they show once requests come.
    def busy() -> dict[str, str] | None:
        predict(svc.endpoint.prediction_url, [[5.1, 3.5, 1.4, 0.2]])
        r = row_of(tmux.screen(), svc.uuid)
        return r if r and r["REQ/S"] not in ("-", "0.0") and r["CPU"] not in ("-", "0.0%") else None

    row = wait_for(busy, timeout=30, interval=0.005, what="REQ/S and CPU above 0 while requests come")
    assert float(row["REQ/S"]) > 0 and float(row["CPU"].rstrip("%")) > 0, row

    pid = client.get(svc.uuid).status.pid
    assert pid
    os.kill(pid, signal.SIGKILL)

    def restarted() -> str | None:
        screen = tmux.screen()
        r = row_of(screen, svc.uuid)
        return screen if r and r["RESTARTS"] == "1" and r["STATE"] == "active" else None

    screen = wait_for(restarted, timeout=30, what="RESTARTS 1 and the service active again on top's screen")
    strip = screen[screen.index("latest events") :]
    short = str(svc.uuid)[:8]
    assert re.search(rf"\({short}\) exited \[signal 9\]", strip), strip
    assert re.search(rf"\({short}\) restarting", strip), strip
    assert strip.index(" exited [signal 9]") < strip.index(f"({short}) restarting"), strip

    # q quits with 0, and the terminal is as it was: the shell's screen back (no trace of top's), its prompt.
    tmux.type("q")
    screen = wait_for(lambda: tmux.showing(r"top-exited-\d"), timeout=10, what="top to exit on q")
    assert "top-exited-0" in screen, screen
    assert "RESTARTS" not in screen and "latest events" not in screen, screen
    assert screen.rstrip().splitlines()[-1].startswith(PROMPT.rstrip()), screen

    # Ctrl-C quits as q does.
    tmux.type("clear", "Enter")
    run_top(tmux, home)
    wait_for(lambda: row_of(tmux.screen(), svc.uuid), timeout=30, what="top's screen again")
    tmux.type("C-c")
    screen = wait_for(lambda: tmux.showing(r"top-exited-\d"), timeout=10, what="top to exit on Ctrl-C")
    assert "top-exited-0" in screen and "RESTARTS" not in screen, screen


@pytest.mark.slow
def test_top_piped_prints_one_snapshot(home: Path, client: DaemonClient) -> None:
    svc = client.deploy(iris_config(), timeout=60)
    done = modeld("top", home=home, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout  # plain text: no terminal control sequences
    lines = done.stdout.splitlines()
    assert lines[0].startswith("modeld top") and "1 service: 1 active" in lines[0], done.stdout
    assert re.split(r"\s{2,}", lines[1]) == list(HEADERS), done.stdout
    row = row_of(done.stdout, svc.uuid)
    assert row is not None and row["NAME"] == "iris" and row["STATE"] == "active", done.stdout
    assert row["CPU"].endswith("%") and row["MEM"].endswith("M"), row
    events = lines[lines.index("latest events:") + 1 :]
    short = str(svc.uuid)[:8]
    assert [m.group(1) for e in events if (m := re.search(rf"\({short}\) (\w+)", e))] == ["deployed", "starting", "healthy"]

    data = json.loads(modeld("top", "--json", "--interval", "0", home=home, timeout=60).stdout)
    (service,) = data["services"]
    assert service["uuid"] == str(svc.uuid) and service["state"] == "active" and service["restarts"] == 0
    assert service["last_event"]["type"] == "healthy"
    assert [e["type"] for e in data["events"]] == ["deployed", "starting", "healthy"]


BUSY = (
    "import threading\nPORT, BODY = int(sys.argv[1]), b''\n"
    "def spin():\n    while True:\n        sum(range(10000))\n"
    "threading.Thread(target=spin, daemon=True).start()\n"
)


@pytest.mark.slow
def test_top_piped_gives_a_busy_servers_cpu_at_the_default_interval(home: Path, client: DaemonClient) -> None:
    """The daemon reads a server's CPU at most every 5 s: a snapshot 1 s apart would see one reading
    twice (0 %). Each sample carries the time it was read, and the snapshot scrapes until it has two."""
    from daemon.testing import server_script

    script = home / "busy.py"
    script.write_text(server_script(BUSY))
    busy = client.deploy(ServiceConfig(model_name="busy", model_type="command", command=[sys.executable, str(script), "{port}"]),
                         timeout=60)
    idle = client.deploy(iris_config(), timeout=60)
    assert re.search(r'modeld_service_cpu_seconds_total\{[^}]*\} \S+ \d{13}$', client.metrics(), re.M)  # its read time, in ms
    done = modeld("top", "--events", "0", home=home, timeout=60)
    assert done.returncode == 0, done.stderr
    row, other = row_of(done.stdout, busy.uuid), row_of(done.stdout, idle.uuid)
    assert row is not None and other is not None, done.stdout
    assert float(row["CPU"].rstrip("%")) > 20, done.stdout  # a thread spinning: most of a core
    assert float(other["CPU"].rstrip("%")) < 20, done.stdout


def test_top_reads_metrics_as_prometheus_client_does(home: Path, client: DaemonClient) -> None:
    client.deploy(iris_config(), timeout=60)
    client.deploy(iris_config(model_name='odd "name"\\ x'), timeout=60)
    # and a line with every escape (a model's name cannot hold a newline)
    text = client.metrics() + 'x_total{a="1\\n2",b="q\\"\\\\"} 3 1795939697000\n'
    ours = parse_metrics(text)
    theirs: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            theirs.setdefault(s.name, []).append((s.labels, s.value))
    assert ours == theirs
    assert {labels["model_name"] for labels, _ in ours["modeld_service_up"]} == {"iris", 'odd "name"\\ x'}
    assert ours["x_total"] == [({"a": "1\n2", "b": 'q"\\'}, 3.0)]


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_top_answers_q_and_ctrl_c_at_once_while_the_daemon_does_not_answer(home: Path, client: DaemonClient, tmux: Tmux) -> None:
    """A daemon stopped with SIGSTOP accepts connections and never answers: top asks it in a thread
    of its own, so its screen says so within a few seconds and q or Ctrl-C quit within about 1 s."""
    daemon_pid = client.daemon_info()["pid"]
    run_top(tmux, home)
    wait_for(lambda: tmux.showing(r"modeld top .* 0 services"), timeout=30, what="top's screen")
    os.kill(daemon_pid, signal.SIGSTOP)
    try:
        screen = wait_for(lambda: tmux.showing(r"the daemon does not answer \(for \d+s"), timeout=5, what="top to say the daemon does not answer")
        assert "RESTARTS" in screen, screen  # the view is still drawn
        # Past the client's timeout of a call (5 s), the silence goes on being counted, not reset.
        wait_for(lambda: tmux.showing(r"does not answer \(for ([6-9]|\d\d)s"), timeout=10, what="6 s of silence counted")
        tmux.type("q")
        screen = wait_for(lambda: tmux.showing(r"top-exited-\d"), timeout=1.5, what="top to quit on q within ~1 s")
        assert "top-exited-0" in screen, screen

        tmux.type("clear", "Enter")
        run_top(tmux, home)  # started while the daemon is stopped: its first answer never comes
        wait_for(lambda: tmux.showing(r"the daemon does not answer"), timeout=15, what="top's screen, the daemon silent")
        tmux.type("C-c")
        screen = wait_for(lambda: tmux.showing(r"top-exited-\d"), timeout=1.5, what="top to quit on Ctrl-C within ~1 s")
        assert "top-exited-0" in screen and "RESTARTS" not in screen, screen
    finally:
        os.kill(daemon_pid, signal.SIGCONT)
    assert client.daemon_info()["pid"] == daemon_pid  # it goes on as it was


@pytest.mark.slow
def test_top_columns_stay_aligned_with_long_and_wide_names(home: Path, client: DaemonClient) -> None:
    """Widths are terminal cells: a CJK or emoji name takes two a character, and a long name is cut."""
    names = ["iris", "鸢尾花分类模型", "🌸🌼 flowers", "a-very-long-model-name-" * 4]
    uuids = [client.deploy(iris_config(model_name=name), replace=False, timeout=60).uuid for name in names]
    done = modeld("top", "--interval", "0", home=home, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = lines[1]

    def at(line: str, index: int) -> int:  # the cell where the character at ``index`` starts
        return cells(line[:index])

    rows = [next(line for line in lines if line.startswith(str(u)[:8])) for u in uuids]
    for title in ("STATE", "UPTIME", "RESTARTS", "LAST EVENT"):
        column = header.index(title)
        for line in rows:
            starts = [m.start() for m in re.finditer(r"(?<=  )\S", line)]
            assert column in [at(line, i) for i in starts], (title, header, line)
    for line in rows:
        assert at(line, line.index("active")) == header.index("STATE"), (header, line)
    long_row = rows[-1]
    name = re.split(r"\s{2,}", long_row)[1]
    assert name.endswith("…") and cells(name) == NAME_MAX, long_row
