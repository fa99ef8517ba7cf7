"""The LXC configuration of a VM's container (SPEC §4), written where the LXC tools look.

The file lands in ``<lxcpath>/qvd-<vm id>/config``. The default lxcpath is liblxc's own
(``/var/lib/lxc``), so ``lxc-ls -f``, ``lxc-attach -n qvd-<id>`` and
``lxc-console -n qvd-<id>`` find the container with no option; with another lxcpath
those tools need ``-P <lxcpath>``.

The controller runs as root and writes a file that liblxc obeys as root, so every
value is checked: a newline in a VM name would otherwise let it add config lines
(a mount of the host's root, say). Names and paths with odd characters are refused
rather than escaped.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
import shutil
from pathlib import Path

import lxc

from qvdctl.images.halt import check_signal
from qvdctl.network.addresses import mac_for_ip, prefix_length, veth_name
from qvdctl.settings import IDMAP_SIZE

log = logging.getLogger(__name__)

DEFAULT_LXCPATH = Path(lxc.default_config_path)
CONFIG_NAME = "config"
LOG_NAME = "lxc.log"
SECCOMP_NAME = "seccomp"
# Marks a config directory as ours, so removing one never touches an admin's container.
OWNER_MARK = ".qvdctl"

_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._+@=,:/-]*$")
_CONTAINER_NAME = re.compile(r"^qvd-[0-9]+$")


class ConfigError(ValueError):
    """A value cannot go into a container config; the message is one line."""


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """The VM's veth: host end ``veth_pair`` on ``bridge``, ``eth0`` inside."""

    bridge: str
    veth_pair: str
    hwaddr: str
    address: ipaddress.IPv4Interface
    gateway: ipaddress.IPv4Address


@dataclasses.dataclass(frozen=True)
class ContainerSpec:
    """Everything the container config says about one VM.

    Attributes:
        name: container name, ``qvd-<vm id>``.
        rootfs: the mounted union root of the VM.
        hostname: ``lxc.uts.name``.
        network: the veth, or None for a container with no network (tests only).
        home: a host folder bind-mounted onto ``/home``; None when the union already
            grafts the home branch at ``/home`` (qvdfs ``HOMEFS=RW@/home``).
        memory_mb: memory limit, None for none.
        cpus: CPU limit in cores (``1.5`` = one and a half), None for none.
        halt_signal: what the image's init takes as "power off" (SIGUSR2: busybox's).
        idmap_start: run in a user namespace whose uids and gids 0-65535 are node ids
            ``idmap_start`` on, the root idmapped to match; None: privileged, hardened.
    """

    name: str
    rootfs: Path
    hostname: str
    network: NetworkSpec | None = None
    home: Path | None = None
    memory_mb: int | None = None
    cpus: float | None = None
    halt_signal: str = "SIGUSR2"
    idmap_start: int | None = None

    @property
    def veth(self) -> str | None:
        """Host end of the VM's veth, None without a network."""
        return self.network.veth_pair if self.network is not None else None

    @classmethod
    def for_vm(
        cls,
        *,
        vm_id: int,
        vm_name: str,
        rootfs: Path,
        ip: str | None,
        netmask: str | int | None,
        gateway: str | None,
        bridge: str | None,
        home: Path | None = None,
        memory_mb: int | None = None,
        cpus: float | None = None,
        halt_signal: str = "SIGUSR2",
        idmap_start: int | None = None,
    ) -> ContainerSpec:
        """Build the spec of VM ``vm_id`` the way SPEC §4 names things.

        ``ip``, ``netmask``, ``gateway`` and ``bridge`` go together: all set, or all
        None for no network.

        Raises:
            ConfigError: a value is invalid.
        """
        network = None
        net_values = (ip, netmask, gateway, bridge)
        if any(v is not None for v in net_values):
            if any(v in (None, "") for v in net_values):
                raise ConfigError(
                    "VM network needs ip, netmask, gateway and bridge "
                    "(set vm.network.gateway and vm.network.netmask)"
                )
            try:
                address = ipaddress.IPv4Interface(f"{ip}/{prefix_length(str(netmask))}")
                gw = ipaddress.IPv4Address(str(gateway))
            except ValueError as exc:
                raise ConfigError(f"invalid VM address: {exc}") from None
            if gw not in address.network:
                raise ConfigError(f"gateway {gw} is outside the VM network {address.network}")
            network = NetworkSpec(
                bridge=str(bridge),
                veth_pair=veth_name(vm_id),
                hwaddr=mac_for_ip(address.ip),
                address=address,
                gateway=gw,
            )
        return cls(
            name=container_name(vm_id),
            rootfs=Path(rootfs),
            hostname=hostname_for(vm_name, vm_id),
            network=network,
            home=Path(home) if home is not None else None,
            memory_mb=memory_mb,
            cpus=cpus,
            halt_signal=halt_signal,
            idmap_start=idmap_start,
        )


