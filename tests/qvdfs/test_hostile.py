"""Hostile input against a real qvdfs mount and against qvdctl: nothing gets out, nothing breaks.

Container-side actions run in a forked child that has chrooted into the mountpoint, as a
root process inside a container sees it: its symlinks resolve inside the union, so a file
changing outside the branches can only be the daemon's (root) doing. A canary file and
folder outside every branch are checked after each attack (content, mode, mtime, names),
and the daemon must still answer.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import stat
import subprocess
import tarfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

from qvdctl.container.config import hostname_for
from qvdctl.errors import QvdError
from qvdctl.images.extract import ensure_extracted
from qvdproc.mountinfo import is_mounted
from tests.support.mounts import NODE_OPTIONS, QVDFS, force_unmount, node_branches, qvdfs_mount
from tests.support.qvdctl import Cli
from tests.support.trees import build_base, describe

RESERVED = [".qvdfs.work", ".unionfs-fuse", ".unionfs"]


@pytest.fixture
def dirs(dirs: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """The branches, and a folder ``outside`` them holding a canary nothing may touch."""
    d = {**dirs, "outside": tmp_path / "outside"}
    d["outside"].mkdir()
    (d["outside"] / "canary").write_text("host secret\n")
    os.chmod(d["outside"] / "canary", 0o600)
    return d


def _snapshot(outside: Path) -> dict[str, tuple]:
    """What an attacker could have changed outside the branches."""
    out = {}
    for p in sorted(outside.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(outside))] = (
            st.st_mode, st.st_uid, st.st_nlink, st.st_size, st.st_mtime_ns,
            p.read_bytes() if p.is_file() else None)
    return out


def in_container(root: Path, action: Callable[[], object], timeout: float = 60) -> object:
    """Run ``action`` as root chrooted into ``root``; return its result or raise its error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            os.chroot(root)
            os.chdir("/")
            payload = ("ok", action())
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            payload = ("error", f"{exc!r}\n{traceback.format_exc()}")
        with os.fdopen(w, "wb") as f:
            pickle.dump(payload, f)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        deadline = time.monotonic() + timeout
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise AssertionError("container-side action timed out")
            time.sleep(0.01)
        kind, value = pickle.load(f)
    if kind == "error":
        raise AssertionError(f"container-side action failed: {value}")
    return value


def _errno_of(fn: Callable[[], object]) -> int | None:
    try:
        fn()
    except OSError as exc:
        return exc.errno
    return None


# --- symlinks, hard links and '..' ------------------------------------------------------


def test_symlinks_in_the_base_never_reach_host_paths(dirs: dict[str, Path]) -> None:
    canary = dirs["outside"] / "canary"
    base = dirs["base"]
    (base / "etc").mkdir()
    os.symlink(str(canary), base / "abs")
    os.symlink("../" * 20 + str(canary).lstrip("/"), base / "rel")
    os.symlink("/etc/shadow", base / "etc" / "shadow-link")
    os.symlink("/", base / "rootlink")
    os.symlink(str(dirs["outside"]), base / "outdir")
    before = _snapshot(dirs["outside"])
    host_root = set(os.listdir("/"))

    def attack() -> dict[str, object]:
        seen: dict[str, object] = {}
        for name in ("/abs", "/rel", "/outdir/canary", "/rootlink" + str(canary)):
            seen["write " + name] = _errno_of(lambda n=name: open(n, "w").write("pwned"))
            seen["read " + name] = _errno_of(lambda n=name: open(n).read())
            seen["chmod " + name] = _errno_of(lambda n=name: os.chmod(n, 0o777))
            seen["truncate " + name] = _errno_of(lambda n=name: os.truncate(n, 0))
        seen["shadow"] = _errno_of(lambda: open("/etc/shadow-link").read())
        seen["rootlink listing"] = sorted(os.listdir("/rootlink"))
        seen["dotdot listing"] = sorted(os.listdir("/../../.."))
        # Operations the daemon itself performs on the links: copy-up, rename, chown, delete.
        os.chown("/abs", 1234, 1234, follow_symlinks=False)
        os.rename("/rel", "/rel2")
        os.rename("/outdir", "/etc/outdir")
        os.unlink("/rootlink")
        with open("/etc/outdir-file", "w") as f:
            f.write("inside")
        seen["link after chown"] = os.readlink("/abs")
        return seen

    with qvdfs_mount(node_branches(dirs), dirs["mnt"], *NODE_OPTIONS) as mnt:
        seen = in_container(mnt, attack)
        for key, value in seen.items():
            if key.startswith(("write", "read", "chmod", "truncate")) or key == "shadow":
                assert value == errno.ENOENT, (key, value)
        # Inside, "/" and "/../../.." are the union's root, as in a container.
        union_root = ["abs", "etc", "outdir", "rel", "rootlink"]
        assert seen["rootlink listing"] == union_root
        assert seen["dotdot listing"] == union_root
        assert not host_root <= set(union_root)
        assert seen["link after chown"] == str(canary)
        assert os.lstat(mnt / "abs").st_uid == 1234
        assert sorted(os.listdir(mnt)) == ["abs", "etc", "rel2"]
    assert _snapshot(dirs["outside"]) == before
    assert os.lstat(canary).st_uid == 0


