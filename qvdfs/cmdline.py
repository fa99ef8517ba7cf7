"""The unionfs-fuse command line, parsed into a ``MountConfig``.

qvdfs must be a drop-in for ``unionfs`` (unionfs-fuse 2.x): the node runs
``<binary> -o cow -o max_files=32000 -o suid -o dev -o allow_other OVERLAY=RW:BASE=RO ROOTFS``
and any admin script written for unionfs-fuse should keep working. The grammar is libfuse's
(``-o a,b=c`` repeated or attached as ``-oa``, single-dash flags, two positionals), which argparse
does not speak, so this module is a small hand-written parser.

Parsing only looks at the words; it touches no file. Whether the branches and the mountpoint
exist is checked by ``qvdfs.daemon`` just before mounting.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Sequence

from qvdfs import __version__
from qvdfs.config import BranchConfig, MountConfig, MountError, WhiteoutFormat
from qvdfs.fuse.mount import Atime

log = logging.getLogger(__name__)

VERSION_TEXT = f"qvdfs {__version__} (unionfs-fuse compatible)"

# Options that set a boolean field of MountConfig of the same name.
_OWN_FLAGS = frozenset({"cow", "relaxed_permissions", "direct_io", "idmap"})
# libfuse mount options handed to the kernel: the MountOptions field each sets, and to what
# (of a pair such as suid/nosuid the later option wins, as libfuse's mount flags do).
_FUSE_FLAGS = {"allow_other": ("allow_other", True), "allow_root": ("allow_root", True),
               "default_permissions": ("default_permissions", True),
               "suid": ("suid", True), "nosuid": ("suid", False),
               "dev": ("dev", True), "nodev": ("dev", False),
               "ro": ("read_only", True), "rw": ("read_only", False),
               "exec": ("exec", True), "noexec": ("exec", False),
               "atime": ("atime", Atime.RELATIME), "relatime": ("atime", Atime.RELATIME),
               "noatime": ("atime", Atime.NOATIME),
               "strictatime": ("atime", Atime.STRICTATIME),
               "diratime": ("diratime", True), "nodiratime": ("diratime", False),
               "sync": ("sync", True), "async": ("sync", False), "dirsync": ("dirsync", True)}
# Accepted so that unionfs-fuse command lines keep working, but they change nothing here.
_IGNORED = frozenset({"nonempty", "use_ino", "kernel_cache", "big_writes", "noinitgroups",
                      "preserve_branch", "async_read", "auto_cache", "hide_meta_files",
                      "statfs_omit_ro"})
_TIMEOUTS = frozenset({"entry_timeout", "attr_timeout", "negative_timeout"})
_VALUED = frozenset({"dirs", "max_files", "chroot", "debug_file", "whiteout", "fsname", "subtype",
                     "max_read", "backend", "threads"}) | _TIMEOUTS

HELP_TEXT = f"""\
usage: qvdfs [options] BRANCHES MOUNTPOINT
       qvdfs [options] -o dirs=BRANCHES MOUNTPOINT

{VERSION_TEXT}: a union filesystem for QVD desktops. It accepts the command line of
unionfs-fuse, mounts, and daemonizes; it exits 0 only once MOUNTPOINT is mounted and serving.
Stop it with a plain `umount MOUNTPOINT` (or `fusermount3 -u MOUNTPOINT`); SIGTERM or SIGINT
also unmount cleanly.

BRANCHES is a list of DIR[=RW|=RO] joined by ':', highest priority first. The mode is
case-insensitive and defaults to RO. Relative paths are taken from the current directory.
The text before the first '=' is the path, so a path cannot contain '=' or ':'.
  /var/ov=RW:/var/base=RO        writes go to /var/ov, /var/base is never changed

Grafts: DIR=RW@/PATH serves DIR alone at /PATH inside the union, like a bind mount
(only that branch is seen there, deletions there are real). PATH is absolute, normalised,
not '/', without '..'; a grafted branch must be RW; one graft per PATH.
  /ov=RW:/base=RO:/homes/7=RW@/home

