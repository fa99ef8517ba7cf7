"""The branches every test of the union starts from (see ``harness``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def branches(tmp_path: Path) -> dict[str, Path]:
    d = {name: tmp_path / name for name in ("upper", "base", "mnt")}
    for path in d.values():
        path.mkdir()
    base = d["base"]
    (base / "file").write_text("base data")
    (base / "dir").mkdir()
    (base / "dir" / "inner").write_text("inner")
    (base / "dir" / "sub").mkdir()
    (base / "empty").mkdir()
    os.symlink("file", base / "link")
    return d