def test_a_lower_symlink_to_root_is_never_merged_as_a_directory(dirs: dict[str, Path],
                                                                tmp_path: Path) -> None:
    """A folder in one branch over a symlink to / in another: the host's / never shows."""
    base, upper = dirs["base"], dirs["upper"]
    os.symlink("/", base / "usr")
    (upper / "usr").mkdir()
    (upper / "usr" / "mine").write_text("upper\n")
    (base / "d").mkdir()
    (base / "d" / "lowfile").write_text("low\n")
    os.symlink("/", upper / "d")  # left in an overlay folder by an earlier session
    middle = tmp_path / "middle"
    (middle).mkdir()
    os.symlink("/", middle / "x")
    (upper / "x").mkdir()
    (upper / "x" / "upfile").write_text("up\n")
    (base / "x").mkdir()
    (base / "x" / "lowfile").write_text("low\n")
    branches = f"{upper}=RW:{middle}=RO:{base}=RO"
    with qvdfs_mount(branches, dirs["mnt"], *NODE_OPTIONS) as mnt:
        assert os.listdir(mnt / "usr") == ["mine"]
        assert stat.S_ISLNK(os.lstat(mnt / "d").st_mode)
        assert os.readlink(mnt / "d") == "/"
        x = set(os.listdir(mnt / "x"))
        assert "proc" not in x and x <= {"upfile", "lowfile"}, x
        assert "upfile" in x
        (mnt / "usr" / "new").write_text("n")
        os.mkdir(mnt / "x" / "sub")
        assert sorted(os.listdir(mnt / "usr")) == ["mine", "new"]
    assert not os.path.exists("/new") and not os.path.exists("/sub")
    assert sorted(os.listdir(upper / "usr")) == ["mine", "new"]


def test_hard_link_in_the_base_to_a_host_file_is_never_written(dirs: dict[str, Path]) -> None:
    canary = dirs["outside"] / "canary"
    os.setxattr(canary, "user.tag", b"host")
    os.link(canary, dirs["base"] / "hl")
    before = _snapshot(dirs["outside"])
    xattrs_before = os.listxattr(canary)
    with qvdfs_mount(node_branches(dirs), dirs["mnt"], *NODE_OPTIONS) as mnt:
        os.chmod(mnt / "hl", 0o4777)
        os.chown(mnt / "hl", 4321, 4321)
        os.setxattr(mnt / "hl", "user.tag", b"container")
        os.utime(mnt / "hl", (1, 1))
        with open(mnt / "hl", "r+") as f:
            f.write("PWNED")
        os.truncate(mnt / "hl", 3)
        os.link(mnt / "hl", mnt / "hl2")
        with open(mnt / "hl2", "a") as f:
            f.write("!")
        assert (mnt / "hl").read_text() == "PWN!"
        assert os.getxattr(mnt / "hl", "user.tag") == b"container"
    assert _snapshot(dirs["outside"]) == before
    assert os.listxattr(canary) == xattrs_before
    assert os.getxattr(canary, "user.tag") == b"host"
    assert stat.S_IMODE(canary.stat().st_mode) == 0o600


