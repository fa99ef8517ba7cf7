"""The HKD speaks systemd's notify protocol to a real datagram socket the test binds as
NOTIFY_SOCKET: READY=1 once registered, WATCHDOG=1 at half of WATCHDOG_USEC from its
loop, STOPPING=1 on SIGTERM; and only the HKD's own process sends them."""

from __future__ import annotations

import os
import secrets
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qvdctl.fleet.sdnotify import Notifier
from tools.fleet import Fleet, stop_hkd
from tests.support.postgres import PgServer, pg_server, postgres  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(180)


def receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the sender's pid, as systemd
    sock.bind(address)
    return sock


def receive(sock: socket.socket, timeout: float) -> tuple[str, int]:
    """One message and the pid that sent it."""
    sock.settimeout(timeout)
    data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
    (pid, _uid, _gid), = [struct.unpack("3i", d) for level, kind, d in ancillary
                          if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
    return data.decode(), pid


@pytest.fixture
def fleet(postgres: PgServer, tmp_path: Path) -> Iterator[Fleet]:  # noqa: F811
    f = Fleet(tmp_path, postgres.url(), ("node-a",), vms=0, timeout=5)
    try:
        yield f
    finally:
        f.close()


def test_ready_watchdog_and_stopping_reach_the_socket(fleet: Fleet, tmp_path: Path) -> None:
    node = fleet.nodes["node-a"]
    path = tmp_path / "notify.sock"  # a path: the HKD's own network namespace has its own
    with receiver(str(path)) as sock:  # abstract names
        node.env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"}
        node.start()
        assert node.proc is not None
        message, pid = receive(sock, 60)
        assert (message, pid) == ("READY=1", node.proc.pid)
        assert fleet.admin.hosts()["node-a"]["State"] == "running"  # ready means registered
        # What the HKD starts (here its fence process) cannot speak for it: the HKD took
        # the socket out of its environment.
        (fence,) = node.fences()
        assert b"NOTIFY_SOCKET=" not in Path(f"/proc/{fence}/environ").read_bytes()

        pings = []
        started = time.monotonic()
        while len(pings) < 6:
            message, pid = receive(sock, 10)
            assert (message, pid) == ("WATCHDOG=1", node.proc.pid)
            pings.append(time.monotonic())
        # Half of the 1 s watchdog: six pings take about 2.5 s; never more than the
        # watchdog itself apart on average, or systemd would have restarted the HKD.
        assert (pings[-1] - started) / len(pings) < 1.0

        hkd_pid = node.proc.pid
        node.signal(15)
        while (message := receive(sock, 30))[0] == "WATCHDOG=1":
            pass
        assert message == ("STOPPING=1", hkd_pid)
        assert node.wait() == 0


def test_an_abstract_address_and_no_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"qvd-test-notify-{secrets.token_hex(4)}"
    with receiver(b"\0" + name.encode()) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        monkeypatch.setenv("WATCHDOG_USEC", "4000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        notifier = Notifier.from_environment()
        assert "NOTIFY_SOCKET" not in os.environ  # children of the HKD do not inherit it
        notifier.send("READY=1")
        assert receive(sock, 5) == ("READY=1", os.getpid())
        assert 0 < notifier.ping_due() <= 2.0  # the first ping now, the next in half of 4 s
        assert receive(sock, 5) == ("WATCHDOG=1", os.getpid())

    # Another process's watchdog (WATCHDOG_PID) and no socket: nothing to do, no error.
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    quiet = Notifier.from_environment()
    quiet.send("READY=1")
    assert quiet.ping_due() == float("inf")
