"""A VM's life on this node: from ``stopped`` to a running container and back.

    vm start:  start.start_vm    stopped -> starting -> running   (or back to stopped, or zombie)
    vm stop:   stop.stop_vm      ... -> stopping -> stopped       (or zombie)
    vm list:   health.reconcile  running -> zombie if its root or container is gone
    several:   parallel.run_each a start or stop of each matched VM, a few at a time

``state.py`` holds the model: ``Vm``, ``VmState``, the one table of allowed
transitions, the VM's lock and what ``zombie`` means. The container and network
work goes through ``qvdctl/container/seam.py``; mounting through ``mounting.py``.

Import from the modules themselves: this package re-exports nothing, so that
`vm list` loads the state and health checks without the start machinery.
"""
