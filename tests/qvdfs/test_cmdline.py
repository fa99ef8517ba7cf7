"""The unionfs-fuse command line: what qvdfs accepts, what it makes of it, what it refuses."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qvdfs import __version__
from qvdfs.cmdline import HELP_TEXT, InfoRequested, parse_args, parse_branches
from qvdfs.config import BranchConfig, MountError, WhiteoutFormat
from qvdfs.fuse import mount as fmount
from qvdfs.fuse.mount import Atime, MountOptions
from tests.support.mounts import NODE_OPTIONS

NODE_LINE = [*NODE_OPTIONS, "/var/lib/qvd/storage/overlayfs/1-2-overlayfs=RW:"
             "/var/lib/qvd/storage/basefs/2-image.0.22.tgz=RO",
             "/var/lib/qvd/storage/rootfs/3-2-fs"]


def refused(argv: list[str]) -> str:
    """The one-line message parse_args refuses ``argv`` with."""
    with pytest.raises(MountError) as info:
        parse_args(argv)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_node_line() -> None:
    config = parse_args(NODE_LINE)
    assert config.branches == [
        BranchConfig("/var/lib/qvd/storage/overlayfs/1-2-overlayfs", writable=True),
        BranchConfig("/var/lib/qvd/storage/basefs/2-image.0.22.tgz", writable=False),
    ]
    assert config.mountpoint == "/var/lib/qvd/storage/rootfs/3-2-fs"
    assert config.cow and config.max_files == 32000
    assert config.fuse_options == MountOptions(fsname="qvdfs", subtype="qvdfs", allow_other=True,
                                               default_permissions=True, suid=True, dev=True)
    # What the pyfuse3 backend hands libfuse.
    assert config.fuse_options.libfuse_strings() == {
        "suid", "dev", "allow_other", "default_permissions", "fsname=qvdfs", "subtype=qvdfs"}
    assert not config.foreground and not config.debug
    assert config.whiteout_format is WhiteoutFormat.OVERLAY
    assert config.ignored_options == []


def test_dirs_option_takes_the_branches() -> None:
    config = parse_args(["-o", "cow,dirs=/ov=RW:/base", "/mnt"])
    assert config.branches == [BranchConfig("/ov", True), BranchConfig("/base", False)]
    assert config.mountpoint == "/mnt"


def test_comma_joined_repeated_and_attached_options_are_the_same() -> None:
    forms = [
        ["-o", "cow,max_files=100,allow_other", "/a=RW:/b", "/m"],
        ["-o", "cow", "-o", "max_files=100", "-o", "allow_other", "/a=RW:/b", "/m"],
        ["-ocow,max_files=100", "-oallow_other", "/a=RW:/b", "/m"],
        ["/a=RW:/b", "-ocow", "/m", "-o", "max_files=100,,allow_other"],  # options anywhere
    ]
    configs = [parse_args(argv) for argv in forms]
    assert all(c == configs[0] for c in configs)
    assert configs[0].cow and configs[0].max_files == 100
    assert configs[0].fuse_options.allow_other


def test_modes_are_case_insensitive_and_default_to_ro() -> None:
    config = parse_args(["/a=rw:/b=Ro:/c=rW:/d", "/m"])
    assert [b.writable for b in config.branches] == [True, False, True, False]


def test_relative_paths_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = parse_args(["-o", "debug_file=log", "ov=RW:./base/../base2", "mnt"])
    assert config.branches == [BranchConfig(f"{tmp_path}/ov", True),
                               BranchConfig(f"{tmp_path}/base2", False)]
    assert config.mountpoint == f"{tmp_path}/mnt"
    assert config.debug_file == f"{tmp_path}/log"


def test_paths_are_normalised() -> None:
    config = parse_args(["//srv//ov/=RW", "/m/./"])
    assert config.branches == [BranchConfig("/srv/ov", True)]
    assert config.mountpoint == "/m"


def test_chroot_prefixes_every_branch_and_cannot_be_escaped() -> None:
    # chroot may come after the branches on the line.
    config = parse_args(["/ov=RW:base:/../../etc", "/m", "-o", "chroot=/srv/qvd/"])
    assert config.chroot == "/srv/qvd"
    assert [b.path for b in config.branches] == ["/srv/qvd/ov", "/srv/qvd/base", "/srv/qvd/etc"]
    assert config.mountpoint == "/m"  # the mountpoint is not inside the chroot


def test_grafts() -> None:
    config = parse_args(["/ov=RW:/base=RO:/homes/7=rw@/home:/data=RW@/srv/data", "/m"])
    assert config.stack == [BranchConfig("/ov", True), BranchConfig("/base", False)]
    assert config.grafts == [BranchConfig("/homes/7", True, graft="/home"),
                             BranchConfig("/data", True, graft="/srv/data")]


def test_at_sign_without_a_mode_is_part_of_the_path() -> None:
    assert parse_args(["/srv/a@b", "/m"]).branches == [BranchConfig("/srv/a@b", False)]


@pytest.mark.parametrize(("branches", "words"), [
    ("/ov=RW:/h=RW@home", ["'home'", "absolute"]),
    ("/ov=RW:/h=RW@/a/../home", ["'..'"]),
    ("/ov=RW:/h=RW@/home/", ["not normalised", "'/home'"]),
    ("/ov=RW:/h=RW@//home", ["not normalised"]),
    ("/ov=RW:/h=RW@/./home", ["not normalised"]),
    ("/ov=RW:/h=RW@/", ["'/'"]),
    ("/ov=RW:/h=RW@", ["empty graft"]),
    ("/ov=RW:/h=RO@/home", ["must be RW", "/h=RO@/home"]),
    ("/ov=RW:/h=RW@/home:/g=RW@/home", ["two branches", "/home"]),
    ("/h=RW@/home", ["no branch for the root"]),
])
def test_bad_grafts(branches: str, words: list[str]) -> None:
    message = refused([branches, "/m"])
    for word in words:
        assert word in message


def test_timeouts() -> None:
    config = parse_args(["-o", "entry_timeout=1.5,attr_timeout=0,negative_timeout=30", "/a", "/m"])
    assert (config.entry_timeout, config.attr_timeout, config.negative_timeout) == (1.5, 0.0, 30.0)
    defaults = parse_args(["/a", "/m"])
    assert defaults.entry_timeout == defaults.attr_timeout == defaults.negative_timeout == 3600.0


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf", ""])
def test_bad_timeouts(value: str) -> None:
    assert "attr_timeout" in refused(["-o", f"attr_timeout={value}", "/a", "/m"])


@pytest.mark.parametrize("option", ["cow", "relaxed_permissions", "direct_io"])
def test_own_flags_set_their_field(option: str) -> None:
    config = parse_args(["-o", option, "/a=RW", "/m"])
    assert getattr(config, option) is True
    assert getattr(parse_args(["/a=RW", "/m"]), option) is False


@pytest.mark.parametrize(("option", "field", "value"), [
    ("allow_other", "allow_other", True), ("allow_root", "allow_root", True),
    ("default_permissions", "default_permissions", True), ("suid", "suid", True),
    ("dev", "dev", True), ("nosuid", "suid", False), ("nodev", "dev", False)])
def test_fuse_flags_are_passed_on(option: str, field: str, value: bool) -> None:
    options = parse_args(["-o", "relaxed_permissions", "-o", option, "/a", "/m"]).fuse_options
    assert getattr(options, field) is value
    assert (option in options.libfuse_strings()) is value


@pytest.mark.parametrize("option", ["nonempty", "use_ino", "kernel_cache", "big_writes",
                                    "noinitgroups", "preserve_branch", "async_read", "auto_cache",
                                    "hide_meta_files", "statfs_omit_ro"])
def test_no_op_options_are_accepted_and_recorded(option: str) -> None:
    config = parse_args(["-o", option, "-o", option, "/a", "/m"])
    assert config.ignored_options == [option]
    assert config.fuse_options == parse_args(["/a", "/m"]).fuse_options


def test_backend_threads_and_passthrough_options() -> None:
    defaults = parse_args(["/a", "/m"])
    assert (defaults.backend, defaults.threads, defaults.passthrough) == ("native", None, True)
    config = parse_args(["-o", "backend=pyfuse3,threads=2,nopassthrough", "/a", "/m"])
    assert (config.backend, config.threads, config.passthrough) == ("pyfuse3", 2, False)
    assert parse_args(["-s", "/a", "/m"]).threads == 1
    assert "backend" in refused(["-o", "backend=libfuse", "/a", "/m"])
    assert "threads" in refused(["-o", "threads=0", "/a", "/m"])


def test_idmap_option() -> None:
    assert parse_args(["/a", "/m"]).idmap is False
    config = parse_args(["-o", "cow,idmap", "/a=RW", "/m"])
    assert config.idmap and config.fuse_options.default_permissions
    # The kernel idmaps a FUSE mount only when it checks permissions itself.
    assert "idmap" in refused(["-o", "idmap,relaxed_permissions", "/a", "/m"])
    assert "native backend" in refused(["-o", "idmap,backend=pyfuse3", "/a", "/m"])


def test_valued_options() -> None:
    config = parse_args(["-o", "fsname=base7,subtype=union,max_read=131072,max_files=64",
                         "-o", "debug_file=/var/log/q.log,whiteout=UNIONFS", "/a", "/m"])
    options = config.fuse_options
    assert (options.fsname, options.subtype) == ("base7", "union")
    assert options.max_read == 131072  # the native session mounts with it
    assert config.ignored_options == []
    assert config.max_files == 64
    assert config.debug_file == "/var/log/q.log"
    assert config.whiteout_format is WhiteoutFormat.UNIONFS
    assert parse_args(["-o", "whiteout=overlay", "/a", "/m"]).whiteout_format is \
        WhiteoutFormat.OVERLAY


def test_later_option_wins() -> None:
    config = parse_args(["-o", "suid,nodev,fsname=a", "-o", "nosuid,dev,fsname=b", "/a", "/m"])
    options = config.fuse_options
    assert (options.suid, options.dev, options.fsname) == (False, True, "b")


def test_default_permissions_unless_relaxed() -> None:
    assert parse_args(["/a", "/m"]).fuse_options.default_permissions
    assert not parse_args(["-o", "relaxed_permissions", "/a", "/m"]).fuse_options \
        .default_permissions
    # Asked for explicitly, it stays: relaxed_permissions only stops qvdfs adding it.
    assert parse_args(["-o", "relaxed_permissions,default_permissions", "/a", "/m"]) \
        .fuse_options.default_permissions


def test_flags() -> None:
    assert parse_args(["-f", "/a", "/m"]).foreground
    debug = parse_args(["-d", "/a", "/m"])
    assert debug.debug and debug.foreground  # -d implies -f, as in libfuse
    assert parse_args(["-o", "debug", "/a", "/m"]).foreground
    single = parse_args(["-s", "/a", "/m"])
    assert not single.foreground and not single.debug


def test_double_dash_ends_options() -> None:
    config = parse_args(["-o", "cow", "--", "-odd=RW", "-m"])
    assert config.branches == [BranchConfig(str(Path.cwd() / "-odd"), True)]
    assert config.mountpoint == str(Path.cwd() / "-m")


def test_help_and_version() -> None:
    for flag in ("-V", "--version"):
        with pytest.raises(InfoRequested) as info:
            parse_args([flag])
        assert info.value.text == f"qvdfs {__version__} (unionfs-fuse compatible)"
    for argv in (["-h"], ["--help"], ["-o", "frobnicate", "--help"]):
        with pytest.raises(InfoRequested) as info:
            parse_args(argv)
        assert info.value.text == HELP_TEXT


def test_help_documents_every_option() -> None:
    for option in ["cow", "max_files=", "hide_meta_files", "statfs_omit_ro", "chroot=",
                   "relaxed_permissions", "noinitgroups", "debug_file=", "preserve_branch",
                   "direct_io", "whiteout=overlay|unionfs", "allow_other", "allow_root",
                   "default_permissions", "suid", "nosuid", "dev", "nodev", "fsname=",
                   "subtype=", "max_read=", "entry_timeout=", "attr_timeout=",
                   "negative_timeout=", "nonempty", "use_ino", "kernel_cache", "big_writes",
                   "async_read", "auto_cache", "dirs=", "-f", "-d", "-s", "--version",
                   "@/home", "no-ops", "Exit status", "backend=native|pyfuse3", "threads=N",
                   "nopassthrough", "idmap"]:
        assert option in HELP_TEXT, option


@pytest.mark.parametrize(("argv", "words"), [
    (["-o", "xyz", "/a", "/m"], ["unknown option 'xyz'"]),
    (["-o", "cow,xyz=1", "/a", "/m"], ["unknown option 'xyz'"]),
    (["-x", "/a", "/m"], ["unknown option '-x'"]),
    (["-fd", "/a", "/m"], ["unknown option '-fd'"]),
    (["--foreground", "/a", "/m"], ["unknown option '--foreground'"]),
    (["/a", "/m", "-o"], ["-o needs a value"]),
    (["-o", "cow=1", "/a", "/m"], ["'cow' takes no value"]),
    (["-o", "max_files", "/a", "/m"], ["'max_files' needs a value"]),
    (["-o", "chroot=", "/a", "/m"], ["'chroot' needs a value"]),
    (["-o", "max_files=many", "/a", "/m"], ["'many'", "max_files"]),
    (["-o", "max_files=0", "/a", "/m"], ["'0'", "max_files"]),
    (["-o", "max_read=-5", "/a", "/m"], ["'-5'", "max_read"]),
    (["-o", "whiteout=aufs", "/a", "/m"], ["'aufs'", "overlay or unionfs"]),
    (["-o", "allow_other,allow_root", "/a", "/m"], ["allow_other and allow_root"]),
    ([], ["no branches given"]),
    (["/a=RW"], ["no mountpoint given"]),
    (["-o", "dirs=/a", "/m", "/n"], ["unexpected argument '/n'"]),
    (["/a", "/m", "/n"], ["unexpected argument '/n'"]),
    (["-o", "dirs=/a,dirs=/b", "/m"], ["branches given twice"]),
    (["-o", "dirs=", "/m"], ["'dirs' needs a value"]),
    (["", "/m"], ["no branches given"]),
    (["=RW:/b", "/m"], ["'=RW'", "no directory"]),
    (["/a=RX:/b", "/m"], ["'/a=RX'", "bad mode 'RX'"]),
    (["/a=:/b", "/m"], ["'/a='", "bad mode ''"]),
    (["/a=RW=RO", "/m"], ["bad mode 'RW=RO'"]),
    (["/a::/b", "/m"], ["empty branch", "'/a::/b'"]),
    (["/a:/b:", "/m"], ["empty branch"]),
    ([":/a", "/m"], ["empty branch"]),
    (["/a=RW:/b:/a/", "/m"], ["'/a/'", "repeats", "'/a=RW'"]),
])
def test_refused(argv: list[str], words: list[str]) -> None:
    message = refused(argv)
    for word in words:
        assert word in message, message


def test_no_writable_branch_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="qvdfs.cmdline"):
        config = parse_args(["/a:/b=RO", "/m"])
    assert not any(b.writable for b in config.branches)
    assert [r.getMessage() for r in caplog.records] == [
        "no writable branch in '/a:/b=RO': the union is read-only"]
    caplog.clear()
    parse_args(["/a=RW:/b", "/m"])
    assert caplog.records == []


# --- property: any well-formed branch list reads back as written -----------------------------

_NAME = st.text(alphabet="abcXYZ019-_. @+", min_size=1, max_size=8).filter(
    lambda s: s not in (".", ".."))
_PATH = st.lists(_NAME, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts))
_MODE = st.sampled_from(["", "=RW", "=RO", "=rw", "=ro", "=Rw"])


@given(st.lists(st.tuples(_PATH, _MODE), min_size=1, max_size=6, unique_by=lambda t: t[0]))
def test_branch_lists_read_back(items: list[tuple[str, str]]) -> None:
    text = ":".join(path + mode for path, mode in items)
    assert parse_branches(text) == [BranchConfig(path, mode.upper() == "=RW")
                                    for path, mode in items]


def test_generic_mount_flags_become_mount_flags_and_the_later_of_a_pair_wins() -> None:
    config = parse_args(["-o", "ro,noexec,noatime,nodiratime,sync,exec,rw,ro", "/b", "/m"])
    options = config.fuse_options
    assert (options.read_only, options.exec, options.atime, options.diratime, options.sync) \
        == (True, True, Atime.NOATIME, False, True)
    assert options.flags == (fmount.MS_NOSUID | fmount.MS_NODEV | fmount.MS_RDONLY
                             | fmount.MS_NOATIME | fmount.MS_NODIRATIME | fmount.MS_SYNCHRONOUS)
    assert {"ro", "noatime", "nodiratime", "sync"} <= options.libfuse_strings()
    assert parse_args(["-o", "strictatime", "/b", "/m"]).fuse_options.flags \
        & fmount.MS_STRICTATIME
    # relatime, the kernel's default, needs no flag
    assert parse_args(["-o", "strictatime,relatime", "/b", "/m"]).fuse_options.flags \
        == fmount.MS_NOSUID | fmount.MS_NODEV
