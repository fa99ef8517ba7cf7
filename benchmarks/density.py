"""``make bench-density``: what each desktop's root costs the node, N Debian desktops at once.

    python -m benchmarks.density [--desktops 10] [--targets qvdfs,qvdfs-parent,unionfs-fuse]

One scratch node (``tools/sandbox.py``) with the cached Debian image (``tools/debian_image``)
and N VMs, driven through ``qvdctl`` as ``make bench-vm`` does. For each target in turn:

    startup   ``vm start -f name=*`` (``vm.lifecycle.parallel`` at a time) until every VM
              answers ``systemctl is-system-running --wait`` with running or degraded
    RSS, PSS  of each root's FUSE daemon, from ``/proc/PID/smaps_rollup``, once all are
              booted and the node has settled (``SETTLE`` s)
    MemAvailable per desktop   the node's MemAvailable before the first start less after
              the last boot, divided by N: everything a desktop costs the node (its
              container's processes too), not only its root

Targets, all with the VMs privileged (``vm.lxc.unprivileged=0``, the one mode stock
unionfs-fuse can serve), so that only the root filesystem differs:

    qvdfs          ``vm.lxc.unionfs.type=qvdfs``, each mount its own interpreter (no
                   prepared parent: ``QVDFS_PARENT_SOCKET`` is empty)
    qvdfs-parent   the same, with a prepared parent (``qvdfs parent``) running for the run:
                   each mount is a child forked from it; its own PSS is shown apart
    unionfs-fuse   ``vm.lxc.unionfs.type=unionfs-fuse`` with ``command.unionfs-fuse`` set to
                   the stock ``/usr/bin/unionfs`` (SPEC §3's exact command line; where the
                   hard open-file limit is below 32000, through a wrapper that lowers
                   ``max_files`` to it, since unionfs-fuse would refuse to start)

First, ``--mounts`` fresh mounts per target over the image, interleaved: the seconds from
the command (the node's exact one for qvdfs) to a mount that serves. Then the desktops.
Before the first target one VM is started and stopped, so that the image's extraction is
not in anyone's numbers. MemAvailable is the whole machine's: other work running meanwhile
moves it, so the table gives the load, and the per-daemon PSS is the figure to compare.
Results go to ``<out>/density.md`` and ``<out>/density.json``. Needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks import targets
from benchmarks.targets import daemon_pid
from benchmarks.vmlife import BOOT_PROBES, BOOT_TIMEOUT, BRIDGE, NET, STOP_TIMEOUT, BenchError, \
    Desktop, desktop
from qvdfs import PARENT_SOCKET_ENV
from qvdproc import mountinfo
from tools import debian_image

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_DESKTOPS = 10
DEFAULT_MOUNTS = 10
TARGETS = ("qvdfs", "qvdfs-parent", "unionfs-fuse")
UNIONFS = "/usr/bin/unionfs"
QVDFS = str(Path(sys.executable).parent / "qvdfs")
SETTLE = 5.0  # seconds after the last boot before memory is read
PARENT_TIMEOUT = 30.0


def mem_available_kib() -> int:
    """The node's MemAvailable, KiB."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    raise BenchError("no MemAvailable in /proc/meminfo")


def rollup_kib(pid: int) -> dict[str, int]:
    """``Rss`` and ``Pss`` (and the rest) of ``pid``'s ``/proc/PID/smaps_rollup``, KiB."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                fields[key] = int(rest.split()[0])
    return fields


def fuse_daemons(root: Path) -> dict[str, int]:
    """Each FUSE mount below ``root`` and the pid of the daemon serving it."""
    found = {}
    for m in mountinfo.read_mounts():
        if m.fs_type.startswith("fuse") and m.mount_point.startswith(f"{root.resolve()}/"):
            pid = daemon_pid(Path(m.mount_point))
            if pid is None:
                raise BenchError(f"no daemon found for {m.mount_point}")
            found[m.mount_point] = pid
    return found


@contextlib.contextmanager
def prepared_parent(socket: Path) -> Iterator[int]:
    """A ``qvdfs parent`` on ``socket`` for the duration; its pid. Stopped with SIGTERM."""
    # Its line per mount goes to a log beside the socket, not into the benchmark's output.
    with open(socket.with_suffix(".log"), "ab") as log_file:
        proc = subprocess.Popen([QVDFS, "parent", "--socket", str(socket)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=log_file)
    try:
        deadline = time.monotonic() + PARENT_TIMEOUT
        while not socket.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"qvdfs parent did not listen on {socket}")
            time.sleep(0.01)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=PARENT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# Stock unionfs-fuse refuses ``max_files=32000`` above the hard open-file limit (it cannot
# raise that without CAP_SYS_RESOURCE); on such a machine it gets the hard limit instead.
UNIONFS_WRAPPER = """#!/bin/sh
for word in "$@"; do
    shift
    [ "$word" = max_files=32000 ] && word="max_files=$(ulimit -Hn)"
    set -- "$@" "$word"