Options (-o takes a comma-separated list, may be repeated, and may be attached: -ocow):
  unionfs-fuse options, honoured:
    cow                    copy-on-write: changes to files of RO branches go to the
                           highest RW branch, and deletions are recorded as whiteouts
    max_files=N            raise the open-file limit (RLIMIT_NOFILE) to N; if the hard
                           limit is lower, warn and use the hard limit
    chroot=DIR             branch paths are inside DIR (DIR is prepended to each)
    relaxed_permissions    do not add default_permissions: the filesystem, not the
                           kernel, decides on access (as unionfs-fuse)
    debug_file=FILE        write the log to FILE (appended)
    direct_io              bypass the page cache for file data
  unionfs-fuse options accepted as no-ops:
    noinitgroups, preserve_branch,
    hide_meta_files (the marker folders are always hidden),
    statfs_omit_ro (df always shows the writable branch alone)
  qvdfs options:
    whiteout=overlay|unionfs   format new deletions are written in: kernel overlayfs
                           (0/0 char devices, default) or unionfs-fuse (_HIDDEN~ markers);
                           both formats are always read
    debug                  same as -d
    backend=native|pyfuse3 how to talk to the kernel: qvdfs' own FUSE session (default)
                           or libfuse through pyfuse3 (portable, slower)
    threads=N              threads answering requests (native backend)
    nopassthrough          serve file data from the daemon even where the kernel offers
                           passthrough (native backend)
    idmap                  let the mount be idmapped (mount_setattr MOUNT_ATTR_IDMAP), as
                           LXC does for an unprivileged container's root (native backend,
                           Linux 6.12+, not with relaxed_permissions)
  libfuse options, passed to the kernel:
    allow_other, allow_root, default_permissions, suid, nosuid, dev, nodev,
    fsname=NAME (default qvdfs), subtype=NAME (default qvdfs)
  generic mount flags, as mount(8) takes them (the later of a pair wins):
    ro, rw, exec, noexec, sync, async, dirsync, nodiratime, diratime,
    relatime (default), atime (the same), noatime (the branches' access times are
    left alone too), strictatime
  kernel cache lifetimes in seconds (the daemon invalidates what it changes itself):
    entry_timeout=S, attr_timeout=S, negative_timeout=S   (default 3600 each)
  libfuse options accepted as no-ops:
    nonempty (mounting on a non-empty directory is always allowed), use_ino (qvdfs always
    gives stable inode numbers of its own), kernel_cache (the page cache is always kept),
    big_writes, async_read, auto_cache
  max_read=N               largest read request, in bytes (native backend)
  default_permissions is always added unless relaxed_permissions is given.

Flags:
  -f                     stay in the foreground, log to stderr
  -d                     debug log; implies -f
  -s                     single-threaded: same as -o threads=1
  -h, --help             this text
  -V, --version          print the version
  --                     end of options

