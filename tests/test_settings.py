"""The daemon's settings (``daemon/settings.py``): daemon.toml, then ``MODELD_<KEY>``; a bad one stops the daemon.

Real daemons in temp homes, started as a user starts them (``python -m daemon``, ``modeld``, a
client's auto-start), and one test of the loader alone.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import modeld
from daemon import DaemonClient, DaemonStartError
from daemon.daemon_process import daemon_pid
from daemon.paths import Paths
from daemon.settings import DaemonSettings, env_name, file_keys, load_settings
from daemon.testing import REPO, processes_of

DEFAULTS = {
    "log_level": "INFO",
    "cgroup": "",
    "health_interval": 5.0,
    "warm_start": True,
    "gateway": "127.0.0.1:9277",
    "gateway_timeout": 300.0,
    "gateway_max_body": 64 * 1024 * 1024,
    "wake_timeout": None,
    "max_active": None,
    "memory_budget": None,
    "event_ring": 2_000,
    "event_queue": 1_000,
    "apply": "",
}


@pytest.fixture(autouse=True)
def no_settings_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemons here see only the settings a test gives them (the runner's MODELD_CGROUP, say, goes)."""
    for key in file_keys():
        monkeypatch.delenv(env_name(key), raising=False)
    # Except the gateway: these daemons would race for 127.0.0.1:9277 with every other daemon here.
    monkeypatch.setenv("MODELD_GATEWAY", "off")


def write_settings(home: Path, text: str) -> Path:
    path = home / "daemon.toml"
    path.write_text(text)
    return Paths(home).home / "daemon.toml"


# ------------------------------------------------------------------ the loader alone


def test_loader_defaults_then_file_then_environment(tmp_path):
    paths = Paths(tmp_path)
    nothing = load_settings(paths, environ={})
    assert nothing.public() == {"home": str(paths.home), "socket": str(paths.socket), **DEFAULTS}  # as before settings
    assert set(nothing.sources.values()) == {"default", "argument"}

    toml = write_settings(tmp_path, 'health_interval = 2\nwarm_start = false\nlog_level = "debug"\ncgroup = " off "\n')
    environ = {"MODELD_HEALTH_INTERVAL": "0.25", "MODELD_LOG_LEVEL": "", "MODELD_CGROUP": "", "MODELD_OTHER": "x"}
    settings = load_settings(paths, environ=environ)
    assert (settings.health_interval, settings.warm_start, settings.log_level, settings.cgroup) == (0.25, False, "DEBUG", "off")
    assert settings.sources == {
        "home": "argument",
        "socket": "default",
        "log_level": str(toml),  # an empty variable counts as unset
        "cgroup": str(toml),
        "health_interval": "MODELD_HEALTH_INTERVAL",
        "warm_start": str(toml),
        "gateway": "default",
        "gateway_timeout": "default",
        "gateway_max_body": "default",
        "wake_timeout": "default",
        "max_active": "default",
        "memory_budget": "default",
        "event_ring": "default",
        "event_queue": "default",
        "apply": "default",
    }
    assert settings.named("cgroup") == f"{toml}: cgroup"
    assert settings.named("health_interval") == "MODELD_HEALTH_INTERVAL"

    # The values the variables took before they were settings mean what they meant.
    toml.unlink()
    old = load_settings(paths, environ={"MODELD_WARM_START": "0", "MODELD_CGROUP": "off", "MODELD_LOG_LEVEL": "warning"})
    assert (old.warm_start, old.cgroup, old.log_level) == (False, "off", "WARNING")
    assert load_settings(paths, environ={"MODELD_WARM_START": "1"}).warm_start is True


def test_gateway_addresses():
    def address(value: str) -> tuple[str, int] | None:
        return DaemonSettings(home=Path("/h"), socket=Path("/h/s"), gateway=value).gateway_address

    assert address("127.0.0.1:9277") == ("127.0.0.1", 9277)
    assert address(":0") == ("127.0.0.1", 0)
    assert address("localhost:8080") == ("127.0.0.1", 8080)
    assert address("[::1]:9277") == ("::1", 9277)
    assert address(" OFF ") is None


