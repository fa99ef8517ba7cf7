"""A real Debian desktop image (bookworm minbase + systemd) booted through the CLI.

The image comes from the builder the demo and the benchmarks use (``tools/debian_image.py``),
cached in ``/var/tmp/qvd-images``: on a fresh machine the first run builds it (mmdebstrap,
about a minute), every later run only copies its tarball in with ``di add``.

What this checks, as an admin would, in both modes of ``vm.lxc.unprivileged`` (the
container's root an ordinary node uid, or the node's root hardened): ``vm start`` on a
qvdfs root boots systemd to ``running`` or ``degraded`` (systemd's own verdict; the failed units are printed), ``vm exec``
runs commands in it, and ``vm stop`` halts it with the signal found from the image
(SIGRTMIN+3), cleanly and well inside ``vm.stop.timeout``. "Cleanly" is read from the host,
after the stop, in the VM's overlay: the header of the journal file journald wrote says
ONLINE while the VM runs and OFFLINE once journald closed it; a container killed at the
timeout leaves it ONLINE.

And issue 13's check of ``di commit``: a package installed with ``dpkg -i`` and one purged in
a VM, the VM committed, and a second VM booted on the new image has the one (files, owners,
modes, md5sums) and not the other. The module's node is shared, so the image is added and
extracted once; the tests boot four VMs in all (about 5 s each).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qvdproc.mountinfo import mounts_under
from tests.qvdctl.test_vm_containers import Node, lxc_node
from tools import debian_image

NET = "10.219.9"  # only ever configured inside the test's own namespace
BRIDGE = "qvddeb0"
STOP_TIMEOUT = 30  # the node's default vm.stop.timeout
BOOT_TIMEOUT = 150
# systemd's journal file header: the 8-byte signature, two 32-bit flag words, then the state.
JOURNAL_SIGNATURE = b"LPKSHHRH"
JOURNAL_STATES = {0: "offline", 1: "online", 2: "archived"}


@pytest.fixture(scope="module")
def image() -> debian_image.Image:
    return debian_image.ensure_tarball()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, image: debian_image.Image) -> Iterator[Node]:
    """One node for the module's tests, each adding its own VMs: the 84 MiB image is
    added and extracted once."""
    with lxc_node(tmp_path_factory.mktemp("debian") / "root", prefix="qvddeb", net=NET,
                  bridge=BRIDGE, stop_timeout=STOP_TIMEOUT) as n:  # fmt: skip
        n.cli.run("osf", "add", "name=debian", "memory=512")
        n.cli.run("di", "add", f"path={image.tarball}", "osf=debian", timeout=300)
        n.cli.run("user", "add", "login=u", "password=p")
        yield n


def overlay(node: Node, vm: str, di_id: int = 1) -> Path:
    """VM ``vm``'s overlay on DI ``di_id`` (the module's image is DI 1)."""
    return node.root / "overlayfs" / f"{di_id}-{node.cli.vm(vm)['Id']}-overlayfs"


def journal_state(path: Path) -> str:
    """The state in the header of the journal file ``path``: online, offline or archived."""
    with open(path, "rb") as f:
        header = f.read(17)
    assert header[:8] == JOURNAL_SIGNATURE, f"{path} is not a journal file"
    return JOURNAL_STATES.get(header[16], f"state {header[16]}")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["unprivileged", "privileged"])
def test_a_debian_systemd_vm_boots_runs_commands_and_stops_cleanly(
    node: Node, image: debian_image.Image, mode: str
) -> None:
    vm = f"deb-{mode[0]}"
    node.cli.run("config", "set", f"vm.lxc.unprivileged={int(mode == 'unprivileged')}")
    node.cli.run("vm", "add", f"name={vm}", "user=u", "osf=debian")
    started = time.monotonic()
    try:
        node.cli.run("vm", "start", "-f", f"name={vm}", timeout=300)
    finally:
        node.cli.run("config", "set", "vm.lxc.unprivileged=1")  # the node's default again
    started_in = time.monotonic() - started
    config = (node.lxcpath / f"qvd-{node.cli.vm(vm)['Id']}" / "config").read_text()
    assert "\nlxc.signal.halt = SIGRTMIN+3\n" in config  # found from /sbin/init

    done = node.cli.run("vm", "exec", "-f", f"name={vm}", "--",
                        "systemctl", "is-system-running", "--wait",
                        check=False, timeout=BOOT_TIMEOUT)  # fmt: skip
    booted_in = time.monotonic() - started
    state = done.stdout.strip()
    failed = node.exec(vm, "systemctl --failed --no-legend --plain | cut -d' ' -f1").stdout
    print(f"{mode}: vm start {started_in:.2f} s; systemd {state!r} {booted_in:.2f} s after "
          f"vm start; failed units: {failed.split() or 'none'}")
    assert state in ("running", "degraded"), (done.stdout, done.stderr)

    # Commands run in it, with their output and status; the Python of the image runs.
    done = node.exec(vm, ". /etc/os-release; echo $VERSION_CODENAME; "
                     "python3 -c 'import sys; print(sys.version_info[0])'; hostname; exit 4")
    assert (done.returncode, done.stdout.split()) == (4, ["bookworm", "3", vm]), done.stderr
    # Its root is the node's root only when privileged: "0 <node uid> <count>".
    uid_map = node.exec(vm, "cat /proc/self/uid_map").stdout.split()
    assert uid_map[:1] == ["0"] and (uid_map[1] == "0") == (mode == "privileged"), uid_map
    # What a service wrote, as the container meant it: journald's files are root's and
    # group systemd-journal's in the image's own ids, in the overlay too.
    journal = overlay(node, vm) / "var/log/journal" / debian_image.MACHINE_ID / "system.journal"
    assert journal_state(journal) == "online"
    group = node.exec(vm, "getent group systemd-journal | cut -d: -f3").stdout.strip()
    assert (journal.stat().st_uid, str(journal.stat().st_gid)) == (0, group)

    started = time.monotonic()
    done = node.cli.run("vm", "stop", "-f", f"name={vm}", timeout=STOP_TIMEOUT + 60)
    stopped_in = time.monotonic() - started
    print(f"{mode}: vm stop {stopped_in:.2f} s (vm.stop.timeout {STOP_TIMEOUT} s); "
          f"journal {journal_state(journal)}")
    assert stopped_in < STOP_TIMEOUT / 2
    assert "stopping it hard" not in done.stderr, done.stderr
    assert node.state(vm) == "stopped"
    assert journal_state(journal) in ("offline", "archived")
    # journald's last words in that file are its own stop, not a cut-off boot.
    assert re.search(rb"Journal stopped|Stopping.*Journal Service", journal.read_bytes())


# --- di commit of a VM whose packages changed ---------------------------------------

INSTALLED = "tree"  # one of the image's cached .debs (its dependency, libc6, is there)
# In the image, required by nothing installed, and many files (whiteouts for the commit).
REMOVED = "tzdata"


def boot(node: Node, vm: str) -> None:
    """Start ``vm`` and wait until systemd says it is up."""
    node.cli.run("vm", "start", "-f", f"name={vm}", timeout=300)
    done = node.cli.run("vm", "exec", "-f", f"name={vm}", "--",
                        "systemctl", "is-system-running", "--wait",
                        check=False, timeout=BOOT_TIMEOUT)  # fmt: skip
    assert done.stdout.strip() in ("running", "degraded"), (done.stdout, done.stderr)


def stop_cleanly(node: Node, vm: str) -> None:
    done = node.cli.run("vm", "stop", "-f", f"name={vm}", timeout=STOP_TIMEOUT + 60)
    assert "stopping it hard" not in done.stderr, done.stderr
    assert node.state(vm) == "stopped"


def run(node: Node, vm: str, script: str) -> str:
    """``script`` in ``vm`` (apt and dpkg ask nothing); its output, once it exited 0."""
    done = node.exec(vm, f"export DEBIAN_FRONTEND=noninteractive; {script}")
    assert done.returncode == 0, (script, done.stdout, done.stderr)
    return done.stdout


def status(node: Node, vm: str, package: str) -> str:
    """dpkg's status of ``package`` in ``vm``: "install ok installed", or "" for none."""
    return node.exec(vm, f"dpkg-query -W -f '${{Status}}' {package}").stdout.strip()


