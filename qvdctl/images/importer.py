"""``di add``'s file half: copy a tarball from staging into images/, safely.

The copy goes to a hidden temporary name in images/ and is checksummed on the
way; only a complete, flushed copy is linked under its real name (``link``
rather than ``rename`` so an existing image is never replaced). Any failure
(unreadable source, full disk, name taken) removes the temporary file, so a
failed copy leaves nothing in images/ for the database to point at.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from pathlib import Path

import libarchive
from libarchive.exception import ArchiveError

from qvdctl.errors import QvdError
from qvdctl.progress import progress_bar

log = logging.getLogger(__name__)

CHUNK = 1 << 20

# The file name ends up in paths and in the union's branch string: keep it plain.
_NAME = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9._+-]*")


@dataclasses.dataclass(frozen=True)
class ImportedImage:
    name: str
    path: Path
    sha256: str
    size: int


def check_image_name(name: str) -> str:
    """Return ``name`` if it can be an image file name, else raise QvdError."""
    if not _NAME.fullmatch(name) or len(name) > 200:
        raise QvdError(
            f"image file name '{name}' must be letters, digits and . _ + - "
            "(not starting with . or -)"
        )
    return name


def check_tarball(path: Path) -> None:
    """Raise QvdError unless ``path`` starts like a tar archive (any compression)."""
    try:
        with libarchive.file_reader(str(path), format_name="tar") as archive:
            next(iter(archive), None)
    except ArchiveError as exc:
        raise QvdError(f"{path} is not a tar archive: {getattr(exc, 'msg', exc)}") from None


def import_image(source: Path, images: Path) -> ImportedImage:
    """Copy ``source`` into ``images`` under its own file name.

    Raises:
        QvdError: the source is missing or not a tarball, the name is taken, or
            the copy failed (the message says why); nothing is left behind.
    """
    name = check_image_name(source.name)
    if not source.is_file():
        raise QvdError(f"{source} is not a file")
    check_tarball(source)
    final = images / name
    if final.exists():
        raise QvdError(f"images/{name} already exists")
    tmp = images / f".tmp-{name}.{os.getpid()}"
    digest = hashlib.sha256()
    size = 0
    try:
        with open(source, "rb") as src, open(tmp, "xb") as dst:
            total = os.fstat(src.fileno()).st_size
            with progress_bar(f"copying {name}", total) as advance:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
                    advance(len(chunk))
            dst.flush()
            os.fsync(dst.fileno())
        os.link(tmp, final)
    except FileExistsError:
        raise QvdError(f"images/{name} already exists") from None
    except OSError as exc:
        raise QvdError(f"copying {source} into {images} failed: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    log.info("imported %s (%d bytes, sha256 %s)", final, size, digest.hexdigest())
    return ImportedImage(name=name, path=final, sha256=digest.hexdigest(), size=size)
