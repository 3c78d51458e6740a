"""Bad input on the control socket: 10,000 fuzzed requests and garbage, every one refused cleanly.

The fuzzer is ``scripts/fuzz.py`` (run it alone for other counts and seeds); it takes the
routes from ``daemon.api.Api``'s table, so a new route is fuzzed without touching this test.
A real daemon with one real service answers over its socket; see the script's docstring
for what is sent and what is checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from conftest import iris_config, predict
from daemon.testing import REPO

FUZZ = str(REPO / "scripts" / "fuzz.py")


def run_fuzz(home: Path, *args: str) -> dict[str, Any]:
    """Run scripts/fuzz.py as a program against the daemon of ``home``; its JSON report."""
    proc = subprocess.run([sys.executable, FUZZ, "--home", str(home), *args], capture_output=True, text=True, timeout=600)
    assert proc.stdout, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


def run_in_fuzzer(home: Path, code: str) -> str:
    """Run ``code`` in a child process with the fuzzer's names (``fz``) loaded from the script
    (the tests themselves import nothing from scripts/); its stdout."""
    snippet = f"import runpy, sys\nfz = runpy.run_path({FUZZ!r})\nhome = {str(home)!r}\n" + textwrap.dedent(code)
    proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout

COUNT = 10_000
SETOSA = [[5.0, 3.4, 1.5, 0.2]]


@pytest.mark.slow
@pytest.mark.long
def test_fuzz_every_route(client, home, capsys):
    svc = client.deploy(iris_config(model_name="fz"), timeout=60)
    report = run_fuzz(home, "--count", str(COUNT), "--seed", "20261123")  # aims at the service it finds: svc
    with capsys.disabled():
        print(f"\nfuzz: {report['inputs']} inputs in {report['seconds']}s, {len(report['failures'])} failures; "
              f"by kind {report['by_kind']}")
    assert report["failures"] == [], json.dumps(report["failures"], indent=1, ensure_ascii=False)
    assert report["inputs"] >= COUNT
    assert len(report["by_route"]) >= 9  # every route of the API's table, each named
    for route, n in report["by_route"].items():
        assert n >= 300, f"{route} got only {n} inputs"
    for kind in ("malformed-json", "wrong-type", "unknown-field", "huge-body", "huge-declared", "bad-uuid", "garbage"):
        assert report["by_kind"].get(kind, 0) >= 10, (kind, report["by_kind"])

    # The service the fuzzer aimed bad stops, starts and deletes at is untouched and serves.
    after = client.get(svc.uuid)
    assert (after.status.state, after.status.pid, after.version) == (svc.status.state, svc.status.pid, svc.version)
    assert predict(after.endpoint.prediction_url, SETOSA) == (200, {"predictions": ["setosa"]})


@pytest.mark.slow  # (5 s or more on 2 cores: out of the fast subset)
def test_the_fuzzer_catches_a_mistake(client, home):
    """The checks can fail: a request that succeeds, and one that changes the home, are reported."""
    client.daemon_info()
    out = run_in_fuzzer(home, """
        good = fz["Case"]("probe", fz["request"]("GET", "/v1/daemon"), [], ())
        conn = fz["UnixHTTP"](home + "/modeld.sock", timeout=10.0)
        print(fz["check"](good, conn.exchange(good.raw)))
        conn.close()
    """)
    assert "not a 4xx" in out
    before = run_in_fuzzer(home, "print(repr(fz['snapshot'](fz['Path'](home))))")
    client.deploy(iris_config(model_name="changed"), timeout=60)
    changes = run_in_fuzzer(home, f"print('\\n'.join(fz['diff']({before.strip()}, fz['snapshot'](fz['Path'](home)))))")
    assert any(line.startswith("new: services/") for line in changes.splitlines())


CONFIGS = 200  # most of the generator's table: ~15 s on this project's 2-core machine


@pytest.mark.slow
@pytest.mark.long
def test_fuzz_configs_accepted_ones_run_and_survive_a_restart(client, home, capsys):
    """Plausible configs (one field of a good one changed): no 5xx; a refusal names the field and
    leaves nothing; an accepted config serves, and is listed the same after a daemon restart."""
    client.daemon_info()
    report = run_fuzz(home, "--count", "0", "--configs", str(CONFIGS), "--seed", "20261124")["configs"]
    with capsys.disabled():
        print(f"\nfuzz configs: {report['inputs']} configs in {report['seconds']}s, {report['accepted']} accepted "
              f"({report['accepted_fraction']:.0%}), statuses {report['statuses']}, {len(report['failures'])} failures")
    assert report["failures"] == [], json.dumps(report["failures"], indent=1, ensure_ascii=False)
    assert report["inputs"] == CONFIGS
    assert not any(status.startswith("5") for status in report["statuses"]), report["statuses"]
    assert report["accepted_fraction"] >= 0.2, report
    # Every field of ServiceConfig (and of its restart policy) was fuzzed, and most were also accepted.
    from daemon import ServiceConfig
    from daemon.config import RestartPolicy

    fields = {*ServiceConfig.model_fields, *(f"restart.{name}" for name in RestartPolicy.model_fields)} - {"restart"}
    assert fields <= set(report["by_field"]), sorted(fields - set(report["by_field"]))
    assert len(report["accepted_by_field"]) >= 20, report["accepted_by_field"]
    for field in ("host", "env", "command", "restart.backoff_max", "startup_timeout", "stop_timeout", "request.timeout"):
        assert report["accepted_by_field"].get(field), (field, report["accepted_by_field"])


def test_the_config_fuzzer_catches_a_5xx(client, home):
    """A config the daemon cannot run but accepts (here: a server that exits at once) is a failure."""
    client.daemon_info()

    out = run_in_fuzzer(home, """
        import json
        class Failing(fz["ConfigGenerator"]):
            def _table(self):
                return [fz["Mutation"]("command", lambda g: [sys.executable, "-c", "raise SystemExit(3)"], "command")]
        fz["fuzz_configs"].__globals__["ConfigGenerator"] = Failing
        print(json.dumps(fz["fuzz_configs"](fz["Path"](home), 1, seed=1, restart=False)))
    """)
    report = json.loads(out.splitlines()[-1])
    assert report["statuses"] == {"500": 1}
    assert report["failures"] and "status 500" in report["failures"][0]["problem"]
