"""qvdfs' own FUSE layer, shaped like go-fuse's ``fuse/``: the kernel protocol's numbers and
structs (``abi``), mount(2) (``mount``), the session's read loop, replies, notifications and
counters (``session``), INIT negotiation (``negotiate``), one decoder per opcode and the
dispatch table (``opcodes``), reply packing (``wire``), passthrough bookkeeping
(``passthrough``), and the ``Filesystem`` protocol the session serves (``filesystem``).
Nothing here knows a union; nothing in the union knows a struct layout."""
