"""``modeld apply -f FILE``, ``modeld export`` and ``DaemonClient.apply``: a set of services as a TOML file.

The plan and the file format are pure (tested without a daemon); the rest runs a real daemon with
real servers in the test's home.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from daemon import AsyncDaemonClient, DaemonClient, ServiceConfig
from daemon.client.apply import ApplyReport, Step, changed_fields, compute_plan, describe
from daemon.client.applyfile import ApplyFileError, Desired, export_text, read_desired
from daemon.config import REDACTED
from daemon.exceptions import DaemonNotRunning, ServiceNotFound
from daemon.models import LocalModelService
from daemon.testing import REPO, wait_for
from tests.conftest import modeld, predict

T = TypeVar("T")
X_MODEL = f"{REPO}/examples/iris.py:model"  # (a file that exists: apply checks a model's file is there)
MODEL = "def model(instances):\n    return [MARK for _ in instances]\n"


def write_model(folder: Path, name: str = "m.py", mark: str = "one") -> None:
    (folder / name).write_text(MODEL.replace("MARK", repr(mark)))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def svc(name: str = "a", project: str = "p", **fields: object) -> dict[str, Any]:
    """A service as find answers it, JSON (the daemon filled python and working_dir in)."""
    config = ServiceConfig(name=name, project=project, model_name=name, model_uri=X_MODEL,
                           python="/venv/bin/python", working_dir="/somewhere", **fields)  # type: ignore[arg-type]
    return LocalModelService(config=config).model_dump(mode="json")


def desired(project: str = "p", **services: dict[str, object]) -> Desired:
    return read_desired({"project": project, "services": services})


# ------------------------------------------------------------------ the plan (pure)


def test_plan_creates_replaces_leaves_and_prunes_only_its_own_project():
    want = desired(a={"model_uri": X_MODEL}, b={"model_uri": X_MODEL, "description": "new"},
                   c={"model_uri": X_MODEL})
    current = [svc("a"), svc("b"), svc("gone"), svc("gone", project="other"), svc("a", project="")]
    plan = compute_plan(want, current, prune=True)
    steps = {(s.action, s.name, s.uuid) for s in plan.steps}
    assert steps == {
        ("unchanged", "a", current[0]["uuid"]),
        ("replace", "b", current[1]["uuid"]),
        ("create", "c", None),
        ("delete", "gone", current[2]["uuid"]),  # not the one of project "other", nor the "a" of no project
    }
    assert plan.of("replace")[0].changed == ["description"]
    assert not compute_plan(want, current, prune=False).of("delete")


def test_python_working_dir_search_path_and_port_are_compared_only_when_the_file_sets_them():
    service = svc("a", port=4321)["config"]
    unset = desired(a={"model_uri": X_MODEL})
    assert changed_fields(unset.services["a"], unset.given["a"], service) == []
    pinned = desired(a={"model_uri": X_MODEL, "python": "/other/python", "working_dir": "/w", "port": 1234})
    assert changed_fields(pinned.services["a"], pinned.given["a"], service) == ["port", "python", "working_dir"]
    nested = desired(a={"model_uri": X_MODEL, "restart": {"max_restarts": 9}})
    assert changed_fields(nested.services["a"], nested.given["a"], service) == ["restart.max_restarts"]


def test_secret_env_values_are_compared_with_the_recorded_ones():
    masked = svc("a", env={"API_TOKEN": REDACTED, "LEVEL": "1"})["config"]
    want = desired(a={"model_uri": X_MODEL, "env": {"API_TOKEN": "t0ken", "LEVEL": "1"}})
    config, given = want.services["a"], want.given["a"]
    assert changed_fields(config, given, masked, {"API_TOKEN": "t0ken", "LEVEL": "1"}) == []
    assert changed_fields(config, given, masked, {"API_TOKEN": "other", "LEVEL": "1"}) == ["env"]
    assert changed_fields(config, given, masked, None) == ["env"]  # not known: counts as changed


def test_two_services_of_one_name_the_newest_is_applied_and_prune_deletes_the_other():
    older, newer = svc("a"), svc("a")
    newer["created_at"] = older["created_at"] + 1
    plan = compute_plan(desired(a={"model_uri": X_MODEL}), [older, newer], prune=True)
    assert [(s.action, s.uuid) for s in plan.steps] == [("unchanged", newer["uuid"]), ("delete", older["uuid"])]
    assert "2 services have this name" in plan.notes[0]


# ------------------------------------------------------------------ the file


def test_relative_paths_resolve_against_the_files_folder_and_model_name_defaults(tmp_path):
    (tmp_path / "serve.sh").write_text("")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "iris.py").write_text("")
    (tmp_path / "m.pkl").write_bytes(b"")
    path = write(tmp_path / "set.toml", """
