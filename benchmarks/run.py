"""``python -m benchmarks.run``: the side-by-side benchmark (``make bench``).

For each repetition, for each workload, every target runs once on a fresh mount with an empty
upper branch; the target order rotates between runs so machine noise hits them alike. Targets
that cannot mount here are skipped with a line saying why, never given numbers. At the end the
table is printed and ``latest.json``, ``latest.md`` and ``latest.png`` are written.

Needs root (mounts, dropping caches). Ctrl-C stops the run, unmounts everything, and still
writes what was measured so far.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from benchmarks import DEFAULT_CACHE, fixture, report, targets, workloads

log = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_REPS = 5
# A workload normally takes seconds; past this its daemon is taken to be hung.
WORKLOAD_TIMEOUT = 300.0


class UsageError(Exception):
    """Bad command line: one line to stderr, exit status 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmark qvdfs side by side with kernel overlayfs, unionfs-fuse and "
                    "fuse-overlayfs on the same fixture.")
    parser.add_argument("--reps", type=int, default=None,
                        help=f"repetitions of every workload (default {DEFAULT_REPS})")
    parser.add_argument("--quick", action="store_true", help="one repetition")
    parser.add_argument("--only", default="", help="comma-separated workloads to run")
    parser.add_argument("--targets", default="", help="comma-separated targets to run")
    parser.add_argument("--fixture", default="full", choices=sorted(fixture.SPECS),
                        help="the lower tree to use (default full)")
    parser.add_argument("--cache", default=DEFAULT_CACHE,
                        help=f"folder for cached fixtures and scratch (default {DEFAULT_CACHE})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder for latest.json/.md/.png (default benchmarks/results)")
    parser.add_argument("--list", action="store_true", help="list workloads and targets, exit")
    args = parser.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        raise UsageError("--reps must be at least 1")
    args.reps = args.reps or (1 if args.quick else DEFAULT_REPS)
    args.workloads = _pick(args.only, workloads.BY_NAME, "workload")
    args.target_list = _pick(args.targets, targets.BY_NAME, "target")
    return args


