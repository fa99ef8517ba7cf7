"""A VM as this node sees it, and the one table of the states it may move through.

Every state change goes through ``change_state``, which refuses any move the table
``TRANSITIONS`` does not list. The move is one conditional UPDATE (``WHERE state IN
<the states that may lead there>``), so of two commands racing for one VM exactly
one wins, and the loser learns the state that beat it.

``zombie`` means "this VM serves nobody, and something of it is left on the
node": a cleanup that failed, or (found by ``vm list``) a VM recorded
``running`` whose container died or was stopped from outside, or whose union
daemon died under it. It is never silently reset to ``stopped``, since its
root may still be mounted and its overlay busy; the next ``vm stop`` or
``vm start`` of it retries the whole cleanup (container, veth, config, mounts)
and only then calls it ``stopped``.

Concurrency: ``vm start`` and ``vm stop`` of one VM hold that VM's lock
(``Storage.vm_lock``, taken by ``locked``) from their first state change to their
last, so a stop issued during a start waits for the start to end, then stops what
it started. The lock dies with its process: a VM found ``starting`` or ``stopping``
by the holder of its lock was left so by a command that crashed, and ``vm stop``
cleans it up.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Collection, Iterator, Mapping
from typing import Any, NoReturn

from sqlalchemy import Connection, update

from qvdctl import locks
from qvdctl.db import store
from qvdctl.db.schema import vms
from qvdctl.db.states import VmState
from qvdctl.errors import QvdError
from qvdctl.node import Node

S = VmState

# From each state, where it may go, and who moves it.
TRANSITIONS: Mapping[VmState, frozenset[VmState]] = {
    S.STOPPED: frozenset({S.STARTING}),  # vm start claims it
    S.STARTING: frozenset({
        S.RUNNING,  # root mounted, container up
        S.STOPPED,  # a step failed and everything was undone
        S.ZOMBIE,  # a step failed and so did its undo
        S.STOPPING,  # vm stop after a start that crashed (it held no lock any more)
    }),
    S.RUNNING: frozenset({
        S.STOPPING,  # vm stop
        S.ZOMBIE,  # vm list found its root or its container gone
    }),
    S.STOPPING: frozenset({
        S.STOPPED,  # cleaned up
        S.ZOMBIE,  # a cleanup step failed
        S.STOPPING,  # vm stop after a stop that crashed
    }),
    S.ZOMBIE: frozenset({S.STOPPING}),  # vm stop, or vm start before it starts again
    S.DEBUGGING: frozenset({S.STOPPING}),
}  # fmt: skip


class StateRefused(QvdError):
    """A state change the table, or its caller, does not allow from the VM's state.

    Attributes:
        current: the state the VM is in.
    """

    def __init__(self, vm_id: int, current: VmState, new: VmState) -> None:
        super().__init__(f"VM {vm_id} is {current}; it cannot become {new}")
        self.current = current


def change_state(
    conn: Connection,
    vm_id: int,
    new: VmState,
    *,
    only_from: Collection[VmState] | None = None,
    **values: Any,
) -> None:
    """Move VM ``vm_id`` to ``new`` (and set the columns ``values``), if ``TRANSITIONS`` allows.

    ``only_from`` narrows the states it may leave; e.g. ``vm list`` marks only a
    ``running`` VM zombie, never one a command is starting.

    Raises:
        StateRefused: the VM is in a state from which this move is not allowed.
    """
    sources = {state for state, targets in TRANSITIONS.items() if new in targets}
    if only_from is not None:
        sources &= set(only_from)
    if new is VmState.STOPPED:
        values.setdefault("host_id", None)  # a stopped VM belongs to no node
    expect = tuple(sorted(sources))
    if not store.set_vm_state(conn, vm_id, new, expect=expect, **values):
        raise StateRefused(vm_id, VmState(store.get_vm(conn, vm_id)["state"]), new)


def release_host_vms(conn: Connection, host_id: int, why: str) -> int:
    """Call every VM of a lost host ``stopped``, whatever its state; return how many.

    The one move outside ``TRANSITIONS``: the host's HKD fenced itself (stopped its
    VMs) before its lease ran out, so nothing of them runs any more, and they must be
    free to start elsewhere. Commands queued for the host go with it; ``why`` is
    the VMs' error line.
    """
    stmt = (
        update(vms).where(vms.c.host_id == host_id)
        .values(state=VmState.STOPPED.value, host_id=None, vm_cmd=None, error=why,
                state_changed=store.now())
    )  # fmt: skip
    return conn.execute(stmt).rowcount


@dataclasses.dataclass(frozen=True)
class Vm:
    """What a start or a stop needs to know about one VM."""

    id: int
    name: str
    user_id: int
    user: str
    osf: str
    memory: int  # MiB
    ip: str
    di_tag: str
    state: VmState


def load_vm(node: Node, vm_id: int) -> Vm:
    with node.db.reader() as conn:
        row = store.get_vm(conn, vm_id)
    return Vm(
        id=row["id"], name=row["name"], user_id=row["user_id"], user=row["user"],
        osf=row["osf"], memory=row["memory"], ip=row["ip"], di_tag=row["di_tag"],
        state=VmState(row["state"]),
    )  # fmt: skip


@contextlib.contextmanager
def locked(node: Node, vm_id: int) -> Iterator[Vm]:
    """Hold VM ``vm_id``'s lock; yield the VM as the database has it once the lock is ours."""
    storage = node.storage()
    storage.ensure()
    with locks.exclusive(storage.vm_lock(vm_id)):
        yield load_vm(node, vm_id)


def fail_as_zombie(node: Node, vm: Vm, what: str, exc: BaseException) -> NoReturn:
    """Mark ``vm`` zombie after a failed cleanup, and raise the admin's one line.

    ``what`` says what failed; the line adds that the VM is now a zombie and how it
    gets cleaned up.
    """
    with node.db.writer() as conn:
        change_state(conn, vm.id, VmState.ZOMBIE)
    raise QvdError(f"{what}; it is now a zombie (vm stop retries the cleanup)") from exc
