"""Disk images: import into images/, and extraction into basefs/ (real tarballs, real files)."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import io
import os
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import libarchive
import pytest

from qvdctl.errors import QvdError
from qvdctl.images.extract import ensure_extracted, find_root, image_kind
from tests.support import REPO
from tests.support.mounts import force_unmount
from tools.imagebuild import build_image_tarball

# A capability set as setcap cap_net_raw+ep writes it (VFS_CAP_REVISION_2).
CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    """A real tmpfs of ``size`` at ``path``: a disk that fills up."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "qvdtest", str(path)], check=True)
    try:
        yield path
    finally:
        force_unmount(path)


def _zstd(plain: Path, dest: Path) -> Path:
    data = plain.read_bytes()
    with libarchive.file_writer(str(dest), "raw", "zstd") as archive:
        archive.add_file_from_memory("data", len(data), data)
    return dest


def _members(dest: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    """A tarball holding exactly ``members`` (with a root that has sbin/)."""
    with tarfile.open(dest, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        sbin = tarfile.TarInfo("sbin")
        sbin.type, sbin.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(sbin)
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return dest


def _info(name: str, type_=tarfile.REGTYPE, **attrs) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.mode = attrs.pop("mode", 0o644)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


# --- compressions and image kinds -------------------------------------------------


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz", "", "zst"])
def test_every_compression_extracts(tmp_path, rootfs, compression):
    if compression == "zst":
        plain = build_image_tarball(tmp_path / "plain.tar", rootfs, compression="")
        archive = _zstd(plain, tmp_path / "image.tar.zst")
    else:
        archive = build_image_tarball(tmp_path / f"image.tar.{compression}", rootfs, compression=compression)
    target = tmp_path / "basefs" / ".images" / archive.name
    assert ensure_extracted(archive, target) is True
    assert (target / "bin" / "busybox").read_bytes() == (rootfs / "bin" / "busybox").read_bytes()
    assert os.readlink(target / "bin" / "sh") == "busybox"
    assert image_kind(target) == "basic"


def test_compression_is_detected_from_content_not_name(tmp_path, rootfs):
    # An xz tarball wearing a .tgz name.
    archive = build_image_tarball(tmp_path / "misnamed.tgz", rootfs, compression="xz")
    target = tmp_path / "out"
    ensure_extracted(archive, target)
    assert (target / "etc" / "inittab").is_file()


def test_basic_and_extended_images(tmp_path, rootfs):
    basic = build_image_tarball(tmp_path / "basic.tgz", rootfs)
    extended = build_image_tarball(tmp_path / "extended.tgz", rootfs, extended=True)
    ensure_extracted(basic, tmp_path / "b")
    ensure_extracted(extended, tmp_path / "e")
    assert image_kind(tmp_path / "b") == "basic" and find_root(tmp_path / "b") == tmp_path / "b"
    assert image_kind(tmp_path / "e") == "extended"
    assert find_root(tmp_path / "e") == tmp_path / "e" / "rootfs"


def test_an_archive_without_a_root_is_refused(tmp_path):
    archive = tmp_path / "noroot.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.addfile(_info("etc", tarfile.DIRTYPE, mode=0o755))
    with pytest.raises(QvdError, match="neither sbin/ nor rootfs/sbin/"):
        ensure_extracted(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_owners_modes_links_devices_and_xattrs_are_kept(tmp_path):
    cap = _info("sbin/ping", mode=0o4755, uid=0, gid=0)
    cap.pax_headers = {
        "LIBARCHIVE.xattr.security.capability": base64.b64encode(CAP_NET_RAW).decode(),
        "SCHILY.xattr.user.origin": "image",
    }
    members = [
        # Numeric owners win over names: "root" here must not become uid 0.
        (_info("etc/owned", uid=1234, gid=5678, uname="root", gname="root", mode=0o640), b"x"),
        (_info("etc", tarfile.DIRTYPE, mode=0o755), b""),
        (cap, b"#!/bin/sh\n"),
        (_info("etc/hard", tarfile.LNKTYPE, linkname="etc/owned"), b""),
        (_info("etc/soft", tarfile.SYMTYPE, linkname="/etc/owned", mode=0o777), b""),
        (_info("dev", tarfile.DIRTYPE, mode=0o755), b""),
        (_info("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666), b""),
        (_info("tmp", tarfile.DIRTYPE, mode=0o1777), b""),
    ]
    target = tmp_path / "out"
    ensure_extracted(_members(tmp_path / "attrs.tgz", members), target)
    owned = (target / "etc" / "owned").lstat()
    assert (owned.st_uid, owned.st_gid, stat.S_IMODE(owned.st_mode)) == (1234, 5678, 0o640)
    ping = (target / "sbin" / "ping").lstat()
    assert stat.S_IMODE(ping.st_mode) == 0o4755
    assert os.getxattr(target / "sbin" / "ping", "security.capability") == CAP_NET_RAW
    assert os.getxattr(target / "sbin" / "ping", "user.origin") == b"image"
    assert (target / "etc" / "hard").lstat().st_ino == owned.st_ino
    assert os.readlink(target / "etc" / "soft") == "/etc/owned"
    null = (target / "dev" / "null").lstat()
    assert stat.S_ISCHR(null.st_mode)
    assert (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert stat.S_IMODE((target / "tmp").lstat().st_mode) == 0o1777


# --- hostile archives -------------------------------------------------------------


def _hostile_cases(outside: Path) -> dict[str, list]:
    secret = outside / "secret"
    return {
        "absolute path": [(_info(str(outside / "pwned")), b"owned")],
        "dot-dot": [(_info("etc/../../../../outside/pwned"), b"owned")],
        "symlink then write through it": [
            (_info("escape", tarfile.SYMTYPE, linkname=str(outside), mode=0o777), b""),
            (_info("escape/pwned"), b"owned"),
        ],
        "hard link outside (relative)": [
            (_info("hl", tarfile.LNKTYPE, linkname="../../../../outside/secret"), b""),
        ],
        "hard link outside (absolute)": [
            (_info("hl", tarfile.LNKTYPE, linkname=str(secret)), b""),
        ],
        "hard link through a symlink": [
            (_info("escape", tarfile.SYMTYPE, linkname=str(outside), mode=0o777), b""),
            (_info("hl", tarfile.LNKTYPE, linkname="escape/secret"), b""),
        ],
    }


@pytest.mark.parametrize("case", list(_hostile_cases(Path("/x"))))
def test_hostile_archive_writes_nothing_outside(tmp_path, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("keep me")
    # Deep enough that the ".." members would land exactly in outside/.
    target = tmp_path / "a" / "b" / "c"
    archive = _members(tmp_path / "hostile.tgz", _hostile_cases(outside)[case])
    with pytest.raises(QvdError) as info:
        ensure_extracted(archive, target)
    message = str(info.value)
    assert "\n" not in message and message.startswith("extracting hostile.tgz failed: ")
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_text() == "keep me"
    assert (outside / "secret").stat().st_nlink == 1
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir() if ".tmp-" in p.name] == []


@pytest.mark.parametrize("content", [os.urandom(4096), b"just some text\n" * 50, b""])
def test_not_a_tarball_is_refused(tmp_path, content):
    archive = tmp_path / "junk.tgz"
    archive.write_bytes(content)
    with pytest.raises(QvdError) as info:
        ensure_extracted(archive, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_hostile_image_through_the_cli_fails_the_start(cli, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("keep me")
    cases = _hostile_cases(outside)
    archive = _members(tmp_path / "evil.tgz", cases["symlink then write through it"])
    cli.run("config", "set", "vm.hypervisor=lxc", "vm.lxc.unionfs.type=overlayfs",
            "vm.start.mount_only=1")
    cli.run("osf", "add", "name=o")
    cli.run("di", "add", f"path={archive}", "osf=o")
    cli.run("user", "add", "login=u", "password=p")
    cli.run("vm", "add", "name=v", "user=u", "osf=o")
    error = cli.fails("vm", "start", "-f", "name=v")
    assert "extracting the image failed" in error and "written through the symlink" in error
    assert cli.vm("v")["State"] == "stopped"
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert not (cli.root / "basefs" / ".images" / "evil.tgz").exists()


# --- once per image, never half ---------------------------------------------------


_CHILD = """
import sys
from pathlib import Path
from qvdctl.images.extract import ensure_extracted
print(ensure_extracted(Path(sys.argv[1]), Path(sys.argv[2])))
"""


@pytest.mark.timeout(180)
def test_concurrent_extraction_happens_once(tmp_path, rootfs):
    archive = build_image_tarball(tmp_path / "image.tgz", rootfs)
    target = tmp_path / "basefs" / ".images" / "image.tgz"
    target.parent.mkdir(parents=True)
    # Hold the lock so every child is provably waiting at the same time.
    with open(target.parent / ".image.tgz.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        children = [
            subprocess.Popen([sys.executable, "-c", _CHILD, str(archive), str(target)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=REPO)
            for _ in range(6)
        ]
        try:
            time.sleep(2)
            assert all(c.poll() is None for c in children), "a child did not wait for the lock"
            assert not target.exists()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    outputs = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        outputs.append(out.strip())
    assert sorted(outputs) == ["False"] * 5 + ["True"]
    assert (target / "bin" / "busybox").is_file()


def test_a_crashed_extraction_is_not_trusted(tmp_path, rootfs):
    archive = build_image_tarball(tmp_path / "image.tgz", rootfs)
    target = tmp_path / "basefs" / "image.tgz"
    target.parent.mkdir()
    half = target.parent / ".image.tgz.tmp-99999"
    (half / "bin").mkdir(parents=True)
    assert ensure_extracted(archive, target) is True
    assert not half.exists()
    assert (target / "sbin").is_dir()


def test_a_truncated_archive_leaves_no_tree(tmp_path, rootfs):
    whole = build_image_tarball(tmp_path / "whole.tgz", rootfs).read_bytes()
    archive = tmp_path / "truncated.tgz"
    archive.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(QvdError, match="extracting truncated.tgz failed"):
        ensure_extracted(archive, tmp_path / "basefs" / "truncated.tgz")
    assert list((tmp_path / "basefs").iterdir()) == [tmp_path / "basefs" / ".truncated.tgz.lock"]


def test_a_full_disk_leaves_no_tree(tmp_path, rootfs):
    archive = build_image_tarball(tmp_path / "image.tgz", rootfs)
    with small_tmpfs(tmp_path / "basefs", "512k") as basefs:
        with pytest.raises(QvdError, match="extracting image.tgz failed"):
            ensure_extracted(archive, basefs / "image.tgz")
        assert [p.name for p in basefs.iterdir()] == [".image.tgz.lock"]


# --- di add -----------------------------------------------------------------------


def test_a_failed_copy_registers_nothing(cli, tmp_path, rootfs):
    archive = build_image_tarball(tmp_path / "big.tgz", rootfs)
    assert archive.stat().st_size > 256 * 1024
    cli.run("osf", "add", "name=o")
    with small_tmpfs(cli.root / "images", "256k") as images:
        error = cli.fails("di", "add", f"path={archive}", "osf=o")
        assert "copying" in error and "No space left on device" in error
        assert list(images.iterdir()) == []
    assert cli.json("di", "list") == []


def test_di_add_refuses_what_is_not_a_tarball(cli, tmp_path):
    junk = tmp_path / "junk.tgz"
    junk.write_bytes(os.urandom(10000))
    cli.run("osf", "add", "name=o")
    assert "is not a tar archive" in cli.fails("di", "add", f"path={junk}", "osf=o")
    assert "is not a file" in cli.fails("di", "add", f"path={tmp_path}/missing.tgz", "osf=o")
    assert "image file name" in cli.fails("di", "add", f"path={tmp_path}/.hidden", "osf=o")
    assert cli.json("di", "list") == []
    assert list((cli.root / "images").iterdir()) == []
