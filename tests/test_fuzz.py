"""Bad input on the control socket: 10,000 fuzzed requests and garbage, every one refused cleanly.

The fuzzer is ``scripts/fuzz.py`` (run it alone for other counts and seeds); it takes the
routes from ``daemon.api.Api``'s table, so a new route is fuzzed without touching this test.
A real daemon with one real service answers over its socket; see the script's docstring
for what is sent and what is checked.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from conftest import REPO, iris_config, predict

spec = importlib.util.spec_from_file_location("modeld_fuzz", REPO / "scripts" / "fuzz.py")
assert spec is not None and spec.loader is not None
fuzz = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = fuzz  # dataclasses look their module up there
spec.loader.exec_module(fuzz)

COUNT = 10_000
SETOSA = [[5.0, 3.4, 1.5, 0.2]]


@pytest.mark.slow
def test_fuzz_every_route(client, home, capsys):
    svc = client.deploy(iris_config(model_name="fz"), timeout=60)
    report = fuzz.fuzz(home, COUNT, seed=20261123, real_uuids=[str(svc.uuid)])
    with capsys.disabled():
        print(f"\nfuzz: {report['inputs']} inputs in {report['seconds']}s, {len(report['failures'])} failures; "
              f"by kind {report['by_kind']}")
    assert report["failures"] == [], json.dumps(report["failures"], indent=1, ensure_ascii=False)
    assert report["inputs"] >= COUNT
    routes = {f"{method} {template}" for method, template, _ in fuzz.route_table()}
    assert set(report["by_route"]) == routes and len(routes) >= 9
    for route, n in report["by_route"].items():
        assert n >= 300, f"{route} got only {n} inputs"
    for kind in ("malformed-json", "wrong-type", "unknown-field", "huge-body", "huge-declared", "bad-uuid", "garbage"):
        assert report["by_kind"].get(kind, 0) >= 10, (kind, report["by_kind"])

    # The service the fuzzer aimed bad stops, starts and deletes at is untouched and serves.
    after = client.get(svc.uuid)
    assert (after.status.state, after.status.pid, after.version) == (svc.status.state, svc.status.pid, svc.version)
    assert predict(after.endpoint.prediction_url, SETOSA) == (200, {"predictions": ["setosa"]})


def test_the_fuzzer_catches_a_mistake(client, home):
    """The checks can fail: a request that succeeds, and one that changes the home, are reported."""
    good = fuzz.Case("probe", fuzz.request("GET", "/v1/daemon"), [], ())
    conn = fuzz.Conn(str(home / "modeld.sock"))
    client.daemon_info()
    try:
        assert "not a 4xx" in (fuzz.check(good, conn.exchange(good.raw)) or "")
    finally:
        conn.close()
    before = fuzz.snapshot(home)
    client.deploy(iris_config(model_name="changed"), timeout=60)
    assert any(line.startswith("new: services/") for line in fuzz.diff(before, fuzz.snapshot(home)))


CONFIGS = 200  # most of the generator's table: ~15 s on this project's 2-core machine


def test_fuzz_configs_accepted_ones_run_and_survive_a_restart(client, home, capsys):
    """Plausible configs (one field of a good one changed): no 5xx; a refusal names the field and
    leaves nothing; an accepted config serves, and is listed the same after a daemon restart."""
    client.daemon_info()
    report = fuzz.fuzz_configs(home, CONFIGS, seed=20261124)
    with capsys.disabled():
        print(f"\nfuzz configs: {report['inputs']} configs in {report['seconds']}s, {report['accepted']} accepted "
              f"({report['accepted_fraction']:.0%}), statuses {report['statuses']}, {len(report['failures'])} failures")
    assert report["failures"] == [], json.dumps(report["failures"], indent=1, ensure_ascii=False)
    assert report["inputs"] == CONFIGS
    assert not any(status.startswith("5") for status in report["statuses"]), report["statuses"]
    assert report["accepted_fraction"] >= 0.2, report
    # Every field of ServiceConfig (and of its restart policy) was fuzzed, and most were also accepted.
    from daemon import ServiceConfig
    from daemon.models import RestartPolicy

    fields = {*ServiceConfig.model_fields, *(f"restart.{name}" for name in RestartPolicy.model_fields)} - {"restart"}
    assert fields <= set(report["by_field"]), sorted(fields - set(report["by_field"]))
    assert len(report["accepted_by_field"]) >= 20, report["accepted_by_field"]
    for field in ("host", "env", "command", "restart.backoff_max", "startup_timeout", "stop_timeout", "request.timeout"):
        assert report["accepted_by_field"].get(field), (field, report["accepted_by_field"])


def test_the_config_fuzzer_catches_a_5xx(client, home):
    """A config the daemon cannot run but accepts (here: a server that exits at once) is a failure."""
    client.daemon_info()

    class Failing(fuzz.ConfigGenerator):
        def _table(self):
            return [fuzz.Mutation("command", lambda g: [sys.executable, "-c", "raise SystemExit(3)"], "command")]

    original = fuzz.ConfigGenerator
    fuzz.ConfigGenerator = Failing
    try:
        report = fuzz.fuzz_configs(home, 1, seed=1, restart=False)
    finally:
        fuzz.ConfigGenerator = original
    assert report["statuses"] == {"500": 1}
    assert report["failures"] and "status 500" in report["failures"][0]["problem"]
