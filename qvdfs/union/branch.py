"""Branches and stacks of branches, each held open by a directory descriptor."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import stat

from qvdfs.config import BranchConfig, MountError, WhiteoutFormat
from qvdformat import markers, syscalls

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
        self.meta_fds = markers.unionfs_meta_fds(self.root_fd)

    def refresh_meta(self) -> None:
        """Pick up a unionfs-fuse metadata folder created after the mount."""
        for fd in self.meta_fds:
            os.close(fd)
        self.meta_fds = markers.unionfs_meta_fds(self.root_fd)

    def close(self) -> None:
        for fd in (self.root_fd, *self.meta_fds):
            with contextlib.suppress(OSError):
                os.close(fd)


class UpperBranch:
    """The branch of a stack that takes every change, with this mount's work folder in it.

    Changes are prepared in ``work_fd``, a folder at the root of the upper branch that the
    union never shows, and renamed into place, so that a crash never leaves a half-made
    entry visible. Write paths get one from ``Stack.require_upper``, which answers EROFS
    for a read-only union: past that point nothing is optional.
    """

    def __init__(self, index: int, branch: Branch) -> None:
        self.index = index
        self.branch = branch
        self.work_fd, self.work_name = self._open_work_dir(branch)

    @staticmethod
    def _open_work_dir(upper: Branch) -> tuple[int, bytes]:
        """Make this mount's own work folder inside ``.qvdfs.work`` and lock it.

        Each mount works in a folder of its own, held with flock while mounted, so that the
        cleanup of a mount that is ending never touches the work of the next mount of the
        same upper branch (a VM restarted at once). Whatever is there unlocked was left by
        a crash in the middle of an operation that had not yet become visible: garbage by
        construction.
        """
        for _attempt in range(5):
            with contextlib.suppress(FileExistsError):
                os.mkdir(markers.WORK_DIR, 0o700, dir_fd=upper.root_fd)
            try:
                parent = syscalls.open_dir(upper.root_fd, markers.WORK_DIR)
            except OSError as exc:
                raise MountError(f"cannot use work folder in {upper.path}: {exc.strerror}") from None
            try:
                _remove_unlocked(parent)
                name = f"{os.getpid()}-{secrets.token_hex(4)}"
                try:
                    os.mkdir(name, 0o700, dir_fd=parent)
                except FileNotFoundError:
                    continue  # the ending mount removed the folder under us: make it again
                fd = syscalls.open_dir(parent, os.fsencode(name))
                fcntl.flock(fd, fcntl.LOCK_EX)
                return fd, os.fsencode(name)
            finally:
                os.close(parent)
        raise MountError(f"cannot make a work folder in {upper.path}")

    @staticmethod
    def temp_name() -> bytes:
        """A fresh name in the work folder."""
        return b"tmp-" + secrets.token_hex(8).encode()

    def discard(self, pfd: int, name: bytes) -> None:
        """Remove the upper entry ``pfd/name`` (a directory possibly holding whiteouts) in
        one step: it leaves the union at once, and is emptied in the work folder."""
        tmp = self.temp_name()
        os.rename(name, tmp, src_dir_fd=pfd, dst_dir_fd=self.work_fd)
        syscalls.remove_at(self.work_fd, tmp)

    def close(self) -> None:
        """Remove this mount's work folder (and ``.qvdfs.work`` if no other mount uses it)."""
        root = self.branch.root_fd
        with contextlib.suppress(OSError):
            parent = syscalls.open_dir(root, markers.WORK_DIR)
            try:
                syscalls.remove_at(parent, self.work_name)
            finally:
                os.close(parent)
        os.close(self.work_fd)
        # Fails while another mount of this branch works in there, as it should.
        with contextlib.suppress(OSError):
            os.rmdir(markers.WORK_DIR, dir_fd=root)


class Stack:
    """Branches merged at one place of the union, highest priority first.

    ``upper`` is the index of the branch that takes every change (the first writable
    one), or None for a read-only union; the read paths compare branch indexes with it.
    ``upper_branch`` is that branch with its work folder (None alike).
    """

    def __init__(self, branches: list[Branch], whiteout_format: WhiteoutFormat, cow: bool,
                 xattrs: markers.OverlayXattrs) -> None:
        self.branches = branches
        self.whiteout_format = whiteout_format
        # the namespace of the overlay xattrs read and written in these branches
        self.xattrs = xattrs
        self.cow = cow
        upper = next((i for i, b in enumerate(branches) if b.writable), None)
        self.upper_branch = UpperBranch(upper, branches[upper]) if upper is not None else None
        self.upper: int | None = upper

    def require_upper(self) -> UpperBranch:
        """The upper branch, for a change; EROFS if the union is read-only."""
        if self.upper_branch is None:
            raise OSError(errno.EROFS, "read-only union")
        return self.upper_branch

    def close(self) -> None:
        if self.upper_branch is not None:
            self.upper_branch.close()
        for branch in self.branches:
            branch.close()


def _remove_unlocked(work_dir: int) -> None:
    """Remove what no live mount holds inside ``work_dir`` (see Stack._open_work_dir)."""
    for name in os.listdir(work_dir):
        if not stat.S_ISDIR(os.lstat(name, dir_fd=work_dir).st_mode):
            os.unlink(name, dir_fd=work_dir)  # never a mount's own folder; never opened
            continue
        fd = os.open(name, syscalls.DIR_FLAGS, dir_fd=work_dir)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live mount's folder
        finally:
            os.close(fd)
        syscalls.remove_at(work_dir, name)
