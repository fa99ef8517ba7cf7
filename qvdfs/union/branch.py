"""Branches and stacks of branches, each held open by a directory descriptor."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets

from qvdfs.config import BranchConfig, MountError, WhiteoutFormat
from qvdfs.union import markers, syscalls

log = logging.getLogger(__name__)


class Branch:
    """One directory of the union, opened once at mount time.

    ``root_fd`` is the anchor of every access to the branch (see ``syscalls``), so a
    branch renamed or replaced by a symlink on the host after the mount keeps serving
    the directory that was mounted.
    """

    def __init__(self, config: BranchConfig) -> None:
        self.path = config.path
        self.writable = config.writable
        try:
            self.root_fd = os.open(config.path, syscalls.DIR_FLAGS)
        except FileNotFoundError:
            raise MountError(f"branch {config.path} does not exist") from None
        except NotADirectoryError:
            raise MountError(f"branch {config.path} is not a directory") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise MountError(f"branch {config.path} is a symlink; give its target") from None
            raise MountError(f"branch {config.path}: {exc.strerror}") from None
        self.meta_fds: list[int] = []
        for meta in markers.UNIONFS_META_DIRS:
            with contextlib.suppress(OSError):
                self.meta_fds.append(syscalls.open_dir(self.root_fd, meta))

    def refresh_meta(self) -> None:
        """Pick up a unionfs-fuse metadata folder created after the mount."""
        for fd in self.meta_fds:
            os.close(fd)
        self.meta_fds = []
        for meta in markers.UNIONFS_META_DIRS:
            with contextlib.suppress(OSError):
                self.meta_fds.append(syscalls.open_dir(self.root_fd, meta))

    def close(self) -> None:
        for fd in (self.root_fd, *self.meta_fds):
            with contextlib.suppress(OSError):
                os.close(fd)


class Stack:
    """Branches merged at one place of the union, highest priority first.

    ``upper`` is the index of the branch that takes every change (the first writable
    one), or None for a read-only union. Changes are prepared in ``work_fd``, a folder
    at the root of the upper branch that the union never shows, and renamed into place
    so that a crash never leaves a half-made entry visible.
    """

    def __init__(self, branches: list[Branch], whiteout_format: WhiteoutFormat, cow: bool) -> None:
        self.branches = branches
        self.whiteout_format = whiteout_format
        self.cow = cow
        self.upper = next((i for i, b in enumerate(branches) if b.writable), None)
        self.work_fd: int | None = None
        if self.upper is not None:
            self.work_fd = self._open_work_dir(branches[self.upper])

    @staticmethod
    def _open_work_dir(upper: Branch) -> int:
        with contextlib.suppress(FileExistsError):
            os.mkdir(markers.WORK_DIR, 0o700, dir_fd=upper.root_fd)
        try:
            fd = syscalls.open_dir(upper.root_fd, markers.WORK_DIR)
        except OSError as exc:
            raise MountError(f"cannot use work folder in {upper.path}: {exc.strerror}") from None
        # Whatever is here was left by a crash in the middle of an operation that had
        # not yet become visible: it is garbage by construction.
        for entry in os.listdir(fd):
            syscalls.remove_at(fd, entry)
        return fd

    def temp_name(self) -> bytes:
        return b"tmp-" + secrets.token_hex(8).encode()

    def close(self) -> None:
        if self.work_fd is not None and self.upper is not None:
            os.close(self.work_fd)
            with contextlib.suppress(OSError):
                os.rmdir(markers.WORK_DIR, dir_fd=self.branches[self.upper].root_fd)
        for branch in self.branches:
            branch.close()
