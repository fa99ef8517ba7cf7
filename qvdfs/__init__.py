"""qvdfs: a union filesystem for QVD desktops, a drop-in for unionfs-fuse.

Layout of the package:

- ``cmdline``: the unionfs-fuse command line, parsed into a ``MountConfig``.
- ``daemon``: the ``qvdfs`` entry point: checks, mount, daemonize, serve, unmount.
- ``operations``: the pyfuse3 Operations class, a thin adapter over ``union``.
- ``union/``: the union itself, free of pyfuse3: the branch stack and safe
  directory-relative syscalls (``branch``, ``syscalls``), the in-memory index of
  merged directories (``tree``), whiteout and opaque markers (``markers``),
  copy-up (``copyup``) and the namespace operations (``namespace``).
"""

__version__ = "0.1.0"
