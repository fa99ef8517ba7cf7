"""Several VMs at once: ``vm start`` / ``vm stop`` of every VM a filter matches."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

from qvdctl.errors import QvdError
from qvdctl.vm.state import Vm

T = TypeVar("T")


def run_each(
    action: Callable[[Vm], T], vms: list[Vm], limit: int
) -> list[tuple[Vm, T | None, QvdError | None]]:
    """Run ``action`` on every VM, at most ``limit`` at a time; one failure stops no other.

    Returns (vm, result, error) in the order of ``vms``, with exactly one of result
    and error set. Only QvdError is caught: anything else is a bug and propagates
    once every running action has finished.
    """
    if len(vms) <= 1 or limit <= 1:
        return [_attempt(action, vm) for vm in vms]
    # Threads, since each action is blocking (the container seam runs its own trio loop
    # per call). On Ctrl+C the process still waits for its worker threads before it
    # exits, so each action in progress ends through its own success or failure path.
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(limit, len(vms))) as pool:
        futures = [pool.submit(_attempt, action, vm) for vm in vms]
    return [future.result() for future in futures]


def _attempt(action: Callable[[Vm], T], vm: Vm) -> tuple[Vm, T | None, QvdError | None]:
    try:
        return vm, action(vm), None
    except QvdError as exc:
        return vm, None, exc
