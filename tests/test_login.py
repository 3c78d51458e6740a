"""Start at login: ``modeld daemon install|uninstall`` (a systemd user unit), ``Type=notify``, and a
client that starts the unit instead of forking.

What cannot be tested here: ``systemctl --user enable --now`` against a real user manager (PID 1 is
not systemd on these machines, so no user manager ever answers). Every test runs systemctl with an
empty ``XDG_RUNTIME_DIR`` and no session bus, so that none answers on any machine either, and with
a temp ``HOME`` and ``XDG_CONFIG_HOME``: the user's own ``~/.config`` is never read or written.
``test_client_starts_the_unit_when_a_user_manager_answers`` puts a stand-in ``systemctl`` first on
PATH (it says so), the one test of that branch.

Everything else is real: daemons, model servers, the notify datagram socket, ``systemd-analyze``.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

from conftest import in_ci
from daemon import DaemonClient, ServiceConfig, ServiceState
from daemon import login
from daemon.daemon_process import running_daemon
from daemon.paths import Paths
from daemon.testing import COMMAND_SERVER, REPO, pid_alive, wait_for

ODD = 'we ird %h $USER "q\\z'  # a space, a specifier, a variable, a quote, a backslash


@pytest.fixture
def no_manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A temp HOME and XDG_CONFIG_HOME, and no systemd user manager within reach (set in os.environ
    too, for the in-process client); the environment for a ``modeld`` command."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    for name, value in (("HOME", tmp_path / "user"), ("XDG_CONFIG_HOME", tmp_path / "config"), ("XDG_RUNTIME_DIR", runtime)):
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    assert login.user_manager() is None
    return dict(os.environ)


def modeld(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deployers.cli", *args], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=timeout,
    )


def systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        if in_ci():
            pytest.fail("CI is set but systemd-analyze is not installed (apt-get install systemd)", pytrace=False)
        pytest.skip("systemd-analyze is not installed; CI has it")
    return exe


def verify(unit: str, folder: Path) -> subprocess.CompletedProcess[str]:
    folder.mkdir(exist_ok=True)
    (folder / login.UNIT_NAME).write_text(unit)
    return subprocess.run([systemd_analyze(), "verify", str(folder / login.UNIT_NAME)], capture_output=True, text=True,
                          timeout=60)


# ------------------------------------------------------------------ the unit


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path, no_manager: dict[str, str]) -> None:
    home = tmp_path / ODD
    result = modeld("daemon", "install", "--dry-run", "--home", str(home), env=no_manager)
    assert result.returncode == 0, result.stderr
    unit = result.stdout
    for line in ("Type=notify", "Restart=on-failure", "KillMode=process", "Delegate=yes", "WantedBy=default.target"):
        assert line in unit.splitlines()
    assert unit.startswith(login.MARK)
    checked = verify(unit, tmp_path / "plain")
    assert checked.returncode == 0 and checked.stdout + checked.stderr == "", checked

    # The interpreter's path itself odd (a space, a specifier): systemd checks that it is executable,
    # so a quoting systemd reads differently fails here.
    odd_bin = tmp_path / "b in%o"
    odd_bin.mkdir()
    (odd_bin / "python").symlink_to(sys.executable)
    unit = login.unit_text(Paths(home), python=str(odd_bin / "python"))
    checked = verify(unit, tmp_path / "odd")
    assert checked.returncode == 0 and checked.stdout + checked.stderr == "", checked
    wrong = unit.replace("%%o", "%o")  # the specifier left as it is: systemd expands it to another path
    assert verify(wrong, tmp_path / "wrong").returncode != 0

    # The environment reads back as the home; the arguments are quoted as systemd.syntax(7) says.
    env = login.read_unit(tmp_path / "odd" / login.UNIT_NAME)
    assert env is not None and env["MODELD_HOME"] == str(Paths(home).home)
    assert env["PYTHONPATH"] == str(REPO)
    assert login.quote_arg(str(home)) == '"' + str(tmp_path) + '/we ird %%h $$USER \\"q\\\\z"'
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start.endswith(f"-m daemon --home {login.quote_arg(str(home))} --socket {login.quote_arg(str(home / 'modeld.sock'))}")


def test_an_interpreter_systemd_cannot_run_as_spelled_is_refused(tmp_path: Path) -> None:
    with pytest.raises(login.UnitError, match=r"systemd cannot run the interpreter .* contains '\$'"):
        login.unit_text(Paths(tmp_path), python="/opt/py$thon/bin/python")


# ------------------------------------------------------------------ install / uninstall


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_install_and_uninstall_without_a_user_manager(tmp_path: Path, no_manager: dict[str, str]) -> None:
    home = tmp_path / "h"
    unit = tmp_path / "config" / "systemd" / "user" / login.UNIT_NAME
    wants = unit.parent / "default.target.wants" / login.UNIT_NAME

    dry = modeld("daemon", "install", "--dry-run", "--home", str(home), env=no_manager)
    assert dry.returncode == 0, dry.stderr
    assert "nothing written" in dry.stderr
    assert not (tmp_path / "config").exists()
    assert not home.exists()

    done = modeld("daemon", "install", "--home", str(home), env=no_manager)
    assert done.returncode == 0, done.stderr
    assert unit.read_text() == dry.stdout
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert "no systemd user manager answers here" in done.stdout
    assert "loginctl enable-linger" in done.stdout
    assert not (tmp_path / "user" / ".config").exists()  # XDG_CONFIG_HOME is respected
    if not Path("/run/systemd/system").exists():
        # No systemd runs this machine: systemctl enables on the files alone (at the next login, it starts).
        assert "ran: systemctl --user enable modeld.service\n" in done.stdout
        assert wants.is_symlink() and wants.resolve() == unit
        assert "systemctl --user start modeld.service" in done.stdout
    else:
        assert "systemctl --user daemon-reload && systemctl --user enable --now modeld.service" in done.stdout

    # Another home's install or uninstall is refused, naming the home the unit serves.
    other = modeld("daemon", "install", "--home", str(tmp_path / "other"), env=no_manager)
    assert other.returncode == 2 and f"runs the daemon of another home ({home}, socket {home}/modeld.sock)" in other.stderr
    other = modeld("daemon", "uninstall", "--home", str(tmp_path / "other"), env=no_manager)
    assert other.returncode == 2 and f"--home {home}" in other.stderr
    assert unit.exists()

    gone = modeld("daemon", "uninstall", "--home", str(home), env=no_manager)
    assert gone.returncode == 0, gone.stderr
    assert f"removed {unit}" in gone.stdout
    assert not unit.exists() and not wants.is_symlink()
    again = modeld("daemon", "uninstall", "--home", str(home), env=no_manager)
    assert again.returncode == 0 and "no modeld unit is installed" in again.stdout

    # Without XDG_CONFIG_HOME: ~/.config, ~ being the (temp) HOME.
    env = {k: v for k, v in no_manager.items() if k != "XDG_CONFIG_HOME"}
    done = modeld("daemon", "install", "--home", str(home), env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "user" / ".config" / "systemd" / "user" / login.UNIT_NAME).exists()
    assert modeld("daemon", "uninstall", "--home", str(home), env=env).returncode == 0
    assert not (tmp_path / "user" / ".config" / "systemd" / "user" / login.UNIT_NAME).exists()


def test_a_unit_modeld_did_not_write_is_left_alone(tmp_path: Path, no_manager: dict[str, str]) -> None:
    unit = tmp_path / "config" / "systemd" / "user" / login.UNIT_NAME
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    for action in ("install", "uninstall"):
        result = modeld("daemon", action, "--home", str(tmp_path / "h"), env=no_manager)
        assert result.returncode == 2 and "was not written by `modeld daemon install`" in result.stderr, result
    assert unit.read_text() == "[Service]\nExecStart=/bin/true\n"


# ------------------------------------------------------------------ Type=notify


@pytest.mark.slow
def test_the_daemon_notifies_ready_after_its_rebuild_then_stopping(home: Path, tmp_path: Path, no_manager: dict[str, str]) -> None:
    # A service to rebuild: deployed by a first daemon, which then stops (the server keeps running).
    first = DaemonClient(home=home)
    (tmp_path / "srv.py").write_text(COMMAND_SERVER)
    web = first.deploy(ServiceConfig(model_name="web", command=[sys.executable, "srv.py", "{port}", "{host}"],
                                     health_path="/", working_dir=str(tmp_path), stop_timeout=5), timeout=60)
    first_pid = first.daemon_info()["pid"]
    first.shutdown(stop_services=False)
    wait_for(lambda: not pid_alive(first_pid), 30, what="the first daemon to exit")
    first.close()
    stopped_at = time.time()

    # The second daemon as systemd starts it: NOTIFY_SOCKET (a datagram socket the test binds) and INVOCATION_ID.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(home / "n.sock"))
    notify.settimeout(30)
    env = {k: v for k, v in os.environ.items() if k not in ("MODELD_SOCKET", "NOTIFY_SOCKET")}
    env.update(PYTHONPATH=str(REPO), NOTIFY_SOCKET=str(home / "n.sock"), INVOCATION_ID=uuid.uuid4().hex)
    with open(home / "daemon.log", "ab") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "daemon", "--home", str(home)], env=env, cwd="/",
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert notify.recv(4096) == b"READY=1"
        ready_at = time.time()
        # Sent once every service was rebuilt: the server adopted and probed before, not after.
        client = DaemonClient(home=home, auto_start=False)
        again = client.get(web.uuid)
        assert again.status.state == ServiceState.ACTIVE and again.status.pid == web.status.pid
        assert stopped_at < again.status.updated_at <= ready_at
        pid, by = running_daemon(Paths(home)) or (0, "")
        assert pid == daemon.pid and by.startswith("systemd"), by  # "systemd (<its unit>)" in a unit's cgroup

        # No child speaks for the daemon: a server it starts has no NOTIFY_SOCKET.
        client.stop(web.uuid)
        started = client.start(web.uuid, timeout=60)
        assert started.status.pid != web.status.pid
        assert "NOTIFY_SOCKET" not in psutil.Process(started.status.pid).environ()
        assert "NOTIFY_SOCKET" in psutil.Process(daemon.pid).environ()  # (as it was given to the daemon)

        # The lock refuses a second daemon, which says which one runs and how to stop it.
        second = subprocess.run([sys.executable, "-m", "daemon", "--home", str(home)], cwd=REPO,
                                env={**env, "INVOCATION_ID": "", "NOTIFY_SOCKET": ""},
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 3
        assert f"(pid {daemon.pid}, started by {by}); stop it with " in second.stderr
        # With its unit in its cgroup (under systemd), stopped with systemctl; here no unit shows.
        unit = by.partition("(")[2].rstrip(")")
        assert (f"`systemctl --user stop {unit}`" if unit else "`modeld daemon stop`") in second.stderr

        daemon.terminate()  # as `systemctl stop` does
        assert notify.recv(4096) == b"STOPPING=1"
        assert daemon.wait(30) == 0
        notify.settimeout(0.2)
        with pytest.raises(TimeoutError):
            notify.recv(4096)  # each once
        client.close()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
        notify.close()


# ------------------------------------------------------------------ the client's auto-start


@pytest.mark.slow
def test_autostart_forks_when_the_unit_is_installed_but_no_user_manager_answers(
    home: Path, tmp_path: Path, no_manager: dict[str, str]
) -> None:
    done = modeld("daemon", "install", "--home", str(home), env=no_manager)
    assert done.returncode == 0, done.stderr
    assert login.serves(login.read_unit(), Paths(home))
    with DaemonClient(home=home) as client:
        assert client.find() == []
        pid = client.daemon_info()["pid"]
    assert running_daemon(Paths(home)) == (pid, "a client's auto-start")
    log = (home / "daemon.log").read_text()
    assert "serves this home, but no systemd user manager answers: starting the daemon directly" in log

    # A second daemon, refused, names the auto-started one.
    second = subprocess.run([sys.executable, "-m", "daemon", "--home", str(home)], cwd=REPO, capture_output=True,
                            text=True, timeout=60, env={**no_manager, "PYTHONPATH": str(REPO)})
    assert second.returncode == 3
    assert f"(pid {pid}, started by a client's auto-start); stop it with `modeld daemon stop`" in second.stderr
    assert modeld("daemon", "uninstall", "--home", str(home), env=no_manager).returncode == 0


STAND_IN = textwrap.dedent('''\
    #!{python}
    """A stand-in for `systemctl --user`, for one test: a user manager that answers, and a `start` that
    runs the unit's ExecStart= as systemd would for Type=notify (INVOCATION_ID, NOTIFY_SOCKET; it
    returns once READY=1 arrives). It records each call."""
    import os, shlex, socket, subprocess, sys
    with open({calls!r}, "a") as f:
        f.write(" ".join(sys.argv[1:]) + "\\n")
    if sys.argv[1:] == ["--user", "is-system-running"]:
        print("running")
        sys.exit(0)
    if sys.argv[1:] != ["--user", "start", "modeld.service"]:
        sys.exit(1)
    lines = open({unit!r}).read().splitlines()
    argv = shlex.split(next(l for l in lines if l.startswith("ExecStart=")).partition("=")[2])  # plain paths only
    env = dict(os.environ)
    for line in lines:
        if line.startswith("Environment="):
            k, _, v = shlex.split(line.partition("=")[2])[0].partition("=")
            env[k] = v
    path = os.path.join({home!r}, "stand-in.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    env.update(INVOCATION_ID="0" * 32, NOTIFY_SOCKET=path)
    subprocess.Popen(argv, env=env, cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)
    sys.exit(0 if sock.recv(64) == b"READY=1" else 1)
''')


@pytest.mark.slow
def test_client_starts_the_unit_when_a_user_manager_answers(
    home: Path, tmp_path: Path, no_manager: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    done = modeld("daemon", "install", "--home", str(home), env=no_manager)
    assert done.returncode == 0, done.stderr
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    stand_in = bin_dir / "systemctl"
    stand_in.write_text(STAND_IN.format(python=sys.executable, calls=str(calls), unit=str(login.unit_path()), home=str(home)))
    stand_in.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert login.user_manager() == "running"

    started = time.monotonic()
    with DaemonClient(home=home) as client:
        assert client.find() == []
        pid = client.daemon_info()["pid"]
    assert time.monotonic() - started < 30
    # (the first call is this test's own check above)
    assert calls.read_text().splitlines() == ["--user is-system-running"] * 2 + ["--user start modeld.service"]
    recorded, by = running_daemon(Paths(home)) or (0, "")
    assert recorded == pid and by.startswith("systemd"), by  # the unit's daemon, not one the client forked
    assert psutil.Process(pid).ppid() != os.getpid()

    # A unit of another home is not started for this one: the client forks its own.
    other = Path(str(home) + "o")
    try:
        with DaemonClient(home=other) as client:
            other_pid = client.daemon_info()["pid"]
        assert running_daemon(Paths(other)) == (other_pid, "a client's auto-start")
        assert calls.read_text().count("start") == 1
    finally:
        from daemon.testing import reap_home

        reap_home(other)
        shutil.rmtree(other, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.long
def test_a_client_names_the_daemon_that_holds_the_home(home: Path, no_manager: dict[str, str]) -> None:
    """One home, one daemon: while another holds daemon.lock, a client does not start a second one
    beside it; it waits for that one's socket and, if it never answers, says which one runs."""
    import fcntl

    from daemon.client import ensure_daemon
    from daemon.exceptions import DaemonStartError
    from daemon.linux import ProcessIdentity

    paths = Paths(home)
    paths.ensure()
    lock = os.open(paths.daemon_lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a daemon (this test) holds the home, not answering yet

        # Its record not written yet: the client spawns a daemon, which the lock refuses; the client
        # waits for the holder's socket (it does not fail at the refusal), then names it as it can.
        started = time.monotonic()
        # (10 s: the refused daemon has to start and give up first, on a loaded machine too)
        with pytest.raises(DaemonStartError, match=r"did not answer on .* within 10s \(a modeld daemon is already running"):
            ensure_daemon(paths, timeout=10)
        assert time.monotonic() - started >= 10
        assert "is already running for" in (home / "daemon.log").read_text()  # the spawned one was refused

        # Its record written, as a daemon systemd started writes it: named, with how to stop it.
        me = ProcessIdentity.of(os.getpid())
        assert me is not None
        paths.daemon_pid.write_text(f"{me.pid}\n{me.start_ticks}\n{me.boot_id}\nstarted_by=systemd (modeld.service)\n")
        with pytest.raises(DaemonStartError) as caught:
            ensure_daemon(paths, timeout=2)
        assert f"(pid {os.getpid()}, started by systemd (modeld.service)); stop it with `systemctl --user stop modeld.service`" in str(caught.value)
    finally:
        os.close(lock)
        paths.daemon_pid.unlink(missing_ok=True)  # (names this test: the reaper must not act on it)
