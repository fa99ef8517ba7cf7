"""A hardware watchdog the fence keeps fed while it can keep its promise (SBD-style).

The fence process (``fence.py``) kills the node's containers when the lease runs out.
What it cannot cover is being stuck itself at that moment, together with the HKD (a
frozen machine, a kernel hang, both paused). With ``hkd.fence.watchdog`` naming a
watchdog device (``/dev/watchdog``), the fence feeds it only while one of these holds:

- a fence stuck right after this feed would have the machine reset no later than
  ``grace`` after the lease's deadline: ``now + W <= deadline + grace``, with W the
  watchdog's timeout and grace half the lease's margin (``lease.margin``). Another node
  may take over only a whole margin after the deadline, so the reset comes first; and a
  fence that is not stuck kills at the deadline, half a margin before the reset;
- the lease ran out and nothing runs any more (the fence killed it all): a stuck fence
  then leaves nothing to protect, and the machine is not reset for the HKD's sake.

So the machine is reset exactly when the fence did not, or could not, kill in time.
The timeout follows the lease (``timeout_for``): a heartbeat short of the time a renewal
leaves, so a renewal a little late still leaves room to feed, and at most ``MAX_S``
(what most hardware accepts).

The device is Linux's watchdog API (``linux/watchdog.h``): opening it starts the timer,
any write feeds it, ``WDIOC_SETTIMEOUT`` sets the timeout, and the "magic close" (write
``V``, then close) stops it; a close without it (the fence killed) leaves it running, so
the next fence must open it in time. Only one process may hold it open.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import math
import os
from pathlib import Path

from qvdctl.errors import QvdError
from qvdproc import devices

log = logging.getLogger("qvdctl.fleet.fence")

MAX_S = 60

# ioctl numbers of linux/watchdog.h: _IOWR('W', 6, int) and _IOR('W', 7, int).
_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, number: int) -> int:
    return (direction << 30) | (ctypes.sizeof(ctypes.c_int) << 16) | (ord("W") << 8) | number


WDIOC_SETTIMEOUT = _ioc(_IOC_READ | _IOC_WRITE, 6)
WDIOC_GETTIMEOUT = _ioc(_IOC_READ, 7)
MAGIC_CLOSE = b"V"


def timeout_for(valid_s: float, heartbeat_s: float) -> int:
    """The watchdog timeout for a lease that holds ``valid_s`` after each renewal, renewed
    every ``heartbeat_s``: whole seconds, at least 1, at most ``MAX_S``, and no more than
    what is left of a lease when its renewal is a whole heartbeat late."""
    return max(1, min(MAX_S, math.floor(valid_s - 2 * heartbeat_s)))


def check_device(path: str) -> None:
    """Raise QvdError unless ``path`` is a character device (checked when the HKD starts,
    so that a typo is an error, not a fence that can never arm)."""
    try:
        devices.require_character_device(path)
    except devices.NotACharacterDevice as exc:
        raise QvdError(f"hkd.fence.watchdog: {exc}") from None


class Watchdog:
    """One watchdog device, opened (and so armed) at the first ``feed``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.timeout_s = 0

    def feed(self, timeout_s: int) -> bool:
        """Feed it, first opening it or setting ``timeout_s`` if that changed; False if it
        cannot be opened yet (another fence still holds it: the caller tries again)."""
        if self.fd is None:
            try:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    return False
                raise
            log.info("fence: watchdog %s armed", self.path)
        if timeout_s != self.timeout_s:
            self._set_timeout(timeout_s)
        os.write(self.fd, b"\0")
        return True

    def _set_timeout(self, seconds: int) -> None:
        assert self.fd is not None
        value = ctypes.c_int(seconds)
        try:
            fcntl.ioctl(self.fd, WDIOC_SETTIMEOUT, value)
        except OSError as exc:
            self.disarm()  # nothing runs the machine's clock down that we cannot feed
            raise QvdError(f"{self.path}: cannot set the watchdog's timeout to {seconds} s"
                           f" ({exc.strerror}): not a watchdog device?") from None
        if value.value > seconds:  # the device rounded up: too long to be safe
            self.disarm()
            raise QvdError(f"{self.path}: the watchdog took a timeout of {value.value} s,"
                           f" longer than the {seconds} s the lease allows")
        self.timeout_s = seconds
        log.info("fence: watchdog %s timeout %d s", self.path, seconds)

    def disarm(self) -> None:
        """The magic close: the device stops and may be opened again."""
        if self.fd is None:
            return
        try:
            os.write(self.fd, MAGIC_CLOSE)
        finally:
            os.close(self.fd)
            self.fd = None
            self.timeout_s = 0
        log.info("fence: watchdog %s disarmed", self.path)