def _pick(csv: str, known: dict[str, Any], what: str) -> list[Any]:
    """The entries of ``known`` named in ``csv`` (all of them if it is empty), in that order."""
    if not csv:
        return list(known.values())
    names = [n.strip() for n in csv.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"unknown {what} {unknown[0]!r}; choose from {', '.join(known)}")
    return [known[n] for n in names]


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM takes the same path as Ctrl-C, so every finally unmounts.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="bench: %(levelname)s: %(message)s")
    try:
        args = parse_args(argv)
    except UsageError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for w in workloads.ALL:
            print(f"workload {w.name:<11} {w.summary}")
        for t in targets.ALL:
            print(f"target   {t.name:<15} {t.summary}")
        return 0
    if os.geteuid() != 0:
        print("bench: must run as root (it mounts filesystems and drops caches)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _interrupt)
    results = run(args)
    paths = report.write(results, args.out)
    print()
    print(report.markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 130 if results.meta.get("interrupted") else 0


def run(args: argparse.Namespace) -> report.Results:
    """Run every (repetition × workload × target) and gather the samples."""
    started = time.monotonic()
    fx = fixture.ensure_fixture(fixture.SPECS[args.fixture], args.cache)
    scratch = Path(args.cache) / f"run-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    chosen: list[targets.Target] = []
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "reps": args.reps,
        "fixture": fx.spec.name,
        "fixture_entries": len(fx.entries),
        "fixture_dirs": len(fx.dirs),
        "workloads": [w.name for w in args.workloads],
        "qvdfs_version": _source_version(),
        "interrupted": False,
    }
    results = report.Results(targets=[], skipped={}, samples={}, errors={}, meta=meta)
    try:
        for target in args.target_list:
            reason = targets.probe(target, fx.lower, scratch)
            if reason:
                print(f"bench: skipping {target.name}: {reason}", flush=True)
                results.skipped[target.name] = reason
            else:
                chosen.append(target)
                results.targets.append(target.name)
        if fx.python is None and any(w.needs_python for w in args.workloads):
            print(f"bench: skipping the python workload: the {fx.spec.name} fixture has no "
                  "interpreter", flush=True)
            args.workloads = [w for w in args.workloads if not w.needs_python]
        if targets.BASELINE not in results.targets:
            print("bench: unionfs-fuse is not in this run; ratios are against the first target",
                  flush=True)
        for rep in range(args.reps):
            for index, workload in enumerate(args.workloads):
                shift = (rep + index) % max(len(chosen), 1)
                for target in chosen[shift:] + chosen[:shift]:
                    _one(rep, args.reps, workload, target, fx, scratch, results)
    except KeyboardInterrupt:
        print("\nbench: interrupted; unmounting and writing what was measured", flush=True)
        meta["interrupted"] = True
    finally:
        targets.unmount_all()
        fx.repair()
        shutil.rmtree(scratch, ignore_errors=True)
    meta["seconds"] = round(time.monotonic() - started, 1)
    return results


def _one(rep: int, reps: int, workload: workloads.Workload, target: targets.Target,
         fx: fixture.Fixture, scratch: Path, results: report.Results) -> None:
    """Run one workload on one fresh mount of one target, and file its numbers or its error.

    Its caveats go to ``results.notes``; qvdfs' own counters for the mount, read right before
    the unmount, to ``results.counters``.
    """
    label = f"[{rep + 1}/{reps}] {workload.name:<10} {target.name:<15}"
    where = scratch / f"{rep}-{workload.name}-{target.name}"
    extra = target.uncached_attr_options() if workload.uncached_attrs else []
    ctx = None
    try:
        with targets.mount(target, fx.lower, where, extra) as mounted:
            # A hung FUSE daemon would block the workload's syscalls forever; killing it
            # makes them fail, so the run reports the hang and goes on.
            watchdog = threading.Timer(WORKLOAD_TIMEOUT, _abort_hung, (mounted, label))
            watchdog.start()
            try:
                ctx = workloads.Context(mounted, fx, more=where.with_name(where.name + "-more"))
                values = workload.run(ctx)
            finally:
                watchdog.cancel()
            counters = mounted.daemon_counters()
            if counters is not None:
                results.counters.setdefault(workload.name, []).append(counters)
        if mounted.mount_seconds is not None:
            values["mount-time"] = mounted.mount_seconds
        if mounted.unmount_seconds is not None:
            values["unmount-time"] = mounted.unmount_seconds
    except (OSError, subprocess.SubprocessError, targets.MountError,
            workloads.WorkloadError) as exc:
        message = f"{type(exc).__name__}: {exc}"
        results.errors.setdefault(target.name, {}).setdefault(workload.name, []).append(message)
        print(f"{label} FAILED {message}", flush=True)
        return
    finally:
        if target.kind == "plain":
            fx.repair(expected=True)
        for note in ctx.notes if ctx is not None else []:
            filed = results.notes.setdefault(target.name, {}).setdefault(workload.name, [])
            if note not in filed:
                filed.append(note)
                print(f"{label} note: {note}", flush=True)
    per = results.samples.setdefault(target.name, {})
    for metric, value in values.items():
        per.setdefault(metric, []).append(value)
    shown = " ".join(f"{m}={v:.3g}" if abs(v) < 1000 else f"{m}={v:.0f}"
                     for m, v in values.items() if not m.endswith("mount-time"))
    print(f"{label} {shown}", flush=True)


def _source_version() -> str:
    """The repository's commit, marked ``+changes`` if qvdfs/ differs from it: what was measured."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "qvdfs"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + ("+changes" if dirty else "")


def _abort_hung(mounted: targets.Mounted, label: str) -> None:
    aborted = mounted.abort()
    print(f"{label} still running after {WORKLOAD_TIMEOUT:g} s; "
          + ("killed its daemon" if aborted else "no daemon to kill"), flush=True)


if __name__ == "__main__":
    sys.exit(main())