Exit status: 0 mounted (or help/version shown); 1 bad command line, a failed check (no
/dev/fuse, missing branch or mountpoint, mountpoint already in use) or a failed mount; in
the foreground, also 1 if the daemon stopped on an internal error. Errors are one line on
stderr, prefixed with 'qvdfs:'. Nothing is left mounted after a non-zero exit.
"""


class InfoRequested(Exception):
    """-h or -V was given: print ``text`` to stdout and exit 0 without mounting."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def parse_args(argv: Sequence[str]) -> MountConfig:
    """Parse a unionfs-fuse command line (without the program name) into a MountConfig.

    Paths in the result are absolute and normalised.

    Raises:
        MountError: the command line is wrong; the message is one line naming the bad part.
        InfoRequested: help or version was asked for.
    """
    options: list[str] = []
    positionals: list[str] = []
    flags: set[str] = set()
    words = list(argv)
    index = 0
    options_ended = False
    while index < len(words):
        word = words[index]
        index += 1
        if options_ended or not word.startswith("-") or word == "-":
            positionals.append(word)
        elif word == "--":
            options_ended = True
        elif word == "-o":
            if index == len(words):
                raise MountError("option -o needs a value")
            options.extend(words[index].split(","))
            index += 1
        elif word.startswith("-o"):
            options.extend(word[2:].split(","))
        elif word in ("-f", "-d", "-s", "-h", "--help", "-V", "--version"):
            flags.add(word)
        else:
            raise MountError(f"unknown option '{word}'")

    # Help and version win over everything else, wherever they are on the line.
    if flags & {"-h", "--help"}:
        raise InfoRequested(HELP_TEXT)
    if flags & {"-V", "--version"}:
        raise InfoRequested(VERSION_TEXT)

    config = MountConfig(branches=[], mountpoint="")
    config.debug = "-d" in flags
    config.foreground = "-f" in flags or config.debug
    if "-s" in flags:
        config.threads = 1
    branch_text: str | None = None
    for option in options:
        if option:  # "-o cow,,dev" has an empty item; libfuse skips those too
            value = _apply_option(config, option)
            if value is not None:
                if branch_text is not None:
                    raise MountError("branches given twice (dirs= used more than once)")
                branch_text = value

    if branch_text is None:
        if not positionals:
            raise MountError("no branches given (usage: qvdfs [options] BRANCHES MOUNTPOINT)")
        branch_text = positionals.pop(0)
    if not positionals:
        raise MountError("no mountpoint given (usage: qvdfs [options] BRANCHES MOUNTPOINT)")
    if len(positionals) > 1:
        raise MountError(f"unexpected argument '{positionals[1]}'")

    config.mountpoint = _absolute(positionals[0])
    config.branches = parse_branches(branch_text, chroot=config.chroot)
    fuse = config.fuse_options
    if fuse.allow_other and fuse.allow_root:
        raise MountError("allow_other and allow_root cannot be used together")
    if config.idmap and (config.relaxed_permissions or config.backend != "native"):
        # The kernel idmaps a FUSE mount only if it checks permissions itself, and only
        # the native session can ask for it.
        raise MountError("idmap needs the native backend and cannot go with relaxed_permissions")
    if not config.relaxed_permissions:
        fuse.default_permissions = True
    if fuse.subtype is None:
        # Shows as type fuse.qvdfs in /proc/mounts, so admins can find qvdfs mounts.
        fuse.subtype = "qvdfs"
    if not any(b.writable for b in config.branches):
        log.warning("no writable branch in '%s': the union is read-only", branch_text)
    return config


def _apply_option(config: MountConfig, option: str) -> str | None:
    """Record one -o item in ``config``; return the branch string if it is ``dirs=``."""
    name, has_value, value = option.partition("=")
    if name not in _VALUED and name not in _OWN_FLAGS | _FUSE_FLAGS.keys() | _IGNORED | {
            "debug", "nopassthrough"}:
        raise MountError(f"unknown option '{name}'")
    if name not in _VALUED:
        if has_value:
            raise MountError(f"option '{name}' takes no value")
        if name in _OWN_FLAGS:
            setattr(config, name, True)
        elif name == "nopassthrough":
            config.passthrough = False
        elif name in _FUSE_FLAGS:
            setattr(config.fuse_options, *_FUSE_FLAGS[name])
        elif name == "debug":
            config.debug = config.foreground = True
        elif name not in config.ignored_options:
            config.ignored_options.append(name)
        return None

    if not has_value or not value:
        raise MountError(f"option '{name}' needs a value ({name}=...)")
    if name == "dirs":
        return value
    if name == "max_files":
        config.max_files = _positive_int(name, value)
    elif name == "max_read":
        config.fuse_options.max_read = _positive_int(name, value)
    elif name == "threads":
        config.threads = _positive_int(name, value)
    elif name == "backend":
        if value not in ("native", "pyfuse3"):
            raise MountError(f"bad value '{value}' for backend: want native or pyfuse3")
        config.backend = value
    elif name in _TIMEOUTS:
        setattr(config, name, _seconds(name, value))
    elif name == "chroot":
        config.chroot = _absolute(value)
    elif name == "debug_file":
        config.debug_file = _absolute(value)
    elif name == "whiteout":
        try:
            config.whiteout_format = WhiteoutFormat(value.lower())
        except ValueError:
            raise MountError(f"bad value '{value}' for whiteout: want overlay or unionfs") from None
    else:  # fsname, subtype: one of each, the last one wins
        setattr(config.fuse_options, name, value)
    return None


