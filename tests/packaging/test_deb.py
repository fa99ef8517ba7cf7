"""The node's Debian package, built with ``make deb`` and installed on a throwaway Debian 12.

``make test-deb`` runs this module (``make test`` runs only ``test_sources.py``: a fresh
build takes minutes, most of it pip compiling pyfuse3 and python-lxc). The package is never
installed on this host: each root here is the cached Debian image (``tools/debian_image.py``)
under a writable overlay, entered with chroot; apt fetches the package's dependencies from
the Debian archive into a cache beside the image, so later runs download nothing.

What an admin relies on: with the root booted (systemd in an LXC container, as qvdctl
runs a VM), ``systemctl start qvd-hkd`` brings up an HKD that registers with a PostgreSQL
and renews its lease, and ``systemctl stop`` ends it cleanly; the files land where the package promises, both programs run
there, lintian finds no errors, node.conf is a conffile that a reinstall keeps as edited,
root's sub-id ranges are reserved once (an overlap with another user's is reported, not
forced), a remove keeps node.conf and the storage, and a purge takes back node.conf and
the id ranges the package added while the storage and everyone else's ranges stay.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qvdctl import locks
from qvdctl.container.config import ContainerSpec, write_config
from tests.support import REPO
from tools.fleet import AdminCli, until
from tests.support.postgres import pg_server
from tools import debian_image

pytestmark = [pytest.mark.deb, pytest.mark.timeout(900)]

VERSION = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M)[1]
RANGE = "1000000:65536000"  # sub-ids 1000000-66535999, as the package's postinst reserves
APT_CACHE = debian_image.CACHE / "qvd-node-apt"  # lists/ and archives/ of the test roots
STORAGE_FILE = "var/lib/qvd/storage/basefs/1-image.tgz/etc/os-release"


class DebianRoot:
    """A Debian 12 root to install into: the cached image under a throwaway overlay in
    ``scratch``, with /proc and the shared apt cache mounted; ``close`` unmounts it all."""

    def __init__(self, image: debian_image.Image, scratch: Path) -> None:
        self.path = scratch / "mnt"
        self._mounts: list[Path] = []
        upper, work = scratch / "upper", scratch / "work"
        for folder in (upper, work, self.path, APT_CACHE / "lists/partial",
                       APT_CACHE / "archives/partial"):  # fmt: skip
            folder.mkdir(parents=True, exist_ok=True)
        try:
            self._mount(self.path, "-t", "overlay", "overlay", "-o",
                        f"lowerdir={image.rootfs},upperdir={upper},workdir={work}")
            self._mount(self.path / "proc", "-t", "proc", "proc")
            self._mount(self.path / "var/lib/apt/lists", "--bind", str(APT_CACHE / "lists"))
            self._mount(self.path / "var/cache/apt/archives", "--bind",
                        str(APT_CACHE / "archives"))
        except BaseException:
            self.close()
            raise

    def _mount(self, target: Path, *args: str) -> None:
        subprocess.run(["mount", *args, str(target)], check=True, timeout=60)
        self._mounts.append(target)

    def share(self, folder: Path) -> None:
        """Make the host's ``folder`` appear at the same path inside (a socket folder)."""
        inside = self.path / folder.relative_to("/")
        inside.mkdir(parents=True, exist_ok=True)
        self._mount(inside, "--bind", str(folder))

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``argv`` run inside the root; its output (stderr folded in) is in ``stdout``."""
        done = subprocess.run(
            ["chroot", str(self.path), "env", "DEBIAN_FRONTEND=noninteractive", *argv],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, timeout=600,
        )  # fmt: skip
        if check:
            assert done.returncode == 0, f"{' '.join(argv)} exited {done.returncode}:\n" + \
                done.stdout[-3000:]
        return done

    def install(self, deb: Path) -> subprocess.CompletedProcess[str]:
        """apt installs ``deb`` and what it depends on, as ``apt install ./deb`` on a node."""
        inside = self.path / "tmp" / deb.name
        inside.write_bytes(deb.read_bytes())
        # One apt at a time in the shared cache: apt-get fails at once on a held lock.
        with locks.exclusive(APT_CACHE.with_suffix(".lock")):
            if not any((APT_CACHE / "lists").glob("*_Packages*")):
                self.run("apt-get", "update", "-q")
            done = self.run("apt-get", "install", "-y", "-q", "--no-install-recommends",
                            f"/tmp/{deb.name}", check=False)
            if done.returncode != 0:  # lists gone stale since they were cached
                self.run("apt-get", "update", "-q")
                done = self.run("apt-get", "install", "-y", "-q", "--no-install-recommends",
                                f"/tmp/{deb.name}")
        return done

    def file(self, path: str) -> Path:
        return self.path / path

    def close(self) -> None:
        """Ends anything left running inside (none should be; the test then fails), unmounts."""
        leftovers = _processes_under(self.path)
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        while self._mounts:
            target = self._mounts.pop()
            if subprocess.run(["umount", str(target)], timeout=60).returncode != 0:
                subprocess.run(["umount", "-l", str(target)], timeout=60)
        assert not leftovers, f"processes left running in the test root: {leftovers}"


def _processes_under(root: Path) -> list[int]:
    """Pids whose root directory is ``root``: what a postinst may have left running."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/root") == str(root):
                    pids.append(int(entry))
            except OSError:
                pass  # gone meanwhile, or a kernel thread
    return pids


