"""Build branch trees for tests and describe what a mount shows, for comparisons."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path


def build_base(root: Path) -> Path:
    """A small OS-like lower branch with every kind of entry a union must merge."""
    (root / "etc/conf.d").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/lib/deep/er").mkdir(parents=True)
    (root / "var/log").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/conf.d/a.conf").write_text("a=1\n")
    (root / "etc/conf.d/b.conf").write_text("b=2\n")
    (root / "usr/bin/tool").write_bytes(b"\x7fELF" + bytes(range(256)) * 64)
    os.chmod(root / "usr/bin/tool", 0o4755)
    (root / "usr/lib/deep/er/lib.so").write_bytes(b"x" * 5000)
    (root / "usr/lib/deep/file").write_text("deep\n")
    os.symlink("../lib/deep/file", root / "usr/bin/link-to-file")
    os.symlink("/etc/passwd", root / "usr/bin/abs-link")
    os.link(root / "etc/conf.d/a.conf", root / "etc/conf.d/a-hardlink.conf")
    (root / "var/log/syslog").write_text("boot\n")
    os.chown(root / "var/log/syslog", 0, 4)
    os.chmod(root / "var/log/syslog", 0o640)
    os.setxattr(root / "etc/passwd", "user.origin", b"base")
    os.mkfifo(root / "var/fifo")
    return root


def describe(root: Path, *, dir_nlink: bool = False) -> dict[str, tuple]:
    """What a tree shows: type, mode, owner, size, content, link target, links, xattrs.

    Directory link counts are left out unless asked for: kernel overlayfs reports 1 for
    merged directories.
    """
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            nlink = st.st_nlink if (dir_nlink or not stat.S_ISDIR(st.st_mode)) else None
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                        st.st_size if stat.S_ISREG(st.st_mode) else None, content, nlink,
                        user_xattrs(path))
    return out


def user_xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)
            if n.startswith("user.")}