BAD = [
    # (daemon.toml, environment, what the message says after "cannot start the daemon: ")
    ("helth_interval = 1\n", {}, r"{toml}: helth_interval: unknown setting \(the settings are log_level, cgroup"),
    ('health_interval = "soon"\n', {}, r"{toml}: health_interval: Input should be a valid number.*\(got 'soon'\)"),
    ("health_interval = 0\n", {}, r"{toml}: health_interval: Input should be greater than 0"),
    ('log_level = "loud"\n', {}, r"{toml}: log_level: unknown log level 'loud'"),
    ("health_interval = \n", {}, r"{toml}: not valid TOML: .*line 1"),
    ('socket = "/tmp/elsewhere.sock"\n', {}, r"{toml}: socket: not read from daemon.toml; set --socket or MODELD_SOCKET"),
    ("health_interval = 1\n", {"MODELD_HEALTH_INTERVAL": "abc"}, r"MODELD_HEALTH_INTERVAL: Input should be a valid number"),
    ("", {"MODELD_WARM_START": "maybe"}, r"MODELD_WARM_START: Input should be a valid boolean.*\(got 'maybe'\)"),
]
BAD += [
    ('gateway = "9277"\n', {}, r"{toml}: gateway: '9277' is not host:port \(e.g. 127.0.0.1:9277, :0 for a free port\) or off"),
    ("", {"MODELD_GATEWAY": "example.com:80"}, r"MODELD_GATEWAY: 'example.com:80': the host must be an IP address"),
    ("", {"MODELD_GATEWAY": "127.0.0.1:70000"}, r"MODELD_GATEWAY: '127.0.0.1:70000' is not host:port"),
    ("gateway_timeout = 0\n", {}, r"{toml}: gateway_timeout: Input should be greater than 0"),
    ("", {"MODELD_GATEWAY_MAX_BODY": "lots"}, r"MODELD_GATEWAY_MAX_BODY: Input should be a valid integer"),
]
BAD_IDS = ["unknown-key", "bad-value", "out-of-range", "bad-level", "broken-toml", "socket-in-file", "bad-env", "bad-env-bool"]
BAD_IDS += ["gateway-no-port", "gateway-name", "gateway-port-range", "gateway-timeout", "gateway-max-body"]
BAD += [
    ("max_active = 0\n", {}, r"{toml}: max_active: Input should be greater than or equal to 1 \(got 0\)"),
    ("max_active = true\n", {}, r"{toml}: max_active: give a number, not true or false"),
    ("", {"MODELD_MAX_ACTIVE": "three"}, r"MODELD_MAX_ACTIVE: Input should be a valid integer.*\(got 'three'\)"),
    ("", {"MODELD_MAX_ACTIVE": "2.5"}, r"MODELD_MAX_ACTIVE: Input should be a valid integer"),
    ('memory_budget = "2 gigs"\n', {}, r"{toml}: memory_budget: '2 gigs' is not a size: bytes, or a number with B, kB"),
    ("memory_budget = 0\n", {}, r"{toml}: memory_budget: Input should be greater than or equal to 1"),
    ("", {"MODELD_MEMORY_BUDGET": "-1GiB"}, r"MODELD_MEMORY_BUDGET: '-1GiB' is not a size"),
    ("memory_budget = 1.5\n", {}, r"{toml}: memory_budget: Input should be a valid integer, got a number with a fractional part"),
]
BAD_IDS += ["max-active-0", "max-active-bool", "max-active-word", "max-active-fraction"]
BAD_IDS += ["budget-unit", "budget-0", "budget-negative", "budget-fraction"]


