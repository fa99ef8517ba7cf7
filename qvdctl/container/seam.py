"""Blocking entry points for a VM's start and stop (``qvdctl/vm/``), in the node's own terms.

The admin CLI is synchronous; a start, a stop or ``exec_in_vm`` runs one short trio
loop around the async container layer, and loads it (trio, pyroute2) only then: the
queries below are plain calls, so ``vm list``, ``vm exec`` and ``vm console`` answer
without it. Inputs are plain values and the node's settings, so the lifecycle needs no
knowledge of LXC:

    start_vm_container(vm_id=, vm_name=, ip=, rootfs=, home=, memory_mb=, halt_signal=,
                       settings=)
    stop_vm_container(vm_id=, settings=)
    exec_in_vm(vm_id, argv, settings=)          -> ExecResult
    exec_command(vm_id, argv, settings=)         -> the lxc-attach argv to exec
    vm_container_states(settings=)               -> {vm_id: "RUNNING" | "STOPPED" | ...}
    monitor_runs(vm_id, settings=)               -> whether its liblxc monitor runs
    console_command(vm_id, settings=)            -> the lxc-console argv to exec

Settings read: ``vm.network.bridge``, ``vm.network.netmask``, ``vm.network.gateway``,
``vm.stop.timeout``, ``vm.lxc.unprivileged`` with ``vm.lxc.idmap.start`` and
``vm.lxc.idmap.isolated``, and ``vm.lxc.lxcpath`` when the node defines it (else
liblxc's default, which the LXC tools use without ``-P``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from qvdctl.container import query
from qvdctl.container.config import (
    DEFAULT_LXCPATH,
    ContainerSpec,
    container_name,
    idmap_start_for,
)
from qvdctl.network.addresses import veth_name

if TYPE_CHECKING:
    from qvdctl.container.runtime import ExecResult

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0


def lxcpath_from(settings: Mapping[str, str]) -> Path:
    """The lxcpath the node uses: setting ``vm.lxc.lxcpath`` if known and set, else the default."""
    try:
        value = settings["vm.lxc.lxcpath"]
    except KeyError:
        value = ""
    return Path(value) if value else DEFAULT_LXCPATH


def _spec(
    vm_id: int,
    vm_name: str,
    ip: str,
    rootfs: Path,
    home: Path | None,
    memory_mb: int | None,
    halt_signal: str,
    settings: Mapping[str, str],
) -> ContainerSpec:
    gateway = settings["vm.network.gateway"]
    if not gateway:
        raise query.ContainerError(
            "vm.network.gateway is not set; set it with `config set vm.network.gateway=IP`"
        )
    return ContainerSpec.for_vm(
        vm_id=vm_id, vm_name=vm_name, rootfs=rootfs, ip=ip,
        netmask=settings["vm.network.netmask"], gateway=gateway,
        bridge=settings["vm.network.bridge"], home=home, memory_mb=memory_mb or None,
        halt_signal=halt_signal,
        idmap_start=idmap_start_for(vm_id, int(settings["vm.lxc.idmap.start"]),
                                    settings["vm.lxc.idmap.isolated"] == "1")
        if settings["vm.lxc.unprivileged"] == "1" else None,
    )  # fmt: skip


def start_vm_container(
    *,
    vm_id: int,
    vm_name: str,
    ip: str,
    rootfs: Path,
    home: Path | None,
    memory_mb: int | None,
    halt_signal: str,
    settings: Mapping[str, str],
) -> int:
    """Start VM ``vm_id``'s container on its mounted ``rootfs``; return init's pid.

    ``home`` is bind-mounted onto ``/home``; pass None when the union grafts it.
    ``halt_signal`` is what the image's init powers off on (``images/halt.py``).

    Raises:
        ConfigError: a setting or VM value cannot go into the config.
        ContainerError: the gateway is unset.
        LaunchError: a step failed; nothing of this call is left behind.
    """
    import trio

    from qvdctl.container.launch import launch

    spec = _spec(vm_id, vm_name, ip, rootfs, home, memory_mb, halt_signal, settings)
    return trio.run(launch, spec, lxcpath_from(settings), START_TIMEOUT)


def stop_vm_container(*, vm_id: int, settings: Mapping[str, str]) -> bool:
    """Stop VM ``vm_id``'s container: halt, hard stop after ``vm.stop.timeout``, clean up.

    ``settings`` is required: with the wrong lxcpath the container would look absent
    and stay running while its root is unmounted under it.

    Idempotent: no container, or a stopped one, is fine. Returns True if it halted
    by itself (or was not running), False if it was killed.

    Raises:
        ContainerError: it could not be stopped (its config is kept for a retry).
        NetworkError: its veth could not be removed.
    """
    import trio

    from qvdctl.container.launch import halt

    timeout = float(settings["vm.stop.timeout"] or 30)
    return trio.run(halt, container_name(vm_id), veth_name(vm_id), lxcpath_from(settings), timeout)


def exec_in_vm(
    vm_id: int, argv: Sequence[str], *, settings: Mapping[str, str], timeout: float = 3600
) -> ExecResult:
    """Run ``argv`` in VM ``vm_id``'s container; return its exit status and output.

    Raises:
        ContainerError: the container is not running, or the command timed out.
    """
    import trio

    from qvdctl.container.runtime import exec_in

    return trio.run(exec_in, container_name(vm_id), argv, lxcpath_from(settings), timeout)


def exec_command(vm_id: int, argv: Sequence[str], *, settings: Mapping[str, str]) -> list[str]:
    """The ``lxc-attach`` command line running ``argv`` in VM ``vm_id``, for the CLI to exec.

    Run with the caller's own standard streams, the command reads the caller's input
    and writes straight to its output, and lxc-attach exits with the command's status.

    Raises:
        ContainerError: empty command, or the container is not running.
    """
    return query.attach_command(container_name(vm_id), argv, lxcpath_from(settings))


def vm_container_states(*, settings: Mapping[str, str]) -> dict[int, str]:
    """liblxc's state of every ``qvd-<id>`` container, by VM id, for ``vm list``.

    A VM whose id is missing here has no container: if the database says it runs,
    it died or was destroyed from outside.
    """
    states = query.states(lxcpath_from(settings))
    return {int(name.removeprefix("qvd-")): state for name, state in states.items()}


def monitor_runs(vm_id: int, *, settings: Mapping[str, str]) -> bool:
    """Whether liblxc's monitor of VM ``vm_id``'s container runs (seen from any namespace)."""
    name, lxcpath = container_name(vm_id), lxcpath_from(settings)
    return any(m.name == name and m.lxcpath == lxcpath for m in query.monitors())


def console_command(vm_id: int, *, settings: Mapping[str, str]) -> list[str]:
    """The ``lxc-console`` command line for VM ``vm_id`` (Ctrl+a q leaves), to exec."""
    return query.console_argv(container_name(vm_id), lxcpath_from(settings))
