"""``di commit``'s file: a VM's base with its overlay applied (``merge``), written as a new
image tarball (``archive``) that appears only complete.

The tarball is written under a temporary name, fsynced and linked into place only when
complete; any failure removes it, and the folder is fsynced once it is there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from libarchive.exception import ArchiveError

from qvdctl.errors import QvdError
from qvdctl.images.archive import write_tarball
from qvdctl.images.merge import Entry, Merge, outer_entries
from qvdformat import syscalls

log = logging.getLogger(__name__)

CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class WrittenImage:
    path: Path
    sha256: str
    size: int
    entries: int


def write_image(upper: Path, lower: Path, dest: Path, *, outer: Path | None = None
                ) -> WrittenImage:
    """Write the merged tree of ``upper`` over ``lower`` as the tarball ``dest``.

    ``outer``: an extended image's extracted tree, whose root ``lower`` is its
    ``rootfs/``; what lies beside ``rootfs/`` is kept as it is and the merged root
    goes under ``rootfs/`` again. ``dest`` must not exist; it appears only
    complete and flushed to disk.

    Raises:
        QvdError: the trees cannot be merged, or writing failed (nothing is left behind).
    """
    tmp = dest.with_name(f".tmp-{dest.name}.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with Merge(upper, lower) as merge:
                count = write_tarball(fd, _image_entries(merge, outer))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, dest)
    except FileExistsError:
        raise QvdError(f"{dest} already exists") from None
    except QvdError:
        raise
    except OSError as exc:
        where = f": {os.fsdecode(exc.filename)}" if exc.filename else ""
        raise QvdError(f"writing {dest.name} failed: {exc.strerror or exc}{where}") from None
    except ArchiveError as exc:
        why = getattr(exc, "msg", None) or str(exc)
        if getattr(exc, "errno", None):
            why = f"{why}: {os.strerror(exc.errno)}"
        raise QvdError(f"writing {dest.name} failed: {why}") from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(dest.parent)
    digest = hashlib.sha256()
    with open(dest, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    log.info("wrote %s (%d entries)", dest, count)
    return WrittenImage(dest, digest.hexdigest(), dest.stat().st_size, count)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, syscalls.DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _image_entries(merge: Merge, outer: Path | None) -> Iterator[tuple[bytes, Entry]]:
    """The image's entries with their path prefix: the merged root alone, or an extended
    image's tree with the merged root under ``rootfs/``."""
    prefix = b""
    if outer is not None:
        for entry in outer_entries(outer):
            yield b"", entry
        prefix = b"rootfs/"
    for entry in merge.entries():
        yield prefix, entry