project = "lab"
[services.iris]
model_uri = "models/iris.py:model"
working_dir = "work"
python = ".venv/bin/python"
[services.pick]
model_uri = "m.pkl"
model_name = "other"
[services.mod]
model_uri = "package.module:attr"
[services.cmd]
command = ["./serve.sh", "{port}", "./not-there"]
[services.sys]
command = ["python3", "-m", "http.server"]
""")
    got = read_desired(path).services
    assert got["iris"].model_uri == f"{tmp_path}/models/iris.py:model"
    assert (got["iris"].working_dir, got["iris"].python) == (f"{tmp_path}/work", f"{tmp_path}/.venv/bin/python")
    assert (got["iris"].name, got["iris"].model_name, got["iris"].project) == ("iris", "iris", "lab")
    assert (got["pick"].model_uri, got["pick"].model_type, got["pick"].model_name) == (f"{tmp_path}/m.pkl", "pickle", "other")
    assert got["mod"].model_uri == "package.module:attr"  # a module, found by import: not a path
    assert got["cmd"].command == [f"{tmp_path}/serve.sh", "{port}", "./not-there"]
    assert got["sys"].command[0] == "python3"


def test_a_bad_file_names_the_file_each_service_and_field(tmp_path):
    path = write(tmp_path / "bad.toml", """
project = "p"
extra = 1
[services.a]
model_uri = "m.py:model"
port = "lots"
env = {K = {from_env = "MODELD_TEST_UNSET_KEY"}, J = 3}
[services.b]
name = "other"
model_uri = "m.py:model"
[services.b.restart]
max_restarts = -1
""")
    with pytest.raises(ApplyFileError) as caught:
        read_desired(path, environ={})
    message = caught.value.message
    for part in (str(path), "extra: unknown key", "services.a.port:", "services.a.env.J:",
                 "services.a.env.K: from_env = 'MODELD_TEST_UNSET_KEY', but MODELD_TEST_UNSET_KEY is not set",
                 "services.b.name: not a key", "services.b.restart.max_restarts:", "nothing was applied"):
        assert part in message
    with pytest.raises(ApplyFileError, match="not valid TOML"):
        read_desired(write(tmp_path / "x.toml", "[services.a\n"))
    with pytest.raises(ApplyFileError, match="cannot read it"):
        read_desired(tmp_path / "missing.toml")


def test_from_env_reads_the_applying_environment():
    got = read_desired({"services": {"a": {"model_uri": X_MODEL, "env": {"TOKEN": {"from_env": "MY_TOKEN"}}}}},
                       environ={"MY_TOKEN": "s3cret"})
    assert got.services["a"].env == {"TOKEN": "s3cret"}


@pytest.mark.parametrize("text", ["plain", 'q"uote\\back', "tab\tnew\nline\r\x00\x01\x1f\x7f", "ünï 🐍", ""])
def test_the_toml_writer_round_trips_through_tomllib(text):
    config = ServiceConfig(
        name="my svc.1", model_name="weird.name",
        description=text, command=["prog", text.replace("\x00", ""), "{port}"], env={"A B": text.replace("\x00", ""), "SAFE_KEY_X": "v"},
        port=8080, bind_unix=False, startup_timeout=1e300, stop_timeout=0.1, log_max_bytes=1 << 40,
        idle_timeout=2.5, restart={"mode": "always", "backoff_initial": 0.25}, health_path="/h",
    )
    back = tomllib.loads(export_text("proj \"x\"", [config]))
    assert back["project"] == 'proj "x"'
    (name, table), = back["services"].items()
    assert name == config.name
    assert table.get("description", "") == text and table["command"] == config.command  # (a default is left out)
    assert table["env"] == {"A B": config.env["A B"], "SAFE_KEY_X": {"from_env": "SAFE_KEY_X"}}  # secret: never in clear
    assert (table["port"], table["startup_timeout"], table["stop_timeout"], table["log_max_bytes"]) == (8080, 1e300, 0.1, 1 << 40)
    assert table["restart"] == {"mode": "always", "backoff_initial": 0.25}
    assert "bind_unix" not in table and "python" not in table  # defaults are left out
    again = read_desired({"project": back["project"], "services": back["services"]}, environ={"SAFE_KEY_X": "v"})
    assert again.services[name].model_dump() == config.model_copy(update={"project": 'proj "x"'}).model_dump()


# ------------------------------------------------------------------ real daemon, real servers


def pids(client: DaemonClient, project: str) -> dict[str, tuple[str, int | None, int]]:
    return {s.config.name: (str(s.uuid), s.status.pid, s.endpoint.port) for s in client.find(project=project)}


def test_apply_creates_leaves_alone_replaces_in_place_and_prunes(home, client, tmp_path, monkeypatch):
    write_model(tmp_path)
    write_model(tmp_path, "m2.py", mark="two")
    other = client.deploy(ServiceConfig(name="keep", project="other", model_uri=f"{tmp_path}/m.py:model"), timeout=60)
    loose = client.deploy(ServiceConfig(model_name="gone", model_uri=f"{tmp_path}/m.py:model"), timeout=60)  # no project
    first = write(tmp_path / "set.toml", """
