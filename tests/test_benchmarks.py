"""Smoke test of the benchmark harness itself (not of any filesystem's speed).

Runs ``python -m benchmarks.run`` for real on a tiny fixture, one repetition, two cheap
workloads, against the plain directory and kernel overlayfs, and checks that it writes a JSON
report, a Markdown table and a PNG chart with sane numbers, and leaves no mount behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from benchmarks import report, targets, workloads

REPO = Path(__file__).resolve().parent.parent
WORKLOAD_METRICS = {"stat-cold", "stat-warm", "smallfiles-create", "smallfiles-delete"}


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "benchmarks.run", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=50)


def _mounts_below(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(path))]


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

    assert _mounts_below(tmp_path) == []
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
            "qvdfs": {"stat-warm": [0.1, 0.15, 0.2], "copyup": [0.5], "daemon-rss": [50.0]},
        },
        errors={},
        meta={"reps": 3},
    )
    assert results.median("unionfs-fuse", "stat-warm") == 0.6
    assert results.ratio("qvdfs", "stat-warm") == pytest.approx(4.0)
    by_text = {g.text: g for g in report.goals(results)}
    assert by_text["stat-warm: ≥ 3× unionfs-fuse"].passed is True
    assert by_text["copyup: ≥ 3× unionfs-fuse"].passed is False  # only 2×
    assert by_text["daemon RSS after the stat walk ≤ 40 MiB"].passed is False
    assert by_text["mount time ≤ 300 ms"].passed is None  # not measured


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
    assert _mounts_below(tmp_path) == []
