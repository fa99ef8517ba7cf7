"""A node's wall clock set off, and jumped while it runs, for the fleet's clock faults.

With this folder on ``PYTHONPATH`` and ``QVD_CLOCK_OFFSET_FILE`` naming a file, every
Python process started so (an HKD, and the fence and tools it starts) reads the wall
clock that many seconds off: ``time.time``, ``time.time_ns`` and ``clock_gettime`` of
``CLOCK_REALTIME`` (so ``logging``'s timestamps too). The file holds a number of seconds
and is read again at most every ``REREAD_S``, so writing it jumps the clock of a running
process, as a step of a node's NTP (or an admin's ``date -s``) would.

Why not libfaketime: it is preloaded into every program the HKD runs, liblxc and mount
among them, and broke their mount calls. Here the C programs the HKD runs read the real
clock; the monotonic clock is left alone (``tools/fleet.py`` offsets a node's
monotonic and boot-time clocks with a time namespace instead, which the kernel applies to
every process on the node).
"""

from __future__ import annotations

import os
import time

REREAD_S = 0.05

_path = os.environ.get("QVD_CLOCK_OFFSET_FILE", "")

if _path:
    _real = (time.time, time.time_ns, time.clock_gettime, time.clock_gettime_ns)
    _state = {"read_at": float("-inf"), "offset": 0.0}

    def _offset() -> float:
        now = time.monotonic()
        if now - _state["read_at"] >= REREAD_S:
            _state["read_at"] = now
            try:
                with open(_path) as f:
                    _state["offset"] = float(f.read().strip() or 0)
            except (OSError, ValueError):
                pass  # being rewritten: the last offset holds a moment longer
        return _state["offset"]

    def _time() -> float:
        return _real[0]() + _offset()

    def _time_ns() -> int:
        return _real[1]() + int(_offset() * 1e9)

    def _clock_gettime(clock: int) -> float:
        return _real[2](clock) + (_offset() if clock == time.CLOCK_REALTIME else 0.0)

    def _clock_gettime_ns(clock: int) -> int:
        skew = int(_offset() * 1e9) if clock == time.CLOCK_REALTIME else 0
        return _real[3](clock) + skew

    time.time, time.time_ns = _time, _time_ns
    time.clock_gettime, time.clock_gettime_ns = _clock_gettime, _clock_gettime_ns