done
exec {unionfs} "$@"
"""


def unionfs_command(folder: Path) -> str:
    """``command.unionfs-fuse`` for this machine: the stock binary, or a wrapper of it."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard >= 32000:
        return UNIONFS
    wrapper = folder / "unionfs"
    wrapper.write_text(UNIONFS_WRAPPER.format(unionfs=UNIONFS))
    wrapper.chmod(0o755)
    return str(wrapper)


def configure(d: Desktop, target: str, unionfs: str) -> None:
    kind = "unionfs-fuse" if target == "unionfs-fuse" else "qvdfs"
    d.qvdctl("config", "set", f"vm.lxc.unionfs.type={kind}", f"command.unionfs-fuse={unionfs}",
             "vm.lxc.unprivileged=0")


def boot_all(d: Desktop, names: list[str]) -> tuple[float, list[str]]:
    """Start every VM; seconds until the last one's systemd said it is up, and the names of
    those that came up degraded (a unit failed: is-system-running then exits 1)."""
    began = time.perf_counter()
    d.qvdctl("vm", "start", "-f", "name=d*", timeout=BOOT_TIMEOUT * 2)
    degraded = []
    for name in names:
        _, said = d.qvdctl("vm", "exec", "-f", f"name={name}", "--", "sh", "-c",
                           BOOT_PROBES["debian"] + " || true", timeout=BOOT_TIMEOUT)
        state = said.strip().splitlines()[-1:]
        if state not in (["running"], ["degraded"]):
            raise BenchError(f"{name} did not boot: {said.strip()!r}")
        if state == ["degraded"]:
            degraded.append(name)
    return time.perf_counter() - began, degraded


def measure(d: Desktop, target: str, names: list[str], parent: int | None,
            log: Any) -> dict[str, Any]:
    """One target: N desktops started, booted, measured, stopped."""
    configure(d, target, unionfs_command(d.node.root))
    before = mem_available_kib()
    try:
        startup, degraded = boot_all(d, names)
        time.sleep(SETTLE)
        after = mem_available_kib()
        daemons = fuse_daemons(d.node.root)
        if len(daemons) != len(names):
            raise BenchError(f"{len(daemons)} FUSE roots mounted for {len(names)} desktops")
        gone = [f"{name} ({state})" for name, state in states(d).items()
                if name in names and state != "running"]
        if gone:
            raise BenchError(f"not running after the measurement: {', '.join(gone)}")
        memory = [rollup_kib(pid) for pid in daemons.values()]
        result: dict[str, Any] = {
            "startup_s": startup,
            "degraded": degraded,
            "rss_kib": [m["Rss"] for m in memory],
            "pss_kib": [m["Pss"] for m in memory],
            "private_kib": [m.get("Private_Clean", 0) + m.get("Private_Dirty", 0)
                            for m in memory],
            "available_drop_kib": before - after,
            "load": os.getloadavg(),
        }
        if parent is not None:
            result["parent_pss_kib"] = rollup_kib(parent)["Pss"]
        log(f"{target}: {len(names)} booted in {startup:.1f} s ({len(degraded)} degraded); "
            f"daemon PSS median "
            f"{statistics.median(result['pss_kib']) / 1024:.1f} MiB, RSS "
            f"{statistics.median(result['rss_kib']) / 1024:.1f} MiB; MemAvailable "
            f"-{(before - after) / len(names) / 1024:.1f} MiB per desktop")
        return result
    finally:
        stop_all(d, names)


def states(d: Desktop) -> dict[str, str]:
    """Each VM's state, by name."""
    _, listing = d.qvdctl("--json", "vm", "list")
    return {row["Name"]: row["State"] for row in json.loads(listing)}


def stop_all(d: Desktop, names: list[str]) -> None:
    """Stop those of ``names`` that run (after a failure, some may not)."""
    if any(states(d).get(name) == "running" for name in names):
        d.qvdctl("vm", "stop", "-f", "name=d*,state=running",
                 timeout=STOP_TIMEOUT * len(names) + 60)


def mount_times(chosen: list[str], reps: int, tmp: Path, log: Any) -> dict[str, list[float]]:
    """Seconds from the command to a mount that serves, ``reps`` fresh mounts per target over
    the image, the targets interleaved (``benchmarks.targets.mount``: the node's exact
    options for qvdfs)."""
    rootfs = debian_image.ensure_image().rootfs
    socket = tmp / "mount-parent.sock"
    seconds: dict[str, list[float]] = {name: [] for name in chosen}
    with contextlib.ExitStack() as stack:
        if "qvdfs-parent" in chosen:
            stack.enter_context(prepared_parent(socket))
        for rep in range(reps):
            for name in chosen[rep % len(chosen):] + chosen[:rep % len(chosen)]:
                os.environ[PARENT_SOCKET_ENV] = str(socket) if name == "qvdfs-parent" else ""
                target = targets.UNIONFS if name == "unionfs-fuse" else targets.QVDFS_TARGET
                with targets.mount(target, rootfs, tmp / f"mount-{name}-{rep}") as mounted:
                    os.listdir(mounted.root)
                    assert mounted.mount_seconds is not None
                    seconds[name].append(mounted.mount_seconds)
    for name, values in seconds.items():
        log(f"{name}: mount median {statistics.median(values) * 1000:.1f} ms "
            f"({min(values) * 1000:.1f}-{max(values) * 1000:.1f})")
    return seconds


