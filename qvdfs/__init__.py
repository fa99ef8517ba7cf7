"""qvdfs: a union filesystem for QVD desktops, a drop-in for unionfs-fuse.

Layout of the package, top down:

- ``cmdline``: the unionfs-fuse command line, parsed into a ``MountConfig`` (``config``).
- ``daemon``: the ``qvdfs`` entry point: checks, mount, daemonize, serve, unmount.
- ``handlers``: what each FUSE request means, written once against the union core.
- ``backends/``: how requests reach ``handlers``: ``native`` (the default, our own FUSE
  session) or ``pyfuse3`` (the portable one).
- ``fuse/``: the kernel's FUSE protocol itself: its structs (``abi``), mount(2)
  (``mount``), the request loop with INIT negotiation and passthrough (``session``),
  and the interface a filesystem offers it (``filesystem``).
- ``union/``: the union, free of FUSE: safe directory-relative syscalls (``syscalls``),
  branches and stacks (``branch``), the in-memory index (``tree``), on-disk markers
  (``markers``) and writing whiteouts (``whiteout``), copy-up (``copyup``), open files
  (``handles``), rename (``rename``) and the other operations (``core``).
- ``stats``: the counters ``qvdfs stats MOUNTPOINT`` reads while mounted.
- ``launch``: the ``qvdfs`` command itself: through the node's prepared parent
  (``parent``, ``qvdfs parent``), or ``daemon`` in its own process.
"""

__version__ = "0.1.0"

# Where ``qvdfs parent`` listens by default (``qvdfs.parent``, ``qvdfs.launch``). A mount's
# own command line must stay unionfs-fuse's, so the environment is the one knob: another
# socket, or empty for none.
PARENT_SOCKET = "/run/qvdfs/parent.sock"
PARENT_SOCKET_ENV = "QVDFS_PARENT_SOCKET"
