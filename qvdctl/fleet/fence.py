"""A node's fence: a small process of its own that kills the node's VMs when its lease runs out.

The HKD starts it (``Fence``) and, after each renewal the database accepted, sends it the
lease's deadline on the node's monotonic clock (``lease.valid_for`` after the moment the
renewal was *sent*). When a deadline passes with no later one, the fence kills every
container of the node's lxcpath, and keeps killing any that appears, until it is sent a
deadline in the future again (the HKD renewed, or rejoined). Being its own process, it
holds while the HKD is paused (SIGSTOP, a hung NFS read), busy, or killed: a HKD that
dies closes the pipe, and the fence then waits out the last deadline, kills, and exits.

How it kills: SIGKILL to the container's init, the first process of its PID namespace.
The kernel then kills every process in that namespace and lets no new one in, in one
step the container cannot block or outrun; it needs no cgroup controller (this works on
cgroup v1, hybrid and v2 hosts alike) and no answer from liblxc. The inits are found from
the process table: liblxc retitles each container's monitor ``[lxc monitor] LXCPATH NAME``
and the init is that monitor's child. The monitor then sees its container stopped and
cleans up as after any stop; the roots are unmounted when the HKD reconciles.

To keep its promise on a node in trouble, it locks its memory (no page of it waits on a
swap storm), runs at a real-time priority and is the last process the OOM killer picks.
What it cannot survive is its own death while the HKD is stopped too: for that, the
admin names a hardware watchdog (``hkd.fence.watchdog``), which the fence feeds only
while it can keep its promise (``watchdog.py``), and which otherwise resets the machine.

    fence -> HKD:                  fired              (it killed: the HKD must clean up
                                                       and rejoin, even if a renewal it
                                                       sent in time has been accepted
                                                       since, too late to feed the fence)
    HKD -> fence, one line each:   feed DEADLINE      (time.monotonic() seconds)
                                   watchdog W GRACE   (its timeout, and how long after
                                                       the deadline a reset may come)
                                   stop               (the HKD stopped every VM: exit)
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from qvdctl.container.query import container_inits
from qvdctl.fleet.watchdog import Watchdog
from qvdproc import processes

# Named, not __name__: the process runs this module as __main__.
log = logging.getLogger("qvdctl.fleet.fence")

MODULE = "qvdctl.fleet.fence"
# Once fired, how often the fence looks again for a container to kill (one being started
# as the HKD stopped may appear a moment later).
RECHECK_S = 0.1
# With its HKD gone, the fence exits once it has found nothing to kill for this long
# after the deadline (a start the HKD began may still bring a container up).
SETTLE_S = 2.0
# The real-time priority of the fence: the lowest, above every ordinary process.
RT_PRIORITY = 1
_MCL_CURRENT, _MCL_FUTURE = 1, 2


def kill_containers(lxcpath: Path) -> list[str]:
    """SIGKILL the init of every container of ``lxcpath``; the names of those killed."""
    killed = []
    for pid, (monitor, name) in container_inits(lxcpath).items():
        if _sigkill(pid, lambda: processes.parent(pid) == monitor):
            killed.append(name)
    return killed


def _sigkill(pid: int, still: Callable[[], bool]) -> bool:
    """SIGKILL ``pid`` if ``still()`` holds once a pidfd pins it (so a pid reused since it
    was found is never hit); whether it was sent."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        if still():
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            return True
    except ProcessLookupError:
        pass
    finally:
        os.close(fd)
    return False


class Fence:
    """The HKD's handle on its fence process; ``watchdog``: a watchdog device's path, or
    empty for none."""

    def __init__(self, lxcpath: Path, watchdog: str = "") -> None:
        self.lxcpath = lxcpath
        self.watchdog_device = watchdog
        self.deadline: float | None = None
        self.watchdog_line = ""
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", MODULE, str(self.lxcpath)]
        if self.watchdog_device:
            argv.append(self.watchdog_device)
        # Its own session: a Ctrl+C for the HKD's terminal must not end the fence too.
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                start_new_session=True)
        assert proc.stdin is not None and proc.stdout is not None
        # A fence that stops reading (stopped itself) must not block the HKD in a write,
        # nor one that says nothing block it in a read.
        os.set_blocking(proc.stdin.fileno(), False)
        os.set_blocking(proc.stdout.fileno(), False)
        log.info("fence process %d watches the containers of %s", proc.pid, self.lxcpath)
        return proc

    def feed(self, deadline: float) -> None:
        """The lease holds until ``deadline`` (``time.monotonic()``)."""
        self.deadline = deadline
        self._send(f"feed {deadline!r}\n")

    def set_watchdog(self, timeout_s: int, grace_s: float) -> None:
        """The watchdog's timeout, and how long after a deadline a reset may come (sent
        only when they change; a no-op without a watchdog)."""
        line = f"watchdog {timeout_s} {grace_s!r}\n"
        if self.watchdog_device and line != self.watchdog_line:
            self.watchdog_line = line
            self._send(line)

    def fired(self) -> bool:
        """Whether the fence killed this node's containers since the last call."""
        assert self.proc.stdout is not None
        said = b""
        try:
            while chunk := os.read(self.proc.stdout.fileno(), 4096):
                said += chunk
        except BlockingIOError:
            pass
        return b"fired\n" in said

    def retire_others(self) -> None:
        """End the fences a previous HKD of this node left waiting out its lease.

        Called once this HKD's own lease holds (its fence is fed): from then on the old
        one would only kill VMs this HKD has taken over.
        """
        for pid in self._fences():
            if pid != self.proc.pid and _sigkill(pid, lambda: pid in self._fences()):
                log.info("ended fence process %d of a previous HKD", pid)

    def _fences(self) -> list[int]:
        """The fence processes watching this node's lxcpath."""
        return [p.pid for p in processes.with_argument(str(self.lxcpath))
                if MODULE.encode() in p.argv]

    def check(self) -> None:
        """Start the fence again if it died, with the deadline it knew."""
        if self.proc.poll() is None:
            return
        log.error("the fence process %d ended (status %s); starting another",
                  self.proc.pid, self.proc.returncode)
        self.proc = self._spawn()
        if self.watchdog_line:
            self._send(self.watchdog_line)
        if self.deadline is not None:
            self.feed(self.deadline)

    def stop(self) -> None:
        """The HKD leaves with nothing running: the fence exits without killing."""
        self._send("stop\n")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.error("the fence process %d did not exit; killing it", self.proc.pid)
            self.proc.kill()
            self.proc.wait()

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            os.write(self.proc.stdin.fileno(), line.encode())
        except BlockingIOError:
            log.error("the fence process %d reads nothing: is it stopped?", self.proc.pid)
        except BrokenPipeError:
            pass  # it died: check() starts another and sends it the deadline


