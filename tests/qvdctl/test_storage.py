"""Storage names (SPEC §1): each built and read back in qvdctl/storage.py alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from qvdctl.storage import Storage

pytestmark = pytest.mark.timeout(30)


def test_a_rootfs_entry_is_read_back_as_its_vm(tmp_path: Path) -> None:
    folders = {name: tmp_path / name for name in
               ("staging", "images", "basefs", "homefs", "overlayfs", "rootfs")}
    storage = Storage(**folders)
    storage.ensure()
    assert storage.rootfs_vm(storage.rootfs_entry(3, 42)) == 42
    assert storage.rootfs_vm(storage.rootfs / "3-42-fs.old") is None
    assert storage.rootfs_vm(storage.rootfs / ".42.lock") is None
    assert storage.rootfs_vm(tmp_path / "elsewhere" / "3-42-fs") is None
