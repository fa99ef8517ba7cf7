"""The portable backend: libfuse through pyfuse3 and trio, over any ``Filesystem``.

For setups where the native session (``qvdfs.fuse``) cannot run. Each request is handed to
the same ``Filesystem`` methods the native session calls, inline on trio's thread, so a slow
request (a large copy-up, an fsync) holds up the others here; pyfuse3 offers no
passthrough, no plain READDIR, no FOPEN_CACHE_DIR, and no fallocate, lseek or
copy_file_range (the kernel answers EOPNOTSUPP or falls back to read and write).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio
from pyfuse3 import FileHandleT, FileNameT, InodeT, ModeT, RequestContext

from qvdfs.config import MountConfig, MountError
from qvdfs.fuse.mount import Atime
from qvdfs.fuse.abi import FOPEN_CACHE_DIR, FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE
from qvdfs.fuse.filesystem import (
    Attr,
    Context,
    Entry,
    Filesystem,
    Opened,
    SetattrChanges,
)

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _entry_attributes(attr: Attr | None, entry_timeout: float, attr_timeout: float,
                      node_id: int | None = None) -> pyfuse3.EntryAttributes:
    out = pyfuse3.EntryAttributes()
    out.entry_timeout = entry_timeout
    out.attr_timeout = attr_timeout
    if attr is None:
        out.st_ino = node_id or 0
        return out
    f = attr.fields()
    out.st_ino = f.ino
    out.generation = 0
    out.st_mode = f.mode
    out.st_nlink = f.nlink
    out.st_uid = f.uid
    out.st_gid = f.gid
    out.st_rdev = f.rdev
    out.st_size = f.size
    out.st_blksize = f.blksize
    out.st_blocks = f.blocks
    out.st_atime_ns = f.atime_ns
    out.st_mtime_ns = f.mtime_ns
    out.st_ctime_ns = f.ctime_ns
    return out


def _context(ctx: RequestContext | None) -> Context:
    if ctx is None:
        return Context(0, 0, 0)
    return Context(ctx.uid, ctx.gid, ctx.pid, getattr(ctx, "umask", 0))


def _errors(handler: Callable[_P, Awaitable[_R]]) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """OSError becomes its errno; anything else is logged and answered with EIO."""
    @functools.wraps(handler)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class Pyfuse3Operations(pyfuse3.Operations):
    """pyfuse3's handlers, each a call of the same name on ``fs``."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, fs: Filesystem, config: MountConfig) -> None:
        super().__init__()
        self.fs = fs
        # The kernel enforces and caches POSIX ACLs; they turn on its permission checks,
        # so not with relaxed_permissions.
        self.enable_acl = config.fuse_options.default_permissions
        self.entry_timeout = config.entry_timeout
        # pyfuse3 gives only the handle to read/release requests; the Filesystem wants the
        # node id too, so remember it per handle.
        self._file_inodes: dict[int, int] = {}
        self._dir_inodes: dict[int, int] = {}
        self._next_dir_fh = 0

    def _entry(self, entry: Entry) -> pyfuse3.EntryAttributes:
        return _entry_attributes(entry.attr, entry.entry_timeout, entry.attr_timeout,
                                 entry.node_id)

    def _attr(self, reply: tuple[Attr, float]) -> pyfuse3.EntryAttributes:
        attr, timeout = reply
        return _entry_attributes(attr, self.entry_timeout, timeout)

    @staticmethod
    def _file_info(opened: Opened) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=opened.fh,
                                keep_cache=bool(opened.open_flags & FOPEN_KEEP_CACHE),
                                direct_io=bool(opened.open_flags & FOPEN_DIRECT_IO))

    @_errors
    async def lookup(self, parent_inode: InodeT, name: FileNameT,
                     ctx: RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._entry(self.fs.lookup(parent_inode, name, _context(ctx)))

    @_errors
    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        for inode, count in inode_list:
            self.fs.forget(inode, count)

    @_errors
    async def getattr(self, inode: InodeT,
                      ctx: RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attr(self.fs.getattr(inode, None, _context(ctx)))

    @_errors
    async def setattr(self, inode: InodeT, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: FileHandleT | None,
                      ctx: RequestContext) -> pyfuse3.EntryAttributes:
        changes = SetattrChanges(
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return self._attr(self.fs.setattr(inode, fh, changes, _context(ctx)))

    @_errors
    async def readlink(self, inode: InodeT, ctx: RequestContext) -> FileNameT:
        return self.fs.readlink(inode, _context(ctx))

    @_errors
    async def statfs(self, ctx: RequestContext) -> pyfuse3.StatvfsData:
        st = self.fs.statfs(pyfuse3.ROOT_INODE)
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail", "f_namemax"):
            setattr(out, field, getattr(st, field))
        return out

    @_errors
    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        self.fs.opendir(inode, 0, _context(ctx))
        fh = self._next_dir_fh = self._next_dir_fh + 1
        self._dir_inodes[fh] = inode
        return fh

    @_errors
    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        inode = self._dir_inodes[fh]

        def add(name: bytes, entry: Entry, offset: int) -> bool:
            assert entry.attr is not None
            return bool(pyfuse3.readdir_reply(token, name, self._entry(entry), offset))

        self.fs.readdirplus(inode, fh, start_id, add)

    @_errors
    async def releasedir(self, fh: FileHandleT) -> None:
        self.fs.releasedir(self._dir_inodes.pop(fh), fh)

    @_errors
    async def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        pass

    @_errors
    async def mkdir(self, parent_inode: InodeT, name: FileNameT, mode: ModeT,
                    ctx: RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(self.fs.mkdir(parent_inode, name, mode, _context(ctx)))

    @_errors
    async def mknod(self, parent_inode: InodeT, name: FileNameT, mode: ModeT, rdev: int,
                    ctx: RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(self.fs.mknod(parent_inode, name, mode, rdev, _context(ctx)))

    @_errors
    async def symlink(self, parent_inode: InodeT, name: FileNameT, target: FileNameT,
                      ctx: RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(self.fs.symlink(parent_inode, name, target, _context(ctx)))

    @_errors
    async def link(self, inode: InodeT, new_parent_inode: InodeT, new_name: FileNameT,
                   ctx: RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(self.fs.link(inode, new_parent_inode, new_name, _context(ctx)))

    @_errors
    async def unlink(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        self.fs.unlink(parent_inode, name, _context(ctx))

    @_errors
    async def rmdir(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        self.fs.rmdir(parent_inode, name, _context(ctx))

    @_errors
    async def rename(self, parent_inode_old: InodeT, name_old: FileNameT,
                     parent_inode_new: InodeT, name_new: FileNameT, flags: int,
                     ctx: RequestContext) -> None:
        self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags,
                       _context(ctx))

    @_errors
    async def open(self, inode: InodeT, flags: int, ctx: RequestContext) -> pyfuse3.FileInfo:
        # pyfuse3 does not pass the kernel's FUSE_OPEN_KILL_SUIDGID; a caller other than
        # root is the closest stand-in for "truncating without CAP_FSETID".
        kill_suidgid = bool(flags & os.O_TRUNC) and ctx.uid != 0
        opened = self.fs.open(inode, flags, _context(ctx), kill_suidgid)
        self._file_inodes[opened.fh] = inode
        return self._file_info(opened)

    @_errors
    async def create(self, parent_inode: InodeT, name: FileNameT, mode: ModeT, flags: int,
                     ctx: RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        entry, opened = self.fs.create(parent_inode, name, mode, flags, _context(ctx))
        self._file_inodes[opened.fh] = entry.node_id
        return self._file_info(opened), self._entry(entry)

    @_errors
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        data = self.fs.read(self._file_inodes[fh], fh, off, size)
        return data if isinstance(data, bytes) else bytes(data)  # pyfuse3 wants bytes

    @_errors
    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        return self.fs.write(self._file_inodes[fh], fh, off, memoryview(buf), None)

    @_errors
    async def flush(self, fh: FileHandleT) -> None:
        pass

    @_errors
    async def release(self, fh: FileHandleT) -> None:
        self.fs.release(self._file_inodes.pop(fh), fh)

    @_errors
    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        self.fs.fsync(self._file_inodes[fh], fh, bool(datasync))

    @_errors
    async def getxattr(self, inode: InodeT, name: bytes, ctx: RequestContext) -> bytes:
        return self.fs.getxattr(inode, name, _context(ctx))

    @_errors
    async def listxattr(self, inode: InodeT, ctx: RequestContext) -> list[bytes]:
        return self.fs.listxattr(inode, _context(ctx))

    @_errors
    async def setxattr(self, inode: InodeT, name: bytes, value: bytes, ctx: RequestContext) -> None:
        self.fs.setxattr(inode, name, value, 0, _context(ctx))

    @_errors
    async def removexattr(self, inode: InodeT, name: bytes, ctx: RequestContext) -> None:
        self.fs.removexattr(inode, name, _context(ctx))


class Pyfuse3Notifier:
    """The ``Notifier`` through libfuse: entries are invalidated, inodes need not be."""

    @staticmethod
    def invalidate_entry(parent: int, name: bytes) -> None:
        pyfuse3.invalidate_entry_async(parent, name)

    @staticmethod
    def invalidate_inode(node_id: int) -> None:
        """Nothing to do: without FOPEN_CACHE_DIR the kernel keeps no listings here."""

    @staticmethod
    def invalidate_attributes(node_id: int) -> None:
        # Safe inline: without a writeback cache, dropping attributes blocks on nothing.
        with contextlib.suppress(FileNotFoundError):
            pyfuse3.invalidate_inode(InodeT(node_id), attr_only=True)


class Pyfuse3Backend:
    """Mount with libfuse, serve with trio; ``stop`` may be called from a signal handler."""

    name = "pyfuse3"

    def __init__(self, fs: Filesystem, config: MountConfig) -> None:
        self.fs = fs
        self.config = config
        self.ops = Pyfuse3Operations(fs, config)
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop_requested = False
        fs.init(frozenset({"readdirplus"} | ({"posix_acl"} if self.ops.enable_acl else set())),
                Pyfuse3Notifier())

    def counters(self) -> dict[str, object]:
        return {}

    def mount(self) -> None:
        options = self.config.fuse_options
        if options.atime is Atime.STRICTATIME or not options.diratime:
            raise MountError("libfuse takes neither strictatime nor nodiratime; "
                             "use the native backend for them")
        try:
            pyfuse3.init(self.ops, self.config.mountpoint,
                         self.config.fuse_options.libfuse_strings())
        except RuntimeError as exc:
            # libfuse has already printed its reason to stderr; ours names the mountpoint.
            raise MountError(f"cannot mount on {self.config.mountpoint}: {exc}") from None

    def serve(self) -> None:
        try:
            trio.run(self._main)
        finally:
            # pyfuse3 has no hook for the kernel's DESTROY; the native session calls it itself.
            try:
                self.fs.destroy()
            except Exception:  # noqa: BLE001 - the mount must still go
                log.exception("filesystem destroy failed")

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        if self._stop_requested:
            return
        await pyfuse3.main()

    @staticmethod
    def wait_initialized(timeout: float) -> bool:
        """pyfuse3 tells nothing of INIT; the readiness probe waits for the answer instead."""
        return True

    def stop(self) -> None:
        # Called from a signal handler or another thread: pyfuse3.terminate must run inside
        # trio's loop.
        self._stop_requested = True
        token = self._token
        if token is not None:
            token.run_sync_soon(pyfuse3.terminate)

    def close(self, unmount: bool) -> None:
        pyfuse3.close(unmount=unmount)

    @staticmethod
    def abandon() -> None:
        """In the parent, for a daemon that died without a word: take the mount down."""
        try:
            pyfuse3.close(unmount=True)
        except Exception:  # noqa: BLE001 - best effort; the caller reports the failure
            pass

