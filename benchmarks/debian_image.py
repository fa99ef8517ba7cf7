"""A real Debian image for ``benchmarks.realimage``, built once and cached.

The image is a folder ``<cache>/debian-systemd-v<VERSION>/`` holding:

    rootfs/         Debian bookworm, variant minbase, plus systemd, systemd-sysv, dbus, iproute2
                    and python3: the read-only lower branch every target is mounted over
    debs/*.deb      a few small packages (``DEBS``) whose dependencies minbase already has,
                    fetched once with ``apt-get download`` for the ``dpkg -i`` step
    manifest.json   what was built: the package list, the .deb files, build seconds

It is built with mmdebstrap under a temporary name and renamed into place only after the .debs
were checked to install on it (``dpkg --root --no-act``), so an interrupted or failed build never
leaves a half image that looks finished. Bump ``VERSION`` whenever the content changes.

The image gets a fixed ``/etc/machine-id``: with an empty one every boot on a fresh upper branch
would be a "first boot" (``systemctl preset-all`` and friends), which is not what a VM's
everyday boot does. Nothing else is tuned for containers: units that fail there show up as
``degraded`` in the results.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

VERSION = 1
NAME = "debian-systemd"
SUITE = "bookworm"
VARIANT = "minbase"
INCLUDE = ("systemd", "systemd-sysv", "dbus", "iproute2", "python3")
# The dpkg -i step: small packages whose dependencies minbase (plus INCLUDE) already has.
DEBS = ("less", "file", "libmagic1", "libmagic-mgc", "tree", "bc")
# The same suites the host's apt uses, so that ``apt-get download`` on the host fetches the
# versions the image was built against.
MIRRORS = (
    f"deb http://deb.debian.org/debian {SUITE} main",
    f"deb http://deb.debian.org/debian {SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {SUITE}-security main",
)
# Any fixed 128-bit hex id will do (see the module docstring).
MACHINE_ID = "5176b2d9c3b64f1a9e0d2b7c4a8f6e31"
BUILD_TIMEOUT = 1800.0


class ImageError(Exception):
    """The image could not be built."""


@dataclasses.dataclass(frozen=True)
class Image:
    """A built image: the lower tree and the .deb files of the dpkg step."""

    root: Path
    debs: tuple[str, ...]  # file names below ``debs/``, in install order
    build_seconds: float

    @property
    def rootfs(self) -> Path:
        return self.root / "rootfs"

    @property
    def debs_dir(self) -> Path:
        return self.root / "debs"


def image_root(cache: str | os.PathLike[str]) -> Path:
    return Path(cache) / f"{NAME}-v{VERSION}"


def ensure_image(cache: str | os.PathLike[str]) -> Image:
    """Return the cached image below ``cache``, building it first if needed (root only)."""
    root = image_root(cache)
    if not (root / "manifest.json").exists():
        _build(root)
    manifest = json.loads((root / "manifest.json").read_text())
    return Image(root, tuple(manifest["debs"]), manifest["build_seconds"])


def _build(root: Path) -> None:
    if shutil.which("mmdebstrap") is None:
        raise ImageError("mmdebstrap is not installed (make bench-image installs it)")
    tmp = root.with_name(root.name + f".building-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    print(f"building the Debian image in {root} (once; it is cached)", file=sys.stderr,
          flush=True)
    started = time.monotonic()
    try:
        rootfs, debs = tmp / "rootfs", tmp / "debs"
        _run(["mmdebstrap", "--mode=root", f"--variant={VARIANT}",
              "--include=" + ",".join(INCLUDE),
              SUITE, str(rootfs), *MIRRORS])
        # After mmdebstrap, whose last step empties /etc/machine-id again.
        (rootfs / "etc/machine-id").write_text(MACHINE_ID + "\n")
        (rootfs / "etc/hostname").write_text(NAME + "\n")
        debs.mkdir()
        _run(["apt-get", "download", "-q", *DEBS], cwd=debs)
        files = _order(debs)
        _check_install(rootfs, debs, files, tmp / "check")
        seconds = round(time.monotonic() - started, 1)
        manifest = {
            "version": VERSION,
            "suite": SUITE,
            "variant": VARIANT,
            "include": list(INCLUDE),
            "debs": files,
            "build_seconds": seconds,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"built the Debian image in {seconds:.0f} s", file=sys.stderr, flush=True)


def _check_install(rootfs: Path, debs: Path, files: list[str], scratch: Path) -> None:
    """Install ``files`` for real on a throwaway overlay of ``rootfs``; raise if dpkg fails.

    The benchmark's dpkg step must not fail on a missing dependency, and ``dpkg --no-act``
    does not check dependencies, so the image counts as built only once this has worked.
    """
    upper, work, mnt = scratch / "upper", scratch / "work", scratch / "mnt"
    for folder in (upper / "tmp/debs", work, mnt):
        folder.mkdir(parents=True)
    for name in files:
        shutil.copy2(debs / name, upper / "tmp/debs" / name)
    _run(["mount", "-t", "overlay", "overlay", "-o",
          f"lowerdir={rootfs},upperdir={upper},workdir={work}", str(mnt)])
    try:
        _run(["chroot", str(mnt), "dpkg", "-i", *(f"/tmp/debs/{name}" for name in files)])
    finally:
        _run(["umount", str(mnt)])
        shutil.rmtree(scratch)


def _order(debs: Path) -> list[str]:
    """The downloaded files in ``DEBS`` order, one per package."""
    files = sorted(p.name for p in debs.glob("*.deb"))
    ordered = []
    for package in DEBS:
        match = [f for f in files if f.split("_", 1)[0] == package]
        if len(match) != 1:
            raise ImageError(f"expected one .deb of {package} in {debs}, found {match}")
        ordered.append(match[0])
    return ordered


def _run(argv: list[str], cwd: Path | None = None) -> None:
    log.info("running %s", " ".join(argv))
    try:
        done = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"{argv[0]} took longer than {BUILD_TIMEOUT:g} s") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise ImageError(f"{argv[0]} exited {done.returncode}:\n{tail}")


def main() -> int:
    """``python -m benchmarks.debian_image [CACHE]``: build (if needed) and print the image."""
    from benchmarks import DEFAULT_CACHE

    logging.basicConfig(level=logging.INFO, format="image: %(message)s")
    image = ensure_image(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_CACHE)
    print(f"{image.rootfs} (built in {image.build_seconds:.0f} s); debs: {' '.join(image.debs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
