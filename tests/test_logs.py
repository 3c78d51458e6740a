"""service.log is capped: past the service's ``log_max_bytes`` it is rotated to service.log.1 (built-in server)."""

from __future__ import annotations

from conftest import predict
from daemon import ServiceConfig
from daemon.testing import wait_for

CHATTY = '''
def model(instances):
    print("x" * 500, flush=True)
    return [len(str(i)) for i in instances]
'''


def test_log_of_a_builtin_server_is_rotated_past_its_cap(client, home, tmp_path):
    (tmp_path / "chatty.py").write_text(CHATTY)
    svc = client.deploy(ServiceConfig(model_name="chatty", model_uri=str(tmp_path / "chatty.py") + ":model",
                                      log_max_bytes=4096, log_backups=1), timeout=60)
    log = home / "services" / str(svc.uuid) / "service.log"
    for _ in range(30):
        assert predict(svc.endpoint.prediction_url, [1])[0] == 200
    # (30 s: the lines pass through the log writer, a process of its own, which a loaded machine may
    # leave waiting; 10 s ran out once in CI with a Ray head starting on the same two cores)
    wait_for(lambda: log.with_name("service.log.1").exists(), timeout=30, what="service.log.1")
    assert 4096 <= log.with_name("service.log.1").stat().st_size <= 4096 + 64 * 1024
    assert not log.with_name("service.log.2").exists()  # log_backups=1
    # The server goes on writing to the new file, and the log route still serves it.
    assert predict(svc.endpoint.prediction_url, [1])[0] == 200
    wait_for(lambda: "xxxx" in "".join(client.logs(svc.uuid, tail=5)), timeout=5, what="new log lines")
