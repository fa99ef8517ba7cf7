"""qvdproc.processes on the real process table: argv, states, zombies, and processes that end
while the table is read."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qvdproc import processes as procs

SLEEP = "import time; time.sleep(60)"


@pytest.fixture
def sleeper():
    """Start a child with the given argv (``sleep 60`` without); killed and reaped on the way out."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*argv: str) -> subprocess.Popen[bytes]:
        argv = argv or ("sleep", "60")
        child = subprocess.Popen(list(argv))
        started.append(child)
        # Until the child has exec'd, its command line is its parent's (or empty, mid-exec).
        deadline = time.monotonic() + 10
        cmdline = Path(f"/proc/{child.pid}/cmdline")
        while not cmdline.read_bytes().startswith(os.fsencode(argv[0]) + b"\0"):
            assert time.monotonic() < deadline, f"child {child.pid} did not exec {argv[0]}"
            time.sleep(0.01)
        return child

    try:
        yield start
    finally:
        for child in started:
            child.kill()
            child.wait(timeout=10)


@pytest.mark.timeout(30)
def test_a_child_is_found_with_its_exact_argv(sleeper, tmp_path: Path) -> None:
    word = str(tmp_path / "mount point")
    child = sleeper(sys.executable, "-c", SLEEP, word, "")
    (found,) = [p for p in procs.processes() if p.pid == child.pid]
    # The empty last argument cannot be told from padding, and is dropped.
    assert found.argv == (os.fsencode(sys.executable), b"-c", SLEEP.encode(), os.fsencode(word))
    assert found.command_line == f"{sys.executable} -c {SLEEP} {word}"
    assert [p.pid for p in procs.with_argument(word)] == [child.pid]
    assert procs.with_argument(str(tmp_path)) == []  # a whole argument, not a substring


@pytest.mark.timeout(30)
def test_states_of_a_live_child_a_zombie_and_a_reaped_one(sleeper) -> None:
    child = sleeper()
    # Just after exec a child may still be paging its program in from disk ("D").
    assert procs.state(child.pid) in ("R", "S", "D") and procs.alive(child.pid)
    os.kill(child.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while procs.state(child.pid) != "Z":
        assert time.monotonic() < deadline, "the killed child never became a zombie"
        time.sleep(0.01)
    assert not procs.alive(child.pid)
    # A zombie has no command line, so a scan does not see it.
    assert child.pid not in [p.pid for p in procs.processes()]
    assert procs.wait_gone([child.pid], timeout=1)
    child.wait(timeout=10)
    assert procs.state(child.pid) is None
    assert (procs.status(child.pid), procs.cpu_ticks(child.pid)) == ({}, None)
    assert procs.open_files(child.pid) == []


@pytest.mark.timeout(30)
def test_processes_that_end_in_the_middle_of_a_scan_are_left_out(sleeper) -> None:
    children = [sleeper() for _ in range(20)]
    scan = procs.processes()
    first = next(scan)  # the pids are listed now; the victims are read later
    for child in children:
        child.kill()
        child.wait(timeout=10)
    rest = list(scan)
    victims = {c.pid for c in children}
    assert first.pid not in victims
    assert not victims & {p.pid for p in rest}
    assert os.getpid() in {p.pid for p in rest} | {first.pid}


def test_a_scan_skips_a_folder_whose_process_is_gone(tmp_path: Path) -> None:
    # A copy of /proc in which process 7 ended between the listing and the read.
    for pid, cmdline in ((5, b"init\0"), (7, None), (9, b"[lxc monitor] /var/lib/lxc qvd-1\0\0\0")):
        (tmp_path / str(pid)).mkdir()
        if cmdline is not None:
            (tmp_path / str(pid) / "cmdline").write_bytes(cmdline)
    (tmp_path / "self").mkdir()
    found = list(procs.processes(str(tmp_path)))
    assert [(p.pid, p.command_line) for p in found] == [
        (5, "init"), (9, "[lxc monitor] /var/lib/lxc qvd-1")]


def test_status_cpu_and_open_files_of_this_process() -> None:
    status = procs.status(os.getpid())
    assert status["Pid"] == str(os.getpid()) and status["VmRSS"].endswith("kB")
    ticks = procs.cpu_ticks(os.getpid())
    assert ticks is not None and ticks >= 0
    with open(sys.executable, "rb"):
        assert os.path.realpath(sys.executable) in procs.open_files(os.getpid())


def test_a_command_name_with_spaces_and_parentheses_keeps_the_state_right(tmp_path: Path) -> None:
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "stat").write_bytes(b"3 (a) b (c) S 1 3 3 0 -1 0 0 0 0 0 7 5 0 0\n")
    assert procs.state(3, str(tmp_path)) == "S"
    assert procs.cpu_ticks(3, str(tmp_path)) == 12


@contextlib.contextmanager
def _python_sleeper(*wrapper: str) -> Iterator[int]:
    """The pid of a Python sleeper started through ``wrapper`` (setpriv, unshare), once the
    wrapper has exec'd it; killed and reaped on the way out."""
    child = subprocess.Popen([*wrapper, sys.executable, "-c", SLEEP])
    try:
        python = os.fsencode(sys.executable) + b"\0"
        deadline = time.monotonic() + 10
        while not Path(f"/proc/{child.pid}/cmdline").read_bytes().startswith(python):
            assert time.monotonic() < deadline, f"{wrapper[0]} did not exec python"
            time.sleep(0.01)
        yield child.pid
    finally:
        child.kill()
        child.wait(timeout=10)


@pytest.mark.timeout(30)
def test_credentials_of_root_an_unprivileged_child_and_a_user_namespace() -> None:
    me = procs.credentials(os.getpid())
    assert me is not None and me.capable(4) and me.in_our_user_namespace  # CAP_FSETID
    with _python_sleeper("setpriv", "--reuid=1000", "--regid=1000", "--groups=27,100") as pid:
        creds = procs.credentials(pid)
    assert creds is not None and creds.effective == 0 and not creds.capable(4)
    assert creds.in_group(1000) and creds.in_group(27) and creds.in_group(100)
    assert not creds.in_group(0)
    # Root of a user namespace of its own holds every capability, but only over that
    # namespace's files.
    with _python_sleeper("unshare", "--user", "--map-root-user") as pid:
        inner = procs.credentials(pid)
    assert inner is not None and inner.effective >> 4 & 1 and not inner.capable(4)
    assert procs.credentials(2 ** 22 + 1) is None  # no such pid
