"""A private network namespace, and a scratch node in it, to run the whole controller in.

``scratch_node`` is what the demo, the container tests and the VM benchmark start from: a
storage root, a network namespace holding the node's bridge and the VMs' veths, the
settings of an LXC node on qvdfs, and a cleanup that leaves the host as it was.

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
import dataclasses
import logging
import os
import secrets
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from pyroute2 import IPRoute, netns

from qvdproc.mountinfo import is_mounted, mounts_under

log = logging.getLogger(__name__)

# The qvdctl installed beside this Python (.venv/bin/qvdctl).
QVDCTL = str(Path(sys.executable).parent / "qvdctl")

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


# Runs as `sh -c SCRIPT sh ARGV...`: ARGV gets the listening socket on this shell's
# stdin as systemd's socket activation hands one over (fd 3, LISTEN_PID, LISTEN_FDS).
# Inside a namespace, `qvdctl web` so serves on a socket bound in the host's, where a
# browser reaches it (sockets keep the namespace they were made in).
_HAND_OVER_STDIN = 'export LISTEN_PID=$$ LISTEN_FDS=1; exec "$@" 3<&0 0</dev/null'


def socket_on_stdin_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` given the socket on its stdin by socket activation (``qvdctl web``)."""
    return ["sh", "-c", _HAND_OVER_STDIN, "sh", *argv]


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
        force_unmount(path)


def force_unmount(path: str | os.PathLike[str]) -> None:
    """Take the top mount off ``path`` however it can be done, for cleanups: ``umount``,
    then FUSE's lazy unmount, then a lazy ``umount`` (logged). Not mounted is fine."""
    for argv in (["umount"], ["fusermount3", "-u", "-z"], ["umount", "-l"]):
        if not is_mounted(path):
            return
        if argv[-1] == "-l":
            log.warning("%s still busy, detaching it lazily", path)
        if subprocess.run([*argv, str(path)], capture_output=True, timeout=30).returncode == 0:
            return


@contextlib.contextmanager
def scratch_netns(prefix: str = "qvdtest") -> Iterator[str]:
    """A new namespace ``<prefix>-<random>`` for the duration, removed on exit."""
    name = f"{prefix}-{secrets.token_hex(4)}"
    create_netns(name)
    try:
        yield name
    finally:
        remove_netns(name)


@dataclasses.dataclass(frozen=True)
class ScratchNode:
    """A node's storage root (a shared mount) and the network namespace its commands run in.

    Its containers live in ``lxcpath`` (setting ``vm.lxc.lxcpath``), inside the root, so
    they never meet the host's own ``qvd-<id>``; ``ip netns exec NETNS lxc-ls -P LXCPATH``
    shows them.
    """

    root: Path
    netns: str

    @property
    def lxcpath(self) -> Path:
        return self.root / "lxc"

    def lxc_settings(self, *, net: str, bridge: str, stop_timeout: int = 10) -> list[str]:
        """``config set`` words for LXC desktops on qvdfs: bridge ``bridge`` (made in the
        namespace at the first start), VM addresses in ``<net>.0/24``, gateway ``<net>.1``."""
        return [
            "vm.hypervisor=lxc", "vm.lxc.unionfs.type=qvdfs", f"vm.network.bridge={bridge}",
            f"vm.network.ip.start={net}.2", "vm.network.netmask=255.255.255.0",
            f"vm.network.gateway={net}.1", f"vm.stop.timeout={stop_timeout}",
            f"vm.lxc.lxcpath={self.lxcpath}",
        ]  # fmt: skip

    def qvdctl_argv(self, *args: str) -> list[str]:
        """The command line of ``qvdctl --root ROOT ARGS`` in the node's namespace."""
        return netns_argv(self.netns, [QVDCTL, "--root", str(self.root), *args])

    def web(self, sock: socket.socket) -> subprocess.Popen[str]:
        """``qvdctl web`` in the node's namespace, serving on ``sock`` (a listening socket
        bound anywhere, the host's loopback say); its first stdout line says where."""
        argv = netns_argv(self.netns, socket_on_stdin_argv([QVDCTL, "--root", str(self.root),
                                                            "web"]))
        return subprocess.Popen(argv, stdin=sock.fileno(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def qvdctl(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``qvdctl ARGS``; raise RuntimeError with its error line if it fails."""
        done = subprocess.run(self.qvdctl_argv(*args), capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
        if done.returncode != 0:
            why = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
            raise RuntimeError(f"qvdctl {' '.join(args)}: {why[0]}")
        return done


@contextlib.contextmanager
def scratch_node(root: Path, *, prefix: str) -> Iterator[ScratchNode]:
    """A node on ``root`` (created if missing) whose commands run in a new network
    namespace ``<prefix>-<random>``; ``lxc_settings`` gives its LXC settings.

    On exit, whatever is left runs no more: every container in its lxcpath is stopped
    (killed: the node is being thrown away), everything mounted below ``root`` is
    unmounted, and the namespace is deleted with its links. ``root`` itself stays.
    """
    root.mkdir(parents=True, exist_ok=True)
    reachable_by_mapped_root(root)
    with shared_mount(root), scratch_netns(prefix) as ns:
        node = ScratchNode(root, ns)
        try:
            yield node
        finally:
            _tear_down(node)


def _tear_down(node: ScratchNode) -> None:
    # liblxc reaches a container only from the namespace that started it.
    for folder in sorted(node.lxcpath.glob("qvd-*")) if node.lxcpath.is_dir() else ():
        log.warning("stopping container %s left running", folder.name)
        subprocess.run(
            netns_argv(node.netns, ["lxc-stop", "-P", str(node.lxcpath), "-n", folder.name, "-k"]),
            capture_output=True, timeout=60,
        )  # fmt: skip
    for point in mounts_under(node.root):
        if point != str(node.root.resolve()):  # the shared mount: shared_mount's to undo
            force_unmount(point)