def container_name(vm_id: int) -> str:
    """``qvd-<vm id>``."""
    if vm_id < 0:
        raise ConfigError(f"invalid VM id {vm_id}")
    return f"qvd-{vm_id}"


def hostname_for(vm_name: str, vm_id: int) -> str:
    """A valid hostname from the VM name: letters, digits and dashes, at most 63 long.

    Falls back to ``qvd-<vm id>`` when nothing usable is left.
    """
    name = re.sub(r"[^A-Za-z0-9-]+", "-", vm_name).strip("-")[:63].strip("-")
    return name or container_name(vm_id)


def cgroup_version() -> int:
    """2 on a pure cgroup2 host, else 1 (legacy or hybrid: the controllers are on v1)."""
    return 2 if Path("/sys/fs/cgroup/cgroup.controllers").exists() else 1


def _path(value: Path, what: str) -> str:
    text = str(value)
    if not _SAFE_PATH.match(text) or "/../" in text + "/":
        raise ConfigError(f"{what} path {text!r} is not absolute or has unsupported characters")
    return text


def _word(value: str, what: str) -> str:
    if not value or not re.fullmatch(r"[A-Za-z0-9._:+-]+", value):
        raise ConfigError(f"invalid {what} {value!r}")
    return value


def _halt_signal(value: str) -> str:
    try:
        return check_signal(value)
    except ValueError as exc:
        raise ConfigError(f"invalid halt signal: {exc}") from None


def render_config(spec: ContainerSpec, lxcpath: Path = DEFAULT_LXCPATH) -> str:
    """The text of ``spec``'s LXC config.

    Raises:
        ConfigError: a value is invalid.
    """
    if not _CONTAINER_NAME.match(spec.name):
        raise ConfigError(f"invalid container name {spec.name!r}")
    lines = [
        "# Written by qvdctl; rewritten on every start of the VM.",
        f"lxc.uts.name = {_word(spec.hostname, 'hostname')}",
        f"lxc.rootfs.path = dir:{_path(spec.rootfs, 'rootfs')}",
        f"lxc.log.file = {_path(lxcpath / spec.name / LOG_NAME, 'log')}",
        "lxc.log.level = WARN",
        # Images carry no usable /dev: LXC fills a tmpfs with the standard nodes.
        "lxc.autodev = 1",
        # FUSE inside the desktop (sshfs, appimages): bind the host's node, which
        # needs no mknod right in the container.
        "lxc.mount.entry = /dev/fuse dev/fuse none bind,create=file,optional 0 0",
        "lxc.tty.max = 3",
        "lxc.pty.max = 1024",
        "lxc.mount.auto = proc:mixed sys:ro",
        # The signal that makes the image's init power off (images/halt.py finds it);
        # a shutdown that times out ends in a hard stop anyway.
        f"lxc.signal.halt = {_halt_signal(spec.halt_signal)}",
        "lxc.init.cmd = /sbin/init",
    ]
    net = spec.network
    if net is None:
        lines.append("lxc.net.0.type = empty")
    else:
        lines += [
            "lxc.net.0.type = veth",
            f"lxc.net.0.link = {_word(net.bridge, 'bridge name')}",
            f"lxc.net.0.veth.pair = {_word(net.veth_pair, 'veth name')}",
            "lxc.net.0.name = eth0",
            "lxc.net.0.flags = up",
            f"lxc.net.0.hwaddr = {_word(net.hwaddr, 'MAC address')}",
            # The broadcast is given explicitly: liblxc otherwise sets 0.0.0.255-style ones.
            f"lxc.net.0.ipv4.address = {net.address} {net.address.network.broadcast_address}",
            f"lxc.net.0.ipv4.gateway = {net.gateway}",
        ]
    if spec.home is not None:
        lines.append(
            f"lxc.mount.entry = {_path(spec.home, 'home')} home none bind,create=dir 0 0"
        )
    lines += _limit_lines(spec)
    lines += _hardening_lines(spec, lxcpath)
    lines += _userns_lines(spec)
    return "\n".join(lines) + "\n"


