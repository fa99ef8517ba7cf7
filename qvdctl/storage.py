"""The storage layout of SPEC §1: which folder holds what, and every name in it.

    <root>/staging/                     tarballs waiting for `di add`
    <root>/images/<file>                imported disk images
    <root>/basefs/<vm id>-<file>        a VM's read-only branch: a symlink to the
                                        image's one shared extraction
    <root>/basefs/.images/<file>/       that extraction (see images/extract.py)
    <root>/homefs/<vm id>-<user id>-homefs
    <root>/overlayfs/<di id>-<vm id>-overlayfs
    <root>/overlayfs/<di id>-<vm id>-overlayfs.work   kernel overlayfs' workdir
    <root>/rootfs/<user id>-<vm id>-fs  the mountpoint of the merged root
    <root>/rootfs/.<vm id>.lock         held by the `vm start` or `vm stop` at work

An overlay is never deleted by qvdctl: when it must go (non-persistent start,
failed start) it is renamed with the prefix ``deleteme-`` for the admin.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path

from qvdctl.settings import STORAGE_FOLDERS, Settings

log = logging.getLogger(__name__)

DELETEME = "deleteme-"
# rootfs_entry's name, read back
_ROOTFS_ENTRY = re.compile(r"[0-9]+-([0-9]+)-fs")


@dataclasses.dataclass(frozen=True)
class Storage:
    """The storage folders, as configured."""

    staging: Path
    images: Path
    basefs: Path
    homefs: Path
    overlayfs: Path
    rootfs: Path

    @classmethod
    def from_settings(cls, settings: Settings) -> Storage:
        return cls(**{name: settings.path(f"path.storage.{name}") for name in STORAGE_FOLDERS})

    def ensure(self) -> None:
        """Create every folder that is missing.

        All but staging/ are created root-only (0700): images carry setuid-root
        programs and device nodes, which host users must not reach through
        basefs/, overlayfs/ or a mounted rootfs/. Existing folders are left as
        the admin made them.
        """
        for name in STORAGE_FOLDERS:
            mode = 0o755 if name == "staging" else 0o700
            getattr(self, name).mkdir(mode=mode, parents=True, exist_ok=True)

    # --- names (SPEC §1) ----------------------------------------------------

    def image(self, image_file: str) -> Path:
        return self.images / image_file

    def extraction(self, image_file: str) -> Path:
        """The single extracted tree shared by every VM of one image."""
        return self.basefs / ".images" / image_file

    def basefs_entry(self, vm_id: int, image_file: str) -> Path:
        return self.basefs / f"{vm_id}-{image_file}"

    def homefs_entry(self, vm_id: int, user_id: int) -> Path:
        return self.homefs / f"{vm_id}-{user_id}-homefs"

    def overlay(self, di_id: int, vm_id: int) -> Path:
        return self.overlayfs / f"{di_id}-{vm_id}-overlayfs"

    def overlay_workdir(self, di_id: int, vm_id: int) -> Path:
        return self.overlayfs / f"{di_id}-{vm_id}-overlayfs.work"

    def rootfs_entry(self, user_id: int, vm_id: int) -> Path:
        return self.rootfs / f"{user_id}-{vm_id}-fs"

    def rootfs_vm(self, path: Path) -> int | None:
        """The VM id of ``path`` if it is a ``rootfs_entry`` of this storage, else None."""
        if path.parent != self.rootfs.resolve():
            return None
        m = _ROOTFS_ENTRY.fullmatch(path.name)
        return int(m.group(1)) if m else None

    def vm_lock(self, vm_id: int) -> Path:
        """The lock file that serialises starts and stops of one VM (see vm/state.py)."""
        return self.rootfs / f".{vm_id}.lock"


def move_aside(path: Path) -> Path:
    """Rename ``path`` to ``deleteme-<name>`` (``deleteme-<name>.N`` if taken); return it.

    Nothing is deleted: earlier ``deleteme-`` folders are kept for the admin.
    ``os.rename`` onto an existing empty folder would succeed silently, so the
    free name is claimed with mkdir first and the folder renamed over it.
    """
    for n in range(0, 10_000):
        suffix = f".{n}" if n else ""
        target = path.with_name(f"{DELETEME}{path.name}{suffix}")
        try:
            target.mkdir()
        except FileExistsError:
            continue
        os.rename(path, target)
        log.info("moved %s aside as %s", path, target.name)
        return target
    raise RuntimeError(f"no free deleteme- name for {path}")
