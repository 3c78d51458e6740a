"""One CLI for every deployer: ``modeld --deployer NAME <command>`` and ``MODELD_DEPLOYER``.

Most commands run in this process (``deployers.cli.main``, output captured) against real daemons,
which is the same code as the ``modeld`` command and a second faster; those about the environment
and the command line as a whole run ``python -m deployers.cli`` in a subprocess.

A second ``local``-flavor deployer, ``other``, is registered in the test's home and pointed at a
second home with a daemon of its own. The commands given ``--deployer other`` must act in that
home and not in the default one, through the BaseModelDeployer methods, and print what the plain
commands print there (``--home OTHER``), with the same exit codes. A ``memory``-flavor deployer
(tests/flavor_fixtures) stands for a flavor that is not a local daemon.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from conftest import http_get, modeld, predict
from daemon.testing import IRIS, reap_home, wait_for
from deployers import get_deployer
from deployers.base import BaseModelDeployer, NotSupported, RedeployError
from deployers.cli import main
from deployers.local.deployer import LocalDaemonModelDeployer
from deployers.local.flavor import LocalDaemonModelDeployerFlavor

SETOSA = [[5.0, 3.4, 1.5, 0.2]]
MEMORY_FLAVOR = "tests.flavor_fixtures.memory_flavor.InMemoryModelDeployerFlavor"


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


def error_line(result: subprocess.CompletedProcess[str], code: int, *mentions: str) -> str:
    """A failed command: exit ``code``, one ``modeld:`` line on stderr naming each of ``mentions``."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modeld:"), result.stderr
    for text in mentions:
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.fixture(autouse=True)
def no_deployer_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plain commands here mean the local daemon, whatever the shell running the tests exports."""
    monkeypatch.delenv("MODELD_DEPLOYER", raising=False)


@pytest.fixture
def other(home: Path) -> Iterator[Path]:
    """A second home, whose daemon the deployer ``other`` (registered in ``home``) talks to."""
    path = Path(tempfile.mkdtemp(prefix="mo", dir="/tmp"))
    try:
        ok(modeld("deployer", "register", "other", "--flavor", "local", f"home={path}", home=home))
        yield path
    finally:
        reap_home(path)
        shutil.rmtree(path, ignore_errors=True)


Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run a ``modeld`` command in this process: (exit code, stdout, stderr) as a CompletedProcess."""

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        try:
            code = main(list(argv))
        except SystemExit as exit:  # argparse's errors
            code = int(exit.code or 0)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(argv), code, out, err)

    return run


def both(cli: Cli, other: Path, *argv: str) -> tuple[Any, Any]:
    """The command through ``--deployer other``, and the plain one on the other home."""
    return cli("--deployer", "other", *argv), cli("--home", str(other), *argv)


def same(cli: Cli, other: Path, *argv: str) -> str:
    via, plain = both(cli, other, *argv)
    assert (via.returncode, via.stdout, via.stderr) == (plain.returncode, plain.stdout, plain.stderr), argv
    return str(via.stdout)


def listed(cli: Cli, path: Path) -> list[dict[str, Any]]:
    """The services of the daemon of ``path``, asked directly."""
    return json.loads(ok(cli("--home", str(path), "ls", "--json")))  # type: ignore[no-any-return]