# What a privileged container's root may not do to the node, after LXC's own defaults
# (/usr/share/lxc/config/common.conf). Those files are spelled out here rather than
# included: common.conf also sets the tty layout (lxc.tty.dir, 4 ttys), cgroup and sys
# mounts and a clone hook that SPEC §4's config sets otherwise, and common.seccomp
# misses kexec_file_load and the keyring calls.
#
# CAP_SYS_ADMIN stays: systemd images mount their API filesystems and per-service
# namespaces with it, and without it they do not boot. What it still allows (mounts,
# cgroupfs among them) is what unprivileged containers are for.
DROPPED_CAPABILITIES = ("mac_admin", "mac_override", "sys_time", "sys_module", "sys_rawio")
# errno 1 (EPERM): systemd takes a refused keyring as "access prohibited" and goes on.
DENIED_SYSCALLS = (
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "open_by_handle_at", "add_key", "keyctl", "request_key",
)  # fmt: skip
# Character devices the container may read and write (LXC's list): null, zero, full,
# tty, console, ptmx, random, urandom, the pty slaves and fuse. Any node may be made
# (mknod "m"), none other opened: the node's disks stay unreadable.
ALLOWED_DEVICES = (
    "c *:* m", "b *:* m", "c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 5:0 rwm", "c 5:1 rwm",
    "c 5:2 rwm", "c 1:8 rwm", "c 1:9 rwm", "c 136:* rwm", "c 10:229 rwm",
)  # fmt: skip


def seccomp_policy() -> str:
    """The text of the seccomp policy file (LXC's version 2 syntax, a denylist)."""
    rules = "".join(f"{call} errno 1\n" for call in DENIED_SYSCALLS)
    return f"2\ndenylist\nreject_force_umount\n[all]\n{rules}"


def _hardening_lines(spec: ContainerSpec, lxcpath: Path) -> list[str]:
    prefix = "lxc.cgroup2" if cgroup_version() == 2 else "lxc.cgroup"
    lines = [
        f"lxc.cap.drop = {' '.join(DROPPED_CAPABILITIES)}",
        f"lxc.seccomp.profile = {_path(lxcpath / spec.name / SECCOMP_NAME, 'seccomp')}",
        f"{prefix}.devices.deny = a",
    ]
    lines += [f"{prefix}.devices.allow = {rule}" for rule in ALLOWED_DEVICES]
    return lines


def _limit_lines(spec: ContainerSpec) -> list[str]:
    lines = []
    v2 = cgroup_version() == 2
    if spec.memory_mb is not None:
        if spec.memory_mb <= 0:
            raise ConfigError(f"invalid memory limit {spec.memory_mb} MB")
        size = spec.memory_mb * 1024 * 1024
        key = "lxc.cgroup2.memory.max" if v2 else "lxc.cgroup.memory.limit_in_bytes"
        lines.append(f"{key} = {size}")
    if spec.cpus is not None:
        if spec.cpus <= 0:
            raise ConfigError(f"invalid CPU limit {spec.cpus}")
        period = 100_000
        quota = max(1000, int(spec.cpus * period))
        if v2:
            lines.append(f"lxc.cgroup2.cpu.max = {quota} {period}")
        else:
            lines.append(f"lxc.cgroup.cpu.cfs_period_us = {period}")
            lines.append(f"lxc.cgroup.cpu.cfs_quota_us = {quota}")
    return lines


