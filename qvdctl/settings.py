"""Node settings: the SPEC §2 keys, their defaults and their validation.

Settings live in the database (``config set k=v``); every command reads them
through ``Settings``, which falls back to the defaults below. Only known keys
are accepted, so a typo is an error rather than a setting nothing reads.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from qvdctl.errors import QvdError

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/var/lib/qvd/storage")

UNIONFS_TYPES = ("qvdfs", "unionfs-fuse", "overlayfs")

# Folders under path.storage.root, one setting each (SPEC §1).
STORAGE_FOLDERS = ("staging", "images", "basefs", "homefs", "overlayfs", "rootfs")


def _choice(*allowed: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return check


def _bool(value: str) -> str:
    if value not in ("0", "1"):
        raise ValueError("must be 0 or 1")
    return value


def _seconds(value: str) -> str:
    if not re.fullmatch(r"[0-9]+", value) or not 0 < int(value) <= 3600:
        raise ValueError("must be a whole number of seconds between 1 and 3600")
    return value


def _parallel(value: str) -> str:
    if not re.fullmatch(r"[0-9]+", value) or not 1 <= int(value) <= 64:
        raise ValueError("must be a whole number between 1 and 64")
    return value


def _timeout(value: str) -> str:
    if not re.fullmatch(r"[0-9]+", value) or not 2 <= int(value) <= 86400:
        raise ValueError("must be a whole number of seconds between 2 and 86400")
    return value


def _ipv4(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValueError("must be an IPv4 address") from None


def _optional_ipv4(value: str) -> str:
    return _ipv4(value) if value else ""


def _netmask(value: str) -> str:
    """Accept ``255.255.192.0`` or a prefix length such as ``18``."""
    try:
        return str(ipaddress.IPv4Network(f"0.0.0.0/{value}").netmask)
    except ValueError:
        raise ValueError("must be a netmask such as 255.255.255.0 or a prefix length") from None


# Ids a container's user namespace maps: all the ids an image may use (uid_t 0-65535).
IDMAP_SIZE = 65536


def _idmap_start(value: str) -> str:
    """The first node uid/gid of the containers' range: above the node's own 0-65535."""
    try:
        start = int(value)
    except ValueError:
        raise ValueError("must be a number (the first node uid of the containers' ids)") from None
    # 2**32 - 1 is (uid_t)-1, "no id", and cannot be mapped.
    if start < IDMAP_SIZE or start + IDMAP_SIZE > 2**32 - 1:
        raise ValueError(
            f"must be at least {IDMAP_SIZE} (outside the node's own ids) "
            f"and at most {2**32 - 1 - IDMAP_SIZE}"
        )
    return str(start)


def _interface(value: str) -> str:
    # The kernel's limit (IFNAMSIZ - 1) and characters that are safe in lxc.conf.
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", value):
        raise ValueError("must be a network interface name of at most 15 letters, digits, _ . -")
    return value


def _path(value: str) -> str:
    # ':' ',' and '=' would break the union's branch string and overlayfs' option string.
    if not value.startswith("/") or re.search(r"[:,=\s]", value):
        raise ValueError("must be an absolute path without ':', ',', '=' or spaces")
    return value


def _optional_path(value: str) -> str:
    return _path(value) if value else ""


def _command(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("must be an absolute path to a program")
    return value


def _words(value: str) -> str:
    return value


def _hostname(value: str) -> str:
    if value and not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", value):
        raise ValueError("must be a host name")
    return value


def _optional_listen(value: str) -> str:
    host, colon, port = value.rpartition(":")
    if value and not (colon and host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:9640")
    return value


# key -> (default, validator). An empty default means "unset".
# path.storage.* defaults are empty here and computed from the storage root.
KNOWN: dict[str, tuple[str, Callable[[str], str]]] = {
    "vm.hypervisor": ("kvm", _choice("kvm", "lxc")),
    "vm.lxc.unionfs.type": ("qvdfs", _choice(*UNIONFS_TYPES)),
    "command.unionfs-fuse": ("/usr/bin/unionfs", _command),
    "command.unionfs-fuse.args.extra": ("", _words),
    "vm.lxc.unionfs.bind.ro": ("1", _bool),
    "vm.overlay.persistent": ("0", _bool),
    "vm.network.bridge": ("qvdnet", _interface),
    "vm.network.ip.start": ("172.20.64.1", _ipv4),
    "vm.network.netmask": ("255.255.192.0", _netmask),
    "vm.network.gateway": ("", _optional_ipv4),
    "vm.stop.timeout": ("30", _seconds),
    # Ours: how many VMs one `vm start` / `vm stop` works on at a time.
    "vm.lifecycle.parallel": ("4", _parallel),
    # Ours: leave a started VM with only its root mounted (tests, inspecting an image).
    "vm.start.mount_only": ("0", _bool),
    # Where LXC keeps container configs; empty: liblxc's default (read by qvdctl/container/).
    "vm.lxc.lxcpath": ("", _optional_path),
    # Ours: containers run in a user namespace (1, qvdfs roots only) or as the node's
    # root, hardened (0). README.md: "What a desktop's root can do".
    "vm.lxc.unprivileged": ("1", _bool),
    # Ours: container uid/gid 0-65535 are node ids from START on: VM N's from
    # START + (N-1)*65536 when isolated (1), every VM's from START when not (0).
    "vm.lxc.idmap.start": ("1000000", _idmap_start),
    "vm.lxc.idmap.isolated": ("1", _bool),
    # Ours: the name this node goes by in the hosts table and the Host column.
    "nodename": ("", _hostname),
    # Stock: seconds without a heartbeat after which a node is lost (qvdctl/fleet/lease.py).
    "internal.hkd.cluster.node.timeout": ("600", _timeout),
    # Ours: where the HKD serves Prometheus metrics (qvdctl/fleet/metrics.py); empty: off.
    "hkd.metrics.listen": ("", _optional_listen),
    # Ours: a watchdog device the fence feeds while it can keep its promise, so that a
    # node whose HKD and fence are both stuck is reset (qvdctl/fleet/watchdog.py); empty:
    # none. Read when the HKD starts.
    "hkd.fence.watchdog": ("", _optional_path),
    # Ours: how often the HKD publishes its VMs' counters, CPU and memory into the
    # database for the web admin (qvdctl/vm/usage.py): one transaction per period.
    "hkd.usage.interval": ("10", _seconds),
    "path.storage.root": ("", _optional_path),
    **{f"path.storage.{name}": ("", _optional_path) for name in STORAGE_FOLDERS},
}


def validate(key: str, value: str) -> str:
    """Return the normalised ``value`` for ``key``.

    Raises:
        QvdError: unknown key or a value the key does not accept.
    """
    if key not in KNOWN:
        raise QvdError(f"unknown setting '{key}'")
    try:
        return KNOWN[key][1](value)
    except ValueError as exc:
        raise QvdError(f"bad value for {key}: '{value}' {exc}") from None


class Settings(Mapping[str, str]):
    """Every known key with its stored value, or its default.

    ``root`` is the storage root chosen on the command line (``--root`` /
    ``QVD_ROOT``); it is the default of ``path.storage.root``. ``local`` holds the
    node config file's settings, which the stored (global) ones override.
    """

    def __init__(
        self,
        stored: Mapping[str, str],
        root: Path = DEFAULT_ROOT,
        local: Mapping[str, str] | None = None,
    ) -> None:
        self._values = {key: default for key, (default, _) in KNOWN.items()}
        self._values["path.storage.root"] = str(root)
        self._values.update({k: v for k, v in (local or {}).items() if k in KNOWN and v != ""})
        self._values.update({k: v for k, v in stored.items() if k in KNOWN and v != ""})
        storage_root = Path(self._values["path.storage.root"])
        for name in STORAGE_FOLDERS:
            key = f"path.storage.{name}"
            if not self._values[key]:
                self._values[key] = str(storage_root / name)

    def __getitem__(self, key: str) -> str:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def flag(self, key: str) -> bool:
        return self._values[key] == "1"

    def path(self, key: str) -> Path:
        return Path(self._values[key])