def acls(path: Path) -> dict[str, bytes]:
    """The POSIX ACLs of ``path``, as the kernel gives their xattrs."""
    return {name: os.getxattr(path, name) for name in os.listxattr(path)
            if name.startswith("system.posix_acl_")}


def snapshot(tree: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every entry below ``tree``: mode, owner, size, mtime (what a commit must not touch)."""
    entries = {}
    for path in [tree, *tree.rglob("*")]:
        st = path.lstat()
        entries[str(path.relative_to(tree))] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns)
    return entries


@pytest.mark.timeout(600)
def test_a_package_installed_and_one_purged_in_a_vm_are_in_the_image_di_commit_makes(
    node: Node, image: debian_image.Image
) -> None:
    """dpkg -i and dpkg --purge in a VM, di commit, and a second VM on the new image has
    the one package and not the other, files, owners and modes included."""
    started = time.monotonic()
    (deb,) = [image.debs_dir / name for name in image.debs
              if name.split("_", 1)[0] == INSTALLED]  # fmt: skip
    node.cli.run("vm", "add", "name=src", "user=u", "osf=debian")
    boot(node, "src")
    assert status(node, "src", INSTALLED) == ""
    assert status(node, "src", REMOVED) == "install ok installed"
    # Nothing installed depends on it (the first line is the package, the second a title).
    rdepends = run(node, "src", f"apt-cache rdepends --installed {REMOVED}").splitlines()
    assert rdepends[2:] == [], rdepends
    removed_files = run(node, "src", f"dpkg -L {REMOVED} | while read f; do "
                        '[ -d "$f" ] || echo "$f"; done').split()
    assert len(removed_files) > 100, removed_files

    with open(deb, "rb") as f:
        node.cli.run("vm", "exec", "-f", "name=src", "--", "sh", "-c", "cat > /tmp/x.deb",
                     stdin=f)
    run(node, "src", "dpkg -i /tmp/x.deb && rm /tmp/x.deb")
    run(node, "src", f"dpkg --purge {REMOVED}")
    assert status(node, "src", INSTALLED) == "install ok installed"
    assert status(node, "src", REMOVED) == ""
    stop_cleanly(node, "src")
    src_overlay = overlay(node, "src")
    before = snapshot(src_overlay)

    listed = node.cli.json("--dry-run", "di", "commit", "vm=src")
    change = {r["Path"]: r["Change"] for r in listed}
    assert change["/usr/bin/tree"] == "added"
    assert change["/var/lib/dpkg/status"] == "changed"
    assert [f for f in removed_files if change.get(f) != "removed"] == []
    assert "/tmp/x.deb" not in change
    assert len(node.cli.json("di", "list")) == 1  # the dry run wrote nothing

    committing = time.monotonic()
    out = node.cli.json("di", "commit", "vm=src", "tag=dpkg")
    committed_in = time.monotonic() - committing
    sizes = {d["Id"]: d["Size"] for d in node.cli.json("di", "list")}
    assert snapshot(src_overlay) == before

    node.cli.run("vm", "add", "name=dst", "user=u", "osf=debian", "di_tag=dpkg")
    boot(node, "dst")
    assert status(node, "dst", INSTALLED) == "install ok installed"
    assert status(node, "dst", REMOVED) == ""
    # Every file of the package, with the data dpkg recorded (--verify checks each md5sum).
    assert run(node, "dst", f"dpkg --verify {INSTALLED}") == ""
    # ... and the owner and mode the .deb gives it.
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                             check=True).stdout.splitlines()  # fmt: skip
    packaged = {line.split()[-1].lstrip("."): (line.split()[0], line.split()[1])
                for line in listing if line.startswith("-")}
    assert "/usr/bin/tree" in packaged
    stats = run(node, "dst", "stat -c '%A %U/%G %n' " + " ".join(packaged)).splitlines()
    assert {s.split()[2]: (s.split()[0], s.split()[1]) for s in stats} == packaged
    left = node.cli.run("vm", "exec", "-f", "name=dst", "--", "sh", "-c",
                        'for f; do if [ -e "$f" ] || [ -L "$f" ]; then echo "$f"; fi; done',
                        "sh", *removed_files).stdout  # fmt: skip
    assert left == ""
    assert node.exec("dst", "test -e /tmp/x.deb").returncode == 1
    # systemd-tmpfiles gave the journal folder ACLs in the first VM; the image keeps them.
    tree = node.root / "basefs" / ".images" / out["path"]
    assert acls(tree / "var/log/journal") == acls(src_overlay / "var/log/journal") != {}
    assert snapshot(src_overlay) == before
    stop_cleanly(node, "dst")
    assert snapshot(src_overlay) == before
    # Both stops took down everything of their VM: containers, mounts, veths.
    assert list(node.lxcpath.iterdir()) == []
    assert mounts_under(node.root / "rootfs") == []
    assert node.veths() - {BRIDGE} == set()
    print(f"dpkg round trip {time.monotonic() - started:.1f} s; di commit {committed_in:.1f} s; "
          f"image {sizes[1] / 2**20:.1f} MiB, committed {sizes[2] / 2**20:.1f} MiB "
          f"({out['version']}, {len(change)} changes)")
