"""INIT negotiation: from what the kernel offers and what the mount asks, what is in force.

A pure function (``negotiate``) of two values, so every kernel offer can be tried without a
kernel (``tests/fuse/test_negotiate.py``); the session only reads INIT, sends the reply
this computes and acts on the agreement.
"""

from __future__ import annotations

import dataclasses

from . import abi

# With MAX_PAGES the kernel sends up to 256 pages per READ/WRITE.
MAX_WRITE = 1 << 20
# Without MAX_PAGES the kernel's limit is 32 pages.
MAX_WRITE_NO_MAX_PAGES = 128 << 10

# Features the mount may decline (``Asked.disabled``), with the INIT bits they stand for.
FEATURES: dict[str, int] = {
    "passthrough": abi.PASSTHROUGH,
    "readdirplus": abi.DO_READDIRPLUS,
    "readdirplus_auto": abi.READDIRPLUS_AUTO,
    "posix_acl": abi.POSIX_ACL,
    "killpriv_v2": abi.HANDLE_KILLPRIV_V2,
    "cache_symlinks": abi.CACHE_SYMLINKS,
    "parallel_dirops": abi.PARALLEL_DIROPS,
    "max_pages": abi.MAX_PAGES,
    "no_opendir": abi.NO_OPENDIR_SUPPORT,
    "direct_io_allow_mmap": abi.DIRECT_IO_ALLOW_MMAP,
    "allow_idmap": abi.ALLOW_IDMAP,
}
# Always asked for; reported to the filesystem too.
BASE_FEATURES: dict[str, int] = {
    "async_read": abi.ASYNC_READ,
    "atomic_o_trunc": abi.ATOMIC_O_TRUNC,
    "big_writes": abi.BIG_WRITES,
    "explicit_inval_data": abi.EXPLICIT_INVAL_DATA,
}
# Asked for with POSIX ACLs, which they complete: the kernel leaves the umask to us (a
# default ACL overrides it), and says in SETXATTR_EXT's flags when setting an ACL drops the
# set-group-id bit.
WITH_ACL_FEATURES: dict[str, int] = {
    "dont_mask": abi.DONT_MASK,
    "setxattr_ext": abi.SETXATTR_EXT,
}
# Congestion limits of the reply: requests in flight before the kernel queues, and blocks.
MAX_BACKGROUND = 64
CONGESTION_THRESHOLD = 48


class ProtocolTooOld(Exception):
    """The kernel speaks a major version below 7: no reply can make it work."""


@dataclasses.dataclass(frozen=True, slots=True)
class Offer:
    """What the kernel's INIT says: its protocol version and the flags it offers (flags2
    shifted above bit 32, as the ``abi`` constants are)."""

    major: int
    minor: int
    max_readahead: int
    flags: int

    @classmethod
    def unpack(cls, payload: bytes | bytearray | memoryview) -> Offer:
        """Read fuse_init_in (the request after its header). An old kernel sends the short
        struct, and flags2 counts only with INIT_EXT."""
        major, minor, max_readahead, flags = abi.INIT_IN_V1.unpack_from(payload)
        if len(payload) >= abi.INIT_IN.size and flags & abi.INIT_EXT:
            flags |= abi.INIT_IN.unpack_from(payload)[4] << 32
        return cls(major, minor, max_readahead, flags)


@dataclasses.dataclass(frozen=True, slots=True)
class Asked:
    """What the mount wants: features it declines (names from ``FEATURES``), whether it has
    default_permissions and wants idmapped mounts, and whether the filesystem can list
    directories with attributes (readdirplus)."""

    disabled: frozenset[str] = frozenset()
    default_permissions: bool = False
    idmap: bool = False
    readdirplus: bool = True

    def __post_init__(self) -> None:
        unknown = self.disabled - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown FUSE features {sorted(unknown)}")


@dataclasses.dataclass(frozen=True, slots=True)
class Agreement:
    """The INIT reply and what it puts in force.

    ``settled`` is False when the kernel speaks a newer major version: the reply states ours
    and the kernel sends INIT again. ``granted`` are the INIT bits in force, ``features``
    their names (from ``FEATURES`` and ``BASE_FEATURES``), ``max_write`` the largest WRITE.
    """

    reply: bytes
    settled: bool
    granted: int = 0
    features: frozenset[str] = frozenset()
    max_write: int = MAX_WRITE


def negotiate(offer: Offer, asked: Asked) -> Agreement:
    """The agreement on ``offer`` for a mount that asks ``asked``.

    Raises:
        ProtocolTooOld: the kernel's major version is below 7.
    """
    if offer.major != abi.KERNEL_VERSION:
        if offer.major < abi.KERNEL_VERSION:
            raise ProtocolTooOld(f"kernel speaks FUSE protocol {offer.major}.{offer.minor}; "
                                 f"need {abi.KERNEL_VERSION}")
        return Agreement(abi.INIT_OUT.pack(abi.KERNEL_VERSION, abi.KERNEL_MINOR_VERSION,
                                           0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), settled=False)
    want = sum(BASE_FEATURES.values())
    for name, bit in FEATURES.items():
        if name not in asked.disabled:
            want |= bit
    if not asked.default_permissions:
        want &= ~abi.POSIX_ACL
    if want & abi.POSIX_ACL:
        want |= sum(WITH_ACL_FEATURES.values())
    # The kernel refuses the whole INIT when ALLOW_IDMAP comes without
    # default_permissions (it cannot check permissions of mapped ids itself).
    if not asked.idmap or not asked.default_permissions:
        want &= ~abi.ALLOW_IDMAP
    if not asked.readdirplus:
        want &= ~abi.DO_READDIRPLUS
    granted = want & offer.flags
    if not granted & abi.POSIX_ACL:
        granted &= ~sum(WITH_ACL_FEATURES.values())
    if not granted & abi.DO_READDIRPLUS:
        # The kernel ignores AUTO (a choice between plus and plain listings) without it.
        granted &= ~abi.READDIRPLUS_AUTO
    if not offer.flags & abi.INIT_EXT:
        granted &= 0xFFFFFFFF
    max_write = MAX_WRITE if granted & abi.MAX_PAGES else MAX_WRITE_NO_MAX_PAGES
    reply_flags = granted & 0xFFFFFFFF
    if granted >> 32:
        reply_flags |= abi.INIT_EXT
    reply = abi.INIT_OUT.pack(
        abi.KERNEL_VERSION, abi.KERNEL_MINOR_VERSION, offer.max_readahead, reply_flags,
        MAX_BACKGROUND, CONGESTION_THRESHOLD,
        max_write, 1,                            # time_gran: nanoseconds
        max_write // 4096 if granted & abi.MAX_PAGES else 0, 0,
        granted >> 32,
        1 if granted & abi.PASSTHROUGH else 0,   # max_stack_depth: backing on ext4 etc.
        0)
    names = frozenset(name for name, bit in (FEATURES | BASE_FEATURES | WITH_ACL_FEATURES).items()
                      if granted & bit)
    return Agreement(reply, True, granted, names, max_write)
