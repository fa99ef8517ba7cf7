"""Whiteouts: how the upper branch records that a name of a lower branch is gone.

Two on-disk formats, one interface (as fuse-overlayfs keeps its layer formats behind one set
of operations). ``markers`` has the bytes of each format; this module decides what to write
when, so the remove, rename and create paths ask "hide this name", "move this entry and hide
the old name", "make this directory opaque", "build a new entry where a whiteout stands",
and never which format is in force:

- ``WhiteoutFormat.OVERLAY`` (kernel overlayfs, the default): a 0/0 character device named
  like the deleted entry, put in place atomically (built in the work folder, then exchanged
  or renamed over); a directory hides what lies below it with ``trusted.overlay.opaque``.
- ``WhiteoutFormat.UNIONFS`` (unionfs-fuse, ``-o whiteout=unionfs``): a
  ``.unionfs-fuse/<path>_HIDDEN~`` marker beside the tree; a marker beside a real entry of
  the same branch makes that entry opaque.

``writer(stack)`` is the format a stack writes new whiteouts in. A whiteout already on disk
may be of either format whatever the stack writes (the index reads both): its format is
``parent.whiteouts[name]``, and ``build_over``, ``rename_over`` and ``unhide`` act on that.

Every function here is a step of a change: the caller holds ``Index.lock`` and is inside
``Index.changing``, and ``parent``'s directory exists in the upper branch (``pfd``). Each
keeps ``parent.whiteouts`` equal to what is on disk.
"""

from __future__ import annotations

import abc
import errno
import os
from collections.abc import Callable

from qvdfs.config import WhiteoutFormat
from qvdformat import markers, syscalls
from qvdfs.union.branch import Stack, UpperBranch
from qvdfs.union.tree import Index, Node

# make(dirfd, name): create an entry there (and own it); remove it again if it fails midway.
Make = Callable[[int, bytes], None]


class Whiteouts(abc.ABC):
    """One on-disk whiteout format, as the write paths use it."""

    format: WhiteoutFormat

    # -- writing new whiteouts (the stack's format, see ``writer``) ------------------------

    @abc.abstractmethod
    def hide(self, index: Index, parent: Node, pfd: int, name: bytes, *, replace: bool) -> None:
        """Whiteout ``name`` in ``parent``; with ``replace``, the upper entry of that name
        goes in the same step."""

    @abc.abstractmethod
    def move_hiding(self, index: Index, parent_old: Node, old_pfd: int, name_old: bytes,
                    new_pfd: int, name_new: bytes) -> None:
        """Rename the upper entry ``name_old`` to ``new_pfd/name_new`` and whiteout the old
        name (a lower branch still has it)."""

    @abc.abstractmethod
    def make_opaque(self, index: Index, old_pfd: int, name_old: bytes, parent_new: Node,
                    name_new: bytes) -> None:
        """The upper directory ``old_pfd/name_old`` is about to become ``parent_new/name_new``,
        a name lower branches have: make it hide their contents there."""

    # -- replacing a whiteout already on disk (the format recorded in parent.whiteouts) ----

    @abc.abstractmethod
    def build_over(self, upper: UpperBranch, parent: Node, pfd: int, name: bytes, make: Make,
                   *, is_dir: bool) -> None:
        """Put the entry ``make`` builds at ``pfd/name``, where a whiteout of this format
        stands; a directory stays opaque."""

    @abc.abstractmethod
    def rename_over(self, parent: Node, pfd: int, name: bytes, move: Callable[[], None], *,
                    is_dir: bool) -> None:
        """Call ``move``, which renames an entry onto ``pfd/name`` where a whiteout of this
        format stands."""

    @abc.abstractmethod
    def unhide(self, index: Index, parent: Node, name: bytes) -> None:
        """A file now stands on ``name``: remove the whiteout if it is still on disk."""


