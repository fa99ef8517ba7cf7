"""rename(2) and RENAME2 in the union: moving entries that may live in a lower branch.

Everything moves inside the upper branch. The entry and, for a directory, its whole tree are
copied up first (``copyup.copy_up_tree``); a merged directory becomes opaque on the way, so
it shows at its new name exactly what it showed at the old one. If a lower branch has the old
name, a whiteout takes its place (``Whiteouts.move_hiding``); if a lower branch has the new
name and a directory moves there, the directory is made opaque first.

RENAME_NOREPLACE and RENAME_EXCHANGE are honoured; a graft's root never moves (EBUSY), and
nothing moves between stacks (EXDEV, as between filesystems).

Locking (see ``qvdfs.union.tree``): ``rename`` runs under ``Index.lock`` inside
``Index.changing`` for both parents; a large copy-up lets go of the lock meanwhile, the
mutation lock keeps other changes out.
"""

from __future__ import annotations

import errno
import os

from qvdformat import syscalls
from qvdfs.union import copyup, whiteout
from qvdfs.union.tree import Index, Node, stale


def rename(index: Index, parent_old: Node, name_old: bytes, parent_new: Node, name_new: bytes,
           flags: int) -> None:
    """Rename ``parent_old/name_old`` to ``parent_new/name_new`` with RENAME2 ``flags``."""
    node = index.lookup(parent_old, name_old)
    target = index.listing(parent_new).get(name_new)
    stale(node, target)
    exchange = bool(flags & syscalls.RENAME_EXCHANGE)
    if node.is_stack_root or (target is not None and target.is_stack_root):
        raise OSError(errno.EBUSY, "a grafted branch is mounted here")
    if parent_new.stack is not node.stack:
        raise OSError(errno.EXDEV, "cross-branch rename")
    if flags & syscalls.RENAME_NOREPLACE and target is not None:
        raise OSError(errno.EEXIST, "file exists")
    if target is None:
        if exchange:
            raise OSError(errno.ENOENT, "no such entry")
    elif target is node:
        return
    elif exchange:
        _exchange(index, node, parent_old, name_old, target, parent_new, name_new)
        return
    elif node.is_dir and not target.is_dir:
        raise OSError(errno.ENOTDIR, "not a directory")
    elif not node.is_dir and target.is_dir:
        raise OSError(errno.EISDIR, "is a directory")
    elif target.is_dir and index.listing(target):
        raise OSError(errno.ENOTEMPTY, "directory not empty")
    copyup.copy_up_tree(index, node)
    old_pfd = copyup.ensure_dir_on_upper(index, parent_old)
    new_pfd = copyup.ensure_dir_on_upper(index, parent_new)
    _move(index, node, parent_old, name_old, old_pfd, target, parent_new, name_new, new_pfd)


def _exchange(index: Index, node: Node, parent_old: Node, name_old: bytes, target: Node,
              parent_new: Node, name_new: bytes) -> None:
    """RENAME_EXCHANGE: both entries come up whole and swap places; no whiteout changes,
    since both names stay taken."""
    copyup.copy_up_tree(index, node)
    copyup.copy_up_tree(index, target)
    old_pfd = copyup.ensure_dir_on_upper(index, parent_old)
    new_pfd = copyup.ensure_dir_on_upper(index, parent_new)
    syscalls.renameat2(old_pfd, name_old, new_pfd, name_new, syscalls.RENAME_EXCHANGE)
    index.move_name(node, parent_old, name_old, parent_new, name_new)
    index.move_name(target, parent_new, name_new, parent_old, name_old)
    index.listing(parent_old)[name_old] = target
    index.listing(parent_new)[name_new] = node
    node.in_lower, target.in_lower = target.in_lower, node.in_lower


def _move(index: Index, node: Node, parent_old: Node, name_old: bytes, old_pfd: int,
          target: Node | None, parent_new: Node, name_new: bytes, new_pfd: int) -> None:
    """Move the upper entry of ``node`` onto ``name_new``, replacing ``target`` if any."""
    stack = node.stack
    writer = whiteout.writer(stack)
    lower_at_new = target.in_lower if target is not None else whiteout.hidden(parent_new, name_new)
    if target is not None and target.is_dir and target.on_upper:
        tfd = copyup.ensure_dir_on_upper(index, target)
        for leftover in os.listdir(tfd):  # only whiteouts remain in an empty-looking dir
            syscalls.remove_at(tfd, leftover)
    if node.is_dir and lower_at_new:
        writer.make_opaque(index, old_pfd, name_old, parent_new, name_new)

    def move() -> None:
        if node.in_lower:
            writer.move_hiding(index, parent_old, old_pfd, name_old, new_pfd, name_new)
        else:
            os.rename(name_old, name_new, src_dir_fd=old_pfd, dst_dir_fd=new_pfd)

    whiteout.rename_over(parent_new, new_pfd, name_new, move, is_dir=node.is_dir)
    del index.listing(parent_old)[name_old]
    if target is not None:
        index.drop_name(target, parent_new, name_new)
    index.listing(parent_new)[name_new] = node
    index.move_name(node, parent_old, name_old, parent_new, name_new)
    node.in_lower = lower_at_new