def parse_branches(text: str, chroot: str | None = None) -> list[BranchConfig]:
    """Parse ``DIR[=RW|=RO][@GRAFT]`` items joined by ':' (highest priority first).

    Relative paths are made absolute against the current directory; with ``chroot`` every
    path is taken inside that directory instead (``..`` cannot climb out of it).

    Raises:
        MountError: an item is malformed, or the list has no branch for the union's root.
    """
    if not text:
        raise MountError("no branches given")
    branches: list[BranchConfig] = []
    for item in text.split(":"):
        if not item:
            raise MountError(f"empty branch in '{text}' (two ':' in a row, or one at an end?)")
        branches.append(_parse_branch(item, chroot))

    seen: dict[str, str] = {}
    for branch, item in zip(branches, text.split(":")):
        if branch.path in seen:
            raise MountError(f"branch '{item}' repeats the directory of '{seen[branch.path]}'")
        seen[branch.path] = item
    grafted: set[str] = set()
    for branch in branches:
        if branch.graft in grafted:
            raise MountError(f"two branches are grafted at {branch.graft}")
        if branch.graft is not None:
            grafted.add(branch.graft)
    if all(b.graft is not None for b in branches):
        raise MountError(f"no branch for the root of the union in '{text}' (all are grafted)")
    return branches


def _parse_branch(item: str, chroot: str | None) -> BranchConfig:
    # unionfs-fuse splits at the first '=': the rest is the mode (and here, a graft).
    path, has_mode, rest = item.partition("=")
    if not path:
        raise MountError(f"branch '{item}' has no directory")
    mode, has_graft, graft = rest.partition("@")
    if not has_mode:
        writable = False
    elif mode.upper() in ("RW", "RO"):
        writable = mode.upper() == "RW"
    else:
        raise MountError(f"branch '{item}': bad mode '{mode}', want RW or RO")

    if chroot is not None:
        # "/../x" normalises to "/x", so no branch can point outside the chroot.
        inside = posixpath.normpath("/" + path).lstrip("/")
        path = posixpath.normpath(posixpath.join(chroot, inside))
    else:
        path = _absolute(path)

    if not has_graft:
        return BranchConfig(path=path, writable=writable)
    if not graft:
        raise MountError(f"branch '{item}': empty graft path after '@'")
    if not graft.startswith("/"):
        raise MountError(f"branch '{item}': graft path '{graft}' must be absolute")
    if ".." in graft.split("/"):
        raise MountError(f"branch '{item}': graft path '{graft}' must not contain '..'")
    if graft != _normal(graft):
        raise MountError(f"branch '{item}': graft path '{graft}' is not normalised "
                         f"(use '{_normal(graft)}')")
    if graft == "/":
        raise MountError(f"branch '{item}': cannot graft at '/', that is the whole union")
    if not writable:
        raise MountError(f"branch '{item}': a grafted branch must be RW")
    return BranchConfig(path=path, writable=True, graft=graft)


def _normal(path: str) -> str:
    # normpath keeps a leading "//" (POSIX allows it a meaning); Linux gives it none.
    return "/" + posixpath.normpath(path).lstrip("/")


def _absolute(path: str) -> str:
    """``path`` made absolute against the current directory, and normalised."""
    return _normal(os.path.abspath(path))


def _positive_int(name: str, value: str) -> int:
    try:
        number = int(value, 10)
    except ValueError:
        number = 0
    if number <= 0:
        raise MountError(f"bad value '{value}' for {name}: want a positive whole number")
    return number


def _seconds(name: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise MountError(f"bad value '{value}' for {name}: want a number of seconds >= 0")
    return seconds