@pytest.mark.parametrize(("text", "environ", "said"), BAD, ids=BAD_IDS)
def test_loader_names_the_key_and_where(tmp_path, text, environ, said):
    toml = write_settings(tmp_path, text)
    with pytest.raises(DaemonStartError) as info:
        load_settings(Paths(tmp_path), environ=environ)
    assert re.match("cannot start the daemon: " + said.format(toml=re.escape(str(toml))), str(info.value)), str(info.value)
    assert "\n" not in str(info.value)  # one line: the client's auto-start reports the daemon's last line


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (4294967296, 4294967296),
        ("4294967296", 4294967296),
        ("512MiB", 512 * 1024**2),
        ("2GiB", 2 * 1024**3),
        ("1.5GB", 1_500_000_000),
        ("1.5 gib", int(1.5 * 1024**3)),
        ("100kB", 100_000),
        ("64K", 64 * 1024),  # K, M, G, T alone: binary, as modeld deploy reads --log-max-bytes
        ("3M", 3 * 1024**2),
        ("off", None),
        ("none", None),
    ],
)
def test_memory_budget_takes_bytes_and_sizes_with_units(tmp_path, given, expected):
    from_file = write_settings(tmp_path, f"memory_budget = {json.dumps(given)}\n")
    assert load_settings(Paths(tmp_path), environ={}).memory_budget == expected
    from_file.unlink()
    from_env = load_settings(Paths(tmp_path), environ={"MODELD_MEMORY_BUDGET": str(given)})
    assert from_env.memory_budget == expected
    assert from_env.public()["memory_budget"] == expected  # GET /v1/daemon shows bytes


def test_max_active_and_its_lifting_by_the_environment(tmp_path):
    write_settings(tmp_path, "max_active = 3\nmemory_budget = \"2GiB\"\n")
    assert load_settings(Paths(tmp_path), environ={}).max_active == 3
    lifted = load_settings(Paths(tmp_path), environ={"MODELD_MAX_ACTIVE": "off", "MODELD_MEMORY_BUDGET": "1GiB"})
    assert (lifted.max_active, lifted.memory_budget) == (None, 1024**3)
    assert lifted.sources["max_active"] == "MODELD_MAX_ACTIVE"


def test_readme_lists_every_setting():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Daemon settings", 1)[1].split("\n## ", 1)[0]
    for key in file_keys():
        assert re.search(rf"^\| `{key}` \|.*\| `{env_name(key)}` \|", section, re.M), key
    for key in DaemonSettings.LOCATION:
        assert f"`{key}`" in section, key


# ------------------------------------------------------------------ real daemons


def test_a_daemon_reads_daemon_toml(home, client, monkeypatch):
    monkeypatch.delenv("MODELD_GATEWAY")
    toml = write_settings(
        home,
        'log_level = "warning"\ncgroup = "off"\nhealth_interval = 0.5\nwarm_start = false\n'
        'gateway = "off"\ngateway_timeout = 30\ngateway_max_body = 1000\nwake_timeout = 7\n'
        'max_active = 3\nmemory_budget = "1.5GiB"\nevent_ring = 500\nevent_queue = 50\napply = "empty.toml"\n',
    )
    (home / "empty.toml").write_text("")  # a file of no services: applying it changes nothing
    info = client.daemon_info()  # auto-started
    assert info["settings"] == {
        "home": str(Paths(home).home),
        "socket": str(Paths(home).socket),
        "log_level": "WARNING",
        "cgroup": "off",
        "health_interval": 0.5,
        "warm_start": False,
        "gateway": "off",
        "gateway_timeout": 30.0,
        "gateway_max_body": 1000,
        "wake_timeout": 7.0,
        "max_active": 3,
        "memory_budget": 1610612736,
        "event_ring": 500,
        "event_queue": 50,
        "apply": "empty.toml",
    }
    assert {key: info["settings_sources"][key] for key in file_keys()} == dict.fromkeys(file_keys(), str(toml))
    # They act, not only show: tags, as the file says, and no INFO line in the log.
    assert info["containment"] == "tag"
    assert info["containment_note"] == f"{toml}: cgroup=off"
    assert "serving on" not in (home / "daemon.log").read_text()


