"""A fleet: many nodes on one shared database, an HKD per node (SPEC §6).

    commands.py   the command queue: the admin CLI records a start/stop on a VM's row
                  and notifies its host; the HKD claims it with a conditional UPDATE
    placement.py  which running, unblocked host a VM starts on
    lease.py      hosts' leases: registering, renewing, marking an expired host lost
    hkd.py        the node daemon (``qvdctl hkd``): reconcile, take commands, heartbeat,
                  fence itself when it cannot renew, stop everything on SIGTERM
    client.py     the admin side of ``vm start/stop`` against a fleet: queue, wait, print

The work itself is today's lifecycle (``qvdctl/vm/``), run by the HKD of the VM's host.
"""
