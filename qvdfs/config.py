"""What a qvdfs mount is asked to do, independent of how it was asked."""

from __future__ import annotations

import dataclasses
import enum

from qvdformat.markers import TRUSTED, OverlayXattrs
from qvdfs.fuse.mount import MountOptions


class WhiteoutFormat(enum.Enum):
    """How deletions are recorded in a writable branch."""

    OVERLAY = "overlay"  # kernel overlayfs: 0/0 char devices, trusted.overlay.opaque
    UNIONFS = "unionfs"  # unionfs-fuse: .unionfs-fuse/<path>_HIDDEN~ markers


@dataclasses.dataclass(frozen=True)
class BranchConfig:
    """One branch of the union.

    ``graft`` is None for a branch of the main stack. For a grafted branch it is
    the absolute path inside the union (e.g. ``/home``) where that branch alone is
    served, the way a bind mount would serve it.
    """

    path: str
    writable: bool
    graft: str | None = None


@dataclasses.dataclass
class MountConfig:
    """A parsed command line: branches, mountpoint and every option."""

    branches: list[BranchConfig]
    mountpoint: str
    cow: bool = False
    whiteout_format: WhiteoutFormat = WhiteoutFormat.OVERLAY
    # Where overlayfs' xattrs live: trusted.overlay.* as the kernel's (the daemon is root);
    # user.overlay.* lets the fast tests run the union unprivileged (kernel -o userxattr).
    overlay_xattrs: OverlayXattrs = TRUSTED
    max_files: int | None = None
    relaxed_permissions: bool = False
    chroot: str | None = None
    debug_file: str | None = None
    direct_io: bool = False
    foreground: bool = False
    debug: bool = False
    # How to talk to the kernel: "native" (qvdfs.fuse) or "pyfuse3" (see qvdfs.backends).
    backend: str = "native"
    # Threads answering requests (native backend); see qvdfs.fuse.session for the default.
    threads: int | None = None
    # Let the kernel do file I/O on the branch files itself (native backend, where offered).
    passthrough: bool = True
    # Ask the kernel for idmapped mounts (FUSE_ALLOW_IDMAP, native backend). The kernel
    # then sends the caller's ids only with requests that create a node, already mapped
    # through the mount's idmap; qvdfs reads them nowhere else.
    idmap: bool = False
    # Mount options for the kernel (allow_other, suid, dev, fsname, max_read, ...).
    fuse_options: MountOptions = dataclasses.field(default_factory=MountOptions)
    # Kernel cache lifetimes in seconds. Every change is made by the daemon itself,
    # which invalidates what it changes, so they can be long.
    entry_timeout: float = 3600.0
    attr_timeout: float = 3600.0
    negative_timeout: float = 3600.0
    # Options accepted for compatibility that change nothing here, kept for --debug output.
    ignored_options: list[str] = dataclasses.field(default_factory=list)

    @property
    def stack(self) -> list[BranchConfig]:
        """The branches of the main stack, highest priority first."""
        return [b for b in self.branches if b.graft is None]

    @property
    def grafts(self) -> list[BranchConfig]:
        return [b for b in self.branches if b.graft is not None]


class MountError(Exception):
    """A mount that cannot be done; the message is one line for the admin."""
