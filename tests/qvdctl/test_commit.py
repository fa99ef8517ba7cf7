"""``di commit``: a stopped VM's changes become a new image a second VM boots from."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.qvdctl import Cli, cleanup_root, stock_unionfs_wrapper
from tools.imagebuild import build_busybox_rootfs, build_image_tarball


@pytest.fixture(scope="module")
def tarball(tmp_path_factory) -> Path:
    rootfs = build_busybox_rootfs(tmp_path_factory.mktemp("busybox") / "root")
    os.link(rootfs / "etc" / "hostname", rootfs / "etc" / "hostname.link")
    (rootfs / "opt" / "old").mkdir(parents=True)
    (rootfs / "opt" / "old" / "a").write_text("a\n")
    (rootfs / "opt" / "old" / "b").write_text("b\n")
    return build_image_tarball(tmp_path_factory.mktemp("tarballs") / "image.0.22.tgz", rootfs)


@contextlib.contextmanager
def _node(root: Path, tarball: Path) -> Iterator[Cli]:
    """VM 'v' on OSF 'o' of image ``tarball`` (mount-only starts, qvdfs roots)."""
    cli = Cli(root)
    try:
        cli.run("config", "set", "vm.hypervisor=lxc", "vm.start.mount_only=1",
                "vm.overlay.persistent=1")
        cli.run("osf", "add", "name=o")
        cli.run("di", "add", f"path={tarball}", "osf=o")
        cli.run("user", "add", "login=u", "password=p")
        cli.run("vm", "add", "name=v", "user=u", "osf=o")
        yield cli
    finally:
        cleanup_root(cli.root)


@pytest.fixture
def cli(tmp_path, tarball):
    with _node(tmp_path / "root", tarball) as cli:
        yield cli


def _rootfs(cli: Cli, vm_id: int) -> Path:
    return cli.root / "rootfs" / f"1-{vm_id}-fs"


@contextlib.contextmanager
def _second_vm(cli: Cli, tag: str) -> Iterator[Path]:
    """VM 'w' (id 2) on the image tagged ``tag``, started (which extracts the image); its
    root, stopped on the way out."""
    cli.run("vm", "add", "name=w", "user=u", "osf=o", f"di_tag={tag}")
    cli.run("vm", "start", "-f", "name=w")
    try:
        yield _rootfs(cli, 2)
    finally:
        cli.run("vm", "stop", "-f", "name=w")


def _change_things(root: Path) -> None:
    """Add, change and remove files, replace a folder, link, mknod, setxattr: as a VM would."""
    (root / "etc" / "added.conf").write_text("new\n")
    (root / "etc" / "motd").write_text("changed\n")
    (root / "etc" / "profile").unlink() if (root / "etc" / "profile").exists() else None
    (root / "etc" / "hostname.link").unlink()
    # A folder replaced: everything of the base's goes, the new one is opaque.
    for name in ("a", "b"):
        (root / "opt" / "old" / name).unlink()
    (root / "opt" / "old").rmdir()
    (root / "opt" / "old").mkdir()
    (root / "opt" / "old" / "c").write_text("c\n")
    os.link(root / "etc" / "added.conf", root / "etc" / "added.hard")
    os.mknod(root / "dev" / "null2", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.setxattr(root / "etc" / "added.conf", "user.note", b"kept")
    os.chown(root / "etc" / "added.conf", 1234, 5678)
    os.chmod(root / "etc" / "added.conf", 0o640)
    os.utime(root / "etc" / "added.conf", ns=(1_000_000_000, 1_500_000_000_123))
    (root / "bin" / "sh.old").symlink_to("busybox")
    # Sockets cannot be archived: a new one is not in the image, one over a base file
    # removes it.
    (root / "etc" / "os-release").unlink()
    for name in ("app.sock", "os-release"):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(root / "etc" / name))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("union", ["qvdfs", "overlayfs"])
def test_commit_round_trip(cli, union):
    # The kernel writes the overlay format qvdfs writes: its whiteouts and opaque folders.
    cli.run("config", "set", f"vm.lxc.unionfs.type={union}")
    root = _rootfs(cli, 1)
    cli.run("vm", "start", "-f", "name=v")
    had_profile = (root / "etc" / "profile").exists()
    (root / "etc" / "motd").write_text("before\n") if not (root / "etc" / "motd").exists() else None
    _change_things(root)
    assert "is running" in cli.fails("di", "commit", "vm=v")
    cli.run("vm", "stop", "-f", "name=v")
    overlay = cli.root / "overlayfs" / "1-1-overlayfs"
    def contents() -> list[str]:
        # .qvdfs.work is the union daemon's, removed as it exits after the stop.
        return sorted(str(p.relative_to(overlay)) for p in overlay.rglob("*")
                      if not str(p.relative_to(overlay)).startswith(".qvdfs.work"))

    before = contents()

    listed = cli.json("--dry-run", "di", "commit", "vm=v")
    change = {r["Path"]: r["Change"] for r in listed}
    assert change["/etc/added.conf"] == "added"
    assert change["/etc/added.hard"] == "added"
    assert change["/dev/null2"] == "added"
    assert change["/opt/old/c"] == "added"
    assert change["/etc/hostname.link"] == "removed"
    assert change["/opt/old/a"] == "removed" and change["/opt/old/b"] == "removed"
    assert change["/bin/sh.old"] == "added"
    assert change["/etc/os-release"] == "removed" and "/etc/app.sock" not in change
    if had_profile:
        assert change["/etc/profile"] == "removed"
    assert "/etc/hostname" not in change and "/bin/busybox" not in change
    assert len(cli.json("di", "list")) == 1  # the dry run wrote nothing
    assert os.listdir(cli.root / "images") == ["image.0.22.tgz"]

    out = cli.json("di", "commit", "vm=v", "tag=tested")
    assert out["message"].startswith("DI added with id 2")
    (new,) = [d for d in cli.json("di", "list") if d["Id"] == 2]
    assert set(new["Tags"].split(",")) == {"tested", "head", out["version"]}
    assert contents() == before
    assert not [n for n in os.listdir(cli.root / "images") if n.startswith(".")]

    cli.run("vm", "add", "name=w", "user=u", "osf=o", "di_tag=tested")
    cli.run("vm", "start", "-f", "name=w")
    try:
        w = _rootfs(cli, 2)
        assert (w / "etc" / "added.conf").read_text() == "new\n"
        assert (w / "etc" / "motd").read_text() == "changed\n"
        assert not (w / "etc" / "hostname.link").exists()
        assert (w / "etc" / "profile").exists() is False
        assert sorted(os.listdir(w / "opt" / "old")) == ["c"]
        st = os.stat(w / "etc" / "added.conf")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o640)
        assert st.st_mtime_ns == 1_500_000_000_123
        assert os.getxattr(w / "etc" / "added.conf", "user.note") == b"kept"
        assert os.stat(w / "etc" / "hostname").st_nlink == 1  # its link was removed
        assert os.stat(w / "etc" / "added.hard").st_ino == st.st_ino
        dev = os.stat(w / "dev" / "null2")
        assert stat.S_ISCHR(dev.st_mode) and dev.st_rdev == os.makedev(1, 3)
        assert os.readlink(w / "bin" / "sh.old") == "busybox"
        assert not (w / "etc" / "app.sock").exists() and not (w / "etc" / "os-release").exists()
        # Nothing of the unions' bookkeeping reaches the image.
        tree = cli.root / "basefs" / ".images" / new["Path"]
        for path in [tree, *tree.rglob("*")]:
            names = os.listxattr(path, follow_symlinks=False)
            assert not [n for n in names if n.startswith("trusted.overlay.")], path
            if path.is_char_device() and not path.is_symlink():
                assert path.stat().st_rdev != 0, path
        assert not (tree / ".qvdfs.work").exists()
        # The second VM's own overlay starts empty: the image carries the changes.
        fresh = cli.root / "overlayfs" / "2-2-overlayfs"
        assert [n for n in os.listdir(fresh) if n != ".qvdfs.work"] == []
    finally:
        cli.run("vm", "stop", "-f", "name=w")


@pytest.mark.timeout(180)
def test_commit_refusals(cli, tmp_path):
    assert "never been started" in cli.fails("di", "commit", "vm=v")
    assert "no VM named" in cli.fails("di", "commit", "vm=nope")
    assert "has no --dry-run" in cli.fails("--dry-run", "vm", "list")
    cli.run("vm", "start", "-f", "name=v")
    (_rootfs(cli, 1) / "big").write_bytes(os.urandom(6 << 20))
    cli.run("vm", "stop", "-f", "name=v")
    version = cli.json("di", "list")[0]["Version"]
    assert "already on DI 1" in cli.fails("di", "commit", "vm=v", f"tag={version}")
    assert "already on DI 1" in cli.fails("di", "commit", "vm=v", "tag=default")

    # images/ on a small tmpfs: the disk fills half-way through the tarball.
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    try:
        image = cli.root / "images" / "image.0.22.tgz"
        (small / image.name).write_bytes(image.read_bytes())
        cli.run("config", "set", f"path.storage.images={small}")
        error = cli.fails("di", "commit", "vm=v", "tag=full")
        assert "No space left" in error, error
        assert os.listdir(small) == [image.name]
        assert len(cli.json("di", "list")) == 1
    finally:
        subprocess.run(["umount", str(small)], check=True)


def _metadata(path: Path) -> tuple[int, int, int, dict[str, bytes]]:
    """What a commit must carry over: owner, mode and every xattr (ACLs are xattrs too)."""
    st = path.lstat()
    xattrs = {n: os.getxattr(path, n, follow_symlinks=False)
              for n in os.listxattr(path, follow_symlinks=False)}
    return st.st_uid, st.st_gid, st.st_mode, xattrs


@pytest.mark.timeout(300)
def test_commit_keeps_acls_capabilities_xattrs_links_and_devices(cli):
    """ACLs (access and default), file capabilities and user xattrs set in a VM, hard links
    made there and device nodes it created are all in the committed image's tree."""
    root = _rootfs(cli, 1)
    cli.run("vm", "start", "-f", "name=v")
    shared = root / "srv" / "shared"
    shared.mkdir(parents=True)
    subprocess.run(["setfacl", "-m", "u:1001:rwx,g:1002:r-x,m::rwx",
                    "-d", "-m", "u:1001:rwx,g::r-x", str(shared)], check=True)
    (shared / "inherits").write_text("x\n")  # gets the default ACL as its access ACL
    (root / "etc" / "secret").write_text("s\n")
    subprocess.run(["setfacl", "-m", "u:1001:r--", str(root / "etc" / "secret")], check=True)
    # A base file changed in metadata only (chown, ACL, xattr) is committed with its data.
    subprocess.run(["setfacl", "-m", "g:1003:r--", str(root / "etc" / "hostname")], check=True)
    ping = root / "bin" / "pinger"
    ping.write_bytes(b"#!/bin/sh\n")
    ping.chmod(0o755)
    os.setxattr(ping, "user.origin", b"vm")
    subprocess.run(["setcap", "cap_net_raw+ep", str(ping)], check=True)
    os.link(ping, root / "srv" / "pinger.hard")  # a link across folders, made in the VM
    os.mknod(root / "dev" / "loop9", stat.S_IFBLK | 0o660, os.makedev(7, 9))
    os.mkfifo(root / "srv" / "fifo", 0o620)
    paths = ["srv/shared", "srv/shared/inherits", "etc/secret", "etc/hostname", "bin/pinger",
             "dev/loop9", "srv/fifo"]
    before = {p: _metadata(root / p) for p in paths}
    assert "system.posix_acl_default" in before["srv/shared"][3]
    assert "system.posix_acl_access" in before["srv/shared/inherits"][3]
    assert "security.capability" in before["bin/pinger"][3]
    cli.run("vm", "stop", "-f", "name=v")

    out = cli.json("di", "commit", "vm=v", "tag=acl")
    base_hostname = (cli.root / "basefs" / ".images" / "image.0.22.tgz" / "etc" / "hostname"
                     ).read_text()
    tree = cli.root / "basefs" / ".images" / out["path"]
    with _second_vm(cli, "acl") as w:
        for where in (tree, w):
            assert {p: _metadata(where / p) for p in paths} == before, where
            facl = subprocess.run(["getfacl", "-cn", str(where / "srv" / "shared")],
                                  capture_output=True, text=True, check=True).stdout.split()
            assert {"user:1001:rwx", "group:1002:r-x", "default:user:1001:rwx"} <= set(facl)
            caps = subprocess.run(["getcap", str(where / "bin" / "pinger")],
                                  capture_output=True, text=True, check=True).stdout
            assert "cap_net_raw=ep" in caps, caps
            assert (where / "etc" / "hostname").read_text() == base_hostname
            assert (where / "srv" / "pinger.hard").stat().st_ino == (
                where / "bin" / "pinger").stat().st_ino
            assert stat.S_ISBLK((where / "dev" / "loop9").lstat().st_mode)
            assert (where / "dev" / "loop9").lstat().st_rdev == os.makedev(7, 9)
            assert stat.S_ISFIFO((where / "srv" / "fifo").lstat().st_mode)


