"""qvdproc.devices: a character device passes; anything else is refused, saying why."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from qvdproc.devices import NotACharacterDevice, require_character_device

pytestmark = pytest.mark.timeout(30)


def test_a_character_device_and_a_symlink_to_one_pass(tmp_path: Path) -> None:
    require_character_device("/dev/null")
    (tmp_path / "null").symlink_to("/dev/null")
    require_character_device(str(tmp_path / "null"))


def test_a_missing_path_is_refused_with_the_reason_stat_gave(tmp_path: Path) -> None:
    missing = str(tmp_path / "watchdog")
    with pytest.raises(NotACharacterDevice) as refused:
        require_character_device(missing)
    assert refused.value.strerror == os.strerror(errno.ENOENT)
    assert str(refused.value) == f"{missing}: No such file or directory"


@pytest.mark.parametrize("kind", ["file", "folder", "dangling symlink"])
def test_anything_else_is_refused_as_not_a_character_device(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "fuse"
    if kind == "file":
        path.write_text("")
    elif kind == "folder":
        path.mkdir()
    else:
        path.symlink_to(tmp_path / "nowhere")
    with pytest.raises(NotACharacterDevice) as refused:
        require_character_device(str(path))
    if kind == "dangling symlink":  # followed, like the device's own open would
        assert refused.value.strerror == os.strerror(errno.ENOENT)
    else:
        assert refused.value.strerror is None
        assert str(refused.value) == f"{path} is not a character device"
