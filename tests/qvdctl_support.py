"""Shared pieces of the qvdctl tests: running the real CLI on a throwaway root.

Every root made by ``qvd_root`` is cleaned on the way out: whatever is still
mounted under it is unmounted, deepest first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from qvdctl.imagebuild import build_busybox_rootfs, build_image_tarball
from qvdctl.mounting import mounts_under
from tests.mounts import force_unmount

QVDCTL = str(Path(sys.executable).parent / "qvdctl")


class Cli:
    """``qvdctl --root ROOT ...`` as a subprocess, as an admin would type it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def run(self, *args: str, check: bool = True, env: dict | None = None,
            preexec_fn=None, timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [QVDCTL, "--root", str(self.root), *args],
            capture_output=True, text=True, timeout=timeout,
            env={**os.environ, **(env or {})}, preexec_fn=preexec_fn,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"qvdctl {' '.join(args)} failed: {result.stderr}")
        return result

    def fails(self, *args: str, **kw) -> str:
        """Run a command that must fail; return its one error line."""
        result = self.run(*args, check=False, **kw)
        assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
        return lines[0]

    def json(self, *args: str):
        return json.loads(self.run("--json", *args).stdout)

    def vm(self, name: str) -> dict:
        (row,) = self.json("vm", "list", "-f", f"name={name}")
        return row


def cleanup_root(root: Path) -> None:
    for point in mounts_under(root):
        force_unmount(point)


def busybox_tarball(
    dest: Path, rootfs: Path, compression: str = "gz", extended: bool = False
) -> Path:
    return build_image_tarball(dest, rootfs, compression=compression, extended=extended)


def make_rootfs(dest: Path) -> Path:
    return build_busybox_rootfs(dest)
