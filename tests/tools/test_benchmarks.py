"""Smoke test of the benchmark harness itself (not of any filesystem's speed).

Runs ``python -m benchmarks.run`` for real on a tiny fixture, one repetition, two cheap
workloads, against the plain directory and kernel overlayfs, and checks that it writes a JSON
report, a Markdown table and a PNG chart with sane numbers, and leaves no mount behind; runs the
page-cache and per-request rows the same way on every target installed here; and checks the
goals, the comparison with kernel overlayfs and qvdfs' counters table on made-up samples.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pyroute2 import netns

from benchmarks import realimage, report, targets, workloads
from qvdproc.mountinfo import mounts_under
from tests.support import REPO

WORKLOAD_METRICS = {"stat-cold", "stat-warm", "smallfiles-create", "smallfiles-delete"}


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "benchmarks.run", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=50)


@pytest.mark.timeout(60)
def test_tiny_run_writes_json_table_and_chart(tmp_path: Path) -> None:
    cache, out = tmp_path / "cache", tmp_path / "out"
    done = _bench("--fixture", "tiny", "--reps", "1", "--only", "stat,smallfiles",
                  "--targets", "plain,kernel-overlay", "--cache", str(cache), "--out", str(out))
    assert done.returncode == 0, done.stderr

    data = json.loads((out / "latest.json").read_text())
    assert data["targets"] == ["plain", "kernel-overlay"]
    assert data["skipped"] == {} and data["errors"] == {}
    assert data["baseline"] == "plain"  # unionfs-fuse left out, so the first target
    assert set(data["metrics"]) == WORKLOAD_METRICS | {"mount-time", "unmount-time"}
    for name in WORKLOAD_METRICS:
        per_target = data["metrics"][name]["targets"]
        assert set(per_target) == {"plain", "kernel-overlay"}
        for figures in per_target.values():
            assert len(figures["samples"]) == 1
            # Real timings of a few hundred files: positive and far below a minute.
            assert 0 < figures["median"] < 30
            assert figures["ratio"] > 0
        assert per_target["plain"]["ratio"] == 1.0
    # Only a real mount has mount and unmount times; the plain directory has none.
    for name in ("mount-time", "unmount-time"):
        assert set(data["metrics"][name]["targets"]) == {"kernel-overlay"}
        assert 0 < data["metrics"][name]["targets"]["kernel-overlay"]["median"] < 5

    table = (out / "latest.md").read_text()
    assert "| metric | plain | kernel-overlay |" in table
    for name in WORKLOAD_METRICS:
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert row.count("×)") == 2
    assert "| metric | plain | kernel-overlay |" in done.stdout  # printed at the end too

    # A saved run prints the same table again.
    again = subprocess.run([sys.executable, "-m", "benchmarks.report", str(out / "latest.json")],
                           cwd=REPO, capture_output=True, text=True, timeout=30)
    assert again.returncode == 0, again.stderr
    assert again.stdout == table

    png = (out / "latest.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000

    assert mounts_under(tmp_path) == []
    assert not list(cache.glob("run-*")), "the run's scratch folder was left behind"
    lower = cache / "tiny-v1" / "lower"
    assert not list(lower.glob("bench-*")), "the plain run left its files in the fixture"


def test_unknown_workload_is_a_one_line_error(tmp_path: Path) -> None:
    done = _bench("--only", "stat,nosuch", "--cache", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "bench: unknown workload 'nosuch'; choose from " + ", ".join(workloads.BY_NAME)]
    assert os.listdir(tmp_path) == []  # nothing built, nothing mounted


def test_ratios_and_goals_from_samples() -> None:
    results = report.Results(
        targets=["unionfs-fuse", "qvdfs"],
        skipped={},
        samples={
            "unionfs-fuse": {"stat-warm": [0.9, 0.3, 0.6], "copyup": [1.0]},
            "qvdfs": {"stat-warm": [0.1, 0.15, 0.2], "copyup": [2.0], "daemon-rss": [50.0]},
        },
        errors={},
        meta={"reps": 3},
    )
    assert results.median("unionfs-fuse", "stat-warm") == 0.6
    assert results.ratio("qvdfs", "stat-warm") == pytest.approx(4.0)
    by_text = {g.text: g for g in report.goals(results)}
    assert by_text["stat-warm: ≥ 1× unionfs-fuse"].passed is True
    assert by_text["copyup: ≥ 1× unionfs-fuse"].passed is False  # half as fast
    assert by_text["daemon-rss: daemon RSS after the stat walk ≤ 20 MiB"].passed is False
    assert by_text["mount-time: mount time ≤ 50 ms"].passed is None  # not measured
    assert report.goal_marks(list(by_text.values())) == {
        "stat-warm": "met", "copyup": "MISSED", "daemon-rss": "MISSED"}


def test_real_image_unpack_goal_and_per_phase_opcode_table() -> None:
    def sample(target: str, rep: int, unpack: float, opcodes: dict) -> realimage.Sample:
        return realimage.Sample(target, rep, {"boot": 1.0, "dpkg": 1.0, "unpack": unpack,
                                              "stop": 0.1}, "running", [], opcodes)

    samples = [sample("kernel-overlay", 0, 1.0, {}), sample("kernel-overlay", 1, 1.0, {}),
               sample("qvdfs", 0, 2.0, {"unpack": {"CREATE": [100, 10_000_000]}}),
               sample("qvdfs", 1, 4.0, {"unpack": {"CREATE": [100, 30_000_000],
                                                   "LOOKUP": [50, 1_000_000]},
                                        "boot": {"IOCTL": [10, 100_000]}})]
    results = realimage.summarize(["kernel-overlay", "qvdfs"], samples, {}, {}, {},
                                  {"date": "d", "image": "i", "debs": [], "kernel": "k",
                                   "cpus": 2, "qvdfs_version": "v", "reps": 2,
                                   "interrupted": False})
    goals = {g["metric"]: g for g in results["goals"]}
    assert goals["unpack"]["ratio"] == pytest.approx(3.0) and goals["unpack"]["met"] is False
    text = realimage.markdown(results)
    # Per repetition: 200 CREATEs over 2 repetitions, 40 ms total, 200 µs each.
    assert "| CREATE | - | - | - | 100 | 200.0 | 20.0 |" in text
    assert "| IOCTL | 5 | 10.0 | 0.1 | - | - | - |" in text
    assert "unpack at most 1.3x kernel overlayfs: 3.00x, MISSED" in text


def test_goals_of_the_page_cache_per_request_and_data_rows() -> None:
    fast = {"seqread-warm": [0.10], "seqwrite": [1.0]}
    results = report.Results(
        targets=["kernel-overlay", "unionfs-fuse", "fuse-overlayfs", "qvdfs"],
        skipped={},
        samples={
            "kernel-overlay": {**fast, "pagecache-4mounts": [256.0], "getattr-latency": [2.0]},
            "unionfs-fuse": {"seqread-warm": [0.2], "seqwrite": [1.1],
                             "pagecache-4mounts": [1280.0], "getattr-daemon-cpu": [11.0]},
            "fuse-overlayfs": {"seqread-warm": [0.2], "seqwrite": [1.1],
                               "pagecache-4mounts": [1290.0], "getattr-daemon-cpu": [5.0]},
            "qvdfs": {"seqread-warm": [0.12], "seqwrite": [1.5], "pagecache-4mounts": [300.0],
                      "getattr-daemon-cpu": [24.0], "mount-time": [0.04]},
        },
        errors={},
        meta={"reps": 1},
    )
    checks = report.goals(results)
    by_text = {g.text: g for g in checks}
    # 0.10 / 0.12 of kernel overlayfs' speed, and 1.0 / 1.5.
    assert by_text["seqread-warm: ≥ 0.8× kernel overlayfs' speed"].value == pytest.approx(0.833,
                                                                                         abs=1e-3)
    assert by_text["seqread-warm: ≥ 0.8× kernel overlayfs' speed"].passed is True
    assert by_text["seqwrite: ≥ 0.8× kernel overlayfs' speed"].passed is False
    cache = by_text["pagecache-4mounts: page cache growth ≤ 1.25× kernel overlayfs'"]
    assert cache.value == pytest.approx(300 / 256) and cache.passed is True
    cpu = by_text["getattr-daemon-cpu: daemon CPU per GETATTR ≤ 20 µs "
                  "(unionfs-fuse 11 µs, fuse-overlayfs 5 µs)"]
    assert cpu.value == 24.0 and cpu.passed is False
    assert by_text["mount-time: mount time ≤ 50 ms"].passed is True
    # The new rows have goals of their own, not the "≥ unionfs-fuse" ones.
    assert not [g for g in checks if g.text.startswith(("pagecache-4mounts: ≥",
                                                        "getattr-daemon-cpu: ≥"))]

    table = report.markdown(results)
    row = next(line for line in table.splitlines() if line.startswith("| pagecache-4mounts |"))
    assert row.endswith("| met |")
    row = next(line for line in table.splitlines() if line.startswith("| getattr-daemon-cpu |"))
    assert "| – |" in row and "24 µs" in row and row.endswith("| MISSED |")
    assert "| pagecache-4mounts | 1.00× growth | 5.00× growth | 5.04× growth | 1.17× growth |" \
        in table
    assert "- MISSED: getattr-daemon-cpu: daemon CPU per GETATTR ≤ 20 µs" in table


def test_counters_table_and_round_trip(tmp_path: Path) -> None:
    def stats(getattr_count: int) -> dict[str, object]:
        return {"opcodes": {"GETATTR": {"count": getattr_count, "ns": 30_000_000},
                            "READ": {"count": 512, "ns": 90_000_000},
                            "LOOKUP": {"count": 3, "ns": 60_000},
                            "INIT": {"count": 1, "ns": 5_000}},
                "copy_ups": 0, "passthrough_opens": 4}

    results = report.Results(
        targets=["qvdfs"], skipped={},
        samples={"qvdfs": {"seqread-warm": [0.1], "getattr-daemon-cpu": [30.0]}}, errors={},
        meta={"reps": 2, "workloads": ["seqread", "getattr"]},
        notes={"qvdfs": {"getattr": ["only 50% of the 100 stats reached the daemon"]}},
        counters={"getattr": [stats(1000), stats(3000)], "seqread": [{"opcodes": "garbled"}]},
    )
    table = report.markdown(results)
    assert "| workload | copy-ups | passthrough opens | opcode count, total daemon time |" \
        in table
    # Medians over the repetitions, the costliest opcodes first; seqread's garbled stats
    # make no row.
    assert "| getattr | 0 | 4 | READ 512, 90 ms; GETATTR 2000, 30 ms; LOOKUP 3, 0.06 ms; " \
        "INIT 1, 0.005 ms |" in table
    assert "| seqread |" not in table
    assert "- qvdfs, getattr: only 50% of the 100 stats reached the daemon" in table
    row = next(line for line in table.splitlines() if line.startswith("| getattr-daemon-cpu |"))
    assert "30 µs (1.00×) (see the notes)" in row
    row = next(line for line in table.splitlines() if line.startswith("| seqread-warm |"))
    assert "(see the notes)" not in row
    path = tmp_path / "latest.json"
    path.write_text(json.dumps(report.to_json(results)))
    assert report.markdown(report.from_json(json.loads(path.read_text()))) == table
    # Without counters there is no such table.
    results.counters = {}
    assert "passthrough opens" not in report.markdown(results)


def test_daemon_counters_only_from_a_working_stats_command(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "qvdfs"
    mounted = targets.Mounted(targets.QVDFS_TARGET, tmp_path, None, 0.1, None)
    monkeypatch.setattr(targets, "QVDFS", str(fake))
    assert mounted.daemon_counters() is None  # no such command
    for script, expected in [
        ('echo \'{"opcodes": {"GETATTR": {"count": 2, "ns": 10}}}\'',
         {"opcodes": {"GETATTR": {"count": 2, "ns": 10}}}),
        ('echo "qvdfs: unknown option --json" >&2; exit 1', None),
        ("echo not json", None),
        ('echo \'{"copy_ups": 1}\'', None),
    ]:
        fake.write_text(f"#!/bin/sh\n[ \"$1 $2 $3\" = \"stats {tmp_path} --json\" ] || exit 9\n"
                        f"{script}\n")
        fake.chmod(0o755)
        assert mounted.daemon_counters() == expected, script
    other = targets.Mounted(targets.UNIONFS, tmp_path, None, 0.1, None)
    assert other.daemon_counters() is None


@pytest.mark.timeout(60)
def test_page_cache_and_per_request_rows_on_every_target(tmp_path: Path) -> None:
    cache, out = tmp_path / "cache", tmp_path / "out"
    done = _bench("--fixture", "tiny", "--reps", "1", "--only", "pagecache,getattr",
                  "--cache", str(cache), "--out", str(out))
    assert done.returncode == 0, done.stderr
    data = json.loads((out / "latest.json").read_text())
    ran = data["targets"]
    assert "plain" in ran and "kernel-overlay" in ran
    assert data["errors"] == {}
    # Every FUSE daemon was made to answer every GETATTR (else a note would say so).
    assert data["notes"] == {}
    daemons = [t for t in ran if targets.BY_NAME[t].kind == "fuse"]
    metrics = data["metrics"]
    assert set(metrics["pagecache-4mounts"]["targets"]) == set(ran)
    assert set(metrics["getattr-latency"]["targets"]) == set(ran)
    assert set(metrics["getattr-daemon-cpu"]["targets"]) == set(daemons)
    for name in ("pagecache-4mounts", "getattr-latency", "getattr-daemon-cpu"):
        for figures in metrics[name]["targets"].values():
            assert len(figures["samples"]) == 1
    for figures in metrics["getattr-latency"]["targets"].values():
        assert 0 < figures["median"] < 10_000  # µs per stat
    table = (out / "latest.md").read_text()
    assert "| pagecache-4mounts |" in table and "| getattr-daemon-cpu |" in table
    assert mounts_under(tmp_path) == []
    assert not list(cache.glob("run-*")), "the run's scratch folder was left behind"


@pytest.mark.timeout(60)
def test_abort_frees_calls_stuck_in_a_hung_daemon(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "file").write_text("base\n")
    with targets.mount(targets.UNIONFS, lower, tmp_path / "scratch") as mounted:
        assert mounted.daemon_pid is not None
        os.kill(mounted.daemon_pid, signal.SIGSTOP)  # the daemon now answers nothing
        try:
            outcome: list[BaseException | str] = []

            def stat_it() -> None:
                try:
                    os.stat(mounted.root / "file")
                    outcome.append("answered")
                except OSError as exc:
                    outcome.append(exc)

            caller = threading.Thread(target=stat_it)
            caller.start()
            caller.join(1.0)
            assert caller.is_alive(), "the stat should be stuck in the stopped daemon"
            assert mounted.abort()
            caller.join(10)
            assert not caller.is_alive()
            assert isinstance(outcome[0], OSError)
            assert outcome[0].errno in (errno.ECONNABORTED, errno.ENOTCONN)
        finally:
            # Lets the daemon be unmounted normally if the test failed before killing it.
            with contextlib.suppress(ProcessLookupError):
                os.kill(mounted.daemon_pid, signal.SIGCONT)
    assert mounts_under(tmp_path) == []


def test_cli_startup_bench_prints_a_row_per_command() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.cli", "--runs", "2", "--vms", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr
    rows = [line.split("|")[1].strip() for line in done.stdout.splitlines()[2:]]
    assert rows == ["`qvdctl --help`", "`qvdctl vm list`", "`qvdctl config get`"]


DISPATCH_KINDS = ["GETATTR", "LOOKUP+FORGET", "GETXATTR", "STATFS", "CREATE", "SETATTR/fd",
                  "RELEASE", "SETATTR/name", "UNLINK", "MKDIR", "RMDIR", "READDIRPLUS"]


def test_dispatch_bench_times_every_request_kind_on_the_modules_in_use() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.dispatch", "--count", "8",
                           "--rounds", "2"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    first, *rows = done.stdout.splitlines()
    # This checkout runs its sources: nothing on the request path is compiled.
    assert first == "compiled: none (pure Python)"
    kinds = [row.split()[0] for row in rows]
    assert kinds == DISPATCH_KINDS
    assert all(float(row.split()[1]) > 0 and row.endswith(" us") for row in rows), rows


def test_dispatch_bench_refuses_a_count_too_small_to_cycle() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.dispatch", "--count", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "dispatch: --count must be at least 4 and --rounds at least 1"]


@pytest.mark.timeout(300)
def test_web_bench_prints_every_row_on_both_databases() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.web", "--vms", "30", "--hosts", "3",
                           "--runs", "2", "--changes", "3"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| SQLite")
            or line.startswith("| PostgreSQL")]
    assert len(rows) == 8, done.stdout
    assert all(re.search(r"\| \d+ ms \| \d+ ms", row) for row in rows), rows


@pytest.mark.timeout(240)
def test_vm_life_bench_times_both_modes_through_the_cli(tmp_path: Path) -> None:
    """``make bench-vm`` on busybox, one run per mode: a row per mode, every metric a time,
    the results written, and nothing of its scratch node left on the host."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.vmlife", "--images", "busybox", "--reps", "1",
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=220,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "vmlife.json").read_text())
    runs = result["samples"]["busybox"]
    assert {mode: len(samples) for mode, samples in runs.items()} == {
        "unprivileged": 1, "privileged": 1,
    }
    for (sample,) in runs.values():
        assert set(sample) == {"start", "boot", "exec", "stop"}
        assert 0 < sample["start"] < sample["boot"]
    assert result["first_start"]["busybox"]["mode"] == "unprivileged"
    rows = (tmp_path / "vmlife.md").read_text().splitlines()[2:]
    assert [row.split("|")[1:3] for row in rows] == [
        [" busybox ", " unprivileged "], [" busybox ", " privileged "],
    ]
    assert not [m for m in mounts_under("/tmp") if "qvd-bench-vm-" in m]
    assert not [n for n in netns.listnetns() if n.startswith("qvdbench-")]
