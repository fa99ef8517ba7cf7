"""Fixtures every layer's tests share; the code behind them is in ``tests/support/``.

A module that needs more of one (a populated root, a canary beside the branches) overrides
the fixture under the same name and asks for this one, so the building and the cleaning up
are written once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mounts import force_unmount
from tests.support.qvdctl import IMAGE, Cli, cleanup_root
from tools.imagebuild import build_busybox_rootfs, build_image_tarball


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bootable busybox root folder, built once; tests use it as a read-only base."""
    return build_busybox_rootfs(tmp_path_factory.mktemp("busybox") / "root")


@pytest.fixture(scope="session")
def tarball(tmp_path_factory: pytest.TempPathFactory, rootfs: Path) -> Path:
    """``rootfs`` as a gzip disk image named ``IMAGE``, built once."""
    return build_image_tarball(tmp_path_factory.mktemp("tarballs") / IMAGE, rootfs)


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    """The real qvdctl on an empty storage root; whatever is mounted under it is unmounted."""
    root = tmp_path / "root"
    try:
        yield Cli(root)
    finally:
        cleanup_root(root)


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """Empty ``base`` and ``upper`` branches and a mountpoint ``mnt``, unmounted on the way out."""
    d = {name: tmp_path / name for name in ("base", "upper", "mnt")}
    for path in d.values():
        path.mkdir()
    try:
        yield d
    finally:
        force_unmount(d["mnt"])
