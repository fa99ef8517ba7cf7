"""A private network namespace for tests and the demo to run the whole controller in.

Entering a namespace for LXC takes more than ``setns``: liblxc checks
``/sys/class/net/<bridge>/bridge`` before attaching a veth (a missing entry makes it
try Open vSwitch), and sysfs shows the devices of the namespace that mounted it. So
the child gets a fresh sysfs of its namespace on ``/sys``, in a mount namespace of its
own, with the host's mounts below ``/sys`` (cgroups) bound back onto it. A whole sysfs,
not binds over ``/sys/class/net``: an unprivileged container may mount sysfs only where
some sysfs mount is fully visible (the kernel's ``mount_too_revealing``), and a bind
over a non-empty folder hides part of it.

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
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from pyroute2 import IPRoute, netns

log = logging.getLogger(__name__)

# Runs as `sh -c SCRIPT sh ARGV...` inside the target netns and a new mount namespace.
# On hosts whose mounts are shared (systemd's default) the new namespace's copies are
# peers of the host's: /sys and the mount holding the temporary view are made private
# first, or the new sysfs would replace the host's own /sys.
_ENTER_SCRIPT = """\
set -e
view=$(mktemp -d -t qvd-sysfs.XXXXXX)
mount --make-rprivate /sys
mount --make-private "$(stat -c %m "$view")"
mount -t sysfs sysfs "$view"
sys=$(awk '$5 == "/sys" { id = $1 } END { print id }' /proc/self/mountinfo)
for below in $(awk -v sys="$sys" '$2 == sys { print $5 }' /proc/self/mountinfo); do
    mount --rbind "$below" "$view${below#/sys}"
done
mount --move "$view" /sys
rmdir "$view"
exec "$@"
"""


def reachable_by_mapped_root(path: Path) -> Path:
    """Let an unprivileged container's root pass through ``path`` and its parents; return it.

    liblxc refuses to start a container whose lxcpath the mapped root (an ordinary
    uid on the node) cannot reach, and pytest and ``mkdtemp`` make their folders 0700.
    Only the folders under the temporary directory are changed, and only search
    permission (x) is added: nothing in them can be listed.
    """
    top = Path(tempfile.gettempdir()).resolve()
    for folder in (path.resolve(), *path.resolve().parents):
        if top not in folder.parents:
            break
        folder.chmod(folder.stat().st_mode | 0o011)
    return path


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
