"""Build small but real Linux images from the host's static busybox.

The demo and the tests need a root filesystem that boots as an LXC container
without any network download: Debian's ``busybox-static`` gives one binary that
is init, shell and coreutils at once. ``build_busybox_rootfs`` lays out the tree;
``build_image_tarball`` packs it the way an admin's image arrives in staging/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

BUSYBOX = Path("/bin/busybox")

_DIRS = [
    "bin", "sbin", "etc/init.d", "dev", "proc", "sys", "tmp", "run", "root", "home",
    "var/log", "var/run", "usr/bin", "usr/sbin", "lib", "mnt",
]

_INITTAB = """\
::sysinit:/etc/init.d/rcS
console::respawn:/bin/sh
tty1::respawn:/bin/sh
::shutdown:/bin/sync
"""

_RCS = """\
#!/bin/sh
mountpoint -q /proc || mount -t proc proc /proc
mkdir -p /run /var/log
echo "booted $(date +%s)" >> /var/log/boot.log
"""


def build_busybox_rootfs(dest: Path) -> Path:
    """Lay out a bootable busybox root filesystem in ``dest`` (created, must not exist).

    Raises:
        FileNotFoundError: the host has no static busybox (install busybox-static).
    """
    if not BUSYBOX.exists():
        raise FileNotFoundError(f"{BUSYBOX} is missing; install the busybox-static package")
    dest.mkdir(parents=True)
    for d in _DIRS:
        (dest / d).mkdir(parents=True, exist_ok=True)
    os.chmod(dest / "tmp", 0o1777)
    shutil.copy2(BUSYBOX, dest / "bin/busybox")
    applets = subprocess.run(
        [str(BUSYBOX), "--list-full"], check=True, capture_output=True, text=True
    ).stdout.split()
    for applet in applets:
        link = dest / applet
        if link.exists() or link.is_symlink() or applet == "bin/busybox":
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(dest / "bin/busybox", link.parent))
    (dest / "etc/inittab").write_text(_INITTAB)
    rcs = dest / "etc/init.d/rcS"
    rcs.write_text(_RCS)
    rcs.chmod(0o755)
    (dest / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc/group").write_text("root:x:0:\n")
    (dest / "etc/hostname").write_text("qvd-busybox\n")
    (dest / "etc/os-release").write_text('NAME="QVD busybox demo"\nVERSION_ID="1"\n')
    return dest


def build_image_tarball(
    dest: Path, rootfs: Path, *, compression: str = "gz", extended: bool = False
) -> Path:
    """Pack ``rootfs`` into the tarball ``dest`` with numeric owners.

    ``compression`` is one of "", "gz", "bz2", "xz". With ``extended`` the tree is
    stored under a top-level ``rootfs/`` folder, as QVD's extended images are.
    """
    mode = f"w:{compression}" if compression else "w"
    arcroot = "rootfs" if extended else "."
    # The mode is built at run time; typeshed types each literal mode separately.
    with tarfile.open(dest, mode, format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        tar.add(rootfs, arcname=arcroot, recursive=True)
    return dest
