"""The apply figure (issue 13), run by ``scripts/bench.py`` over its live servers, or alone.

| figure          | how                                                                                   |
|-----------------|---------------------------------------------------------------------------------------|
| apply_noop_ms   | ``DaemonClient.apply`` of a file that describes the live services as they are (written |
|                 | as a user would: no python, working_dir or port), from reading the file to the report |
|                 | (every service ``unchanged``); one kept-alive client, p50 and p99 over the runs        |
| apply_noop_client_cpu_ms | the CPU time of the applying process in those runs (the file, the plan; not the daemon's find) |

Alone: ``python scripts/bench_apply.py [--live N] [--runs N]`` deploys N cheap built-in servers in a
temp home of its own (default 100), measures, and deletes them; prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from daemon import DaemonClient, ServiceConfig
from daemon.testing import reap_home

MODEL = "def model(instances):\n    return instances\n"


def live_config(folder: Path, i: int) -> ServiceConfig:
    """What scripts/bench.py deploys as its live servers (deploy_live)."""
    return ServiceConfig(model_name=f"live{i}", model_uri=f"{folder}/m.py:model", pipeline_name="bench")


def apply_file(folder: Path, count: int) -> Path:
    """The file of ``count`` services named as ``live_config``'s (services without a name count by their model name)."""
    lines = ["# the bench's live services, as they run"]
    for i in range(count):
        lines += [f"[services.live{i}]", f'model_uri = "{folder}/m.py:model"', 'pipeline_name = "bench"', ""]
    path = folder / "live.toml"
    path.write_text("\n".join(lines))
    return path


def apply_noop_runs(client: DaemonClient, folder: Path, count: int, runs: int, summary: Callable[..., Any]) -> dict[str, Any]:
    """``apply_noop_ms`` over the ``count`` live services of ``client``'s daemon (they must run, unchanged)."""
    path = apply_file(folder, count)
    pids = {str(s.uuid): s.status.pid for s in client.find()}
    times: list[float] = []
    cpu: list[float] = []
    for _ in range(runs):
        started, cpu0 = time.perf_counter(), time.process_time()
        report = client.apply(path)
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu0)
        actions = {s.action for s in report.steps}
        if actions != {"unchanged"} or len(report.steps) != count:
            raise RuntimeError(f"apply of the unchanged file was not a no-op: {report.model_dump_json()[:500]}")
    after = {str(s.uuid): s.status.pid for s in client.find()}
    if after != pids:
        raise RuntimeError("apply of the unchanged file restarted a server")
    return {"apply_noop_ms": summary(times, 1000), "apply_noop_client_cpu_ms": summary(cpu, 1000), "apply_noop_services": count}


def _summary(values: list[float], scale: float) -> dict[str, float]:
    xs = sorted(v * scale for v in values)
    p99 = xs[min(len(xs) - 1, max(0, int(round(len(xs) * 0.99)) - 1))]
    return {"p50": round(statistics.median(xs), 1), "p99": round(p99, 1), "n": len(xs)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--live", type=int, default=100, help="live servers (default 100)")
    parser.add_argument("--runs", type=int, default=20, help="applies measured (default 20)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="mba", dir="/tmp"))
    home = folder / "h"
    os.environ["MODELD_HOME"] = str(home)
    os.environ.setdefault("MODELD_GATEWAY", "off")
    (folder / "m.py").write_text(MODEL)
    try:
        with DaemonClient(home=home) as client:
            client.daemon_info()
            print(f"bench: deploying {args.live} live servers", file=sys.stderr, flush=True)

            def one(i: int) -> None:
                with DaemonClient(home=home) as c:
                    c.deploy(live_config(folder, i), timeout=120)

            with ThreadPoolExecutor(4) as pool:
                list(pool.map(one, range(args.live)))
            result = apply_noop_runs(client, folder, args.live, args.runs, _summary)
            client.shutdown(stop_services=True)
    finally:
        with contextlib.suppress(Exception):
            DaemonClient(home=home, auto_start=False, timeout=30).shutdown(stop_services=True)
        reap_home(home)
        shutil.rmtree(folder, ignore_errors=True)
    met = result["apply_noop_ms"]["p50"] <= 50
    print(f"apply_noop_ms p50 {result['apply_noop_ms']['p50']} p99 {result['apply_noop_ms']['p99']} "
          f"({'ok' if met else 'MISS'} p50 <= 50 ms)", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
