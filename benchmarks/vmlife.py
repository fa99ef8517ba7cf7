"""``make bench-vm``: a desktop's life through ``qvdctl``, on each image, in each mode.

    python -m benchmarks.vmlife [--reps 5] [--images busybox,debian] [--out DIR]

One scratch node per image (``tools/sandbox.py``: a temporary storage root, a network
namespace of its own, qvdfs roots), one VM on it, and for every repetition both modes
of ``vm.lxc.unprivileged`` in turn, the first one alternating, so that the machine's
noise hits both alike. Timed as the admin sees it, each a fresh ``qvdctl`` process:

    start   ``vm start`` until it returns: the root is mounted and the container runs
    boot    from ``vm start`` until the image says it is up, asked with one ``vm exec``:
            busybox's rcS wrote its line in /var/log/boot.log; systemd answers
            ``systemctl is-system-running --wait`` with running or degraded
    exec    ``vm exec -- true`` on the booted VM: what asking costs (qvdctl's start-up
            and lxc-attach), included once in ``boot``
    dpkg    (Debian) ``dpkg -i`` inside of the image's six cached .debs, read from the
            VM's home: package files written through the union into a fresh overlay
    stop    ``vm stop`` until it returns: the halt signal found from the image, the
            container gone, the root unmounted

The VM's overlay is not persistent (the node's default), so every start begins from the
image alone. The first start of each image extracts it; that start is timed on its own
(``first start``, in the mode of the first run) and left out of the medians. Page caches
stay warm, as on a node that already runs desktops of the image. The image's own
verdict on its boot (systemd's, and its failed units) is checked on every run: a run
whose boot failed or whose stop needed a kill is an error, never a number.

Results go to ``<out>/vmlife.md`` and ``<out>/vmlife.json`` (every sample). Needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tools import debian_image
from tools.imagebuild import build_busybox_rootfs, build_image_tarball
from tools.sandbox import ScratchNode, scratch_node

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_REPS = 5
IMAGES = ("busybox", "debian")
MODES = {"unprivileged": "1", "privileged": "0"}  # vm.lxc.unprivileged
METRICS = ("start", "boot", "exec", "dpkg", "stop")
NET = "10.213.80"  # only ever configured inside the benchmark's own namespace
BRIDGE = "qvdbench0"
STOP_TIMEOUT = 30  # the node's default vm.stop.timeout: a stop this long was a kill
BOOT_TIMEOUT = 180
# What the VM runs to say it is up; its last output line is checked by ``booted``.
BOOT_PROBES = {
    "busybox": "while [ ! -s /var/log/boot.log ]; do sleep 0.01; done; echo booted",
    "debian": "systemctl is-system-running --wait",
}


class BenchError(Exception):
    """A run did not do what it is timed for; the message is one line."""


@dataclasses.dataclass
class Desktop:
    """The benchmark's node for one image, with its one VM ``bench``."""

    node: ScratchNode
    image: str
    debs: list[str] = dataclasses.field(default_factory=list)  # paths inside, Debian only

    def qvdctl(self, *args: str, timeout: float = 300) -> tuple[float, str]:
        """Run ``qvdctl ARGS``; its wall time in seconds and its stdout."""
        began = time.perf_counter()
        try:
            done = self.node.qvdctl(*args, timeout=timeout)
        except RuntimeError as exc:
            raise BenchError(str(exc)) from None
        return time.perf_counter() - began, done.stdout

    def vm_exec(self, script: str, timeout: float = 120) -> tuple[float, str]:
        return self.qvdctl("vm", "exec", "-f", "name=bench", "--", "sh", "-c", script,
                           timeout=timeout)  # fmt: skip


def _busybox_tarball(workdir: Path) -> Path:
    root = build_busybox_rootfs(workdir / "busybox-root")
    return build_image_tarball(workdir / "busybox.0.1.tgz", root, compression="gz")


@contextlib.contextmanager
def desktop(image: str, workdir: Path) -> Iterator[Desktop]:
    """A scratch node with the image added and VM ``bench`` (id 1, user id 1) on it."""
    if image == "debian":
        built = debian_image.ensure_tarball()
        tarball = built.tarball
    else:
        tarball = _busybox_tarball(workdir)
    with scratch_node(workdir / "storage", prefix="qvdbench") as node:
        d = Desktop(node, image)
        d.qvdctl("config", "set", *node.lxc_settings(net=NET, bridge=BRIDGE,
                                                      stop_timeout=STOP_TIMEOUT))
        d.qvdctl("osf", "add", "name=bench", "memory=512")
        d.qvdctl("di", "add", f"path={tarball}", "osf=bench")
        d.qvdctl("user", "add", "login=bench", "password=bench")
        d.qvdctl("vm", "add", "name=bench", "user=bench", "osf=bench")
        if image == "debian":
            # The home persists across starts; root-owned files there read as root's inside.
            home = node.root / "homefs" / "1-1-homefs" / "debs"
            home.mkdir(parents=True)
            for name in built.debs:
                shutil.copy(built.debs_dir / name, home / name)
            d.debs = [f"/home/debs/{name}" for name in built.debs]
        yield d


