"""The VM state table (``qvdctl/vm/state.py``) on a real database: SQLite, and PostgreSQL.

Each test puts a VM straight into a state with the raw ``store.set_vm_state``, then
asks ``change_state`` for a move: it must happen exactly when ``TRANSITIONS`` lists it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from qvdctl.db import store
from qvdctl.node import Node
from qvdctl.vm.state import TRANSITIONS, StateRefused, VmState, change_state
from tests.support.postgres import PgServer, postgres  # noqa: F401 (a fixture)


@pytest.fixture(params=["sqlite", "postgresql"])
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Node]:
    url = None
    if request.param == "postgresql":
        server: PgServer = request.getfixturevalue("postgres")
        url = server.url()
    node = Node(tmp_path, db_url=url)
    with node.db.writer() as conn:
        user = store.add_user(conn, "alice", "x")
        osf = store.add_osf(conn, "desktop", 256, 0)
        store.add_vm(conn, "v", user, osf, "default", "10.0.0.5")
    try:
        yield node
    finally:
        node.close()


def _vm(node: Node) -> dict:
    with node.db.reader() as conn:
        return store.list_vms(conn)[0]


def _put(node: Node, state: VmState) -> None:
    """Put the VM in ``state`` behind the table's back, on host ``here``."""
    with node.db.writer() as conn:
        host = store.ensure_host(conn, "here")
        store.set_vm_state(conn, _vm(node)["id"], state, host_id=host)


def test_the_states_are_the_stock_names() -> None:
    assert {s.value for s in VmState} == {
        "stopped", "starting", "running", "stopping", "zombie", "debugging",
    }  # fmt: skip
    assert set(TRANSITIONS) == set(VmState)


@pytest.mark.parametrize(("old", "new"), list(itertools.product(VmState, VmState)))
def test_a_move_happens_exactly_when_the_table_lists_it(
    node: Node, old: VmState, new: VmState
) -> None:
    _put(node, old)
    vm_id = _vm(node)["id"]
    if new in TRANSITIONS[old]:
        with node.db.writer() as conn:
            change_state(conn, vm_id, new)
        assert _vm(node)["state"] == new
    else:
        with pytest.raises(StateRefused) as refused, node.db.writer() as conn:
            change_state(conn, vm_id, new)
        assert refused.value.current is old
        assert _vm(node)["state"] == old


def test_only_from_narrows_the_table(node: Node) -> None:
    """vm list marks only a running VM zombie, never one a command is starting."""
    _put(node, VmState.STARTING)
    with pytest.raises(StateRefused), node.db.writer() as conn:
        change_state(conn, _vm(node)["id"], VmState.ZOMBIE, only_from={VmState.RUNNING})
    assert _vm(node)["state"] == VmState.STARTING
    _put(node, VmState.RUNNING)
    with node.db.writer() as conn:
        change_state(conn, _vm(node)["id"], VmState.ZOMBIE, only_from={VmState.RUNNING})
    assert _vm(node)["state"] == VmState.ZOMBIE


def test_a_stopped_vm_belongs_to_no_host(node: Node) -> None:
    _put(node, VmState.STOPPING)
    assert _vm(node)["host"] == "here"
    with node.db.writer() as conn:
        change_state(conn, _vm(node)["id"], VmState.STOPPED)
    vm = _vm(node)
    assert (vm["state"], vm["host"]) == ("stopped", None)