def test_renames_racing_with_lookups_and_writes(dirs: dict[str, Path]) -> None:
    """Threads swap a folder for a symlink to a host path while others write and walk it."""
    base = dirs["base"]
    (base / "dir").mkdir()
    for i in range(30):
        (base / "dir" / f"f{i}").write_text(f"base {i}\n")
    outside = str(dirs["outside"])
    before = _snapshot(dirs["outside"])

    def attack() -> dict[str, int]:
        stop = time.monotonic() + 6
        counts = {"swaps": 0, "writes": 0, "lookups": 0, "unexpected": 0}
        expected = {errno.ENOENT, errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR,
                    errno.EXDEV, errno.EBUSY}

        def swapper() -> None:
            while time.monotonic() < stop:
                try:
                    os.rename("/dir", "/dir.away")
                    os.symlink(outside, "/dir")
                    os.rename("/dir", "/dir.link")
                    os.rename("/dir.away", "/dir")
                    os.unlink("/dir.link")
                    counts["swaps"] += 1
                except OSError as exc:
                    counts["unexpected"] += exc.errno not in expected

        def writer(k: int) -> None:
            while time.monotonic() < stop:
                for name in ("/dir/f%d" % (k * 7 % 30), "/dir.away/f%d" % (k * 11 % 30),
                             "/dir/canary", "/dir.link/canary"):
                    try:
                        with open(name, "a") as f:
                            f.write("w")
                        counts["writes"] += 1
                    except OSError as exc:
                        counts["unexpected"] += exc.errno not in expected
                k += 1

        def walker() -> None:
            while time.monotonic() < stop:
                for top in ("/", "/dir", "/dir.away", "/dir.link"):
                    try:
                        for entry in os.scandir(top):
                            entry.stat(follow_symlinks=False)
                        counts["lookups"] += 1
                    except OSError as exc:
                        counts["unexpected"] += exc.errno not in expected

        threads = [threading.Thread(target=swapper), threading.Thread(target=walker),
                   *(threading.Thread(target=writer, args=(k,)) for k in range(3))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return counts

    with qvdfs_mount(node_branches(dirs), dirs["mnt"], *NODE_OPTIONS) as mnt:
        counts = in_container(mnt, attack, timeout=90)
        assert counts["swaps"] > 20 and counts["writes"] > 100 and counts["lookups"] > 100, counts
        assert counts["unexpected"] == 0, counts
        # The daemon still serves, and every base file kept its data under some name.
        names = set(os.listdir(mnt))
        assert names & {"dir", "dir.away"}, names
        folder = mnt / ("dir" if "dir" in names and (mnt / "dir").is_dir() else "dir.away")
        for i in range(30):
            text = (folder / f"f{i}").read_text()
            assert text.startswith(f"base {i}\n") and set(text[len(f"base {i}\n"):]) <= {"w"}
        # Any "canary" written went into the union's own folder, never through the link.
        for extra in set(os.listdir(folder)) - {f"f{i}" for i in range(30)}:
            assert extra == "canary" and set((folder / extra).read_text()) <= {"w"}
    assert _snapshot(dirs["outside"]) == before


# --- forged whiteouts and the union's own names --------------------------------------


def test_forged_whiteouts_and_overlay_xattrs_are_refused(dirs: dict[str, Path]) -> None:
    base = dirs["base"]
    (base / "etc").mkdir()
    (base / "etc" / "passwd").write_text("root\n")
    (base / "etc" / "group").write_text("root\n")
    (base / "bin").mkdir()
    (base / "bin" / "sh").write_text("#!\n")
    with qvdfs_mount(node_branches(dirs), dirs["mnt"], *NODE_OPTIONS) as mnt:
        # A 0/0 character device is how overlayfs records a delete: never from the container.
        assert _errno_of(lambda: os.mknod(mnt / "etc" / "passwd", stat.S_IFCHR | 0o600,
                                          os.makedev(0, 0))) in (errno.EEXIST, errno.EPERM)
        assert _errno_of(lambda: os.mknod(mnt / "etc" / "ghost", stat.S_IFCHR | 0o600,
                                          os.makedev(0, 0))) == errno.EPERM
        for attr in ("trusted.overlay.opaque", "trusted.overlay.metacopy",
                     "trusted.overlay.redirect", "trusted.overlay.whatever"):
            for target in (mnt / "etc", mnt / "bin" / "sh"):
                err = _errno_of(lambda t=target, a=attr: os.setxattr(t, a, b"y"))
                assert err in (errno.EPERM, errno.ENOTSUP, errno.EACCES), (attr, target, err)
        assert sorted(os.listdir(mnt / "etc")) == ["group", "passwd"]
        # Entries the union itself marked: an opaque dir and a metadata-only copy.
        os.chmod(mnt / "bin" / "sh", 0o755)
        subprocess.run(["rm", "-r", str(mnt / "etc")], check=True)
        os.mkdir(mnt / "etc")
        (mnt / "etc" / "passwd").write_text("new\n")
        for path in (mnt / "etc", mnt / "bin" / "sh", mnt / "etc" / "passwd"):
            assert not [a for a in os.listxattr(path) if a.startswith("trusted.overlay.")]
            assert _errno_of(lambda p=path: os.getxattr(p, "trusted.overlay.opaque")) in (
                errno.ENODATA, errno.EPERM, errno.ENOTSUP)
            assert _errno_of(lambda p=path: os.removexattr(p, "trusted.overlay.opaque")) in (
                errno.ENODATA, errno.EPERM, errno.ENOTSUP)
        assert os.listdir(mnt / "etc") == ["passwd"]
        assert (mnt / "bin" / "sh").read_text() == "#!\n"
        # A name that looks like a unionfs-fuse marker is just a name.
        (mnt / "bin" / "sh_HIDDEN~").write_text("x")
        assert sorted(os.listdir(mnt / "bin")) == ["sh", "sh_HIDDEN~"]
    with qvdfs_mount(node_branches(dirs), dirs["mnt"], *NODE_OPTIONS) as mnt:
        assert os.listdir(mnt / "etc") == ["passwd"]
        assert sorted(os.listdir(mnt / "bin")) == ["sh", "sh_HIDDEN~"]


@pytest.mark.parametrize("fmt", ["overlay", "unionfs"])
def test_the_unions_own_names_are_invisible_and_reserved(dirs: dict[str, Path], fmt: str) -> None:
    (dirs["base"] / "f").write_text("base\n")
    with qvdfs_mount(node_branches(dirs), dirs["mnt"], *NODE_OPTIONS, "-o", f"whiteout={fmt}") as mnt:
        os.unlink(mnt / "f")  # makes the format's own metadata exist in the upper branch
        (mnt / "g").write_text("g")
        assert sorted(os.listdir(mnt)) == ["g"]
        for name in RESERVED:
            assert _errno_of(lambda n=name: os.lstat(mnt / n)) == errno.ENOENT
            for make in (lambda n=name: os.mkdir(mnt / n), lambda n=name: open(mnt / n, "w"),
                         lambda n=name: os.symlink("x", mnt / n),
                         lambda n=name: os.rename(mnt / "g", mnt / n)):
                assert _errno_of(make) in (errno.EPERM, errno.EACCES, errno.EEXIST), name
        assert sorted(os.listdir(mnt)) == ["g"]
        # Below the root the names are ordinary.
        os.mkdir(mnt / "sub")
        (mnt / "sub" / ".qvdfs.work").write_text("mine")
        assert os.listdir(mnt / "sub") == [".qvdfs.work"]
    with qvdfs_mount(node_branches(dirs), dirs["mnt"], *NODE_OPTIONS, "-o", f"whiteout={fmt}") as mnt:
        assert sorted(os.listdir(mnt)) == ["g", "sub"]
        assert (mnt / "sub" / ".qvdfs.work").read_text() == "mine"


# --- long names and deep paths -------------------------------------------------------


@pytest.mark.parametrize("fmt", ["overlay", "unionfs"])
def test_names_at_the_255_byte_limit(dirs: dict[str, Path], fmt: str) -> None:
    longest = "n" * 251 + "é.c"  # 255 bytes in UTF-8
    assert len(longest.encode()) == 255
    (dirs["base"] / longest).write_text("base\n")
    (dirs["base"] / ("d" * 255)).mkdir()
    (dirs["base"] / ("d" * 255) / ("f" * 255)).write_text("deep\n")
    opts = (*NODE_OPTIONS, "-o", f"whiteout={fmt}")
    with qvdfs_mount(node_branches(dirs), dirs["mnt"], *opts) as mnt:
        assert _errno_of(lambda: open(mnt / ("x" * 256), "w")) == errno.ENAMETOOLONG
        assert _errno_of(lambda: os.rename(mnt / longest, mnt / ("x" * 256))) == errno.ENAMETOOLONG
        (mnt / ("y" * 255)).write_text("new\n")
        with open(mnt / ("d" * 255) / ("f" * 255), "a") as f:
            f.write("more\n")
        err = _errno_of(lambda: os.unlink(mnt / longest))
        # A delete must either happen for good or be refused with the file intact.
        assert err in (None, errno.ENAMETOOLONG), err
        deleted = err is None
    with qvdfs_mount(node_branches(dirs), dirs["mnt"], *opts) as mnt:
        assert (mnt / ("y" * 255)).read_text() == "new\n"
        assert (mnt / ("d" * 255) / ("f" * 255)).read_text() == "deep\nmore\n"
        assert (mnt / longest).exists() is not deleted
        assert _errno_of(lambda: os.stat(mnt / ".qvdfs.work")) == errno.ENOENT


def _walk_down(top: int, names: list[str], create: bool) -> int:
    fd = os.dup(top)
    for name in names:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, dir_fd=fd)
        nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    return fd


