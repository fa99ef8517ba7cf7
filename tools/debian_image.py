"""A real Debian desktop image, built once and cached for the demo, the tests and benchmarks.

``make demo DEMO_ARGS="--image debian"`` boots it, ``tests/qvdctl/test_debian_vm.py`` boots it once,
and ``benchmarks.realimage`` mounts every union over it; all three share one cache,
``CACHE/debian-systemd-v<VERSION>/`` (``CACHE`` is ``/var/tmp/qvd-images``), holding:

    rootfs/         Debian bookworm, variant minbase, plus systemd, systemd-sysv, dbus, iproute2
                    and python3: the read-only lower branch every benchmark target mounts over
    debs/*.deb      a few small packages (``DEBS``) whose dependencies minbase already has,
                    fetched once with ``apt-get download`` for the benchmark's ``dpkg -i`` step
    manifest.json   what was built: the package list, the .deb files, build seconds
    debian-systemd-v<VERSION>.tar.gz
                    rootfs/ packed as an admin's image arrives in staging/ (numeric owners,
                    xattrs and ACLs kept), for ``qvdctl di add``; packed on first use

It is built with mmdebstrap under a temporary name and renamed into place only after the .debs
were checked to install on it, so an interrupted or failed build never leaves a half image that
looks finished; the tarball likewise appears under its name only once complete. A lock file
beside the image makes concurrent callers (two test runs, a demo) wait for one build. Bump
``VERSION`` whenever the content changes. mmdebstrap comes with ``make setup``.

The image gets a fixed ``/etc/machine-id``: with an empty one every boot on a fresh upper branch
would be a "first boot" (``systemctl preset-all`` and friends), which is not what a VM's
everyday boot does, and no ``/etc/hostname`` (see ``_build``). Nothing else is tuned for
containers: units that fail there show up as ``degraded``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from qvdctl import locks

log = logging.getLogger(__name__)

VERSION = 2
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
CACHE = Path("/var/tmp/qvd-images")


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

    @property
    def tarball(self) -> Path:
        """The packed rootfs; exists once ``ensure_tarball`` has run."""
        return self.root / f"{self.root.name}.tar.gz"


def image_root(cache: str | os.PathLike[str] = CACHE) -> Path:
    return Path(cache) / f"{NAME}-v{VERSION}"


def ensure_image(cache: str | os.PathLike[str] = CACHE) -> Image:
    """Return the cached image below ``cache``, building it first if needed (root only).

    Raises:
        ImageError: mmdebstrap is missing or a build step failed (nothing half-built stays).
    """
    root = image_root(cache)
    with _locked(root):
        if not (root / "manifest.json").exists():
            _build(root)
    manifest = json.loads((root / "manifest.json").read_text())
    return Image(root, tuple(manifest["debs"]), manifest["build_seconds"])


def ensure_tarball(cache: str | os.PathLike[str] = CACHE) -> Image:
    """``ensure_image``, and its rootfs packed into ``Image.tarball`` if not yet done.

    Raises:
        ImageError: as ``ensure_image``, or tar failed.
    """
    image = ensure_image(cache)
    with _locked(image.root):
        if not image.tarball.exists():
            _pack(image)
    return image


def _locked(root: Path) -> contextlib.AbstractContextManager[None]:
    """An exclusive lock on ``<image>.lock`` beside the image, for a build or a pack."""
    root.parent.mkdir(parents=True, exist_ok=True)
    return locks.exclusive(root.with_name(root.name + ".lock"))


def _pack(image: Image) -> None:
    tmp = image.tarball.with_name(f".{image.tarball.name}.tmp-{os.getpid()}")
    print(f"packing {image.rootfs} into {image.tarball} (once; it is cached)", file=sys.stderr,
          flush=True)
    started = time.monotonic()
    try:
        # GNU tar: it keeps xattrs (file capabilities) and ACLs, which Python's tarfile drops.
        _run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls",
              "-C", str(image.rootfs), "-czf", str(tmp), "."])
        os.rename(tmp, image.tarball)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    print(f"packed in {time.monotonic() - started:.0f} s, "
          f"{image.tarball.stat().st_size / 2**20:.0f} MiB", file=sys.stderr, flush=True)


def _build(root: Path) -> None:
    if shutil.which("mmdebstrap") is None:
        raise ImageError("mmdebstrap is not installed; run `make setup`")
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
        # No /etc/hostname: systemd would give every VM that one name over the VM's own,
        # which LXC sets (lxc.uts.name) before init runs.
        (rootfs / "etc/hostname").unlink(missing_ok=True)
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
    """``python -m tools.debian_image [CACHE]``: build and pack (if needed), print the image."""
    logging.basicConfig(level=logging.INFO, format="image: %(message)s")
    try:
        image = ensure_tarball(sys.argv[1] if len(sys.argv) > 1 else CACHE)
    except ImageError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    print(f"{image.rootfs} (built in {image.build_seconds:.0f} s), {image.tarball}; "
          f"debs: {' '.join(image.debs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