def _harden() -> None:
    """Memory locked, real-time priority, never the OOM killer's pick (each if allowed)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(_MCL_CURRENT | _MCL_FUTURE) != 0:
        log.warning("fence: cannot lock its memory: %s", os.strerror(ctypes.get_errno()))
    try:
        Path("/proc/self/oom_score_adj").write_text("-1000")
    except OSError as exc:
        log.warning("fence: cannot opt out of the OOM killer: %s", exc)
    try:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(RT_PRIORITY))
    except OSError as exc:
        # A cgroup v1 cpu controller grants real-time time only to groups given
        # cpu.rt_runtime_us; the fence then runs at ordinary priority.
        log.info("fence: no real-time priority (%s); ordinary scheduling", exc.strerror)


def _tell_hkd(line: bytes) -> None:
    try:
        os.write(sys.stdout.fileno(), line)
    except (BrokenPipeError, BlockingIOError):
        pass  # the HKD is gone, or not reading: it rejoins when it renews late anyway


def run(lxcpath: Path, feeds: int, watchdog: Watchdog | None = None) -> int:
    """The fence's loop, reading the HKD's lines from descriptor ``feeds``; feeding
    ``watchdog`` (if any) while it may (``watchdog.py``), and disarming it on a clean exit."""
    deadline: float | None = None
    fired = False
    hkd_gone = False
    pending = b""
    dog_timeout, dog_grace = 0, 0.0
    while True:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            killed = kill_containers(lxcpath)
            if not fired or killed:
                log.warning("fence: the lease ran out %.2f s ago; killed %s", now - deadline,
                            ", ".join(killed) or "nothing (no container ran)")
            if not fired and not hkd_gone:
                _tell_hkd(b"fired\n")
            fired = True
            if hkd_gone and not killed and now - deadline >= SETTLE_S:
                break
            wait: float | None = RECHECK_S
        elif hkd_gone:
            if deadline is None:
                break
            wait = deadline - now
        else:
            wait = None if deadline is None else deadline - now
        if watchdog is not None and dog_timeout:
            if ((deadline is not None and now + dog_timeout <= deadline + dog_grace)
                    or (fired and not container_inits(lxcpath))):
                watchdog.feed(dog_timeout)  # False: a previous fence holds it; next turn
            wait = dog_timeout / 4 if wait is None else min(wait, dog_timeout / 4)
        if not select.select([] if hkd_gone else [feeds], [], [], wait)[0]:
            continue
        chunk = os.read(feeds, 4096)
        if not chunk:
            hkd_gone = True
            log.warning("fence: the HKD is gone; the lease holds %s",
                        "nothing" if deadline is None else
                        f"{max(deadline - time.monotonic(), 0):.2f} s more")
            continue
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            word, _, value = line.decode().partition(" ")
            if word == "stop":
                if watchdog is not None:
                    watchdog.disarm()
                return 0
            if word == "watchdog":
                timeout_s, grace_s = value.split()
                dog_timeout, dog_grace = int(timeout_s), float(grace_s)
            if word == "feed":
                deadline = max(deadline or 0.0, float(value))
                if fired and deadline > time.monotonic():
                    log.warning("fence: the lease holds again; no longer killing")
                    fired = False
    # The HKD is gone and nothing runs: the machine needs no reset.
    if watchdog is not None:
        watchdog.disarm()
    return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    lxcpath, *device = argv
    _harden()
    watchdog = Watchdog(Path(device[0])) if device else None
    return run(Path(lxcpath), sys.stdin.fileno(), watchdog)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