project = "lab"
[services.a]
model_uri = "m.py:model"
[services.b]
model_uri = "m.py:model"
[services.gone]
model_uri = "m.py:model"
""")
    report = client.apply(first)
    assert [(s.action, s.status) for s in report.steps] == [("create", "done")] * 3
    before = pids(client, "lab")
    assert len(before) == 3 and all(pid for _, pid, _ in before.values())

    monkeypatch.chdir(home)  # another folder (a client's default working_dir): still nothing to do
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")  # and another PATH (search_path)
    again = client.apply(first)
    assert [s.action for s in again.steps] == ["unchanged"] * 3
    assert pids(client, "lab") == before  # same uuids, pids and ports: nothing restarted

    second = write(tmp_path / "set.toml", """
project = "lab"
[services.a]
model_uri = "m.py:model"
[services.b]
model_uri = "m2.py:model"
""")
    plan = client.apply(second, prune=True, dry_run=True)
    assert plan.dry_run and {(s.action, s.name, tuple(s.changed)) for s in plan.steps} == {
        ("unchanged", "a", ()), ("replace", "b", ("model_uri",)), ("delete", "gone", ())}
    assert all(s.status == "planned" for s in plan.steps)
    assert pids(client, "lab") == before  # a dry run changes nothing

    report = client.apply(second, prune=True)
    assert report.ok and [s.status for s in report.steps] == ["done"] * 3
    after = pids(client, "lab")
    assert set(after) == {"a", "b"} and after["a"] == before["a"]
    uuid, pid, port = after["b"]
    assert (uuid, port) == (before["b"][0], before["b"][2]) and pid != before["b"][1]  # in place: same uuid and port
    b = client.get(uuid)
    assert predict(b.prediction_url, [1]) == (200, {"predictions": ["two"]})
    # Prune touched only its own project: the other project's and the project-less "gone" remain.
    assert {str(s.uuid) for s in client.find()} >= {str(other.uuid), str(loose.uuid)}


def test_an_invalid_file_applies_nothing_and_a_failing_service_is_reported(home, client, tmp_path):
    write_model(tmp_path)
    bad = write(tmp_path / "bad.toml", """
project = "lab"
[services.good]
model_uri = "m.py:model"
[services.broken]
model_uri = "m.py:model"
stop_timeout = -1
""")
    with pytest.raises(ApplyFileError, match=r"bad.toml: services.broken.stop_timeout: .*nothing was applied"):
        client.apply(bad)
    assert client.find(project="lab") == []

    (tmp_path / "crash.py").write_text("raise SystemExit('this model does not load')\n")
    mixed = write(tmp_path / "mixed.toml", """
