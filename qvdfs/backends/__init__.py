"""How a mount talks to the kernel: the native FUSE session (default) or pyfuse3.

Both serve the same ``qvdfs.handlers.UnionFilesystem``. A backend mounts (before the daemon
forks, so mount errors reach the caller), hands the filesystem its features and ``Notifier``
(``Filesystem.init``), serves until the kernel ends the session, can be asked from a signal
handler to stop, and closes the mount.
"""

from __future__ import annotations

from typing import Protocol

from qvdfs.config import MountConfig
from qvdfs.fuse.filesystem import Filesystem

NAMES = ("native", "pyfuse3")


class Backend(Protocol):
    name: str

    def mount(self) -> None:
        """Mount; raise MountError with a line for the admin if it cannot be done."""

    def serve(self) -> None:
        """Answer requests until the session ends (umount, or ``stop``), then call the
        filesystem's ``destroy`` exactly once, also when serving failed."""

    def wait_initialized(self, timeout: float) -> bool:
        """Wait until the kernel's INIT is answered; False if ``timeout`` passed first."""

    def stop(self) -> None:
        """Make ``serve`` return and the mount go; safe to call from a signal handler."""

    def close(self, unmount: bool) -> None:
        """After ``serve``: release the session; with ``unmount``, take the mount down."""

    def abandon(self) -> None:
        """In the parent, for a daemon that died without a word: take the mount down."""

    def counters(self) -> dict[str, object]:
        """Per-opcode request counts and times, and whatever else the session counts."""


def make_backend(fs: Filesystem, config: MountConfig) -> Backend:
    if config.backend == "pyfuse3":
        from qvdfs.backends.pyfuse3 import Pyfuse3Backend

        return Pyfuse3Backend(fs, config)
    from qvdfs.backends.native import NativeBackend

    return NativeBackend(fs, config)
