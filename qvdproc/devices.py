"""Device nodes: whether a path the configuration names is the character device it must be.

qvdfs needs /dev/fuse and the HKD's fence a watchdog device (``hkd.fence.watchdog``); both
check it before they start, so that a missing module or a typo is one clear error instead of
a failure later (a mount that cannot open its device, a fence that can never arm). Each
caller words the error for its own setting; the check itself is here, below both.
"""

from __future__ import annotations

import os
import stat


class NotACharacterDevice(Exception):
    """``path`` is no character device. ``strerror`` says why it could not even be looked
    at (``os.stat`` failed: missing, no permission); None when it is something else."""

    def __init__(self, path: str, strerror: str | None) -> None:
        self.path = path
        self.strerror = strerror
        super().__init__(f"{path}: {strerror}" if strerror is not None
                         else f"{path} is not a character device")


def require_character_device(path: str) -> None:
    """Raise NotACharacterDevice unless ``path`` is (or is a symlink to) a character device."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise NotACharacterDevice(path, exc.strerror or str(exc)) from None
    if not stat.S_ISCHR(mode):
        raise NotACharacterDevice(path, None)