def test_paths_beyond_path_max(dirs: dict[str, Path]) -> None:
    levels = [f"{i:03}" + "p" * 200 for i in range(30)]  # about 6 KiB deep
    assert sum(len(n) + 1 for n in levels) > 4096
    base_fd = os.open(dirs["base"], os.O_RDONLY)
    try:
        fd = _walk_down(base_fd, levels, create=True)
        with open(os.open("base-file", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd), "w") as f:
            f.write("from the base\n")
        os.close(fd)
    finally:
        os.close(base_fd)

    def deep_work() -> dict[str, object]:
        os.chdir("/")
        for name in levels:  # relative steps, as a shell's cd would
            os.chdir(name)
        with open("base-file", "a") as f:
            f.write("changed\n")
        with open("new-file", "w") as f:
            f.write("made deep\n")
        os.rename("new-file", "renamed")
        os.mkdir("more")
        os.chdir("/")
        long_path = "/" + "/".join(levels) + "/renamed"
        return {"long path": _errno_of(lambda: os.stat(long_path))}

    with qvdfs_mount(node_branches(dirs), dirs["mnt"], *NODE_OPTIONS) as mnt:
        seen = in_container(mnt, deep_work)
        assert seen["long path"] == errno.ENAMETOOLONG
    with qvdfs_mount(node_branches(dirs), dirs["mnt"], *NODE_OPTIONS) as mnt:
        root = os.open(mnt, os.O_RDONLY)
        try:
            fd = _walk_down(root, levels, create=False)
            try:
                assert sorted(os.listdir(fd)) == ["base-file", "more", "renamed"]
                with open(os.open("base-file", os.O_RDONLY, dir_fd=fd)) as f:
                    assert f.read() == "from the base\nchanged\n"
                with open(os.open("renamed", os.O_RDONLY, dir_fd=fd)) as f:
                    assert f.read() == "made deep\n"
            finally:
                os.close(fd)
        finally:
            os.close(root)


