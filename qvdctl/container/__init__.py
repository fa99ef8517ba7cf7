"""VMs as LXC containers: the config liblxc reads and the calls that run it.

- ``config``: ``ContainerSpec`` and the config file under the lxcpath (SPEC §4);
- ``query``: a container's state, its liblxc monitor, the lxc-attach and lxc-console
  command lines: plain blocking calls, for ``vm list``, ``vm exec`` and ``vm console``;
- ``runtime``: start, stop and exec of one container in trio (liblxc, lxc-start);
- ``launch``: ``launch`` / ``halt``, the all-or-nothing steps a VM's start and stop call;
- ``seam``: the blocking calls ``qvdctl/vm/`` makes, in the node's own terms.

Import from the modules themselves: this package re-exports nothing, so that
importing one of them (``config`` alone) does not load trio and pyroute2 too.
"""