def test_the_environment_beats_the_file(home, client, monkeypatch):
    write_settings(home, 'log_level = "warning"\nhealth_interval = 0.5\ncgroup = "off"\n')
    monkeypatch.setenv("MODELD_HEALTH_INTERVAL", "0.25")  # the auto-started daemon inherits the client's environment
    monkeypatch.setenv("MODELD_LOG_LEVEL", "info")
    monkeypatch.setenv("MODELD_CGROUP", "tag")
    info = client.daemon_info()
    assert (info["settings"]["health_interval"], info["settings"]["log_level"]) == (0.25, "INFO")
    assert info["settings_sources"]["health_interval"] == "MODELD_HEALTH_INTERVAL"
    assert info["settings_sources"]["log_level"] == "MODELD_LOG_LEVEL"
    assert info["containment_note"] == "MODELD_CGROUP=tag"  # as the variable was reported before it was a setting
    assert "serving on" in (home / "daemon.log").read_text()


@pytest.mark.parametrize(("text", "environ", "said"), [BAD[0], BAD[1], BAD[4], BAD[6]], ids=[BAD_IDS[i] for i in (0, 1, 4, 6)])
@pytest.mark.slow
@pytest.mark.long
def test_a_bad_setting_stops_the_daemon_and_the_client_says_why(home, monkeypatch, text, environ, said):
    toml = write_settings(home, text)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    expected = "cannot start the daemon: " + said.format(toml=re.escape(str(toml)))

    # The daemon itself: exit 3 ("cannot start", as the CLI's table says), one line naming the key.
    started = subprocess.run(
        [sys.executable, "-m", "daemon", "--home", str(home)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert started.returncode == 3, started
    assert re.match("modeld: " + expected, started.stderr.strip().splitlines()[-1]), started.stderr
    assert daemon_pid(Paths(home)) is None and processes_of(home) == []

    # A command that auto-starts it reports that line, at once (not a timeout), and exits 3.
    began = time.monotonic()
    listed = modeld("ls", home=home)
    assert time.monotonic() - began < 20
    assert listed.returncode == 3, listed
    assert re.match("modeld: " + expected + r".* \(the modeld daemon exited with code 3\)$", listed.stderr.strip()), listed.stderr

    # And so does the client library.
    with pytest.raises(DaemonStartError) as info, DaemonClient(home) as client:
        client.daemon_info()
    assert re.match(expected, str(info.value)), str(info.value)
    assert processes_of(home) == []

    # Fixed, the next call starts it.
    (home / "daemon.toml").unlink()
    for key in environ:
        monkeypatch.delenv(key)
    with DaemonClient(home) as client:
        assert client.daemon_info()["settings"]["health_interval"] == 5.0


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_daemon_status_prints_the_settings(home, monkeypatch):
    toml = write_settings(home, "health_interval = 0.5\n")
    monkeypatch.setenv("MODELD_WARM_START", "0")
    assert modeld("daemon", "start", home=home).returncode == 0
    status = modeld("daemon", "status", home=home)
    assert status.returncode == 0, status.stderr
    out = status.stdout
    assert re.search(rf"^  health_interval +0\.5  \(from {re.escape(str(toml))}\)$", out, re.M), out
    assert re.search(r"^  warm_start +false  \(from MODELD_WARM_START\)$", out, re.M), out
    assert re.search(r"^  log_level +INFO  \(default\)$", out, re.M), out
    assert re.search(r'^  cgroup +""  \(default\)$', out, re.M), out
    assert re.search(rf"^  socket +{re.escape(str(Paths(home).socket))}  \(from argument\)$", out, re.M), out
    as_json = json.loads(modeld("daemon", "status", "--json", home=home).stdout)
    assert as_json["settings"]["warm_start"] is False
    assert as_json["settings_sources"]["health_interval"] == str(toml)
