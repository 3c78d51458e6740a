"""The ray flavor beside Ray Serve's own serve.run, measured in one run on a local head; prints one JSON object.

    python scripts/bench_ray.py [--runs N] [--records N] [--redeploy N]

A readable table goes to stderr; the JSON object to stdout. It starts its own head (tests/rayhead.py:
``ray start --head`` in a short temp dir, free ports, no dashboard, 2 CPUs) and stops it by its pids.

| figure                 | how                                                                                  |
|------------------------|--------------------------------------------------------------------------------------|
| deploy_s               | ``deploy_model`` of examples/iris.py until its PREDICTION_URL answers 200 (new service each run) |
| serve_run_s            | bare ``serve.run`` of the same replica class and options from the same connected driver, until |
|                        | the same URL form answers 200; alternated with deploy_s, run for run                  |
| deploy_ratio           | deploy_s p50 / serve_run_s p50 (target <= 1.1)                                        |
| replace_*              | ``deploy_model(replace=True)`` to examples/iris_v2.py while 4 clients post as fast as they can: |
|                        | failed requests (target 0), the call's seconds, the slowest request's seconds         |
| list_ms, find_one_ms   | ``find_model_server()`` over N records (warm: the records cache), and with one filter matching one |
| list_cold_ms           | the first list of a new deployer (every record parsed)                                |
| new_head_s             | ``ray start --head`` again (same ports) until it is up                                |
| redeploy_all_s         | then ``redeploy_all`` of M services until it returns with all of them answering 200   |
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from daemon import ServiceConfig  # noqa: E402
from deployers.ray.deployer import RayServeModelDeployer  # noqa: E402
from deployers.ray.flavor import RayServeModelDeployerConfig  # noqa: E402
from deployers.ray.records import RayModelService  # noqa: E402
from tests.rayhead import Head  # noqa: E402

IRIS = f"{REPO}/examples/iris.py:model"
IRIS_V2 = f"{REPO}/examples/iris_v2.py:model"
BODY = json.dumps({"instances": [[5.1, 3.5, 1.4, 0.2]]}).encode()


def post(url: str, timeout: float = 30) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, BODY), timeout=timeout) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def until_200(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while post(url, 10) != 200:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not answering 200 after {timeout}s")
        time.sleep(0.01)


def summary(values: list[float], scale: float = 1.0) -> dict[str, float]:
    ordered = sorted(v * scale for v in values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(ordered), 3), "p99": round(p99, 3), "n": len(ordered)}


def bare_serve_run(name: str, proxy_port: int) -> str:
    """What a Ray user writes: the same replica class and options, ``serve.run`` from this driver."""
    from ray import serve

    from deployers.ray.replica import ModelReplica

    app = serve.deployment(ModelReplica, name="model", ray_actor_options={"num_cpus": 0.1}, graceful_shutdown_wait_loop_s=0.2)
    serve.run(app.bind("iris", IRIS, "python", str(REPO)), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{proxy_port}/{name}/v1/models/iris:predict"


def deploy_runs(dep: RayServeModelDeployer, runs: int) -> dict[str, list[float]]:
    from ray import serve

    figures: dict[str, list[float]] = {"deploy_s": [], "serve_run_s": []}
    for i in range(runs):
        for which in ("flavor", "bare") if i % 2 == 0 else ("bare", "flavor"):
            start = time.perf_counter()
            if which == "flavor":
                svc = dep.deploy_model(ServiceConfig(model_name="iris", model_uri=IRIS, pipeline_name=f"bench{i}"), timeout=120)
                until_200(svc.prediction_url)
                figures["deploy_s"].append(time.perf_counter() - start)
                dep.delete_model_server(svc.uuid, timeout=60)
            else:
                url = bare_serve_run(f"bare{i}", dep.config.proxy_port)
                until_200(url)
                figures["serve_run_s"].append(time.perf_counter() - start)
                serve.delete(f"bare{i}")
    return figures


def replace_run(dep: RayServeModelDeployer) -> dict[str, Any]:
    svc = dep.deploy_model(ServiceConfig(model_name="iris", model_uri=IRIS, pipeline_name="replace"), timeout=120)
    until_200(svc.prediction_url)
    results: list[tuple[int, float]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            start = time.perf_counter()
            status = post(svc.prediction_url, 60)
            results.append((status, time.perf_counter() - start))

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    time.sleep(0.5)
    start = time.perf_counter()
    dep.deploy_model(ServiceConfig(model_name="iris", model_uri=IRIS_V2, pipeline_name="replace"), replace=True, timeout=120)
    took = time.perf_counter() - start
    time.sleep(0.5)
    stop.set()
    for w in workers:
        w.join(60)
    dep.delete_model_server(svc.uuid, timeout=60)
    return {
        "replace_failed": sum(1 for status, _ in results if status != 200),
        "replace_requests": len(results),
        "replace_s": round(took, 3),
        "replace_slowest_request_s": round(max(s for _, s in results), 3),
    }


def record_runs(records: int, runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="rb-") as home:
        config = RayServeModelDeployerConfig(address="127.0.0.1:1", home=home)  # never connects: find reads the records
        dep = RayServeModelDeployer(config, name="bench")
        for i in range(records):
            dep.records.write(RayModelService(config=ServiceConfig(model_name=f"m{i}", model_uri=IRIS, pipeline_name=f"p{i}")))
        cold = RayServeModelDeployer(config, name="bench")
        start = time.perf_counter()
        assert len(cold.find_model_server()) == records
        cold_ms = (time.perf_counter() - start) * 1000
        figures: dict[str, list[float]] = {"list_ms": [], "find_one_ms": []}
        for _ in range(max(runs, 20)):
            start = time.perf_counter()
            assert len(cold.find_model_server()) == records
            figures["list_ms"].append(time.perf_counter() - start)
            start = time.perf_counter()
            assert len(cold.find_model_server(pipeline_name="p7")) == 1
            figures["find_one_ms"].append(time.perf_counter() - start)
    return {"records": records, "list_cold_ms": round(cold_ms, 1), **{k: summary(v, 1000) for k, v in figures.items()}}


def redeploy_run(dep: RayServeModelDeployer, head: Head, count: int) -> dict[str, Any]:
    services = [
        dep.deploy_model(ServiceConfig(model_name=f"r{i}", model_uri=IRIS, pipeline_name="redeploy"), timeout=120)
        for i in range(count)
    ]
    dep.disconnect()
    head.stop()
    start = time.perf_counter()
    head.start()
    new_head = time.perf_counter() - start
    start = time.perf_counter()
    back = dep.redeploy_all(timeout=300)
    for svc in services:
        until_200(svc.prediction_url)
    took = time.perf_counter() - start
    assert {s.uuid for s in back} >= {s.uuid for s in services}
    return {"new_head_s": round(new_head, 2), "redeploy_all_s": round(took, 2), "redeployed": len(services)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="deploys of each kind, alternated (default 5)")
    parser.add_argument("--records", type=int, default=1000, help="records for find and list (default 1000)")
    parser.add_argument("--redeploy", type=int, default=3, help="services redeployed on the new head (default 3)")
    args = parser.parse_args()
    head = Head().start()
    result: dict[str, Any] = {"ray": __import__("ray").__version__, "runs": args.runs}
    try:
        with tempfile.TemporaryDirectory(prefix="rb-") as home:
            dep = RayServeModelDeployer(
                RayServeModelDeployerConfig(address=head.address, home=home, proxy_port=head.proxy_port), name="bench"
            )
            warm = dep.deploy_model(ServiceConfig(model_name="iris", model_uri=IRIS, pipeline_name="warm"), timeout=180)
            dep.delete_model_server(warm.uuid, timeout=60)  # connected, Serve started: both sides from a connected driver
            figures = deploy_runs(dep, args.runs)
            result.update({k: summary(v) for k, v in figures.items()})
            result["deploy_ratio"] = round(result["deploy_s"]["p50"] / result["serve_run_s"]["p50"], 3)
            result.update(replace_run(dep))
            result.update(record_runs(args.records, args.runs))
            result.update(redeploy_run(dep, head, args.redeploy))
            dep.disconnect()
    finally:
        head.stop()
        head.remove()
    for key, value in result.items():
        print(f"{key:28} {value}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
