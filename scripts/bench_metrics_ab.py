"""A/B of the daemon's cost of GET /metrics (issue 14), on one home of live servers that each tree's
daemon re-adopts in turn, so two versions of the code are compared on the same servers, minutes apart.

    PYTHONPATH=TREE python scripts/bench_metrics_ab.py setup FOLDER N     # N live servers in FOLDER/h
    PYTHONPATH=TREE python scripts/bench_metrics_ab.py measure FOLDER [S] # one line of JSON
    PYTHONPATH=TREE python scripts/bench_metrics_ab.py teardown FOLDER

``measure`` restarts the daemon from TREE (the client's own ``daemon`` package: PYTHONPATH), waits
for every server, 3 s, then times 30 scrapes back to back (p50/p90, and the daemon's CPU per scrape),
then, with one client streaming events (bench_events.EventWatch) and one scraping every second as
scripts/bench.py's idle windows do, the daemon's RSS and CPU over S seconds (default 10), with its
anonymous memory (smaps_rollup) and thread count. NOSCRAPE=1: the idle window without the scraper.
Alternate trees (A B A B ...) on a shared machine; a checkout of the other tree: git archive.
"""
import json, os, sys, statistics, threading, time
from pathlib import Path
tree = os.environ["PYTHONPATH"].split(":")[0]
sys.path.insert(0, tree + "/scripts")
os.environ["MODELD_GATEWAY"] = ":0"
import bench, bench_apply, bench_events
from daemon import DaemonClient
from daemon.linux import ProcessIdentity
from daemon.testing import UnixHTTP

mode, folder = sys.argv[1], Path(sys.argv[2])
home = folder / "h"
os.environ["MODELD_HOME"] = str(home)
if mode == "setup":
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "m.py").write_text(bench.MODEL)
    reaper = bench.Reaper()
    bench.deploy_live(home, folder, int(sys.argv[3]), reaper)
    print("deployed", len(DaemonClient(home=home).find(running=True)))
    sys.exit()
if mode == "teardown":
    DaemonClient(home=home, auto_start=False, timeout=60).shutdown(stop_services=True)
    sys.exit()
idle = float(sys.argv[3]) if len(sys.argv) > 3 else 10.0
noscrape = os.environ.get("NOSCRAPE")
if noscrape: bench.scrape_every_second = lambda sock, stop: None
client = DaemonClient(home=home)
n = len(client.find(running=True))
old = client.daemon_info()["pid"]
ident = ProcessIdentity.of(old)
client.shutdown(stop_services=False)
bench.poll(lambda: ident is None or not ident.is_alive(), what="exit")
while len(client.find(running=True)) < n:
    time.sleep(0.05)
pid = client.daemon_info()["pid"]
env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
assert any(e.startswith(b"PYTHONPATH=" + tree.encode()) for e in env), env
client.close()
time.sleep(3)
sock = str(client.paths.socket)
c0 = bench.cpu_seconds(pid)
times = bench.metrics_runs(sock, 30) if not noscrape else [0.0] * 30
cpu_per_scrape = (bench.cpu_seconds(pid) - c0) / 33
watch = bench_events.EventWatch(home)
time.sleep(1.5)
rss, cpu = bench.idle_daemon(client, idle)
roll = {l.split(":")[0]: int(l.split()[1]) for l in open(f"/proc/{pid}/smaps_rollup") if l.split()[-1] == "kB"}
threads = len(os.listdir(f"/proc/{pid}/task"))
q = statistics.quantiles(times, n=100)
print(json.dumps({"tree": tree, "p50_ms": round(statistics.median(times) * 1000, 2), "p90_ms": round(q[89] * 1000, 2),
                  "scrape_cpu_ms": round(cpu_per_scrape * 1000, 2), "rss_mb": round(rss, 2), "idle_cpu_pct": round(cpu, 2),
                  "anon_kb": roll.get("Anonymous"), "threads": threads, "events": watch.count,
                  "load": os.getloadavg()[0]}))
os._exit(0)
