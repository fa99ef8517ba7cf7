"""Extracting a disk image into basefs/: once per image, never half, never outside.

How one image comes to serve many VMs:

1. ``ensure_extracted`` takes an exclusive ``flock`` on ``.<file>.lock`` beside
   the tree, so of many VMs starting at once exactly one extracts and the
   others wait, then find the tree there.
2. The extraction goes to ``.<file>.tmp-<pid>`` and is renamed into place only
   once complete, checked and flushed to disk. A crash or a full disk leaves a
   temporary folder (removed by the next holder of the lock), never a tree a
   later start would trust.
3. The archive is read by libarchive (every compression, detected from the
   content) with its secure-extraction flags, and every member is checked first
   by ``check_member``: absolute paths, ``..``, hard links leaving the tree and
   members written through an earlier symlink are refused. Owners stay numeric
   (no name lookup), modes, setuid bits, times, device nodes, hard links,
   symlinks, ACLs and xattrs (file capabilities) are kept.
4. How the image's init wants to be halted is found then, once, and kept beside
   the tree (``.<file>.init``, see ``halt.py``).

libarchive writes relative to the current directory, which is process-wide;
so the extraction itself runs in a child process (``python -m
qvdctl.images.extract ARCHIVE DEST``) that changes into DEST, leaving the
caller's directory and threads alone.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import libarchive
from libarchive import extract as ae
from libarchive.exception import ArchiveError

from qvdctl import locks
from qvdctl.errors import QvdError
from qvdctl.images import halt

log = logging.getLogger(__name__)

FLAGS = (
    ae.EXTRACT_OWNER
    | ae.EXTRACT_PERM
    | ae.EXTRACT_TIME
    | ae.EXTRACT_XATTR
    | ae.EXTRACT_ACL
    | ae.EXTRACT_SECURE_SYMLINKS
    | ae.EXTRACT_SECURE_NODOTDOT
    | ae.EXTRACT_SECURE_NOABSOLUTEPATHS
)


class HostileArchive(Exception):
    """A member that would write outside the target folder."""


def _member_path(name: str) -> PurePosixPath:
    """The path of a member, "./" prefixes dropped; refuses absolute and ``..``."""
    if name.startswith("/"):
        raise HostileArchive(f"member '{name}' has an absolute path")
    path = PurePosixPath(name)
    if ".." in path.parts:
        raise HostileArchive(f"member '{name}' climbs out with '..'")
    return path


def check_member(entry: libarchive.ArchiveEntry, symlinks: set[PurePosixPath]) -> None:
    """Raise HostileArchive if ``entry`` could write outside the tree.

    ``symlinks`` holds the symlink members seen so far; this function adds to it.
    """
    path = _member_path(entry.pathname)
    through = [p for p in path.parents if p in symlinks]
    if through:
        raise HostileArchive(
            f"member '{entry.pathname}' is written through the symlink '{through[0]}'"
        )
    if entry.issym:
        # A symlink may point anywhere (images hold /bin/sh -> busybox); only
        # writing through it is dangerous, and that is checked above.
        symlinks.add(path)
    elif entry.linkpath:
        target = _member_path(entry.linkpath)
        if any(p in symlinks for p in [target, *target.parents]):
            raise HostileArchive(f"hard link '{entry.pathname}' points through a symlink")


class _LibarchiveWarnings(logging.Handler):
    """Collects libarchive's warnings, which libarchive-c only logs.

    A warning is how archive_write_disk reports a write that failed half-way
    (ENOSPC: "Write failed") or metadata it could not restore (an xattr, an
    owner). Either way the tree is not the image, so each one is an error.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def check(self, where: str) -> None:
        if self.messages:
            raise ArchiveError(f"{self.messages[0]} ({where})")


def extract_here(archive: Path) -> int:
    """Extract ``archive`` into the current directory, checking every member.

    Returns the number of members. Raises HostileArchive or ArchiveError.
    """
    symlinks: set[PurePosixPath] = set()
    count = 0
    warnings = _LibarchiveWarnings()
    previous = ""

    def checked(entries: Iterable[Any]) -> Iterator[Any]:
        nonlocal count, previous
        for entry in entries:
            # The writer has finished the previous member by the time we get here.
            warnings.check(f"at {previous}")
            check_member(entry, symlinks)
            count += 1
            previous = entry.pathname
            yield entry

    libarchive_log = logging.getLogger("libarchive")
    libarchive_log.addHandler(warnings)
    libarchive_log.propagate = False
    try:
        with libarchive.file_reader(str(archive), format_name="tar") as entries:
            ae.extract_entries(checked(entries), FLAGS)
        warnings.check(f"at {previous}")
    finally:
        libarchive_log.removeHandler(warnings)
        libarchive_log.propagate = True
    return count


def find_root(tree: Path) -> Path:
    """The root filesystem inside an extracted image: ``tree`` or ``tree/rootfs``.

    A root is recognised by ``sbin`` at its top (a folder, or a symlink such as
    ``sbin -> usr/sbin``, which is not followed). Basic images have it at the
    top, extended ones under ``rootfs/``.

    Raises:
        QvdError: neither has one.
    """
    for root in (tree, tree / "rootfs"):
        sbin = root / "sbin"
        if not root.is_symlink() and (sbin.is_symlink() or sbin.is_dir()):
            return root
    raise QvdError("the image has neither sbin/ nor rootfs/sbin/ at its top: not a root filesystem")


def image_kind(tree: Path) -> str:
    """``basic`` or ``extended`` for an extracted image."""
    return "basic" if find_root(tree) == tree else "extended"


def ensure_extracted(archive: Path, target: Path) -> bool:
    """Make sure ``target`` holds the extracted ``archive``; True if this call extracted it.

    Safe to call from many processes at once: one extracts, the rest wait for it.

    Raises:
        QvdError: the archive is hostile, corrupt, not a tar, not a root
            filesystem, or the disk is full. ``target`` is then left absent.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with locks.exclusive(target.parent / f".{target.name}.lock"):
        if target.exists():
            return False
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            log.warning("removing %s left by an interrupted extraction", stale)
            shutil.rmtree(stale)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            _extract_in_child(archive, tmp)
            # Examined before it is in place, so a tree in place always has its facts.
            halt.record(target, find_root(tmp))
            # The rename must not reach the disk before the files do.
            os.sync()
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("extracted %s into %s", archive, target)
    return True


def _extract_in_child(archive: Path, dest: Path) -> None:
    # -I: the child runs as root; it must not import modules from the caller's
    # current folder or obey PYTHON* variables.
    cmd = [sys.executable, "-I", "-m", "qvdctl.images.extract", str(archive.absolute()), str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd="/")
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        raise QvdError(f"extracting {archive.name} failed: {lines[-1]}")


def main(argv: list[str] | None = None) -> int:
    """``python -m qvdctl.images.extract ARCHIVE DEST``: the child's side."""
    archive, dest = argv if argv is not None else sys.argv[1:]
    archive = os.path.abspath(archive)
    os.chdir(dest)
    try:
        count = extract_here(Path(archive))
    except HostileArchive as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    except ArchiveError as exc:
        print(getattr(exc, "msg", None) or str(exc), file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{exc.strerror}: {exc.filename}", file=sys.stderr)
        return 1
    log.debug("extracted %d members", count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