@pytest.mark.slow
def test_the_service_commands_act_in_the_deployers_home_with_the_plain_output(home: Path, other: Path, cli: Cli) -> None:
    deploy = ["deploy", "--model-name", "iris", "--model-uri", IRIS, "--name", "ir", "--pipeline-name", "p"]
    out = ok(modeld("--deployer", "other", *deploy, "--project", "proj", home=home))  # as a user would
    first, url = out.splitlines()
    uuid, state = re.fullmatch(r"(\S+) (\S+) in \d+\.\d\ds", first).groups()  # type: ignore[union-attr]
    assert state == "active" and url.startswith("prediction url: http://127.0.0.1:")
    assert predict(url.split(": ", 1)[1], SETOSA)[0] == 200
    # In the other home, not the default one.
    assert [s["uuid"] for s in listed(cli, other)] == [uuid]
    assert listed(cli, home) == []

    # ls: the same table, and every filter of ls, through find_model_server.
    table = same(cli, other, "ls")
    assert "ir" in table and uuid[:8] in table
    for flags in (
        ["--model-name", "iris"], ["--model-name", "nope"], ["--pipeline-name", "p"], ["--model-type", "python"],
        ["--model-uri", IRIS], ["--project", "proj"], ["--state", "active"], ["--pipeline-run-id", "x"],
        ["--state", "inactive"], ["--running"], ["--uuid", uuid[:6]], ["--pipeline-step-name", "x"],
    ):
        same(cli, other, "ls", *flags)
    assert json.loads(same(cli, other, "ls", "--json", "--project", "proj"))[0]["uuid"] == uuid
    assert same(cli, other, "ls", "--project", "nope") == ""

    # info, logs: the same text, by name, prefix or uuid.
    for ref in ("ir", uuid[:8], uuid):
        assert "PREDICTION_URL" in same(cli, other, "info", ref)
    log = same(cli, other, "logs", "ir")
    assert log.endswith("\n") and same(cli, other, "logs", "ir", "-n", "1") == log.splitlines(keepends=True)[-1]

    # Not found: the same one line and exit code.
    for argv in (["info", "nosuch"], ["info", "6d2b1c8a-0000-0000-0000-000000000000"], ["logs", "nosuch"],
                 ["stop", "nosuch"], ["rm", "6d2b1c8a-0000-0000-0000-000000000000"], ["start", "nosuch"]):
        via, plain = both(cli, other, *argv)
        error_line(via, 4, "no service")
        assert (via.returncode, via.stderr) == (plain.returncode, plain.stderr)

    # stop, start, rm: the lines of the plain commands, acted on in the other home.
    assert ok(cli("--deployer", "other", "stop", "ir")) == f"{uuid} inactive\n"
    assert listed(cli, other)[0]["status"]["state"] == "inactive"
    out = ok(cli("--deployer", "other", "start", "ir", "--json"))
    assert json.loads(out)["status"]["state"] == "active"
    assert ok(cli("--deployer", "other", "stop", "ir")) == f"{uuid} inactive\n"
    started = ok(cli("--deployer", "other", "start", "--all"))
    assert re.fullmatch(rf"{uuid} active http://127\.0\.0\.1:\d+\n", started)
    assert same(cli, other, "start", "--all") == ""  # "every service runs already", on both
    assert ok(cli("--deployer", "other", "rm", uuid[:8])) == f"{uuid} deleted\n"
    assert listed(cli, other) == []
    error_line(cli("--deployer", "other", "deploy", "--model-name", "x", "--model-uri", IRIS, "--uuid", uuid), 2, "--uuid")


