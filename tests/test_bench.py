"""scripts/bench.py runs in --quick mode and emits every figure (no timing is asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from daemon.testing import REPO

FIGURES = (
    "cold_floor_ms", "deploy_ms", "uds_floor_us", "find_one_us", "list_all_ms", "stop_ms", "crash_recover_ms",
    "readopt_ms", "readopt_restarted", "daemon_rss_mb", "daemon_idle_cpu_pct", "replace_failed_requests",
    "replace_latency_ms", "replace_requests", "deploy_over_floor", "find_over_uds_floor", "targets", "setup",
    "gateway_overhead_us", "gateway_rps_ratio", "stream_first_byte_over_direct_ms", "gateway_rss_mb", "gateway_idle_cpu_pct",
    "apply_noop_ms", "apply_noop_client_cpu_ms",
)


@pytest.mark.slow
@pytest.mark.long
def test_quick_bench_emits_every_figure() -> None:
    # Small counts keep it to seconds; --quick with its defaults is what the README documents.
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--quick", "--runs", "2", "--live", "3", "--registered", "50", "--idle", "0.5"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    missing = [key for key in FIGURES if key not in result]
    assert not missing, f"missing figures: {missing}"
    for key in ("cold_floor_ms", "deploy_ms", "find_one_us", "list_all_ms", "stop_ms", "crash_recover_ms", "replace_latency_ms"):
        assert result[key]["p50"] > 0 and result[key]["p99"] >= result[key]["p50"], key
    assert result["readopt_restarted"] == 0  # re-adoption never restarts a live server
    assert result["replace_requests"] > 0
    assert set(result["targets"]) >= {"deploy_ms", "find_one_us", "list_all_ms", "stop_ms", "readopt_ms"}
    assert "cold_floor_ms" in proc.stderr  # the readable table
