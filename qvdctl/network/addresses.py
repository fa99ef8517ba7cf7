"""A VM's addresses (SPEC §4): the IP it is given at ``vm add``, and the names and
addresses of its network link derived from that IP and its id.

Pure functions, no system calls: the VM's start, the container config and the tests
all derive the same MAC and veth name from the same inputs.

IPs are handed out from the top of the range down. The range is the network of
``vm.network.ip.start``/``vm.network.netmask``, from its broadcast address - 1
down to ``vm.network.ip.start``. The gateway, when it falls in the range, is
never handed out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping

from qvdctl.errors import QvdError

# Linux limits interface names to IFNAMSIZ - 1 bytes.
IFNAME_MAX = 15
MAC_PREFIX = "54:52:00"


def mac_for_ip(ip: str | ipaddress.IPv4Address) -> str:
    """The VM's MAC: ``54:52:00`` then the IP's last three octets in two-digit hex.

    ``mac_for_ip("172.20.127.254") == "54:52:00:14:7f:fe"``.

    Raises:
        ValueError: ``ip`` is not an IPv4 address.
    """
    octets = ipaddress.IPv4Address(str(ip)).packed
    return MAC_PREFIX + "".join(f":{b:02x}" for b in octets[1:])


def veth_name(vm_id: int) -> str:
    """Host side of the VM's veth pair: ``qvd<vm id>``.

    Raises:
        ValueError: the id is negative or the name would exceed the kernel's limit.
    """
    if vm_id < 0:
        raise ValueError(f"invalid VM id {vm_id}")
    name = f"qvd{vm_id}"
    if len(name) > IFNAME_MAX:
        raise ValueError(f"VM id {vm_id} is too large for an interface name ({name})")
    return name


def prefix_length(netmask: str | int) -> int:
    """Prefix length of ``netmask``, given dotted (``255.255.255.0``) or as a length (``24``).

    Raises:
        ValueError: not a valid IPv4 netmask.
    """
    text = str(netmask).strip()
    if text.isdigit():
        length = int(text)
        if not 0 <= length <= 32:
            raise ValueError(f"invalid netmask {netmask!r}")
        return length
    try:
        return ipaddress.IPv4Network(f"0.0.0.0/{text}").prefixlen
    except ValueError:
        raise ValueError(f"invalid netmask {netmask!r}") from None


def interface_address(ip: str, netmask: str | int) -> ipaddress.IPv4Interface:
    """``ip`` with the prefix of ``netmask``, e.g. ``10.0.0.5/24``."""
    return ipaddress.IPv4Interface(f"{ip}/{prefix_length(netmask)}")


def gateway_cidr(gateway: str, netmask: str | int) -> str:
    """The address the bridge carries, e.g. ``10.0.0.1/24``."""
    return str(interface_address(gateway, netmask))


# --- assigning IPs at `vm add` ---------------------------------------------------


def candidates(settings: Mapping[str, str]) -> Iterator[ipaddress.IPv4Address]:
    """Every assignable address, highest first."""
    start = ipaddress.IPv4Address(settings["vm.network.ip.start"])
    network = ipaddress.IPv4Network(f"{start}/{settings['vm.network.netmask']}", strict=False)
    gateway = settings["vm.network.gateway"]
    address = network.broadcast_address - 1
    while address >= start and address > network.network_address:
        if str(address) != gateway:
            yield address
        address -= 1


def next_free(settings: Mapping[str, str], used: set[str]) -> str:
    """The highest free address. Raises QvdError when the range is full."""
    for address in candidates(settings):
        if str(address) not in used:
            return str(address)
    raise QvdError(
        f"no free IP left in the range {settings['vm.network.ip.start']} up to the broadcast "
        f"address of netmask {settings['vm.network.netmask']}"
    )


def check_requested(settings: Mapping[str, str], ip: str, used: set[str]) -> str:
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