@pytest.mark.slow
def test_modeld_deployer_in_the_environment(home: Path, other: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In subprocesses: the variable is read by the command as a user runs it."""
    deploy = ["deploy", "--model-name", "iris", "--model-uri", IRIS, "--name", "envir"]
    monkeypatch.setenv("MODELD_DEPLOYER", "other")
    uuid = ok(modeld(*deploy, home=home)).split()[0]
    assert uuid in ok(modeld("--deployer", "local", "--home", str(other), "ls", "--json", home=home))
    assert "envir" in ok(modeld("ls", home=home))  # through the environment's deployer: the other home
    assert ok(modeld("--deployer", "local", "ls", home=home)) == ""  # --deployer wins; local is the default home
    assert [d["name"] for d in json.loads(ok(modeld("deployer", "list", "--json", home=home)))] == ["local", "other"]
    monkeypatch.setenv("MODELD_DEPLOYER", "nosuch")
    error_line(modeld("ls", home=home), 2, "$MODELD_DEPLOYER=nosuch", "unknown deployer 'nosuch'", "local, other")
    monkeypatch.delenv("MODELD_DEPLOYER")
    assert ok(modeld("ls", home=home)) == ""  # and without it, the default home as always


def test_an_unknown_deployer_names_the_registered_ones(home: Path, cli: Cli) -> None:
    ok(cli("deployer", "register", "mine", "--flavor", "local", "home=/tmp/nowhere-md"))
    for command in (["ls"], ["info", "x"], ["redeploy", "--all"], ["daemon", "status"], ["top"]):
        error_line(cli("--deployer", "nosuch", *command), 2, "unknown deployer 'nosuch'", "local, mine")
    error_line(modeld("--deployer", "nosuch", "ls", home=home), 2, "unknown deployer 'nosuch'", "local, mine")
    assert not (home / "modeld.sock").exists()  # no daemon was started for it


def test_local_only_commands_refuse_another_flavor(home: Path, tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    ok(cli("flavor", "register", MEMORY_FLAVOR))
    ok(cli("deployer", "register", "mem", "--flavor", "memory"))
    (tmp_path / "m.toml").write_text('project = "p"\n')
    for command in (["daemon", "status"], ["daemon", "start"], ["daemon", "stop"], ["top"], ["events"], ["export"],
                    ["unload", "x"], ["apply", "-f", str(tmp_path / "m.toml")]):
        line = error_line(cli("--deployer", "mem", *command), 2, "local daemon only", "'mem'", "'memory'")
        assert f"`modeld {' '.join(command[:2] if command[0] == 'daemon' else command[:1])}`" in line
    assert not (home / "modeld.sock").exists()  # not silently the local daemon
    # Through the interface, any flavor works (this one forgets its services between calls).
    assert cli("--deployer", "mem", "ls").stderr == "no services\n"
    error_line(cli("--deployer", "mem", "info", "x"), 4, "no service")
    error_line(cli("--deployer", "mem", "redeploy", "--all"), 2, "'mem'", "has no redeploy", "redeploy_all")
    # The registry commands use no deployer: an explicit one is refused, the environment's ignored.
    error_line(cli("--deployer", "mem", "deployer", "list"), 2, "--deployer", "registry")
    monkeypatch.setenv("MODELD_DEPLOYER", "mem")
    assert "mem" in ok(cli("deployer", "list"))
    error_line(cli("top"), 2, "local daemon only", "$MODELD_DEPLOYER")
    assert not (home / "modeld.sock").exists()


@pytest.mark.slow
def test_a_local_flavor_deployer_takes_the_daemon_commands_to_its_home(home: Path, other: Path, cli: Cli) -> None:
    ok(cli("--deployer", "other", "daemon", "start"))
    assert (other / "modeld.sock").exists() and not (home / "modeld.sock").exists()
    assert json.loads(ok(cli("--deployer", "other", "daemon", "status", "--json")))["running"]
    ok(cli("--deployer", "other", "daemon", "stop"))
    assert not (other / "modeld.sock").exists()


def test_a_local_deployer_with_a_socket_of_its_own_says_the_daemon_commands_need_a_home(home: Path, cli: Cli) -> None:
    ok(cli("deployer", "register", "sock", "--flavor", "local", "socket=/tmp/md-nowhere.sock"))
    error_line(cli("--deployer", "sock", "daemon", "status"), 2, "`modeld daemon status`", "socket=/tmp/md-nowhere.sock", "--home")
    assert not (home / "modeld.sock").exists()


def test_the_cli_and_the_registry_agree_on_the_built_in_deployers_name() -> None:
    from deployers import registry
    from deployers.cli import target

    assert target.BUILTIN_DEPLOYER == registry.BUILTIN_DEPLOYER


def test_the_default_get_logs_and_redeploy_all_say_what_the_flavor_lacks() -> None:
    from tests.flavor_fixtures.memory_deployer import InMemoryModelDeployer
    from tests.flavor_fixtures.memory_flavor import InMemoryModelDeployerConfig

    deployer = InMemoryModelDeployer(InMemoryModelDeployerConfig(), name="mem")
    assert "get_logs" not in vars(InMemoryModelDeployer) and "redeploy_all" in vars(BaseModelDeployer)
    with pytest.raises(NotSupported, match=r"deployer 'mem' \(flavor 'memory', InMemoryModelDeployer\) has no logs.*get_logs"):
        deployer.get_logs(UUID(int=1))
    with pytest.raises(NotSupported, match="has no redeploy.*redeploy_all"):
        deployer.redeploy_all()


@pytest.mark.slow
def test_redeploy_all_starts_what_should_run_and_not_more(home: Path, other: Path, cli: Cli) -> None:
    deploy = ["--deployer", "other", "deploy", "--model-name", "iris", "--model-uri", IRIS, "--restart", "never"]
    crashes = ok(cli(*deploy, "--name", "crashes")).split()[0]
    held = ok(cli(*deploy, "--name", "held")).split()[0]
    ok(cli("--deployer", "other", "stop", "held"))  # desired stopped: redeploy leaves it
    nothing = cli("--deployer", "other", "redeploy", "--all")
    assert ok(nothing) == "" and "nothing to redeploy" in nothing.stderr
    deployer = get_deployer("other", home=home)
    (svc,) = deployer.find_model_server(service_uuid=UUID(crashes))
    assert svc.status.pid
    os.kill(svc.status.pid, signal.SIGKILL)  # a crash, not restarted (restart never); desired still running
    wait_for(lambda: not deployer.find_model_server(service_uuid=UUID(crashes))[0].is_running, 30, what="down")
    out = modeld("--deployer", "other", "redeploy", "--all", home=home)  # as a user would
    assert re.fullmatch(rf"{crashes} active http://127\.0\.0\.1:\d+\n", ok(out)), out.stdout
    assert {s["uuid"]: s["status"]["state"] for s in listed(cli, other)} == {crashes: "active", held: "inactive"}
    assert deployer.redeploy_all(timeout=30) == []  # the Python API: nothing to do now
    error_line(cli("--deployer", "other", "redeploy"), 2, "--all")
    # Without --deployer: the default home's daemon (it has nothing to redeploy).
    assert json.loads(ok(cli("redeploy", "--all", "--json"))) == {"started": [], "failed": {}}
    assert listed(cli, home) == []


@pytest.mark.slow
def test_get_logs_gives_the_lines_of_modeld_logs_and_follows(home: Path, other: Path, cli: Cli) -> None:
    deployer = get_deployer("other", home=home)
    out = ok(cli("--deployer", "other", "deploy", "--model-name", "web", "--model-type", "command", "--health-path", "/",
                 "--", sys.executable, "-m", "http.server", "{port}", "--bind", "{host}"))
    uuid = UUID(out.split()[0])
    port = deployer.find_model_server(service_uuid=uuid)[0].endpoint.port
    assert port
    http_get(port, "/first-line")
    wait_for(lambda: "/first-line" in "".join(deployer.get_logs(uuid)), 10, what="the request logged")
    printed = ok(cli("--home", str(other), "logs", str(uuid)))
    lines = list(deployer.get_logs(uuid))  # (health probes may have added lines since)
    assert all(line.endswith("\n") and "\n" not in line[:-1] for line in lines)
    assert "".join(lines).startswith(printed) and "/first-line" in printed
    last = list(deployer.get_logs(uuid, tail=2))
    assert len(last) == 2 and "".join(last) in "".join(deployer.get_logs(uuid))

    seen: list[str] = []
    follow = deployer.get_logs(uuid, follow=True, tail=0)

    def read() -> None:
        for line in follow:
            seen.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    # tail=0 follows from the end as it is when the stream opens: once a health probe's line came
    # through, it is open, and the requests after it are followed.
    wait_for(lambda: seen, 30, what="a health probe's line, followed")
    for n in range(3):
        http_get(port, f"/followed-{n}")
        wait_for(lambda n=n: any(f"/followed-{n}" in line for line in seen), 10, what=f"followed line {n}")
    assert not any("/first-line" in line for line in seen)  # tail=0: only the new ones
    deployer.delete_model_server(uuid)
    reader.join(10)
    assert not reader.is_alive()  # following ends when the service goes


class StrippingDeployer(LocalDaemonModelDeployer):
    """A local deployer whose get_logs gives its lines without their newline, as ZenML's services do."""

    def get_logs(self, uuid: UUID, follow: bool = False, tail: int | None = None) -> Iterator[str]:
        for line in super().get_logs(uuid, follow, tail):
            yield line.removesuffix("\n")


class StrippingFlavor(LocalDaemonModelDeployerFlavor):
    @property
    def name(self) -> str:
        return "stripping"

    @property
    def implementation_class(self) -> type[StrippingDeployer]:
        return StrippingDeployer


@pytest.mark.slow
def test_logs_prints_one_line_a_line_from_a_flavor_that_strips_newlines(home: Path, other: Path, cli: Cli) -> None:
    ok(cli("flavor", "register", f"{__name__}.StrippingFlavor"))
    ok(cli("deployer", "register", "strip", "--flavor", "stripping", f"home={other}"))
    ok(cli("--deployer", "strip", "deploy", "--model-name", "web", "--model-type", "command", "--health-path", "/",
           "--", sys.executable, "-m", "http.server", "{port}", "--bind", "{host}"))
    http_get(int(json.loads(ok(cli("--deployer", "strip", "info", "web", "--json")))["endpoint"]["port"]), "/nope")
    wait_for(lambda: "/nope" in ok(cli("--deployer", "other", "logs", "web")), 10, what="the request logged")
    printed = ok(cli("--deployer", "strip", "logs", "web", "-n", "3"))  # a 4th line may come between the two
    plain = ok(cli("--deployer", "other", "logs", "web", "-n", "4")).splitlines(keepends=True)
    assert len(printed.splitlines()) == 3 and printed in ("".join(plain[:3]), "".join(plain[1:]))


@pytest.mark.long  # about 10 s on 2 cores: a server that takes its time, three times, so that there is progress to show
@pytest.mark.slow
def test_the_progress_line_is_drawn_through_a_deployer_too(home: Path, other: Path, cli: Cli) -> None:
    from tests.test_frictions import PROGRESS, after_progress, on_terminal, slow_command

    ok(cli("--home", str(other), "daemon", "start"))  # running already: the line shows the server
    code, out = on_terminal("--deployer", "other", "deploy", "--model-name", "slow", *slow_command(), home=home)
    assert code == 0, out
    drawn = [line for line in PROGRESS.findall(out) if line]
    assert drawn and all(line.startswith("deploying slow: ") for line in drawn), out
    assert any("pending_startup" in line and "loading weights (step 1 of 1)" in line for line in drawn), drawn
    result = after_progress(out)
    assert re.fullmatch(r"[0-9a-f-]{36} active in [\d.]+s", result[0]), result
    uuid = result[0].split()[0]
    assert [s["uuid"] for s in listed(cli, other)] == [uuid]

    ok(cli("--deployer", "other", "stop", uuid))
    code, out = on_terminal("--deployer", "other", "start", uuid[:8], home=home)
    assert code == 0, out
    drawn = [line for line in PROGRESS.findall(out) if line]
    assert drawn and all(line.startswith(f"starting {uuid[:8]}: ") for line in drawn), out
    assert any("loading weights" in line for line in drawn), drawn
    assert after_progress(out)[0].startswith(f"{uuid} active http://127.0.0.1:"), out

    code, out = on_terminal("--deployer", "other", "deploy", "--model-name", "slow", "--replace", *slow_command(), home=home)
    assert code == 0, out
    drawn = [line for line in PROGRESS.findall(out) if line]
    assert drawn and all(line.startswith("replacing slow: ") for line in drawn), out
    assert after_progress(out)[0].startswith(f"{uuid} active in "), out  # replaced in place


@pytest.mark.slow
def test_redeploy_all_starts_the_others_when_one_fails(home: Path, other: Path, cli: Cli, tmp_path: Path) -> None:
    model = tmp_path / "model.py"
    source = Path(IRIS.partition(":")[0]).read_text()
    model.write_text(source)
    deploy = ["--deployer", "other", "deploy", "--model-type", "python", "--restart", "never"]
    good = ok(cli(*deploy, "--model-name", "iris", "--model-uri", IRIS, "--name", "good")).split()[0]
    bad = ok(cli(*deploy, "--model-name", "iris2", "--model-uri", f"{model}:model", "--name", "bad")).split()[0]
    deployer = get_deployer("other", home=home)

    def crash_both_and_break_one() -> None:
        for uuid in (good, bad):
            (svc,) = deployer.find_model_server(service_uuid=UUID(uuid))
            assert svc.status.pid
            os.kill(svc.status.pid, signal.SIGKILL)  # not restarted (restart never); desired still running
        wait_for(lambda: not any(s.is_running for s in deployer.find_model_server()), 30, what="both down")
        model.write_text("raise RuntimeError('broken on purpose')\n")

    crash_both_and_break_one()
    with pytest.raises(RedeployError) as raised:  # the Python API: both lists, on the error
        deployer.redeploy_all(timeout=60)
    assert [str(s.uuid) for s in raised.value.started] == [good] and list(raised.value.failed) == [bad]
    assert f"1 of 2 services did not start: {bad}: " in str(raised.value)
    # (the daemon stops wanting a service whose start failed: a second redeploy leaves it)
    assert deployer.redeploy_all(timeout=60) == []

    model.write_text(source)
    ok(cli("--deployer", "other", "start", "bad"))
    crash_both_and_break_one()
    result = cli("--deployer", "other", "redeploy", "--all", "--timeout", "60")
    assert result.returncode == 5, result
    assert re.fullmatch(rf"{good} active http://127\.0\.0\.1:\d+\n", result.stdout), result.stdout
    assert result.stderr.startswith(f"modeld: {bad}: ") and len(result.stderr.splitlines()) == 1, result.stderr
    states = {s["uuid"]: s["status"]["state"] for s in listed(cli, other)}
    assert states[good] == "active" and states[bad] != "active"
