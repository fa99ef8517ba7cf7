"""The fence's hardware watchdog (``qvdctl/fleet/watchdog.py``): when it is fed, and the
device's protocol.

No test here opens a real watchdog device: armed, one resets the machine unless it is fed
to the end and disarmed, and this machine has none anyway (its kernel has no watchdog
driver and no loadable modules, so no ``softdog``). The fence's loop is therefore run on
a thread with a recording double in the device's place (``Recorder``), which notes each
feed and the magic close; the device class itself is checked against the kernel's ioctl
numbers and against a FIFO, which is no watchdog and must be refused and left disarmed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qvdctl.errors import QvdError
from qvdctl.fleet import fence, lease
from qvdctl.fleet.watchdog import (MAGIC_CLOSE, WDIOC_GETTIMEOUT, WDIOC_SETTIMEOUT, Watchdog,
                                   check_device, timeout_for)
from tools.cli import Cli

pytestmark = pytest.mark.timeout(60)

TIMEOUT_S, GRACE_S = 1, 0.5
LEASE_S = 1.5  # what the fixture's fence is fed


class Recorder(Watchdog):
    """A watchdog double: records when it was fed and whether it was disarmed."""

    def __init__(self) -> None:
        super().__init__(Path("/nonexistent-watchdog"))
        self.fed: list[float] = []
        self.disarmed_at: float | None = None

    def feed(self, timeout_s: int) -> bool:
        assert timeout_s == TIMEOUT_S
        self.fed.append(time.monotonic())
        return True

    def disarm(self) -> None:
        self.disarmed_at = time.monotonic()


class FenceThread:
    """``fence.run`` on a thread, reading the lines written with ``send``."""

    def __init__(self, lxcpath: Path, dog: Recorder) -> None:
        self.read_end, self.write_end = os.pipe()
        self.status: list[int] = []
        self.thread = threading.Thread(
            target=lambda: self.status.append(fence.run(lxcpath, self.read_end, dog)))
        self.thread.start()

    def send(self, line: str) -> None:
        os.write(self.write_end, line.encode())

    def close(self) -> None:
        """The HKD is gone (its end of the pipe closed)."""
        if self.write_end >= 0:
            os.close(self.write_end)
            self.write_end = -1

    def join(self, timeout: float) -> int:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the fence did not exit"
        if self.read_end >= 0:
            os.close(self.read_end)
            self.read_end = -1
        return self.status[0]


@pytest.fixture
def dog() -> Recorder:
    return Recorder()


@pytest.fixture
def running(tmp_path: Path, dog: Recorder) -> Iterator[FenceThread]:
    """A fence of an lxcpath with no containers, fed a lease of LEASE_S."""
    f = FenceThread(tmp_path, dog)
    try:
        f.send(f"watchdog {TIMEOUT_S} {GRACE_S}\n")
        f.send(f"feed {time.monotonic() + LEASE_S!r}\n")
        yield f
    finally:
        f.close()
        f.join(10)


def test_fed_while_the_lease_holds_never_late_enough_to_outlive_the_deadline(
    running: FenceThread, dog: Recorder,
) -> None:
    deadline = time.monotonic() + LEASE_S  # within the fixture's, a moment later
    time.sleep(LEASE_S + 1)
    before = [t for t in dog.fed if t < deadline - 0.1]
    # Fed often (a quarter of the timeout, with room for a busy machine) ...
    assert before and before[0] - (deadline - LEASE_S) < 0.5
    assert max(b - a for a, b in zip(before, before[1:])) < 0.5
    # ... and never so late that a fence stuck right after could outlive deadline + grace.
    assert all(t + TIMEOUT_S <= deadline + GRACE_S for t in before)
    # Once the lease ran out with nothing left running, it is fed again: the fence works.
    assert [t for t in dog.fed if t > deadline]
    running.send("stop\n")
    assert running.join(10) == 0
    assert dog.disarmed_at is not None


def test_not_fed_past_the_deadline_while_a_container_outlives_its_kill(
    running: FenceThread, dog: Recorder, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An init the SIGKILL has not ended yet (stuck in the kernel): the machine must be
    reset, so the fence stops feeding, for as long as it lasts."""
    monkeypatch.setattr(fence, "container_inits", lambda _lxcpath: {4242: (4241, "qvd-1")})
    monkeypatch.setattr(fence, "kill_containers", lambda _lxcpath: [])
    deadline = time.monotonic() + LEASE_S
    time.sleep(LEASE_S + 1.5)
    assert dog.fed and all(t + TIMEOUT_S <= deadline + GRACE_S + 0.05 for t in dog.fed)
    assert dog.disarmed_at is None


def test_a_gone_hkd_disarms_it_once_the_lease_is_out_and_nothing_runs(
    running: FenceThread, dog: Recorder,
) -> None:
    running.close()
    assert running.join(LEASE_S + fence.SETTLE_S + 5) == 0
    assert dog.disarmed_at is not None and dog.fed[-1] <= dog.disarmed_at


def test_the_ioctl_numbers_are_the_kernels() -> None:
    # linux/watchdog.h: _IOWR('W', 6, int) and _IOR('W', 7, int).
    assert (WDIOC_SETTIMEOUT, WDIOC_GETTIMEOUT) == (0xC0045706, 0x80045707)


def test_a_fifo_is_refused_as_a_watchdog_and_left_disarmed(tmp_path: Path) -> None:
    path = tmp_path / "not-a-watchdog"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(QvdError, match="cannot set the watchdog's timeout to 3 s"):
            Watchdog(path).feed(3)
        assert os.read(reader, 16) == MAGIC_CLOSE  # the magic close, and nothing fed
        assert os.read(reader, 16) == b""  # end of file: closed (an open writer: EAGAIN)
    finally:
        os.close(reader)


@pytest.mark.parametrize("limit", [2, 3, 5, 10, 30, 60, 600, 3600, 86400])
def test_renewals_on_time_always_leave_room_to_feed(limit: int) -> None:
    """Just before a renewal that comes on time, the lease holds valid - heartbeat more;
    the fence may feed as long as that plus the grace is at least the timeout."""
    valid, beat = lease.valid_for(limit), limit / lease.HEARTBEATS
    timeout = timeout_for(valid, beat)
    assert 1 <= timeout <= 60
    assert valid - beat + lease.margin(limit) / 2 >= timeout


def test_the_hkd_refuses_a_watchdog_that_is_not_a_device(tmp_path: Path) -> None:
    check_device("/dev/null")  # a character device passes
    cli = Cli(tmp_path / "node")
    plain = tmp_path / "watchdog"
    plain.touch()
    cli.run("config", "set", f"hkd.fence.watchdog={plain}")
    result = cli.run("hkd", check=False, timeout=30)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].endswith(
        f"hkd.fence.watchdog: {plain} is not a character device"), result.stderr