# --- two VMs on one base --------------------------------------------------------------


def test_a_container_wiping_its_root_cannot_touch_another_vms_view(tmp_path: Path) -> None:
    """rm -rf / inside VM A: VM B, sharing the same base, sees every file as before."""
    base = build_base(tmp_path / "base")
    mounts = []
    for vm in ("a", "b"):
        (tmp_path / vm / "upper").mkdir(parents=True)
        (tmp_path / vm / "mnt").mkdir()
        mounts.append((f"{tmp_path / vm / 'upper'}=RW:{base}=RO", tmp_path / vm / "mnt"))
    base_before = describe(base)
    with qvdfs_mount(*mounts[0], *NODE_OPTIONS) as a, qvdfs_mount(*mounts[1], *NODE_OPTIONS) as b:
        b_before = describe(b)

        # No rm binary inside the chroot: remove everything the way rm -rf / would.
        def wipe_in_python() -> list[str]:
            for dirpath, dirnames, filenames in os.walk("/", topdown=False):
                links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
                for n in filenames + links:
                    os.unlink(os.path.join(dirpath, n))
                for n in dirnames:
                    p = os.path.join(dirpath, n)
                    if not os.path.islink(p):
                        os.rmdir(p)
            return os.listdir("/")

        assert in_container(a, wipe_in_python) == []
        assert os.listdir(a) == []
        assert describe(b) == b_before
    assert describe(base) == base_before


# --- the daemon as root, users inside -------------------------------------------------


