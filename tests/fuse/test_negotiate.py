"""INIT negotiation without a kernel: every offer of the bits qvdfs asks for, against what a
mount may ask, checked against the rules stated feature by feature."""

from __future__ import annotations

import itertools

import pytest

from qvdfs.fuse import abi
from qvdfs.fuse.negotiate import (
    BASE_FEATURES,
    FEATURES,
    MAX_WRITE,
    MAX_WRITE_NO_MAX_PAGES,
    Agreement,
    Asked,
    Offer,
    ProtocolTooOld,
    negotiate,
)

pytestmark = pytest.mark.timeout(60)

# Every subset of these is offered: the bits a mount may ask for, and INIT_EXT, without
# which the kernel reads no flags2.
_OFFERABLE = [*FEATURES.values(), abi.INIT_EXT]
_ALL_BASE = sum(BASE_FEATURES.values())
_ASKS = [
    Asked(),
    Asked(default_permissions=True),
    Asked(default_permissions=True, idmap=True),
    Asked(idmap=True),
    Asked(readdirplus=False, default_permissions=True),
    *(Asked(frozenset({name}), default_permissions=True, idmap=True) for name in FEATURES),
]


def _offers() -> list[int]:
    offers = []
    for count in range(len(_OFFERABLE) + 1):
        for bits in itertools.combinations(_OFFERABLE, count):
            offers.append(sum(bits) | _ALL_BASE)
    return offers


def _expected_features(offered: int, asked: Asked) -> set[str]:
    """The rules, one feature at a time."""
    def available(bit: int) -> bool:
        return bool(offered & bit) and (bit < 1 << 32 or bool(offered & abi.INIT_EXT))

    names = {name for name, bit in BASE_FEATURES.items() if available(bit)}
    for name, bit in FEATURES.items():
        if not available(bit) or name in asked.disabled:
            continue
        if name == "posix_acl" and not asked.default_permissions:
            continue      # ACLs are enforced by the kernel's own permission checks
        if name == "allow_idmap" and not (asked.idmap and asked.default_permissions):
            continue      # the kernel refuses INIT with idmap but no default_permissions
        if name in ("readdirplus", "readdirplus_auto") and not asked.readdirplus:
            continue
        names.add(name)
    if "readdirplus" not in names:
        names.discard("readdirplus_auto")  # auto chooses between plus and plain listings
    return names


def _check(offered: int, asked: Asked, agreed: Agreement) -> None:
    features = _expected_features(offered, asked)
    assert agreed.settled
    assert agreed.features == features, (abi.flag_names(offered), asked)
    granted = 0
    for name in features:
        granted |= (FEATURES | BASE_FEATURES)[name]
    assert agreed.granted == granted
    assert agreed.max_write == (MAX_WRITE if "max_pages" in features else MAX_WRITE_NO_MAX_PAGES)
    (major, minor, readahead, flags, _, _, max_write, time_gran, max_pages, _, flags2,
     stack_depth, _) = abi.INIT_OUT.unpack(agreed.reply)
    assert (major, minor, readahead, time_gran) == (7, abi.KERNEL_MINOR_VERSION, 131072, 1)
    assert flags == (granted & 0xFFFFFFFF) | (abi.INIT_EXT if granted >> 32 else 0)
    assert flags2 == granted >> 32
    assert max_write == agreed.max_write
    assert max_pages == (agreed.max_write // 4096 if "max_pages" in features else 0)
    assert stack_depth == (1 if "passthrough" in features else 0)


def test_every_offer_against_every_ask() -> None:
    offers = _offers()
    assert len(offers) == 1 << len(_OFFERABLE)
    for asked in _ASKS:
        for offered in offers:
            _check(offered, asked, negotiate(Offer(7, 45, 131072, offered), asked))


def test_an_offer_without_the_base_features_grants_none_of_them() -> None:
    offered = sum(FEATURES.values()) | abi.INIT_EXT
    agreed = negotiate(Offer(7, 45, 131072, offered), Asked(default_permissions=True))
    assert not agreed.features & set(BASE_FEATURES)
    _check(offered, Asked(default_permissions=True), agreed)


def test_flags2_needs_init_ext_also_in_the_reply() -> None:
    # A kernel that offers flags2 bits must set INIT_EXT; without it they are not granted,
    # and the reply sets INIT_EXT exactly when it grants a flags2 bit.
    high = abi.PASSTHROUGH | abi.DIRECT_IO_ALLOW_MMAP
    without = negotiate(Offer(7, 45, 131072, high | _ALL_BASE), Asked())
    assert without.granted >> 32 == 0
    assert not abi.INIT_OUT.unpack(without.reply)[3] & abi.INIT_EXT
    with_ext = negotiate(Offer(7, 45, 131072, high | abi.INIT_EXT | _ALL_BASE), Asked())
    assert {"passthrough", "direct_io_allow_mmap"} <= with_ext.features
    assert abi.INIT_OUT.unpack(with_ext.reply)[3] & abi.INIT_EXT


def test_an_older_major_is_refused_and_a_newer_one_gets_ours() -> None:
    with pytest.raises(ProtocolTooOld, match="6.31"):
        negotiate(Offer(6, 31, 0, _ALL_BASE), Asked())
    newer = negotiate(Offer(8, 0, 131072, _ALL_BASE), Asked())
    assert not newer.settled and newer.features == frozenset()
    assert abi.INIT_OUT.unpack(newer.reply)[:4] == (7, abi.KERNEL_MINOR_VERSION, 0, 0)


def test_offer_unpack_reads_flags2_only_with_init_ext() -> None:
    low = abi.ASYNC_READ | abi.MAX_PAGES
    flags2 = abi.PASSTHROUGH >> 32
    short = abi.INIT_IN_V1.pack(7, 26, 65536, low | abi.INIT_EXT)      # an old kernel
    assert Offer.unpack(short) == Offer(7, 26, 65536, low | abi.INIT_EXT)
    full = abi.INIT_IN.pack(7, 45, 131072, low | abi.INIT_EXT, flags2)
    assert Offer.unpack(full).flags == low | abi.INIT_EXT | abi.PASSTHROUGH
    no_ext = abi.INIT_IN.pack(7, 45, 131072, low, flags2)
    assert Offer.unpack(no_ext).flags == low


def test_unknown_feature_names_are_refused() -> None:
    with pytest.raises(ValueError, match="warp"):
        Asked(frozenset({"warp"}))
