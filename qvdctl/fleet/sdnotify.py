"""systemd's notify protocol, the HKD's side: READY=1, WATCHDOG=1, STOPPING=1.

A datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named by ``NOTIFY_SOCKET`` (a
leading ``@`` names one in the abstract namespace). Eight lines of socket code, so no
library: python-systemd would add a C extension to the package for this alone.

The environment is read once and cleared, so the processes the HKD starts (qvdfs
daemons, LXC) cannot inherit the right to speak for it.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    """Tells systemd about this process; does nothing when systemd did not ask."""

    def __init__(self, address: str | None, watchdog_s: float | None) -> None:
        self.address = address
        # Ping at half the watchdog period, as sd_watchdog_enabled(3) advises.
        self.every = watchdog_s / 2 if watchdog_s else math.inf
        self.next_ping = time.monotonic() if watchdog_s else math.inf

    @classmethod
    def from_environment(cls) -> Notifier:
        address = os.environ.pop("NOTIFY_SOCKET", None) or None
        usec = os.environ.pop("WATCHDOG_USEC", "")
        pid = os.environ.pop("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else None
        return cls(address, watchdog_s)

    def send(self, state: str) -> None:
        if self.address is None:
            return
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(state.encode(), target)
        except OSError as exc:  # systemd gone: nothing to tell, and the HKD works on
            log.debug("sd_notify %s: %s", state, exc)

    def ping_due(self) -> float:
        """Send WATCHDOG=1 if it is time; the seconds until the next one is due."""
        now = time.monotonic()
        if now >= self.next_ping:
            self.send("WATCHDOG=1")
            self.next_ping = now + self.every
        return self.next_ping - now