@pytest.mark.timeout(180)
def test_commit_of_an_extended_image_keeps_what_is_beside_its_rootfs(tmp_path):
    """An extended image (the root under rootfs/) commits to an extended image: the changes
    under rootfs/, everything beside it as it was."""
    staged = tmp_path / "staged"
    build_busybox_rootfs(staged / "rootfs")
    (staged / "hooks").mkdir()  # what QVD keeps beside rootfs/
    (staged / "hooks" / "start").write_text("#!/bin/sh\n")
    tarball = build_image_tarball(tmp_path / "ext.1.0.tgz", staged)
    with _node(tmp_path / "root", tarball) as cli:
        cli.run("vm", "start", "-f", "name=v")
        (_rootfs(cli, 1) / "etc" / "added").write_text("in the VM\n")
        cli.run("vm", "stop", "-f", "name=v")
        out = cli.json("di", "commit", "vm=v", "tag=next")
        with _second_vm(cli, "next") as w:
            tree = cli.root / "basefs" / ".images" / out["path"]
            assert (tree / "rootfs" / "etc" / "added").read_text() == "in the VM\n"
            assert (tree / "hooks" / "start").read_text() == "#!/bin/sh\n"
            assert sorted(os.listdir(tree)) == ["hooks", "rootfs"]
            assert (w / "etc" / "added").read_text() == "in the VM\n"


