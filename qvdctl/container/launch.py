"""A VM's container from config to running and back, with its network, all or nothing.

These two calls are what a VM's start and stop need (``qvdctl/vm/``, through
``seam.py``); mounting the root stays the caller's job.

``launch`` either returns with the container running, or raises having undone its
own steps: no container left running or defined, no veth left. ``halt`` is
idempotent, so a cleanup that failed half-way can simply be called again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from qvdctl.container import query, runtime
from qvdctl.container.config import DEFAULT_LXCPATH, ContainerSpec, remove_config, write_config
from qvdctl.network.links import NetworkError, ensure_bridge, remove_veth

log = logging.getLogger(__name__)


class LaunchError(Exception):
    """A step of ``launch`` failed; the message is one line.

    Attributes:
        step: "network", "config" or "start".
        cleanup_error: why undoing the failed start failed too, else None; the caller
            should then treat the VM as a zombie and retry ``halt`` later.
    """

    def __init__(self, step: str, message: str, cleanup_error: str | None = None) -> None:
        if cleanup_error:
            message += f" (and its cleanup failed: {cleanup_error})"
        super().__init__(message)
        self.step = step
        self.cleanup_error = cleanup_error


async def launch(
    spec: ContainerSpec, lxcpath: Path = DEFAULT_LXCPATH, timeout: float = 30.0
) -> int:
    """Set up the bridge, write the config and start ``spec``'s container; return init's pid.

    ``spec.rootfs`` must already be mounted. The bridge is created if missing (with
    the gateway address) or verified.

    Raises:
        LaunchError: with ``step`` one of "network", "config", "start"; everything this
            call did is undone first (the bridge is shared and stays). A container of
            that name already running is reported and left alone.
    """
    # Checked first: the cleanup of a failed launch stops the container, and a running
    # one with this name (started by another storage root, or twice) is not ours to stop.
    if await runtime.state(spec.name, lxcpath) not in (query.ABSENT, "STOPPED"):
        raise LaunchError("config", f"container {spec.name} is already running in {lxcpath}")
    net = spec.network
    if net is not None:
        gateway = f"{net.gateway}/{net.address.network.prefixlen}"
        try:
            await trio.to_thread.run_sync(ensure_bridge, net.bridge, gateway)
        except NetworkError as exc:
            raise LaunchError("network", str(exc)) from exc
    try:
        write_config(spec, lxcpath)
    except (ValueError, OSError) as exc:
        raise LaunchError("config", f"container {spec.name}: {exc}") from exc
    try:
        return await runtime.start(spec.name, lxcpath, timeout)
    except BaseException as exc:
        # Also on cancellation: a half-started container must not outlive the request.
        cleanup_error = None
        with trio.CancelScope(shield=True):
            try:
                await halt(spec.name, spec.veth, lxcpath, timeout=0)
            except Exception as cleanup:
                # Not an error log: the caller reports it (LaunchError.cleanup_error), and
                # the CLI's contract is one error line.
                log.info("cleanup after failed start of %s failed: %s", spec.name, cleanup)
                cleanup_error = str(cleanup)
        if isinstance(exc, query.ContainerError):
            raise LaunchError("start", str(exc), cleanup_error) from exc
        raise


async def halt(
    name: str, veth: str | None, lxcpath: Path = DEFAULT_LXCPATH, timeout: float = 30.0
) -> bool:
    """Shut container ``name`` down (hard after ``timeout``), drop its ``veth`` and config.

    Safe to call on a container in any state, or none. Returns True if the container
    halted by itself (or was not running), False if it had to be killed.

    Raises:
        query.ContainerError: the container could not be stopped (config kept).
        NetworkError: the veth could not be removed.
    """
    clean = await runtime.stop(name, lxcpath, timeout)
    if veth is not None:
        # liblxc deletes the veth with the container's namespace; this catches the
        # cases where it could not (a crash of its monitor, a start that died midway).
        await trio.to_thread.run_sync(remove_veth, veth)
    remove_config(name, lxcpath)
    left = await trio.to_thread.run_sync(runtime.prune_cgroups, name)
    if left:
        # Info, not a warning on the admin's terminal: under load liblxc's exiting monitor
        # removes its own groups a few seconds later, and the names are shared with any
        # container of the same name in another lxcpath, so "busy" is often not ours.
        log.info("container %s: cgroups still busy, left in place: %s", name, left[0])
    return clean
