"""``qvdfs parent``: mounts forked from one prepared parent keep the drop-in contract.

Real parents on private sockets (``QVDFS_PARENT_SOCKET``), real mounts. The drop-in tests of
``test_daemon`` run again here with a parent serving, and each checks that the parent did
fork for it (its log names the command), so none can pass by mounting on its own.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qvdctl import mounting
from qvdfs import PARENT_SOCKET_ENV
from qvdproc import processes
from qvdproc.mountinfo import is_mounted
from tests.qvdfs import test_daemon as drop_in
from tests.qvdfs.test_daemon import QVDFS, cleanup, daemon_pids, dirs, node_argv  # noqa: F401
from tests.support.mounts import DEAD_MOUNT_ERRNOS

START_TIMEOUT = 30.0


class Parent:
    """A running ``qvdfs parent`` and the log it writes."""

    def __init__(self, sock: Path, log: Path) -> None:
        self.socket, self.log = sock, log
        self.proc = subprocess.Popen([QVDFS, "parent", "--socket", str(sock)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=log.open("w"))
        deadline = time.monotonic() + START_TIMEOUT
        while not sock.exists():
            assert self.proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the parent did not listen"
            time.sleep(0.01)

    def forks(self) -> int:
        return self.log.read_text().count(" mounts for the command ")

    def env(self) -> dict[str, str]:
        return {**os.environ, PARENT_SOCKET_ENV: str(self.socket)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def world_tmp() -> Iterator[Path]:
    """A folder every user may pass through (pytest's are 0700), for the uid checks."""
    folder = Path(tempfile.mkdtemp(prefix="qvdfs-parent-"))
    folder.chmod(0o711)
    try:
        yield folder
    finally:
        subprocess.run(["rm", "-rf", str(folder)], timeout=30)


@pytest.fixture
def parent(world_tmp: Path) -> Iterator[Parent]:
    p = Parent(world_tmp / "run" / "parent.sock", world_tmp / "parent.log")
    try:
        yield p
    finally:
        p.stop()


def run_qvdfs(parent: Parent, argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([QVDFS, *argv], capture_output=True, text=True, timeout=60,
                          env=parent.env())


DROP_IN: list[Callable[[dict[str, Path]], None]] = [
    drop_in.test_node_command_line_mounts_and_umount_ends_daemon,
    drop_in.test_relative_paths_survive_chdir_to_root,
    drop_in.test_mountpoint_busy,
    drop_in.test_missing_branch,
    drop_in.test_branch_not_a_directory,
    drop_in.test_mountpoint_missing_or_not_a_directory,
    drop_in.test_branch_inside_mountpoint_is_refused,
    drop_in.test_bad_command_line_is_one_line,
    drop_in.test_read_only_union_warns_and_mounts,
    # The command's own limits, not the parent's.
    drop_in.test_max_files_above_hard_limit_warns_and_mounts,
    drop_in.test_max_files_below_hard_limit_is_silent,
]


@pytest.mark.parametrize("case", DROP_IN, ids=[c.__name__[5:] for c in DROP_IN])
def test_drop_in_contract_holds_through_the_parent(
        case: Callable[..., None], parent: Parent, dirs: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(drop_in.STANDIN_ENV, PARENT_SOCKET_ENV, str(parent.socket))
    arguments = {"dirs": dirs, "tmp_path": tmp_path}
    case(**{name: arguments[name] for name in case.__code__.co_varnames[
        :case.__code__.co_argcount]})
    assert parent.forks() >= 1, parent.log.read_text()
    assert parent.proc.poll() is None


def test_mount_is_a_child_named_by_its_command_line(parent: Parent,
                                                    dirs: dict[str, Path]) -> None:
    mnt = dirs["mnt"]
    with cleanup(mnt):
        argv = node_argv(dirs)
        done = run_qvdfs(parent, argv)
        assert done.returncode == 0, done.stderr
        assert parent.forks() == 1
        (daemon,) = daemon_pids(mnt)
        # The caller's command line, word for word, and not the parent's own process.
        with open(f"/proc/{daemon}/cmdline", "rb") as f:
            assert f.read().split(b"\0")[:-1] == [os.fsencode(w) for w in [QVDFS, *argv]]
        assert daemon != parent.proc.pid and processes.parent(daemon) != parent.proc.pid
        # qvdctl's stop finds it as a root's daemon, and its umount ends it.
        found = mounting._fuse_mount(str(mnt))
        assert found is not None and found[1] == [daemon]
        mounting.unmount_tree(mnt)
        assert processes.wait_gone([daemon], timeout=15)
        assert parent.proc.poll() is None


def test_a_killed_root_takes_no_other_down(parent: Parent, tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "hello").write_text("from base\n")
    mounts = []
    for i in range(3):
        (tmp_path / f"upper{i}").mkdir()
        (tmp_path / f"mnt{i}").mkdir()
        mounts.append(tmp_path / f"mnt{i}")
    with contextlib.ExitStack() as stack:
        for i, mnt in enumerate(mounts):
            stack.enter_context(cleanup(mnt))
            done = run_qvdfs(parent, ["-o", "cow,allow_other",
                                      f"{tmp_path / f'upper{i}'}=RW:{base}=RO", str(mnt)])
            assert done.returncode == 0, done.stderr
        victim = daemon_pids(mounts[0])[0]
        os.kill(victim, signal.SIGKILL)
        assert processes.wait_gone([victim], timeout=15)
        with pytest.raises(OSError) as dead:
            os.listdir(mounts[0])
        assert dead.value.errno in DEAD_MOUNT_ERRNOS
        for mnt in mounts[1:]:
            assert (mnt / "hello").read_text() == "from base\n"
            (mnt / "new").write_text("still serving\n")
        assert parent.proc.poll() is None
        # The parent still forks new mounts after one of its roots died.
        subprocess.run(["umount", str(mounts[0])], check=True, timeout=30)
        done = run_qvdfs(parent, ["-o", "cow", f"{tmp_path / 'upper0'}=RW:{base}=RO",
                                  str(mounts[0])])
        assert done.returncode == 0, done.stderr
        assert (mounts[0] / "hello").read_text() == "from base\n"
        assert parent.forks() == 4


NOBODY_CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print("connect", exc.errno)
    raise SystemExit
try:  # the parent may have refused and closed already: its answer is still there to read
    socket.send_fds(s, [b"/q\\0qvdfs\\0-o\\0cow\\0/tmp=RW\\0/mnt"], [0, 1, 2, 0, 0, 0])
except OSError:
    pass
print("reply", s.recv(4096).decode())
"""


def as_nobody(sock: Path) -> str:
    return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                           "/usr/bin/python3", "-c", NOBODY_CONNECT, str(sock)],
                          capture_output=True, text=True, timeout=30, check=True).stdout.strip()


def test_only_root_reaches_the_parent(parent: Parent) -> None:
    # The socket is root's alone...
    assert as_nobody(parent.socket) == f"connect {errno.EACCES}"
    # ...and with its modes opened up, the parent itself still refuses a peer that is not
    # root, before it forks anything.
    parent.socket.parent.chmod(0o755)
    parent.socket.chmod(0o666)
    assert as_nobody(parent.socket) == "reply error the qvdfs parent serves root only"
    assert parent.forks() == 0
    assert parent.proc.poll() is None


def test_without_a_parent_the_command_mounts_by_itself(dirs: dict[str, Path],
                                                       world_tmp: Path) -> None:
    mnt = dirs["mnt"]
    stale = world_tmp / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.bind(str(stale))  # a socket file nobody listens on: a parent that died
    for path in (str(world_tmp / "missing.sock"), str(stale), ""):
        with cleanup(mnt):
            done = subprocess.run([QVDFS, *node_argv(dirs)], capture_output=True, text=True,
                                  timeout=60, env={**os.environ, PARENT_SOCKET_ENV: path})
            assert done.returncode == 0, done.stderr
            assert (mnt / "hello").read_text() == "from base\n"
            drop_in.umount_and_wait(mnt)


def test_foreground_and_help_run_in_the_callers_process(parent: Parent,
                                                        dirs: dict[str, Path]) -> None:
    done = run_qvdfs(parent, ["--version"])
    assert done.returncode == 0 and done.stdout.startswith("qvdfs ")
    mnt = dirs["mnt"]
    with cleanup(mnt):
        proc = subprocess.Popen([QVDFS, "-f", *node_argv(dirs)], env=parent.env(),
                                stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not is_mounted(mnt):
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
            # Serving in the process the caller started, so its signals and exit are its own.
            assert daemon_pids(mnt) == [proc.pid]
            subprocess.run(["umount", str(mnt)], check=True, timeout=30)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert parent.forks() == 2  # both asked, and both were handed back


def test_a_command_of_another_installation_mounts_by_itself(parent: Parent) -> None:
    """A checkout's command must run its own code, not the parent's installation's."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(str(parent.socket))
        socket.send_fds(s, [b"/elsewhere/qvdfs\0qvdfs\0--version"], [0, 1, 2, 0, 0, 0])
        assert s.recv(4096) == b"local"
    assert parent.forks() == 0
    assert "handed back a command of /elsewhere/qvdfs" in parent.log.read_text()


def test_stopping_the_parent_leaves_its_mounts_serving(parent: Parent,
                                                       dirs: dict[str, Path]) -> None:
    mnt = dirs["mnt"]
    with cleanup(mnt):
        assert run_qvdfs(parent, node_argv(dirs)).returncode == 0
        parent.stop()
        assert parent.proc.returncode == 0
        assert not parent.socket.exists()
        assert (mnt / "hello").read_text() == "from base\n"
        drop_in.umount_and_wait(mnt)


def test_a_command_waiting_at_a_stop_is_handed_back(parent: Parent) -> None:
    """A stop answers every command it has accepted: those not yet forked mount by
    themselves."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(str(parent.socket))
        time.sleep(0.3)  # accepted, its request not sent yet
        parent.stop()
        assert parent.proc.returncode == 0
        assert s.recv(4096) == b"local"
    assert parent.forks() == 0


def test_a_second_parent_on_the_same_socket_is_refused(parent: Parent) -> None:
    done = subprocess.run([QVDFS, "parent", "--socket", str(parent.socket)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == f"qvdfs: a parent already serves {parent.socket}"
    assert parent.proc.poll() is None
