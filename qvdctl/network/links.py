"""Host-side links of the VMs: the bridge they share and each VM's veth end.

Every function works in the network namespace of the calling process (tests and the
demo run the whole controller inside a namespace they create). The calls are short
netlink requests and block; async callers run them through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import errno
import ipaddress
import logging

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from qvdctl.network.addresses import IFNAME_MAX

log = logging.getLogger(__name__)


class NetworkError(Exception):
    """A link could not be created, verified or removed; the message is one line."""


def _check_ifname(name: str) -> None:
    if not name or len(name) > IFNAME_MAX or "/" in name or any(c.isspace() for c in name):
        raise NetworkError(f"invalid interface name {name!r}")


def _kind(ipr: IPRoute, index: int) -> str | None:
    link = ipr.link("get", index=index)[0]
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def link_kind(name: str) -> str | None:
    """Kind of the link ``name`` ("bridge", "veth", ...; "" for a plain device), None if absent."""
    _check_ifname(name)
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return None
        return _kind(ipr, found[0]) or ""


def ensure_bridge(name: str, gateway_cidr: str) -> bool:
    """Make sure bridge ``name`` exists, carries ``gateway_cidr`` and is up.

    An existing bridge is kept with its other addresses; only the missing pieces are
    added. Returns True if the bridge was created by this call.

    Raises:
        NetworkError: ``name`` exists but is not a bridge, the address is invalid, or
            the kernel refused a change.
    """
    _check_ifname(name)
    try:
        gateway = ipaddress.IPv4Interface(gateway_cidr)
    except ValueError:
        raise NetworkError(f"invalid gateway address {gateway_cidr!r}") from None
    created = False
    try:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=name)
            if found:
                kind = _kind(ipr, found[0])
                if kind != "bridge":
                    raise NetworkError(
                        f"network link {name!r} exists but is a {kind or 'plain device'}, "
                        "not a bridge; choose another vm.network.bridge"
                    )
                index = found[0]
            else:
                log.info("creating bridge %s", name)
                try:
                    ipr.link("add", ifname=name, kind="bridge")
                    created = True
                except NetlinkError as exc:
                    # EEXIST: a concurrent start created it first; verify it below.
                    if exc.code != errno.EEXIST:
                        raise
                index = ipr.link_lookup(ifname=name)[0]
                if not created and _kind(ipr, index) != "bridge":
                    raise NetworkError(f"network link {name!r} exists but is not a bridge")
            present = {
                (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                for a in ipr.addr("dump", index=index, family=2)
            }
            if (str(gateway.ip), gateway.network.prefixlen) not in present:
                log.info("adding %s to bridge %s", gateway, name)
                try:
                    ipr.addr(
                        "add",
                        index=index,
                        address=str(gateway.ip),
                        prefixlen=gateway.network.prefixlen,
                        broadcast=str(gateway.network.broadcast_address),
                    )
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:  # a concurrent start added it first
                        raise
            ipr.link("set", index=index, state="up")
    except NetlinkError as exc:
        raise NetworkError(f"cannot set up bridge {name!r}: {exc.args[-1]}") from exc
    return created


def remove_veth(name: str) -> bool:
    """Delete the veth ``name`` (both ends go); a missing link is fine.

    Returns True if a link was removed.

    Raises:
        NetworkError: ``name`` exists but is not a veth (it is left alone), or the
            kernel refused to delete it.
    """
    _check_ifname(name)
    try:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=name)
            if not found:
                return False
            kind = _kind(ipr, found[0])
            if kind != "veth":
                raise NetworkError(
                    f"refusing to delete network link {name!r}: it is a "
                    f"{kind or 'plain device'}, not a VM's veth"
                )
            log.info("removing veth %s", name)
            ipr.link("del", index=found[0])
    except NetlinkError as exc:
        # ENODEV: it vanished between lookup and delete (the container stopped meanwhile).
        if exc.code == errno.ENODEV:
            return False
        raise NetworkError(f"cannot remove veth {name!r}: {exc.args[-1]}") from exc
    return True


def remove_bridge(name: str) -> bool:
    """Delete bridge ``name`` if it exists (for tests and the demo, never the lifecycle).

    Raises:
        NetworkError: ``name`` exists but is not a bridge.
    """
    _check_ifname(name)
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return False
        if _kind(ipr, found[0]) != "bridge":
            raise NetworkError(f"refusing to delete {name!r}: not a bridge")
        ipr.link("del", index=found[0])
    return True