def test_unprivileged_users_inside_get_the_base_permissions(dirs: dict[str, Path]) -> None:
    (dirs["base"] / "shadow").write_text("hash\n")
    os.chmod(dirs["base"] / "shadow", 0o600)
    (dirs["base"] / "bin").mkdir()
    (dirs["base"] / "bin" / "su").write_text("suid\n")
    os.chmod(dirs["base"] / "bin" / "su", 0o4755)

    def as_nobody() -> dict[str, int | None]:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        return {
            "read shadow": _errno_of(lambda: open("/shadow").read()),
            "write su": _errno_of(lambda: open("/bin/su", "a").write("x")),
            "chmod su": _errno_of(lambda: os.chmod("/bin/su", 0o777)),
            "unlink su": _errno_of(lambda: os.unlink("/bin/su")),
            "create in /": _errno_of(lambda: open("/mine", "w")),
        }

    with qvdfs_mount(node_branches(dirs), dirs["mnt"], *NODE_OPTIONS) as mnt:
        seen = in_container(mnt, as_nobody)
        assert seen == {"read shadow": errno.EACCES, "write su": errno.EACCES,
                        "chmod su": errno.EPERM, "unlink su": errno.EACCES,
                        "create in /": errno.EACCES}
        assert (mnt / "bin" / "su").read_text() == "suid\n"
        assert stat.S_IMODE((mnt / "bin" / "su").stat().st_mode) == 0o4755
    assert os.listdir(dirs["upper"]) in ([], [".qvdfs.work"])


# --- admin input ---------------------------------------------------------------------


@pytest.mark.parametrize("branches", [
    "=RW", ":", "::", "/a=RX", "/a=RW=RO", "relative=RW:/b", "/nonexistent=RW",
    "/a\nb=RW", "/a=RW:/a=RO",
])
def test_malformed_branch_strings_mount_nothing(tmp_path: Path, branches: str) -> None:
    for d in ("a", "b", "m"):
        (tmp_path / d).mkdir()
    (tmp_path / "a" / "keep").write_text("keep")
    spelled = branches.replace("/a", str(tmp_path / "a")).replace("/b", str(tmp_path / "b"))
    result = subprocess.run([QVDFS, *NODE_OPTIONS, spelled, str(tmp_path / "m")],
                            capture_output=True, text=True, timeout=30, cwd=tmp_path)
    try:
        assert result.returncode != 0, result
        errors = [line for line in result.stderr.splitlines() if "warning" not in line]
        assert len(errors) == 1 and errors[0].startswith("qvdfs: "), result.stderr
        assert not is_mounted(tmp_path / "m")
        assert os.listdir(tmp_path / "a") == ["keep"] and os.listdir(tmp_path / "b") == []
        assert os.listdir(tmp_path / "m") == []
    finally:
        force_unmount(tmp_path / "m")


def test_a_symlinked_branch_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "m").mkdir()
    os.symlink("/", tmp_path / "link")
    result = subprocess.run([QVDFS, *NODE_OPTIONS, f"{tmp_path / 'real'}=RW:{tmp_path / 'link'}=RO",
                             str(tmp_path / "m")], capture_output=True, text=True, timeout=30)
    try:
        assert result.returncode != 0
        assert "symlink" in result.stderr and len(result.stderr.strip().splitlines()) <= 2
        assert not is_mounted(tmp_path / "m")
    finally:
        force_unmount(tmp_path / "m")


@pytest.fixture
def cli(cli: Cli) -> Cli:
    cli.run("osf", "add", "name=o")
    cli.run("user", "add", "login=u", "password=p")
    return cli


@pytest.mark.parametrize("args", [
    ["vm", "add", "name=$(touch {canary})", "user=u", "osf=o"],
    ["vm", "add", "name=`touch {canary}`", "user=u", "osf=o"],
    ["vm", "add", "name=a\nlxc.mount.entry = / host none bind 0 0", "user=u", "osf=o"],
    ["vm", "add", "name=" + "v" * 300, "user=u", "osf=o"],
    ["osf", "add", "name=x y; touch {canary}"],
    ["vm", "add", "name=ok", "user=u;touch {canary}", "osf=o"],
    ["vm", "list", "-f", "name=;touch {canary}"],
    ["vm", "del", "-f", "name=*;touch {canary}"],
    ["config", "set", "vm.network.ip.start=10.0.0.1;touch {canary}"],
    ["config", "set", "command.unionfs-fuse=$(touch {canary})"],
    ["config", "set", "vm.overlay.persistent=yes please"],
    ["config", "set", "vm.network.bridge=br0\nlxc.net.1.type=phys"],
    ["config", "set", "vm.network.gateway=10.0.0.1\n"],
    ["config", "set", "path.storage.rootfs=/tmp/../../etc\nx"],
    ["di", "add", "path={canary}; ls", "osf=o"],
])
def test_hostile_admin_input_is_one_line_and_changes_nothing(cli: Cli, tmp_path: Path,
                                                            args: list[str]) -> None:
    canary = tmp_path / "pwned"
    args = [a.replace("{canary}", str(canary)) for a in args]
    before = cli.db_dump()
    error = cli.fails(*args)
    assert len(error) < 1000 or "v" * 300 in error
    assert cli.db_dump() == before
    assert not canary.exists()


