"""Host networking of the VMs: the shared bridge, each VM's veth, MAC and addresses.

The private namespace the tests and the demo run the controller in is not part of
a node: it lives in ``tools/sandbox.py``.

Import from the modules themselves: this package re-exports nothing, so that
``addresses`` (plain arithmetic) comes without pyroute2, which only ``links`` needs.
"""
