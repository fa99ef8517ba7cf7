"""Names and addresses of a VM's network link, derived from its IP and id (SPEC §4).

Pure functions, no system calls: the lifecycle, the container config and the tests
all derive the same MAC and veth name from the same inputs.
"""

from __future__ import annotations

import ipaddress

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