project = "lab"
[services.good]
model_uri = "m.py:model"
[services.crash]
model_uri = "crash.py:model"
startup_timeout = 20
[services.crash.restart]
mode = "never"
[services.late]
model_uri = "m.py:model"
""")
    report = client.apply(mixed, timeout=30)
    assert not report.ok
    assert [(s.name, s.status) for s in report.steps] == [("good", "done"), ("crash", "failed"), ("late", "done")]
    assert "this model does not load" in (report.steps[1].error or "")
    assert {s.config.name for s in client.find(project="lab", running=True)} == {"good", "late"}
    assert describe(report)[-2].endswith("(project 'lab'): 2 created, 1 create failed")
    assert describe(report)[-1] == "failed: crash; applied: good, late"


@pytest.mark.slow
def test_secrets_from_env_export_round_trip_and_the_cli(home, client, tmp_path, monkeypatch):
    write_model(tmp_path)
    monkeypatch.setenv("LAB_TOKEN", "first-secret-value")
    path = write(tmp_path / "set.toml", """
project = "lab"
[services.a]
model_uri = "m.py:model"
env = {API_TOKEN = {from_env = "LAB_TOKEN"}, LEVEL = "debug"}
[services.b]
model_uri = "m.py:model"
description = "with \\"quotes\\" and ünïcode"
restart = {max_restarts = 2}
""")
    assert client.apply(path).ok
    before = pids(client, "lab")

    exported = client.export(project="lab")
    assert "first-secret-value" not in exported
    assert 'API_TOKEN = {from_env = "API_TOKEN"}' in exported
    out = tmp_path / "export.toml"
    out.write_text(exported)
    monkeypatch.setenv("API_TOKEN", "first-secret-value")  # where the export reads it from
    report = client.apply(out)
    assert [s.action for s in report.steps] == ["unchanged", "unchanged"]
    assert pids(client, "lab") == before

    # The CLI: export to a file, a dry run as JSON, then a changed secret replaces its service.
    done = modeld("export", "--project", "lab", "-o", str(tmp_path / "cli.toml"), home=home)
    assert done.returncode == 0, done.stderr
    assert tomllib.loads((tmp_path / "cli.toml").read_text()) == tomllib.loads(exported)
    env = {"API_TOKEN": "a-new-secret-value"}
    done = subprocess.run([sys.executable, "-m", "deployers.cli", "apply", "-f", str(out), "--dry-run", "--json"],
                          cwd=REPO, env={**os.environ, **env, "MODELD_HOME": str(home)}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    plan = ApplyReport.model_validate(json.loads(done.stdout))
    assert [(s.action, s.changed) for s in plan.steps] == [("replace", ["env"]), ("unchanged", [])]
    monkeypatch.delenv("API_TOKEN")
    done = modeld("apply", "-f", str(out), home=home)
    assert done.returncode == 2 and "services.a.env.API_TOKEN: from_env = 'API_TOKEN'" in done.stderr
    assert "nothing was applied" in done.stderr
    done = modeld("apply", "-f", str(path), home=home)
    assert done.returncode == 0 and "unchanged a" in done.stdout and "2 unchanged" in done.stdout, done.stdout
    done = modeld("info", "a", home=home)
    assert done.returncode == 0 and "PROJECT" in done.stdout and "lab" in done.stdout, done.stdout
    done = modeld("ls", "--project", "lab", home=home)
    assert done.stdout.count("\n") == 3 and " a " in done.stdout and " b " in done.stdout


def test_prune_needs_a_project(home, client, tmp_path):
    write_model(tmp_path)
    path = write(tmp_path / "set.toml", '[services.a]\nmodel_uri = "m.py:model"\n')
    with pytest.raises(ApplyFileError, match="--prune needs a top-level project"):
        client.apply(path, prune=True)
    assert client.find() == []
    # A dict shaped like the file is taken too.
    plan = client.apply({"project": "x", "services": {"a": {"model_uri": f"{tmp_path}/m.py:model"}}}, dry_run=True)
    assert (plan.source, [(s.action, s.name) for s in plan.steps]) == ("<dict>", [("create", "a")])
    assert client.find() == []


def answering(call: Callable[[], T]) -> T | None:
    try:
        return call()
    except DaemonNotRunning:
        return None


@pytest.mark.slow
def test_the_daemon_applies_a_file_at_start_and_survives_a_bad_one(home, tmp_path):
    write_model(tmp_path)
    path = write(tmp_path / "set.toml", 'project = "boot"\n[services.a]\nmodel_uri = "m.py:model"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELD_")}
    env.update(MODELD_HOME=str(home), MODELD_GATEWAY="off", PYTHONPATH=str(REPO))
    with open(tmp_path / "daemon.out", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "deployers.cli", "daemon", "run", "--apply", str(path)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with DaemonClient(home, auto_start=False) as client:
            found = wait_for(lambda: answering(lambda: client.find(project="boot", running=True)), 60, what="the applied service")
            assert found[0].config.name == "a"
            info = client.daemon_info()
            assert info["settings"]["apply"] == str(path) and info["settings_sources"]["apply"] == "argument"
            wait_for(lambda: "apply: applied" in (tmp_path / "daemon.out").read_text(), 30, what="the apply logged")

            client.shutdown()
        proc.wait(30)

        # The setting, in daemon.toml, relative to the home; a file that fails is logged, the daemon serves.
        write(home / "daemon.toml", 'apply = "missing.toml"\n')
        with open(tmp_path / "daemon2.out", "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "daemon", "--home", str(home)], cwd=REPO, env=env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        with DaemonClient(home, auto_start=False) as client:
            wait_for(lambda: answering(client.daemon_info), 30, what="the daemon")
            wait_for(lambda: "nothing applied" in (tmp_path / "daemon2.out").read_text(), 30, what="the failure logged")
            assert f"{home}/missing.toml: cannot read it" in (tmp_path / "daemon2.out").read_text()
            assert client.daemon_info()["pid"] == proc.pid  # still serving
            assert [s.config.name for s in client.find(project="boot")] == ["a"]  # and the first apply's service stays
            client.shutdown(stop_services=True)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()


def test_the_readme_example_file_validates(monkeypatch):
    monkeypatch.chdir(REPO)  # (its model's file, examples/iris.py, must be there)
    readme = (REPO / "README.md").read_text()
    section = readme.split("## A set of models as code", 1)[1].split("\n## ", 1)[0]
    text = section.split("```toml\n", 1)[1].split("```", 1)[0]
    got = read_desired({**tomllib.loads(text)}, environ={"IRIS_TOKEN": "x"})
    assert got.project == "laptop" and set(got.services) == {"iris", "web"}
    assert got.services["iris"].restart.max_restarts == 3 and got.services["web"].model_type == "command"


# ------------------------------------------------------------------ hostile cases


def cli_apply(path: Path, home: Path, *args: str) -> subprocess.Popen[str]:
    """``modeld apply -f PATH`` in a process of its own (its own group: the test kills it by that)."""
    return subprocess.Popen([sys.executable, "-m", "deployers.cli", "apply", "-f", str(path), *args],
                            cwd=REPO, env={**os.environ, "MODELD_HOME": str(home)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finished(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    return proc.returncode, out


@pytest.mark.slow
@pytest.mark.long
def test_two_applies_at_once_take_turns_the_last_one_wins(home, client, tmp_path):
    """A replaces s1..s6 while B (prune, only s1) starts: B waits for A, then plans against what A left,
    so its deletes stand; without the lock A's replace brought B's deleted services back."""
    write_model(tmp_path)
    names = [f"s{i}" for i in range(1, 7)]
    six = "".join(f'[services.{n}]\nmodel_uri = "m.py:model"\ndescription = "DESC"\n' for n in names)
    write(tmp_path / "v1.toml", 'project = "race"\n' + six.replace("DESC", "one"))
    assert client.apply(tmp_path / "v1.toml").ok
    before = pids(client, "race")
    (tmp_path / "slow.py").write_text("import time\ntime.sleep(0.8)  # each of A's replaces takes a while\n" + MODEL)
    a_file = write(tmp_path / "v2.toml", 'project = "race"\n' + six.replace("DESC", "two").replace("m.py", "slow.py"))
    b_file = write(tmp_path / "b.toml", 'project = "race"\n[services.s1]\nmodel_uri = "slow.py:model"\ndescription = "two"\n')
    a = cli_apply(a_file, home, "--json")
    try:
        # A is under way: its first replace is done (s1 runs a new server), s2..s6 are still to come.
        wait_for(lambda: pids(client, "race")["s1"][1] != before["s1"][1], 60, what="A's first replace")
        b = cli_apply(b_file, home, "--prune", "--json")
        b_code, b_out = finished(b)
    finally:
        a_code, a_out = finished(a)
    assert (a_code, b_code) == (0, 0), (a_out, b_out)
    a_report, b_report = ApplyReport.model_validate_json(a_out), ApplyReport.model_validate_json(b_out)
    assert [(s.action, s.status) for s in a_report.steps] == [("replace", "done")] * 6
    assert sorted((s.action, s.status) for s in b_report.steps) == [("delete", "done")] * 5 + [("unchanged", "done")]
    after = client.find(project="race")
    assert [s.config.name for s in after] == ["s1"]  # B's state: no resurrected service
    assert str(after[0].uuid) == before["s1"][0] and after[0].config.description == "two"
    assert not any((home / "services" / before[n][0]).exists() for n in names[1:])
    assert any("waited" in n for n in b_report.notes), b_report.notes


@pytest.mark.slow
def test_an_asyncio_apply_waits_for_the_lock_without_blocking_its_loop(home, tmp_path):
    """The async apply takes the same lock: while another holds it (here this test, as filelock or a
    `modeld apply` would), the apply waits and the event loop keeps running; then it applies."""
    write_model(tmp_path)
    wanted = {"project": "aio", "services": {"a": {"model_uri": f"{tmp_path}/m.py:model"}}}

    async def main() -> None:
        async with AsyncDaemonClient(home) as client:
            await client.daemon_info()  # (the daemon up, so the wait below is the lock's)
            fd = os.open(home / "apply.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                applying = asyncio.create_task(client.apply(wanted))
                ticks = 0
                for _ in range(20):  # 1 s of a loop that still runs
                    await asyncio.sleep(0.05)
                    ticks += 1
                assert ticks == 20 and not applying.done()
                assert await client.find(project="aio") == []  # it has not even planned
                plan = await client.apply(wanted, dry_run=True)  # a dry run takes no lock
                assert [s.action for s in plan.steps] == ["create"]
            finally:
                os.close(fd)
            report = await asyncio.wait_for(applying, 60)
            assert report.ok and [s.action for s in report.steps] == ["create"]
            assert any("waited" in n for n in report.notes), report.notes
            with pytest.raises(ServiceNotFound, match="no service of project 'typo'.*'aio'"):
                await client.export(project="typo")
            await client.shutdown(stop_services=True)

    asyncio.run(main())


@pytest.mark.slow
def test_an_export_of_a_service_deployed_with_a_relative_model_uri_applies_unchanged(home, client, tmp_path):
    """`modeld deploy --model-uri m.py:model` in a folder stores the uri as given and the folder as
    working_dir: export writes the path absolute, and the plan reads the record's relative uri against
    its working_dir, so applying the export from another folder changes nothing."""
    work, elsewhere = tmp_path / "w", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    write_model(work)
    (work / "m.pkl").write_bytes(b"")  # (a pickle is not loaded by this test: only its path is compared)
    env = {**os.environ, "MODELD_HOME": str(home), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "deployers.cli", "deploy", "--name", "dup", "--project", "dp",
                           "--model-uri", "m.py:model"], cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    svc = client.find(project="dp")[0]
    assert (svc.config.model_uri, svc.config.working_dir) == ("m.py:model", str(work))
    before = pids(client, "dp")
    done = modeld("export", "--project", "dp", "-o", str(elsewhere / "dp.toml"), home=home)
    assert done.returncode == 0, done.stderr
    assert tomllib.loads((elsewhere / "dp.toml").read_text())["services"]["dup"]["model_uri"] == f"{work}/m.py:model"
    report = client.apply(elsewhere / "dp.toml")
    assert [(s.action, s.changed) for s in report.steps] == [("unchanged", [])]
    assert pids(client, "dp") == before
    # The same for a pickle's path, in the plan (a record read against its working_dir).
    have = svc.config.model_copy(update={"model_uri": "m.pkl", "model_type": "pickle"}).model_dump(mode="json")
    want = desired("dp", dup={"model_uri": f"{work}/m.pkl", "model_name": ""})
    assert changed_fields(want.services["dup"], want.given["dup"], have) == []
    assert changed_fields(want.services["dup"], want.given["dup"], {**have, "working_dir": str(elsewhere)}) == ["model_uri"]


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_apply_reads_only_a_regular_file_of_at_most_the_cap(home, tmp_path):
    """/dev/zero grew without bound and a FIFO hung forever: each is now an error naming it, at once,
    from the CLI and from the daemon's start-up apply (the same reader)."""
    fifo, big, folder = tmp_path / "fifo", tmp_path / "big.toml", tmp_path / "dir.toml"
    os.mkfifo(fifo)
    folder.mkdir()
    with open(big, "wb") as f:
        f.truncate(16 * 1024 * 1024 + 1)  # (sparse: one byte over the cap)
    cases = {"/dev/zero": "a character device", str(fifo): "a FIFO", str(folder): "a directory",
             str(big): "larger than 16 MiB"}
    for path, what in cases.items():
        done = modeld("apply", "-f", path, home=home, timeout=30)
        assert done.returncode == 2 and f"{path}: " in done.stderr and what in done.stderr, (path, done.stderr)
        assert "nothing was applied" in done.stderr
    done = subprocess.run([sys.executable, "-m", "daemon.client.apply_main", "--home", str(home), str(fifo)],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and f"{fifo}: " in done.stderr and "a FIFO" in done.stderr, done.stderr
    assert not (home / "daemon.pid").exists()  # refused before any request (no daemon was started)
    # Exactly the cap is read (and is not TOML here).
    with open(big, "r+b") as f:
        f.truncate(16 * 1024 * 1024)
    with pytest.raises(ApplyFileError, match="not valid TOML"):
        read_desired(big)


def test_the_summary_counts_what_was_done_and_what_failed_per_action():
    steps = [Step(action="create", name=f"c{i}", status="failed" if i == 2 else "done") for i in range(4)]
    steps += [Step(action="replace", name="r", status="failed", error="no"), Step(action="delete", name="d", status="done"),
              Step(action="unchanged", name="u", status="done")]
    lines = describe(ApplyReport(source="odd.toml", project="odd", steps=steps))
    assert "applied odd.toml (project 'odd'): 3 created, 1 create failed, 1 replace failed, 1 deleted, 1 unchanged" in lines
    assert "failed: c2, r; applied: c0, c1, c3, d" in lines
    plan = describe(ApplyReport(source="odd.toml", project="odd", dry_run=True, steps=[Step(action="create", name="a")]))
    assert plan[-1] == "plan for odd.toml (project 'odd'): 1 create; nothing changed (--dry-run)"


@pytest.mark.slow
def test_export_of_a_project_without_services_is_an_error_naming_it(home, client, tmp_path):
    write_model(tmp_path)
    assert client.apply({"project": "real", "services": {"a": {"model_uri": f"{tmp_path}/m.py:model"}}}).ok
    done = modeld("export", "--project", "typo", "-o", str(tmp_path / "out.toml"), home=home)
    assert done.returncode == 4 and "no service of project 'typo'" in done.stderr, (done.returncode, done.stderr)
    assert "'real'" in done.stderr  # the projects there are
    assert not (tmp_path / "out.toml").exists()
    with pytest.raises(ServiceNotFound, match="typo"):
        client.export(project="typo")
    assert "[services.a]" in client.export(project="real")


def test_a_model_file_that_does_not_exist_fails_validation_and_nothing_is_applied(home, client, tmp_path):
    """The dry run planned `create` for a model whose file is not there, and the apply failed it after
    applying the others: now the file does not validate, naming the file, the service and model_uri."""
    write_model(tmp_path)
    path = write(tmp_path / "set.toml", """
project = "lab"
[services.good]
model_uri = "m.py:model"
[services.typo]
model_uri = "mm.py:model"
[services.pick]
model_uri = "models/gone.pkl"
[services.bare]
model_uri = "nothere.py"
[services.mod]
model_uri = "json:loads"
""")
    for dry_run in (True, False):
        with pytest.raises(ApplyFileError) as caught:
            client.apply(path, dry_run=dry_run)
        message = caught.value.message
        assert message.startswith(f"{path}: ") and message.endswith("nothing was applied"), message
        assert f"services.typo.model_uri: {tmp_path}/mm.py: no such file" in message
        assert f"services.pick.model_uri: {tmp_path}/models/gone.pkl: no such file" in message
        assert f"services.bare.model_uri: {tmp_path}/nothere.py: no such file" in message
        assert "services.good" not in message and "services.mod" not in message  # (a module is imported by name)
    assert client.find(project="lab") == []
    done = modeld("apply", "-f", str(path), "--dry-run", home=home)
    assert done.returncode == 2 and "services.typo.model_uri" in done.stderr, done.stderr