def test_unicode_names_round_trip_and_stay_out_of_paths(cli: Cli) -> None:
    """Names are data: stored and shown verbatim, never used to build a path or a hostname."""
    for name in ("Ünïcødé-桌面🙂", "../../etc"):
        cli.run("vm", "add", f"name={name}", "user=u", "osf=o")
        assert cli.vm(name)["Name"] == name
        vm_id = int(cli.vm(name)["Id"])
        host = hostname_for(name, vm_id)
        assert host and all(c.isascii() and (c.isalnum() or c == "-") for c in host)
    assert not any("etc" == p.name for p in cli.root.rglob("etc"))


# --- hostile images (what tests/qvdctl/test_images.py does not cover yet) -----------------


def _image(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        sbin = tarfile.TarInfo("sbin")
        sbin.type, sbin.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(sbin)
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return path


def _info(name: str, kind=tarfile.REGTYPE, **kw) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = kw.pop("mode", 0o644)
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def test_device_nodes_and_setuid_files_are_kept_inside_the_tree(tmp_path: Path) -> None:
    members = [
        (_info("dev", tarfile.DIRTYPE, mode=0o755), b""),
        (_info("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660), b""),
        (_info("dev/mem", tarfile.CHRTYPE, devmajor=1, devminor=1, mode=0o640), b""),
        (_info("dev/whiteout", tarfile.CHRTYPE, devmajor=0, devminor=0, mode=0), b""),
        (_info("dev/initctl", tarfile.FIFOTYPE, mode=0o600), b""),
        (_info("bin", tarfile.DIRTYPE, mode=0o755), b""),
        (_info("bin/su", mode=0o6755, uid=0, gid=0, size=5), b"suid\n"),
    ]
    target = tmp_path / "a" / "out"
    ensure_extracted(_image(tmp_path / "dev.tgz", members), target)
    sda = (target / "dev" / "sda").lstat()
    assert stat.S_ISBLK(sda.st_mode) and os.major(sda.st_rdev) == 8
    assert stat.S_ISCHR((target / "dev" / "mem").lstat().st_mode)
    assert stat.S_ISFIFO((target / "dev" / "initctl").lstat().st_mode)
    assert stat.S_IMODE((target / "bin" / "su").lstat().st_mode) == 0o6755
    # Contained: every entry is below the target, nothing appeared beside it.
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) in (["out"], [".out.lock", "out"], [".out.init", ".out.lock", "out"])
    assert sorted(os.listdir(tmp_path)) == ["a", "dev.tgz"]


def test_an_enormous_sparse_member_is_contained(tmp_path: Path) -> None:
    """A 64 GiB sparse member must not fill the disk: refused, or kept sparse."""
    sparse = tmp_path / "holes"
    with open(sparse, "wb") as f:
        f.seek(64 << 30)
        f.write(b"end")
    archive = tmp_path / "sparse.tar"
    (tmp_path / "tree" / "sbin").mkdir(parents=True)
    os.rename(sparse, tmp_path / "tree" / "holes")
    subprocess.run(["tar", "--sparse", "-cf", str(archive), "-C", str(tmp_path / "tree"),
                    "sbin", "holes"], check=True, timeout=60)
    assert archive.stat().st_size < 1 << 20
    target = tmp_path / "out"
    start = time.monotonic()
    try:
        ensure_extracted(archive, target)
    except QvdError as exc:
        assert "\n" not in str(exc)
        assert not target.exists()
    else:
        st = (target / "holes").stat()
        assert st.st_size == (64 << 30) + 3
        assert st.st_blocks * 512 < 64 << 20, "the holes were written out"
    assert time.monotonic() - start < 60
