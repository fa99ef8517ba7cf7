"""What the HKDs publish of their VMs' use (``qvdctl/vm/usage.py``), on SQLite and on a
real PostgreSQL: one host's rows replace its previous ones and no other host's, and a
deleted VM takes its row along."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qvdctl.db import store
from qvdctl.db.states import VmState
from qvdctl.node import Node
from qvdctl.vm import usage
from qvdctl.vm.usage import Usage
from tests.support.postgres import database_url, postgres  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(120)

COUNTERS = {"opcodes": {"LOOKUP": {"count": 3, "ns": 4500}}, "copy_ups": 1,
            "backend": "native"}


@pytest.fixture(params=["sqlite", "postgresql"])
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Node]:
    node = Node(tmp_path, db_url=database_url(request, tmp_path))
    try:
        yield node
    finally:
        node.close()


def test_a_host_publishes_its_running_vms_and_replaces_what_it_published(node: Node) -> None:
    with node.db.writer() as conn:
        osf = store.add_osf(conn, "o", 256, 0)
        user = store.add_user(conn, "u", "x")
        a, b = store.add_host(conn, "a", ""), store.add_host(conn, "b", "")
        ids = [store.add_vm(conn, f"v{i}", user, osf, "head", f"10.0.0.{i}") for i in (1, 2, 3)]
        for vm_id, host in zip(ids, (a, a, b), strict=True):
            store.set_vm_state(conn, vm_id, VmState.RUNNING, host_id=host)
    with node.db.reader() as conn:
        assert usage.running_on(conn, a) == set(ids[:2])
    with node.db.writer() as conn:
        usage.publish(conn, a, {ids[0]: Usage(100.0, 1.5, 2.0**20, COUNTERS),
                                ids[1]: Usage(100.0, None, None, None)})
        usage.publish(conn, b, {ids[2]: Usage(101.0, 3.0, 4.0, None)})
    with node.db.reader() as conn:
        assert usage.published(conn, ids[0]) == ("a", Usage(100.0, 1.5, 2.0**20, COUNTERS))
        assert usage.published(conn, ids[1]) == ("a", Usage(100.0, None, None, None))
    # Host a's next period: v2 stopped; host b's row is not a's to touch.
    with node.db.writer() as conn:
        usage.publish(conn, a, {ids[0]: Usage(110.0, 2.5, 2.0**21, COUNTERS)})
    with node.db.reader() as conn:
        assert usage.published(conn, ids[0]) == ("a", Usage(110.0, 2.5, 2.0**21, COUNTERS))
        assert usage.published(conn, ids[1]) is None
        assert usage.published(conn, ids[2]) == ("b", Usage(101.0, 3.0, 4.0, None))
    # A VM deleted (stopped first, as `vm del` wants) takes its row along.
    with node.db.writer() as conn:
        store.set_vm_state(conn, ids[2], VmState.STOPPED, host_id=None)
        store.del_vm(conn, store.get_vm(conn, ids[2]))
    with node.db.reader() as conn:
        assert usage.published(conn, ids[2]) is None
