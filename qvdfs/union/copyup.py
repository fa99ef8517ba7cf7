"""Copy-up: bring an entry of a lower branch into the upper one before it changes.

Every copy is built in the stack's work folder and renamed into place, so a crash
mid-copy leaves garbage only in the work folder (emptied at the next mount), never a
partial file in the union. Metadata goes on in the order that keeps it: xattrs, owner
(chown clears set-id bits), mode, then timestamps last.

A change of metadata alone (chmod, chown, utimens, xattrs, truncation to zero) copies
no data: the upper file is created sparse at the same size and marked with
``trusted.overlay.metacopy``, and reads keep coming from the lower file, as kernel
overlayfs does with ``metacopy=on``.

A rename copies a whole tree up (``copy_up_tree``); every other change copies up one entry
(``copy_up``) and the directories above it (``ensure_dir_on_upper``).

Every function here is a step of a change: the caller holds ``Index.lock`` and is inside
``Index.changing``. A large data copy lets go of the lock (``Index.unlocked``) while it
runs; the mutation lock keeps other changes out meanwhile.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

from qvdformat import syscalls
from qvdformat.markers import OverlayXattrs
from qvdfs.union import whiteout
from qvdfs.union.tree import Index, Node

log = logging.getLogger(__name__)

# Copies larger than this let go of the index lock, so that other requests keep flowing.
THREAD_COPY_THRESHOLD = 1 << 20


def ensure_dir_on_upper(index: Index, node: Node) -> int:
    """Make sure the directory ``node`` exists in the upper branch; return its fd there."""
    upper = node.stack.require_upper()
    if not node.on_upper:
        if not node.stack.cow:
            raise OSError(errno.EROFS, "copy-on-write is off (mount with -o cow)")
        assert node.parent is not None
        upper_parent = ensure_dir_on_upper(index, node.parent)
        lower_fd = index.dir_fd(node, node.branch)
        if lower_fd is None:
            raise OSError(errno.ENOENT, "directory vanished from its branch")
        st = os.fstat(lower_fd)
        work, tmp = upper.work_fd, upper.temp_name()
        os.mkdir(tmp, 0o700, dir_fd=work)
        _copy_metadata(lower_fd, None, work, tmp, st, node.stack.xattrs)
        try:
            syscalls.renameat2(work, tmp, upper_parent, node.name, syscalls.RENAME_NOREPLACE)
        except FileExistsError:
            # Made behind our back while mounted; adopt it if it is a real directory.
            os.rmdir(tmp, dir_fd=work)
            if not stat.S_ISDIR(syscalls.lstat_at(upper_parent, node.name).st_mode):
                raise
        node.layers.insert(0, upper.index)
        node.branch = upper.index
    fd = index.dir_fd(node, upper.index)
    if fd is None:
        raise OSError(errno.ENOENT, "upper directory vanished")
    return fd


def copy_up(index: Index, node: Node, *, data: bool) -> None:
    """Give ``node`` an entry in the upper branch; with ``data``, its own copy of the data.

    A large data copy lets go of the index lock (see the module docstring).
    """
    if node.is_dir:
        ensure_dir_on_upper(index, node)
        return
    if node.on_upper and not (data and index.is_metacopy(node)):
        return
    if node.unlinked:
        # Its name is gone or names another entry now: a copy by name would copy, or
        # replace, the wrong file. (Kernel overlayfs copies such a file up to a tmpfile.)
        raise OSError(errno.EROFS, "a removed file of a lower branch cannot be copied up")
    upper = node.stack.require_upper()
    if not node.stack.cow:
        raise OSError(errno.EROFS, "copy-on-write is off (mount with -o cow)")
    assert node.parent is not None
    upper_parent = ensure_dir_on_upper(index, node.parent)
    meta_fd = index.parent_fd(node, node.branch)
    st = syscalls.lstat_at(meta_fd, node.name)
    work, tmp = upper.work_fd, upper.temp_name()
    try:
        if stat.S_ISREG(st.st_mode):
            _copy_regular(index, node, work, st, tmp, data=data)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(node.name, dir_fd=meta_fd), tmp, dir_fd=work)
        else:
            os.mknod(tmp, st.st_mode, st.st_rdev, dir_fd=work)
        _copy_metadata(meta_fd, node.name, work, tmp, st, node.stack.xattrs)
        if node.on_upper:
            # Completing a metadata-only copy: replace the sparse placeholder.
            os.rename(tmp, node.name, src_dir_fd=work, dst_dir_fd=upper_parent)
        else:
            syscalls.renameat2(work, tmp, upper_parent, node.name, syscalls.RENAME_NOREPLACE)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=work)
        except FileNotFoundError:
            pass
        raise
    index.copy_ups += 1
    if not node.on_upper:
        _split_hard_links(index, node)
    index.drop_data_location(node)
    node.branch = upper.index
    # After a metadata-only copy the data's place is found again from the xattrs.
    node.data_branch = None if (stat.S_ISREG(st.st_mode) and not data) else upper.index


def copy_up_tree(index: Index, node: Node) -> None:
    """Copy ``node`` and, for a directory, everything under it into the upper branch.

    A directory that merged lower branches becomes opaque: it can then move to any
    name and still show exactly what it showed before. (Kernel overlayfs records a
    redirect instead; copying is slower for big trees but needs no new format.)
    """
    if not node.is_dir:
        copy_up(index, node, data=True)
        return
    ensure_dir_on_upper(index, node)
    for child in list(index.listing(node).values()):
        copy_up_tree(index, child)
    if len(node.layers) > 1:
        whiteout.seal(index, node, ensure_dir_on_upper(index, node))
        if node.redirect is not None:
            syscalls.removexattr_at(*index.entry_ref(node, node.branch),
                                    node.stack.xattrs.redirect)
            node.redirect = None
        for b in node.layers[1:]:
            fd = node.fds.pop(b, None)
            if fd is not None:
                os.close(fd)
        node.layers = [node.branch]
        for child in index.listing(node).values():
            child.in_lower = False


def _copy_regular(index: Index, node: Node, work: int, st: os.stat_result, tmp: bytes, *,
                  data: bool) -> None:
    dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                  0o600, dir_fd=work)
    try:
        if not data:
            os.ftruncate(dst, st.st_size)
            os.setxattr(syscalls.proc_fd(dst), node.stack.xattrs.metacopy, b"")
            return
        _, src_dirfd, src_name = index.data_location(node)
        src = os.open(src_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dirfd)
        try:
            if os.fstat(src).st_size > THREAD_COPY_THRESHOLD:
                index.unlocked(copy_data, src, dst)
            else:
                copy_data(src, dst)
            # Durable before it becomes visible, as overlayfs does on copy-up.
            index.unlocked(os.fsync, dst)
        finally:
            os.close(src)
    finally:
        os.close(dst)


def copy_data(src: int, dst: int) -> None:
    """Copy all of ``src`` to ``dst`` from their current offsets, in-kernel where possible."""
    try:
        while os.copy_file_range(src, dst, 1 << 30):
            pass
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    while os.sendfile(dst, src, None, 1 << 30):
        pass


def _copy_metadata(src_dirfd: int, src_name: bytes | None, dst_dirfd: int, dst_name: bytes,
                   st: os.stat_result, xattrs: OverlayXattrs) -> None:
    """Copy xattrs, owner, mode and times of a source entry onto ``dst_dirfd/dst_name``.

    ``src_name`` None means ``src_dirfd`` is the source itself (a directory).
    """
    if src_name is None:
        src_parent, src_name = src_dirfd, b"."
    else:
        src_parent = src_dirfd
    syscalls.copy_xattrs(src_parent, src_name, dst_dirfd, dst_name, skip=xattrs.prefix)
    os.chown(dst_name, st.st_uid, st.st_gid, dir_fd=dst_dirfd, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        syscalls.chmod_at(dst_dirfd, dst_name, stat.S_IMODE(st.st_mode))
    os.utime(dst_name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_dirfd, follow_symlinks=False)


def _split_hard_links(index: Index, node: Node) -> None:
    """A copy-up breaks a lower hard link, as in overlayfs: other names keep the old file."""
    for parent, name in node.aliases:
        if parent.listing is not None and parent.listing.get(name) is node:
            fresh = index.new_node(parent, name, node.stack, False, node.branch)
            fresh.in_lower = node.in_lower
            parent.listing[name] = fresh
            index.invalidate(parent, name)
    node.aliases = ()
