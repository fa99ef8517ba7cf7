"""VMs as LXC containers: the config liblxc reads and the calls that run it.

- ``config``: ``ContainerSpec`` and the config file under the lxcpath (SPEC §4);
- ``runtime``: start, stop, state, exec and console of one container (liblxc);
- ``launch``: ``launch`` / ``halt``, the all-or-nothing steps a VM's start and stop call;
- ``seam``: the blocking calls ``qvdctl/vm/`` makes, in the node's own terms.

Import from the modules themselves: this package re-exports nothing, so that
importing one of them (``config`` alone) does not load trio and pyroute2 too.
"""
