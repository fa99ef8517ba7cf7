"""The on-disk format of a union's branches, below qvdfs and qvdctl (which never import each
other), as ``qvdproc`` is for ``/proc``.

- ``markers``: what the union writes beside the files it serves, in both formats it reads
  (kernel overlayfs': 0/0 whiteouts, opaque, metacopy and redirect xattrs; unionfs-fuse's
  ``_HIDDEN~`` markers), the names of its bookkeeping folders, and how to read each;
- ``syscalls``: the directory-relative, symlink-proof calls every reader of a branch
  goes through, since the branches hold what an image or a container wrote and the
  readers (the qvdfs daemon, ``di commit``) run as root.

The union (``qvdfs.union``) and ``di commit`` (``qvdctl.images.merge``) both read branches
through these two modules.
"""