class OverlayWhiteouts(Whiteouts):
    """Kernel overlayfs: 0/0 character devices and ``trusted.overlay.opaque``."""

    format = WhiteoutFormat.OVERLAY

    def hide(self, index: Index, parent: Node, pfd: int, name: bytes, *, replace: bool) -> None:
        if replace:
            upper = parent.stack.require_upper()
            work, tmp = upper.work_fd, upper.temp_name()
            markers.make_whiteout(work, tmp)
            syscalls.renameat2(work, tmp, pfd, name, syscalls.RENAME_EXCHANGE)
            syscalls.remove_at(work, tmp)
        else:
            markers.make_whiteout(pfd, name)
        parent.whiteouts[name] = self.format

    def move_hiding(self, index: Index, parent_old: Node, old_pfd: int, name_old: bytes,
                    new_pfd: int, name_new: bytes) -> None:
        try:
            syscalls.renameat2(old_pfd, name_old, new_pfd, name_new, syscalls.RENAME_WHITEOUT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # a branch filesystem without RENAME_WHITEOUT
                raise
            os.rename(name_old, name_new, src_dir_fd=old_pfd, dst_dir_fd=new_pfd)
            markers.make_whiteout(old_pfd, name_old)
        parent_old.whiteouts[name_old] = self.format

    def make_opaque(self, index: Index, old_pfd: int, name_old: bytes, parent_new: Node,
                    name_new: bytes) -> None:
        markers.set_opaque(old_pfd, name_old, parent_new.stack.xattrs)

    def build_over(self, upper: UpperBranch, parent: Node, pfd: int, name: bytes, make: Make,
                   *, is_dir: bool) -> None:
        work, tmp = upper.work_fd, upper.temp_name()
        make(work, tmp)
        try:
            if is_dir:
                # rename(2) cannot put a directory over a device: swap them, drop the device.
                markers.set_opaque(work, tmp, parent.stack.xattrs)
                syscalls.renameat2(work, tmp, pfd, name, syscalls.RENAME_EXCHANGE)
                os.unlink(tmp, dir_fd=work)
            else:
                os.rename(tmp, name, src_dir_fd=work, dst_dir_fd=pfd)
        except BaseException:
            syscalls.remove_at(work, tmp)
            raise
        del parent.whiteouts[name]

    def rename_over(self, parent: Node, pfd: int, name: bytes, move: Callable[[], None], *,
                    is_dir: bool) -> None:
        if is_dir:
            os.unlink(name, dir_fd=pfd)  # a directory cannot replace a device
        move()
        del parent.whiteouts[name]

    def unhide(self, index: Index, parent: Node, name: bytes) -> None:
        """Nothing left: ``build_over`` replaced the device."""


class UnionfsWhiteouts(Whiteouts):
    """unionfs-fuse: ``.unionfs-fuse/<path>_HIDDEN~`` markers beside the tree."""

    format = WhiteoutFormat.UNIONFS

    def _mark(self, index: Index, parent: Node, name: bytes) -> None:
        upper = parent.stack.require_upper()
        markers.unionfs_hide(upper.branch.root_fd, index.parts(parent), name)
        if not upper.branch.meta_fds:
            upper.branch.refresh_meta()  # the first marker made the metadata folder

    def hide(self, index: Index, parent: Node, pfd: int, name: bytes, *, replace: bool) -> None:
        if replace:
            parent.stack.require_upper().discard(pfd, name)
        self._mark(index, parent, name)
        parent.whiteouts[name] = self.format

    def move_hiding(self, index: Index, parent_old: Node, old_pfd: int, name_old: bytes,
                    new_pfd: int, name_new: bytes) -> None:
        os.rename(name_old, name_new, src_dir_fd=old_pfd, dst_dir_fd=new_pfd)
        self._mark(index, parent_old, name_old)
        parent_old.whiteouts[name_old] = self.format

    def make_opaque(self, index: Index, old_pfd: int, name_old: bytes, parent_new: Node,
                    name_new: bytes) -> None:
        # A marker beside the directory's new name: lower entries of that name stay hidden.
        self._mark(index, parent_new, name_new)

    def build_over(self, upper: UpperBranch, parent: Node, pfd: int, name: bytes, make: Make,
                   *, is_dir: bool) -> None:
        # The marker stays beside the new entry and keeps it opaque (a directory), or keeps
        # the lower name hidden once this one goes (a link, whose node's in_lower speaks for
        # its first name); a created file drops it with ``unhide``.
        make(pfd, name)

    def rename_over(self, parent: Node, pfd: int, name: bytes, move: Callable[[], None], *,
                    is_dir: bool) -> None:
        move()  # the marker stays: the entry is opaque there

    def unhide(self, index: Index, parent: Node, name: bytes) -> None:
        upper = parent.stack.require_upper()
        markers.unionfs_unhide(upper.branch.meta_fds, index.parts(parent), name)
        del parent.whiteouts[name]


FORMATS: dict[WhiteoutFormat, Whiteouts] = {
    w.format: w for w in (OverlayWhiteouts(), UnionfsWhiteouts())
}


def writer(stack: Stack) -> Whiteouts:
    """The format ``stack`` writes new whiteouts in (``-o whiteout=``)."""
    return FORMATS[stack.whiteout_format]


def hidden(parent: Node, name: bytes) -> bool:
    """True if a whiteout in ``parent``'s upper directory hides ``name``."""
    return name in parent.whiteouts


def build_over(upper: UpperBranch, parent: Node, pfd: int, name: bytes, make: Make, *,
               is_dir: bool) -> None:
    """Build ``parent/name`` with ``make``, in place of the whiteout there if there is one."""
    kind = parent.whiteouts.get(name)
    if kind is None:
        make(pfd, name)
    else:
        FORMATS[kind].build_over(upper, parent, pfd, name, make, is_dir=is_dir)


def rename_over(parent: Node, pfd: int, name: bytes, move: Callable[[], None], *,
                is_dir: bool) -> None:
    """Call ``move`` (a rename onto ``parent/name``), minding the whiteout there, if any."""
    kind = parent.whiteouts.get(name)
    if kind is None:
        move()
    else:
        FORMATS[kind].rename_over(parent, pfd, name, move, is_dir=is_dir)


def unhide(index: Index, parent: Node, name: bytes) -> None:
    """A file now stands on ``name``: drop the whiteout still on disk, if any."""
    kind = parent.whiteouts.get(name)
    if kind is not None:
        FORMATS[kind].unhide(index, parent, name)


def seal(index: Index, dir_: Node, dfd: int) -> None:
    """Make the upper directory ``dir_`` (open as ``dfd``) opaque, and drop its whiteouts.

    Its lower contents no longer show, so the devices hiding them go. The opaque xattr is
    written in either format; unionfs markers, harmless below an opaque directory, stay.
    """
    for name, kind in list(dir_.whiteouts.items()):
        if kind is WhiteoutFormat.OVERLAY:
            os.unlink(name, dir_fd=dfd)
    dir_.whiteouts = {}
    markers.set_opaque(*index.entry_ref(dir_, dir_.branch), dir_.stack.xattrs)
