"""VM addresses (SPEC §4): assigned at ``vm add``, from the top of the range down.

The range is the network of ``vm.network.ip.start``/``vm.network.netmask``,
from its broadcast address - 1 down to ``vm.network.ip.start``. The gateway,
when it falls in the range, is never handed out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

from qvdctl.errors import QvdError
from qvdctl.settings import Settings


def candidates(settings: Settings) -> Iterator[ipaddress.IPv4Address]:
    """Every assignable address, highest first."""
    start = ipaddress.IPv4Address(settings["vm.network.ip.start"])
    network = ipaddress.IPv4Network(f"{start}/{settings['vm.network.netmask']}", strict=False)
    gateway = settings["vm.network.gateway"]
    address = network.broadcast_address - 1
    while address >= start and address > network.network_address:
        if str(address) != gateway:
            yield address
        address -= 1


def next_free(settings: Settings, used: set[str]) -> str:
    """The highest free address. Raises QvdError when the range is full."""
    for address in candidates(settings):
        if str(address) not in used:
            return str(address)
    raise QvdError(
        f"no free IP left in the range {settings['vm.network.ip.start']} up to the broadcast "
        f"address of netmask {settings['vm.network.netmask']}"
    )


def check_requested(settings: Settings, ip: str, used: set[str]) -> str:
    """Validate an IP the admin chose with ``vm add ip=...``."""
    try:
        address = ipaddress.IPv4Address(ip)
    except ValueError:
        raise QvdError(f"bad ip '{ip}': not an IPv4 address") from None
    if address not in set(candidates(settings)):
        raise QvdError(f"ip {ip} is outside the VM range (or is the gateway)")
    if str(address) in used:
        raise QvdError(f"IP {ip} is already assigned to another VM")
    return str(address)
