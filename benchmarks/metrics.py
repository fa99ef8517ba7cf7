"""``make bench-metrics``: what one scrape of an HKD's /metrics costs with many VMs.

    python -m benchmarks.metrics [--vms 100] [--scrapes 15]

One HKD on its own PostgreSQL (``tools/fleet.py``), ``vm.start.mount_only=1`` with
qvdfs roots, so each running VM has its own qvdfs daemon for the scrape to ask. Measured
over loopback in the node's namespace: the wall time of a scrape (median and worst of
``--scrapes``), the HKD's CPU time per scrape (from /proc), and the text's size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from benchmarks.fleet import _add_vms, bench_fleet, print_figures

LISTEN = "127.0.0.1:9640"
# Runs inside the node's namespace: one process, so the figures are the scrapes alone.
SCRAPER = """
import json, sys, time, urllib.request
times, size = [], 0
for _ in range(int(sys.argv[1])):
    t = time.perf_counter()
    size = len(urllib.request.urlopen("http://%s/metrics", timeout=60).read())
    times.append(time.perf_counter() - t)
print(json.dumps({"times": times, "size": size}))
""" % LISTEN


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(vms: int, scrapes: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    with bench_fleet(("n00",), "qvd-metrics-bench-") as (fleet, _server, url):
        fleet.admin.run("config", "set", "vm.lxc.unionfs.type=qvdfs",
                        f"hkd.metrics.listen={LISTEN}")
        _add_vms(url, vms)
        fleet.start()
        fleet.admin.run("vm", "start", "-f", "name=*", timeout=1200)
        node = fleet.nodes["n00"]
        figures["running"] = len(node.mounts())
        assert node.proc is not None
        cpu = _cpu_s(node.proc.pid)
        done = node.in_ns(sys.executable, "-c", SCRAPER, str(scrapes))
        if done.returncode != 0:
            raise SystemExit(f"scraping failed: {done.stderr}")
        figures["hkd_cpu_per_scrape_ms"] = (_cpu_s(node.proc.pid) - cpu) / scrapes * 1000
        result = json.loads(done.stdout)
        figures["scrape_median_ms"] = statistics.median(result["times"]) * 1000
        figures["scrape_max_ms"] = max(result["times"]) * 1000
        figures["text_kib"] = result["size"] / 1024
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=100)
    parser.add_argument("--scrapes", type=int, default=15)
    ns = parser.parse_args()
    print_figures(f"metrics: one HKD, {ns.vms} VMs (vm.start.mount_only=1, qvdfs roots), "
                  f"{ns.scrapes} scrapes", run(ns.vms, ns.scrapes))


if __name__ == "__main__":
    main()
