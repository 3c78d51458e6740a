"""What the daemon carries: no TLS library (it speaks HTTP on a Unix socket only). OpenSSL came in
unasked through ``secrets`` (hmac, hashlib), uvicorn's WebSocket support and ``hashlib``: ~3.6 MiB
of the daemon's RSS target of 40."""

from pathlib import Path

from conftest import iris_config
from daemon.testing import UnixHTTP


def test_the_daemon_maps_no_tls_library_after_a_deploy_a_scrape_and_an_event_stream(client, home):
    client.deploy(iris_config(), replace=False, timeout=60)
    http = UnixHTTP(str(client.paths.socket))
    try:
        assert b"modeld_service_up" in http.get("/metrics")
        assert b'"deployed"' in http.get("/v1/events?since=0&follow=false")
    finally:
        http.close()
    pid = client.daemon_info()["pid"]
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "libcrypto" not in maps and "libssl" not in maps, [
        line for line in maps.splitlines() if "ssl" in line or "crypto" in line
    ]