@pytest.mark.timeout(180)
def test_commit_of_a_stock_unionfs_fuse_overlay_honours_its_markers(cli, tmp_path):
    """unionfs-fuse deletes a base file with only a marker, .unionfs-fuse/<dir>/<name>_HIDDEN~,
    without making <dir> in the overlay: the commit must leave the file out all the same."""
    wrapper = stock_unionfs_wrapper(tmp_path / "unionfs")
    cli.run("config", "set", "vm.lxc.unionfs.type=unionfs-fuse",
            f"command.unionfs-fuse={wrapper}")
    root = _rootfs(cli, 1)
    cli.run("vm", "start", "-f", "name=v")
    (root / "opt" / "old" / "a").unlink()
    (root / "etc" / "added.conf").write_text("new\n")
    cli.run("vm", "stop", "-f", "name=v")
    overlay = cli.root / "overlayfs" / "1-1-overlayfs"
    assert (overlay / ".unionfs-fuse" / "opt" / "old" / "a_HIDDEN~").exists()
    assert not (overlay / "opt").exists()

    change = {r["Path"]: r["Change"] for r in cli.json("--dry-run", "di", "commit", "vm=v")}
    assert change == {"/opt/old/a": "removed", "/etc/added.conf": "added"}
    out = cli.json("di", "commit", "vm=v", "tag=next")
    tree = cli.root / "basefs" / ".images" / out["path"]
    with _second_vm(cli, "next") as w:
        assert sorted(os.listdir(tree / "opt" / "old")) == ["b"]
        assert sorted(os.listdir(w / "opt" / "old")) == ["b"]
        assert not (tree / ".unionfs-fuse").exists()
