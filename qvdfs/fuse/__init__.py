"""qvdfs' own FUSE session: the kernel protocol (``abi``), mount(2) (``mount``), the request
loop (``session``), and the ``Filesystem`` protocol it serves (``filesystem``). Nothing here
knows a union; nothing in the union knows a struct layout."""
