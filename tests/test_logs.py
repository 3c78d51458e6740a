"""service.log is capped: past MODELD_LOG_MAX_BYTES it is rotated to service.log.1 and truncated."""

from __future__ import annotations

from conftest import predict, wait_for
from daemon import ServiceConfig

CHATTY = '''
def model(instances):
    print("x" * 500, flush=True)
    return [len(str(i)) for i in instances]
'''


def test_log_is_rotated_past_its_cap(client, home, tmp_path, monkeypatch):
    monkeypatch.setenv("MODELD_LOG_MAX_BYTES", "4000")
    monkeypatch.setenv("MODELD_HEALTH_INTERVAL", "0.1")
    (tmp_path / "chatty.py").write_text(CHATTY)
    svc = client.deploy(ServiceConfig(model_name="chatty", model_uri=str(tmp_path / "chatty.py") + ":model"), timeout=60)
    log = home / "services" / str(svc.uuid) / "service.log"
    for _ in range(20):
        assert predict(svc.endpoint.prediction_url, [1])[0] == 200
    wait_for(lambda: log.with_name("service.log.1").exists(), timeout=10, what="service.log.1")
    assert log.with_name("service.log.1").stat().st_size > 4000
    wait_for(lambda: log.stat().st_size <= 4000, timeout=10, what="service.log truncated")
    # The server keeps appending to the truncated file, and the log route still serves it.
    assert predict(svc.endpoint.prediction_url, [1])[0] == 200
    wait_for(lambda: "xxxx" in "".join(client.logs(svc.uuid, tail=5)), timeout=5, what="new log lines")
