"""A VM's life on this node: from ``stopped`` to a running container and back.

    vm start:  start.start_vm    stopped -> starting -> running   (or back to stopped, or zombie)
    vm stop:   stop.stop_vm      ... -> stopping -> stopped       (or zombie)
    vm list:   health.reconcile  running -> zombie if its root or container is gone
    several:   parallel.run_each a start or stop of each matched VM, a few at a time

``state.py`` holds the model: ``Vm``, ``VmState``, the one table of allowed
transitions, the VM's lock and what ``zombie`` means. The container and network
work goes through ``qvdctl/container/seam.py``; mounting through ``mounting.py``.
"""

from __future__ import annotations

from qvdctl.db.states import VmState
from qvdctl.vm.health import reconcile
from qvdctl.vm.parallel import run_each
from qvdctl.vm.start import MountedRoot, start_vm
from qvdctl.vm.state import TRANSITIONS, Vm, load_vm
from qvdctl.vm.stop import stop_vm

__all__ = [
    "TRANSITIONS",
    "MountedRoot",
    "Vm",
    "VmState",
    "load_vm",
    "reconcile",
    "run_each",
    "start_vm",
    "stop_vm",
]
