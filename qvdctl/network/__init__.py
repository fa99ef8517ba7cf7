"""Host networking of the VMs: the shared bridge, each VM's veth, MAC and addresses.

The private namespace the tests and the demo run the controller in is not part of
a node: it lives in ``tools/sandbox.py``.
"""

from __future__ import annotations

from qvdctl.network.addresses import (
    gateway_cidr,
    interface_address,
    mac_for_ip,
    prefix_length,
    veth_name,
)
from qvdctl.network.links import NetworkError, ensure_bridge, link_kind, remove_veth

__all__ = [
    "NetworkError",
    "ensure_bridge",
    "gateway_cidr",
    "interface_address",
    "link_kind",
    "mac_for_ip",
    "prefix_length",
    "remove_veth",
    "veth_name",
]
