"""The default backend: qvdfs' own FUSE session (``qvdfs.fuse``), no libfuse."""

from __future__ import annotations

import logging
import os

from qvdfs.config import MountConfig, MountError
from qvdfs.fuse import mount as fuse_mount
from qvdfs.fuse.filesystem import Filesystem
from qvdfs.fuse.session import DEFAULT_THREADS, Session

log = logging.getLogger(__name__)


class NativeBackend:
    """Mount through ``/dev/fuse`` and mount(2), serve from the session's threads."""

    name = "native"

    def __init__(self, fs: Filesystem, config: MountConfig) -> None:
        self.fs = fs
        self.config = config
        self.fd: int | None = None
        self.session: Session | None = None

    def mount(self) -> None:
        try:
            self.fd = fuse_mount.mount(self.config.mountpoint, self.config.fuse_options)
        except OSError as exc:
            raise MountError(f"cannot mount on {self.config.mountpoint}: {exc}") from None
        self.session = Session(
            self.fs, self.fd, mountpoint=self.config.mountpoint,
            options=self.config.fuse_options,
            disabled=frozenset() if self.config.passthrough else frozenset({"passthrough"}),
            threads=self.config.threads or DEFAULT_THREADS,
            idmap=self.config.idmap)

    def serve(self) -> None:
        assert self.session is not None
        self.session.serve()

    def wait_initialized(self, timeout: float) -> bool:
        assert self.session is not None
        return self.session.initialized.wait(timeout)

    def stop(self) -> None:
        # A lazy unmount detaches the mount at once, even while it is busy; the kernel
        # then ends the session, and every reading thread sees it.
        try:
            fuse_mount.unmount(self.config.mountpoint, lazy=True)
        except OSError as exc:
            log.warning("cannot unmount %s: %s", self.config.mountpoint, exc)

    def close(self, unmount: bool) -> None:
        if unmount:
            self.stop()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def abandon(self) -> None:
        self.close(unmount=True)

    def counters(self) -> dict[str, object]:
        return dict(self.session.counters()) if self.session is not None else {}