def run(chosen: list[str], desktops: int, mounts: int, log: Any = print) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="qvd-bench-density-") as tmp:
        if mounts:
            timed = mount_times(chosen, mounts, Path(tmp), log)
        with desktop("debian", Path(tmp)) as d:
            # ``desktop`` made VM "bench"; the measured ones are d1..dN.
            names = [f"d{i}" for i in range(1, desktops + 1)]
            for name in names:
                d.qvdctl("vm", "add", f"name={name}", "user=bench", "osf=bench")
            d.qvdctl("config", "set", "vm.lxc.unprivileged=0")
            d.qvdctl("vm", "start", "-f", "name=bench")  # extracts the image, once
            d.qvdctl("vm", "stop", "-f", "name=bench")
            socket = Path(tmp) / "parent.sock"
            for target in chosen:
                if target == "qvdfs-parent":
                    os.environ[PARENT_SOCKET_ENV] = str(socket)
                    with prepared_parent(socket) as parent:
                        results[target] = measure(d, target, names, parent, log)
                else:
                    os.environ[PARENT_SOCKET_ENV] = ""
                    results[target] = measure(d, target, names, None, log)
                if mounts:
                    results[target]["mount_s"] = timed[target]
    return results


def _mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def table(results: dict[str, Any], desktops: int) -> str:
    lines = ["| target | mount (median, min-max) | startup of all | daemon RSS (median, min-max) "
             "| daemon PSS (median, min-max) | daemon private | parent PSS "
             "| MemAvailable drop per desktop | load |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in results.items():
        rss, pss, private = r["rss_kib"], r["pss_kib"], r["private_kib"]
        parent = _mib(r["parent_pss_kib"]) + " MiB" if "parent_pss_kib" in r else "–"
        mount = r.get("mount_s")
        mount_cell = (f"{statistics.median(mount) * 1000:.1f} ms ({min(mount) * 1000:.1f}-"
                      f"{max(mount) * 1000:.1f})") if mount else "–"
        degraded = f" ({len(r['degraded'])} degraded)" if r.get("degraded") else ""
        lines.append(
            f"| {name} | {mount_cell} | {r['startup_s']:.1f} s{degraded} "
            f"| {_mib(statistics.median(rss))} MiB ({_mib(min(rss))}-{_mib(max(rss))}) "
            f"| {_mib(statistics.median(pss))} MiB ({_mib(min(pss))}-{_mib(max(pss))}) "
            f"| {_mib(statistics.median(private))} MiB | {parent} "
            f"| {_mib(r['available_drop_kib'] / desktops)} MiB "
            f"| {' '.join(f'{x:.2f}' for x in r['load'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.density",
        description="N Debian desktops on one node: each root's daemon RSS and PSS, the "
                    "node's MemAvailable per desktop, the startup time of all N.")
    parser.add_argument("--desktops", type=int, default=DEFAULT_DESKTOPS,
                        help=f"how many desktops at once (default {DEFAULT_DESKTOPS})")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help=f"comma-separated, from {', '.join(TARGETS)} (default all)")
    parser.add_argument("--mounts", type=int, default=DEFAULT_MOUNTS,
                        help=f"timed mounts per target first (default {DEFAULT_MOUNTS}; 0: none)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where results go")
    args = parser.parse_args(argv)
    chosen = [t for t in args.targets.split(",") if t]
    if not chosen or any(t not in TARGETS for t in chosen):
        parser.error(f"--targets takes {', '.join(TARGETS)}, not {args.targets!r}")
    if args.desktops < 1 or args.mounts < 0:
        parser.error("--desktops needs at least 1 and --mounts at least 0")
    if os.geteuid() != 0:
        print("Error: the benchmark mounts and starts containers: run it as root",
              file=sys.stderr)
        return 1
    began = time.monotonic()
    try:
        results = run(chosen, args.desktops, args.mounts)
    except BenchError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    text = table(results, args.desktops)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(),
            "kernel": platform.release(), "desktops": args.desktops,
            "seconds": round(time.monotonic() - began, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "density.json").write_text(json.dumps({"meta": meta, "targets": results},
                                                      indent=1) + "\n")
    (args.out / "density.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