@pytest.fixture(scope="module")
def deb() -> Path:
    """``make deb``'s package: built on the first run, then only when a packaged file changed."""
    done = subprocess.run(["make", "deb"], cwd=REPO, capture_output=True, text=True,
                          timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    path = REPO / "dist" / f"qvd-node_{VERSION}_amd64.deb"
    assert path.is_file()
    return path


@pytest.fixture(scope="module")
def image() -> debian_image.Image:
    return debian_image.ensure_image()


@pytest.fixture
def root(image: debian_image.Image) -> Iterator[DebianRoot]:
    """A fresh Debian 12 root, nothing of the package in it yet."""
    with tempfile.TemporaryDirectory(prefix="qvd-deb-") as scratch:
        r = DebianRoot(image, Path(scratch))
        try:
            yield r
        finally:
            r.close()


@pytest.fixture(scope="module")
def installed(image: debian_image.Image, deb: Path) -> Iterator[DebianRoot]:
    """One Debian 12 root with the package installed, for the checks that only read it."""
    with tempfile.TemporaryDirectory(prefix="qvd-deb-") as scratch:
        r = DebianRoot(image, Path(scratch))
        try:
            r.install(deb)
            yield r
        finally:
            r.close()


def reservations(root: DebianRoot, kind: str) -> list[str]:
    """The lines of /etc/sub{kind} in ``root``."""
    return root.file(f"etc/sub{kind}").read_text().splitlines()


def test_lintian_finds_no_errors(deb: Path) -> None:
    done = subprocess.run(["lintian", "--fail-on", "error", str(deb)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_files_land_where_promised(installed: DebianRoot) -> None:
    for program in ("qvdfs", "qvdctl"):
        link, target = installed.file(f"usr/bin/{program}"), f"usr/lib/qvd-node/bin/{program}"
        assert os.path.normpath(link.parent / os.readlink(link)) == str(installed.file(target))
        assert installed.file(target).is_file()
    for unit in ("qvd-hkd", "qvd-web", "qvdfs-parent"):
        assert installed.file(f"lib/systemd/system/{unit}.service").is_file()
    for program in ("qvdfs", "qvdctl"):  # the man pages, made from their --help
        page = gzip.decompress(installed.file(f"usr/share/man/man1/{program}.1.gz").read_bytes())
        assert page.startswith(b".\\\"") and f".TH {program.upper()} ".encode() in page
        assert b"usage: " in page
    modules = installed.file("usr/lib/modules-load.d/qvd-node.conf").read_text()
    assert "fuse" in [line.strip() for line in modules.splitlines()]
    assert installed.file("etc/qvd/node.conf").read_text().startswith("# /etc/qvd/node.conf")
    # Nothing the package shipped was changed by installing or by running it (no .pyc
    # rewritten by Python, say), and nothing lives under /opt.
    installed.run("qvdctl", "vm", "--help")
    assert installed.run("dpkg", "--verify", "qvd-node").stdout == ""
    assert not installed.file("opt/venvs").exists()


def test_both_programs_run_in_the_installed_root(installed: DebianRoot) -> None:
    assert installed.run("qvdfs", "--version").stdout.startswith(f"qvdfs {VERSION} ")
    help_text = installed.run("qvdctl", "--help").stdout
    assert help_text.startswith("usage: qvdctl ")
    # qvdctl runs its qvdfs and its image extraction from its own interpreter's folder.
    assert installed.run("/usr/lib/qvd-node/bin/python", "-c",
                         "import qvdctl.mounting as m; print(m.QVDFS)").stdout.strip() \
        == "/usr/lib/qvd-node/bin/qvdfs"


def test_the_units_are_valid_and_not_enabled(installed: DebianRoot) -> None:
    installed.run("systemd-analyze", "verify", "/lib/systemd/system/qvd-hkd.service",
                  "/lib/systemd/system/qvd-web.service",
                  "/lib/systemd/system/qvdfs-parent.service")
    parent = installed.file("lib/systemd/system/qvdfs-parent.service").read_text()
    for line in ("ExecStart=/usr/bin/qvdfs parent", "KillMode=process"):
        assert line in parent.splitlines()
    hkd = installed.file("lib/systemd/system/qvd-hkd.service").read_text()
    for line in ("ExecStart=/usr/bin/qvdctl --config /etc/qvd/node.conf hkd",
                 "KillMode=mixed", "Restart=on-failure", "Type=notify", "NotifyAccess=main"):
        assert line in hkd.splitlines()
    assert re.search(r"^TimeoutStopSec=\d+$", hkd, re.M)
    assert re.search(r"^WatchdogSec=\d+$", hkd, re.M)
    web = installed.file("lib/systemd/system/qvd-web.service").read_text()
    assert re.search(r"^ExecStart=/usr/bin/qvdctl --config /etc/qvd/node.conf web "
                     r"--listen 127\.0\.0\.1:\d+$", web, re.M)
    enabled = list(installed.file("etc/systemd/system").rglob("qvd*"))
    assert enabled == []


def test_a_reinstall_keeps_an_edited_node_conf_and_reserves_the_ids_once(
    installed: DebianRoot, deb: Path
) -> None:
    conffiles = installed.run("dpkg-query", "-W", "-f=${Conffiles}", "qvd-node").stdout
    assert "/etc/qvd/node.conf " in conffiles
    conf = installed.file("etc/qvd/node.conf")
    edited = conf.read_text() + "nodename = node7\n"
    conf.write_text(edited)
    for kind in ("uid", "gid"):
        assert reservations(installed, kind).count(f"root:{RANGE}") == 1
    done = installed.run("dpkg", "-i", f"/tmp/{deb.name}")
    assert "reserved sub-" not in done.stdout  # nothing new to reserve, nothing said
    assert conf.read_text() == edited
    for kind in ("uid", "gid"):
        assert reservations(installed, kind).count(f"root:{RANGE}") == 1


def test_remove_keeps_storage_and_node_conf_purge_takes_back_only_its_own(
    root: DebianRoot, deb: Path
) -> None:
    # Someone else's range, there before the package: it must survive the purge.
    root.file("etc/subuid").write_text("alice:70000000:65536\n")
    done = root.install(deb)
    for kind in ("uid", "gid"):
        assert f"reserved sub-{kind}s 1000000-66535999 for root" in done.stdout
        assert f"root:{RANGE}" in reservations(root, kind)
    # A node's data: qvdctl's own database under /var/lib/qvd, and a file in the storage.
    root.run("qvdctl", "config", "get")
    assert root.file("var/lib/qvd/qvd.db").is_file()
    root.file(STORAGE_FILE).parent.mkdir(parents=True)
    root.file(STORAGE_FILE).write_text("PRETTY_NAME=kept\n")
    conf = root.file("etc/qvd/node.conf")
    conf.write_text(conf.read_text() + "nodename = node7\n")

    root.run("dpkg", "--remove", "qvd-node")
    assert not root.file("usr/bin/qvdctl").exists()
    assert not root.file("usr/lib/qvd-node").exists()
    assert conf.read_text().endswith("nodename = node7\n")
    assert root.file(STORAGE_FILE).read_text() == "PRETTY_NAME=kept\n"
    assert root.file("var/lib/qvd/qvd.db").is_file()
    assert f"root:{RANGE}" in reservations(root, "uid")  # config state stays until purge

    root.run("dpkg", "--purge", "qvd-node")
    assert not root.file("etc/qvd").exists()
    assert not root.file("var/lib/qvd-node").exists()
    assert reservations(root, "uid") == ["alice:70000000:65536"]
    assert reservations(root, "gid") == []
    assert root.file(STORAGE_FILE).read_text() == "PRETTY_NAME=kept\n"
    assert root.file("var/lib/qvd/qvd.db").is_file()
    assert "qvd-node" not in root.run("dpkg-query", "-W", "-f=${Package}\\n", check=False).stdout


def test_ranges_already_there_or_overlapping_are_left_alone_even_by_purge(
    root: DebianRoot, deb: Path
) -> None:
    # The admin reserved the sub-uids by hand (README's old advice); bob holds sub-gids
    # inside the range.
    root.file("etc/subuid").write_text(f"root:{RANGE}\n")
    root.file("etc/subgid").write_text("bob:1500000:65536\n")
    done = root.install(deb)
    assert "reserved sub-uids" not in done.stdout
    assert "NOT reserving sub-gids 1000000-66535999 for root: /etc/subgid gives some of " \
        "them to bob" in done.stdout
    assert reservations(root, "uid") == [f"root:{RANGE}"]
    assert reservations(root, "gid") == ["bob:1500000:65536"]
    root.run("dpkg", "--purge", "qvd-node")
    assert reservations(root, "uid") == [f"root:{RANGE}"]
    assert reservations(root, "gid") == ["bob:1500000:65536"]


@contextlib.contextmanager
def booted(root: DebianRoot, lxcpath: Path) -> Iterator[Callable[..., str]]:
    """``root`` booted with systemd as a privileged LXC container with no network, as
    qvdctl configures a VM's; yields ``run(*argv)``, which runs a command in it and returns
    its output. Halted (killed after 30 s) on the way out."""
    name = "qvd-9901"  # qvdctl's container names; 9901: no VM of a test has that id
    write_config(ContainerSpec(name=name, rootfs=root.path, hostname="qvdpkg",
                               halt_signal="SIGRTMIN+3"), lxcpath)  # fmt: skip
    where = ["-P", str(lxcpath), "-n", name]

    def run(*argv: str, check: bool = True) -> str:
        done = subprocess.run(["lxc-attach", *where, "--", *argv], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=120)
        if check:
            assert done.returncode == 0, f"{' '.join(argv)}: {done.stdout}{done.stderr}"
        return done.stdout

    subprocess.run(["lxc-start", *where], check=True, capture_output=True, timeout=120)
    try:
        until(lambda: run("systemctl", "is-system-running", check=False).strip()
              in ("running", "degraded"), "systemd to finish booting", timeout=240, step=0.5)
        yield run
    finally:
        if subprocess.run(["lxc-stop", *where, "-t", "30"], capture_output=True,
                          timeout=120).returncode != 0:
            subprocess.run(["lxc-stop", *where, "-k"], capture_output=True, timeout=60)


def test_systemd_runs_the_packaged_hkd_which_registers_renews_and_stops_cleanly(
    root: DebianRoot, deb: Path, tmp_path: Path
) -> None:
    node = "pkgnode"
    with pg_server() as server:
        url = server.url("qvdpkg")
        root.share(server.dir)
        admin = AdminCli(tmp_path / "admin", url)
        started = time.monotonic()
        root.install(deb)
        installed = time.monotonic()
        # The sample, filled in as the admin would; a heartbeat every 2 s (a fifth of it).
        conf = root.file("etc/qvd/node.conf")
        conf.write_text(conf.read_text() + f"nodename = {node}\n"
                        f"database.host = {server.dir}\ndatabase.name = qvdpkg\n"
                        "database.user = qvd\ninternal.hkd.cluster.node.timeout = 10\n")
        with booted(root, tmp_path / "lxc") as run:
            up = time.monotonic()
            run("systemctl", "start", "qvd-hkd")
            until(lambda: admin.hosts().get(node, {}).get("State") == "running",
                  "the packaged HKD to register", timeout=120, step=0.2)
            registered = time.monotonic()
            # qvd-hkd wants the prepared parent, which serves once it has imported qvdfs.
            until(lambda: run("sh", "-c", "test -S /run/qvdfs/parent.sock && systemctl "
                              "is-active qvdfs-parent", check=False).strip() == "active",
                  "qvdfs-parent to serve", timeout=60, step=0.2)
            ages = [admin.hosts()[node]["LeaseAge"]]

            def renewed() -> bool:  # the lease's age fell: the HKD renewed it
                ages.append(admin.hosts()[node]["LeaseAge"])
                return ages[-1] < ages[-2]

            until(renewed, "a lease renewal", timeout=30, step=0.5)
            run("systemctl", "stop", "qvd-hkd")
            assert admin.hosts()[node]["State"] == "stopped"
            # A clean exit (status 0, not a kill at TimeoutStopSec), logged to the journal.
            assert run("systemctl", "show", "-P", "Result", "qvd-hkd").strip() == "success"
            assert run("systemctl", "show", "-P", "ExecMainStatus", "qvd-hkd").strip() == "0"
            journal = run("journalctl", "-u", "qvd-hkd", "-o", "cat", "--no-pager")
            assert f"host {node} stopped" in journal
        print(f"apt install {installed - started:.1f} s, boot {up - installed:.1f} s, "
              f"systemctl start to registered {registered - up:.1f} s")
    root.file(STORAGE_FILE).parent.mkdir(parents=True)
    root.file(STORAGE_FILE).write_text("PRETTY_NAME=kept\n")
    root.run("dpkg", "--remove", "qvd-node")
    assert root.file(STORAGE_FILE).read_text() == "PRETTY_NAME=kept\n"