def cycle(d: Desktop, mode: str) -> dict[str, float]:
    """One start, boot, exec, (dpkg,) stop of the VM in ``mode``; seconds per metric."""
    d.qvdctl("config", "set", f"vm.lxc.unprivileged={MODES[mode]}")
    began = time.perf_counter()
    sample = {"start": d.qvdctl("vm", "start", "-f", "name=bench")[0]}
    try:
        _, said = d.vm_exec(BOOT_PROBES[d.image], timeout=BOOT_TIMEOUT)
        sample["boot"] = time.perf_counter() - began
        verdict = said.strip().splitlines()[-1:]
        if verdict not in (["booted"], ["running"], ["degraded"]):
            raise BenchError(f"{d.image} did not boot in {mode} mode: {said.strip()!r}")
        # Whose the VM's root is: the mode must be the one measured.
        _, uid_map = d.vm_exec("cat /proc/self/uid_map")
        if (uid_map.split()[1] == "0") != (mode == "privileged"):
            raise BenchError(f"{mode} run has the uid map {uid_map.strip()!r}")
        sample["exec"] = d.vm_exec("true")[0]
        if d.debs:
            sample["dpkg"] = d.vm_exec("dpkg -i " + " ".join(d.debs) + " >/dev/null")[0]
    finally:
        stopped_in, _ = d.qvdctl("vm", "stop", "-f", "name=bench", timeout=STOP_TIMEOUT + 60)
    if stopped_in >= STOP_TIMEOUT:
        raise BenchError(f"{d.image} in {mode} mode was killed at vm.stop.timeout")
    sample["stop"] = stopped_in
    return sample


def run(images: list[str], reps: int, log: Callable[[str], None] = print) -> dict[str, object]:
    """Every sample of every (image, mode), and the first start of each image."""
    samples: dict[str, dict[str, list[dict[str, float]]]] = {}
    first_start: dict[str, dict[str, float | str]] = {}
    with tempfile.TemporaryDirectory(prefix="qvd-bench-vm-") as tmp:
        for image in images:
            workdir = Path(tmp) / image
            workdir.mkdir()
            samples[image] = {mode: [] for mode in MODES}
            with desktop(image, workdir) as d:
                mode = next(iter(MODES))
                seconds = cycle(d, mode)["start"]
                first_start[image] = {"mode": mode, "seconds": seconds}
                log(f"{image} first start ({mode}, extracts the image): {seconds:.2f} s")
                for rep in range(reps):
                    order = list(MODES) if rep % 2 == 0 else list(reversed(MODES))
                    for mode in order:
                        sample = cycle(d, mode)
                        samples[image][mode].append(sample)
                        log(f"{image} {mode}: " + ", ".join(
                            f"{k} {v:.2f} s" for k, v in sample.items()))
    return {"samples": samples, "first_start": first_start}


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def table(result: dict[str, object]) -> str:
    """Markdown: per image and mode, each metric's median (min–max) in seconds."""
    samples = result["samples"]
    first = result["first_start"]
    assert isinstance(samples, dict) and isinstance(first, dict)
    lines = ["| image | mode | runs | " + " | ".join(METRICS) + " | first start |",
             "|---|---|---:|" + "---:|" * (len(METRICS) + 1)]
    for image, modes in samples.items():
        for mode, runs in modes.items():
            cells = [_cell([s[m] for s in runs if m in s]) for m in METRICS]
            extra = first.get(image, {})
            first_cell = f"{extra['seconds']:.2f}" if extra.get("mode") == mode else ""
            lines.append(f"| {image} | {mode} | {len(runs)} | " + " | ".join(cells)
                         + f" | {first_cell} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.vmlife",
        description="A desktop's start, boot, exec, dpkg and stop through qvdctl, on each "
                    "image, unprivileged and privileged.",
    )  # fmt: skip
    parser.add_argument("--reps", type=int, default=DEFAULT_REPS,
                        help=f"timed runs per image and mode (default {DEFAULT_REPS})")
    parser.add_argument("--images", default=",".join(IMAGES),
                        help="which images, comma-separated (default busybox,debian)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where results go")
    args = parser.parse_args(argv)
    images = [i for i in args.images.split(",") if i]
    unknown = [i for i in images if i not in IMAGES]
    if unknown or not images:
        print(f"Error: --images takes {', '.join(IMAGES)}, not {args.images!r}", file=sys.stderr)
        return 1
    if args.reps < 1:
        print("Error: --reps needs at least 1", file=sys.stderr)
        return 1
    if os.geteuid() != 0:
        print("Error: the benchmark mounts and starts containers: run it as root",
              file=sys.stderr)
        return 1
    started = time.monotonic()
    try:
        result = run(images, args.reps)
    except (BenchError, debian_image.ImageError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    result["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(),
        "kernel": platform.release(), "reps": args.reps,
        "seconds": round(time.monotonic() - started, 1),
    }
    text = table(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vmlife.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "vmlife.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
