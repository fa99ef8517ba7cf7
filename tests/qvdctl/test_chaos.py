"""The short version of ``make chaos`` (``tools/chaos.py``): one fault of each kind.

Three HKDs on one PostgreSQL (reached over TCP) with real containers: an HKD killed, one
paused for longer than the lease, the database killed and restarted, a node cut off from
the database and healed, a node's wall clock stepped; after each, the long run's checker:
never a VM on two nodes, every VM running again within the bound, and the database and
the nodes agreeing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tools import chaos


@pytest.mark.timeout(600)
def test_one_fault_of_each_kind_leaves_no_vm_on_two_nodes(tmp_path: Path) -> None:
    report = chaos.run(tmp_path, seed=25, faults=list(chaos.KINDS), nodes=3, vms=3, timeout=5)
    print("\n".join(report.lines()))
    assert report.failures == []
    assert dict(report.survived) == {kind: 1 for kind in chaos.KINDS}
    # The VMs of the killed, the paused and the cut-off node moved.
    assert set(report.moved_s) == {"sigkill", "sigstop", "partition"}