def write_config(spec: ContainerSpec, lxcpath: Path = DEFAULT_LXCPATH) -> Path:
    """Write ``spec``'s config to ``<lxcpath>/<name>/config``; returns its path.

    Overwrites a config qvdctl wrote before; refuses to overwrite a container that
    qvdctl did not create.

    Raises:
        ConfigError: invalid value, or the name belongs to a foreign container.
    """
    text = render_config(spec, lxcpath)
    folder = lxcpath / spec.name
    if folder.exists() and not (folder / OWNER_MARK).exists():
        raise ConfigError(f"container {spec.name} exists in {lxcpath} and was not made by qvdctl")
    folder.mkdir(parents=True, exist_ok=True, mode=0o750)
    (folder / OWNER_MARK).touch()
    target = folder / CONFIG_NAME
    _replace_file(folder / SECCOMP_NAME, seccomp_policy())
    _replace_file(target, text)
    log.debug("wrote %s", target)
    return target


SUBORDINATE_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))


def idmap_start_for(vm_id: int, start: int, isolated: bool) -> int:
    """The first node id of VM ``vm_id``'s user namespace.

    Isolated, each VM has a range of its own, next to the one before: then no two
    desktops' roots (or users) are the same node uid, even to a process that left its
    namespaces. The image and the overlays do not care which range a VM gets: the
    idmapped root translates, so the setting can change between starts.
    """
    return start + (vm_id - 1) * IDMAP_SIZE if isolated else start


def _userns_lines(spec: ContainerSpec) -> list[str]:
    """An unprivileged container: its ids are node ids ``idmap_start`` on.

    The root is mounted idmapped (``idmap=container``, a mount of the VM's union that
    maps the same range), so the image keeps its owners inside while the branches
    keep them as extracted: the kernel translates, qvdfs sees the container's ids on
    creations only (FUSE_ALLOW_IDMAP), and overlays stay portable.
    """
    start = spec.idmap_start
    if start is None:
        return []
    if start < IDMAP_SIZE:
        raise ConfigError(f"id range {start}-{start + IDMAP_SIZE - 1} overlaps the node's ids")
    # 2**32 - 1 is (uid_t)-1, "no id", and cannot be mapped.
    if start + IDMAP_SIZE > 2**32 - 1:
        raise ConfigError(
            f"id range {start}-{start + IDMAP_SIZE - 1} passes the last node id; "
            "lower vm.lxc.idmap.start or set vm.lxc.idmap.isolated=0"
        )
    for path in SUBORDINATE_FILES:
        check_subordinate_range(path, start, IDMAP_SIZE)
    return [
        f"lxc.idmap = u 0 {start} {IDMAP_SIZE}",
        f"lxc.idmap = g 0 {start} {IDMAP_SIZE}",
        "lxc.rootfs.options = idmap=container",
    ]


def check_subordinate_range(path: Path, start: int, count: int) -> None:
    """Refuse a range that ``path`` (/etc/subuid format) gives to a user other than root.

    Another user's subordinate ids belong to their own containers; sharing them would
    let that user's namespaces own the desktops' files.

    Raises:
        ConfigError: the ranges overlap.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return
    for line in text.splitlines():
        fields = line.strip().split(":")
        if len(fields) != 3 or fields[0] in ("root", "0") or not all(
            f.isdigit() for f in fields[1:]
        ):
            continue
        first, size = int(fields[1]), int(fields[2])
        if first < start + count and start < first + size:
            raise ConfigError(
                f"id range {start}-{start + count - 1} overlaps {fields[0]}'s "
                f"{first}-{first + size - 1} in {path}; set vm.lxc.idmap.start elsewhere"
            )


def _replace_file(target: Path, text: str) -> None:
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, target)


def remove_config(name: str, lxcpath: Path = DEFAULT_LXCPATH) -> bool:
    """Remove ``<lxcpath>/<name>`` if qvdctl made it; returns True if something went.

    Never calls liblxc's destroy: for a ``dir:`` rootfs that deletes the rootfs
    contents, here the VM's mounted union with its overlay and home.
    """
    if not _CONTAINER_NAME.match(name):
        raise ConfigError(f"invalid container name {name!r}")
    folder = lxcpath / name
    if not folder.exists():
        return False
    if not (folder / OWNER_MARK).exists():
        raise ConfigError(f"container {name} in {lxcpath} was not made by qvdctl; left alone")
    shutil.rmtree(folder)
    return True
