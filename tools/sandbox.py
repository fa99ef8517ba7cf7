"""A private network namespace for tests and the demo to run the whole controller in.

Entering a namespace for LXC takes more than ``setns``: liblxc checks
``/sys/class/net/<bridge>/bridge`` before attaching a veth (a missing entry makes it
try Open vSwitch), and sysfs shows the devices of the namespace that mounted it. So
the child gets a fresh sysfs view of its namespace's devices over ``/sys/class/net``
and ``/sys/devices/virtual/net``, in a mount namespace of its own; the rest of
``/sys`` (cgroups) stays as it is.

``ip netns exec`` does a similar remount but also makes every mount a slave, so a FUSE
mount made inside would never reach the host or the next command. Here the mount
namespace keeps the host's propagation, and ``shared_mount`` makes the storage root a
shared mount: mounts the controller makes under it appear on the host and in every
later command, and a plain ``umount`` anywhere removes them everywhere.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from pyroute2 import IPRoute, netns

log = logging.getLogger(__name__)

# Runs as `sh -c SCRIPT sh ARGV...` inside the target netns and a new mount namespace.
# On hosts whose mounts are shared (systemd's default) the new namespace's copies are
# peers of the host's: /sys and the mount holding the temporary view are made private
# first, or the sysfs view would replace the host's own /sys/class/net.
_ENTER_SCRIPT = """\
set -e
view=$(mktemp -d -t qvd-sysfs.XXXXXX)
mount --make-rprivate /sys
mount --make-private "$(stat -c %m "$view")"
mount -t sysfs sysfs "$view"
mount --bind "$view/class/net" /sys/class/net
mount --bind "$view/devices/virtual/net" /sys/devices/virtual/net
umount -l "$view"
rmdir "$view"
exec "$@"
"""


def create_netns(name: str) -> None:
    """Create the named namespace ``name`` (``/run/netns/<name>``) with loopback up."""
    netns.create(name)
    with IPRoute(netns=name) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def remove_netns(name: str) -> None:
    """Delete namespace ``name``; its links (bridge, veth ends) go with it. Missing is fine."""
    if name in netns.listnetns():
        netns.remove(name)


def netns_argv(name: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs ``argv`` inside namespace ``name``, ready for LXC."""
    return [
        "nsenter", f"--net=/run/netns/{name}",
        "unshare", "--mount", "--propagation", "unchanged",
        "sh", "-c", _ENTER_SCRIPT, "sh", *argv,
    ]  # fmt: skip


@contextlib.contextmanager
def shared_mount(path: Path) -> Iterator[Path]:
    """Bind-mount ``path`` onto itself as a shared mount for the duration; see module doc.

    On exit it is unmounted (lazily if something under it is still busy).
    """
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True, capture_output=True)
    try:
        subprocess.run(["mount", "--make-shared", str(path)], check=True, capture_output=True)
        yield path
    finally:
        done = subprocess.run(["umount", str(path)], capture_output=True)
        if done.returncode != 0:
            log.warning("%s still busy, detaching it lazily", path)
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def scratch_netns(prefix: str = "qvdtest") -> Iterator[str]:
    """A new namespace ``<prefix>-<random>`` for the duration, removed on exit."""
    name = f"{prefix}-{secrets.token_hex(4)}"
    create_netns(name)
    try:
        yield name
    finally:
        remove_netns(name)
