"""The qvdfs program end to end: real mounts, real daemons, real umount.

Two programs are run as subprocesses:

- ``.venv/bin/qvdfs``, the real entry point with the real union, for the node's command
  line, the life cycle and every check that happens before the filesystem is built.
- this module run as a script (``STANDIN``): the same ``qvdfs.daemon.run`` serving a tiny
  stand-in filesystem (an empty root directory) that can be told to fail, for the error paths
  and for checking that ``destroy()`` is called. It is never part of the shipped program.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qvdfs import daemon
from qvdfs.config import MountConfig, MountError
from qvdfs.fuse.filesystem import ROOT_ID, Attr, Context, Entry, Notifier, Opened
from qvdproc import processes
from qvdproc.mountinfo import Mount, is_mounted, read_mounts
from tests.support import REPO
from tests.support.mounts import DEAD_MOUNT_ERRNOS, NODE_OPTIONS, node_branches

VENV_BIN = Path(sys.executable).parent
QVDFS = str(VENV_BIN / "qvdfs")
STANDIN = [sys.executable, str(Path(__file__).resolve())]
STANDIN_ENV = {**os.environ, "PYTHONPATH": str(REPO)}
ENTRY = [QVDFS]
STANDIN_ROOT_MODE = 0o711  # unusual on purpose: a stat showing it proves the stand-in answers


class StandinFilesystem:
    """An empty root directory (a ``qvdfs.fuse.Filesystem``). Looking up ``crash`` raises, as
    a handler bug would.

    Environment knobs: QVDFS_STANDIN_FAIL_ROOT=1 makes every getattr raise (the mount never
    answers its first request); QVDFS_STANDIN_DESTROY_MARK=FILE makes ``destroy`` write FILE
    (after writing "destroying" and sleeping QVDFS_STANDIN_DESTROY_DELAY seconds, if set);
    QVDFS_STANDIN_MAX_READ=N mounts with max_read=N behind the parser's back.
    """

    def __init__(self, config: MountConfig) -> None:
        self.config = config
        max_read = os.environ.get("QVDFS_STANDIN_MAX_READ")
        if max_read:
            config.fuse_options.max_read = int(max_read)

    def init(self, features: frozenset[str], notifier: Notifier) -> None:
        pass

    def getattr(self, node_id: int, fh: int | None, ctx: Context) -> tuple[Attr, float]:
        if os.environ.get("QVDFS_STANDIN_FAIL_ROOT"):
            raise RuntimeError("stand-in getattr fails on purpose")
        if node_id != ROOT_ID:
            raise OSError(errno.ENOENT, "no such node")
        now = time.time_ns()
        return Attr(ROOT_ID, stat.S_IFDIR | STANDIN_ROOT_MODE, 2, 0, 0, 0, 0, 0, 4096,
                    now, now, now), 1.0

    def lookup(self, parent: int, name: bytes, ctx: Context) -> Entry:
        if name == b"crash":
            raise RuntimeError("stand-in lookup crashes on purpose")
        raise OSError(errno.ENOENT, "no such entry")

    def opendir(self, node_id: int, flags: int, ctx: Context) -> Opened:
        return Opened(0)

    def readdirplus(self, node_id: int, fh: int, offset: int, add: object) -> None:
        return None

    def readdir(self, node_id: int, fh: int, offset: int, add: object) -> None:
        return None

    def releasedir(self, node_id: int, fh: int) -> None:
        return None

    def destroy(self) -> None:
        mark = os.environ.get("QVDFS_STANDIN_DESTROY_MARK")
        delay = float(os.environ.get("QVDFS_STANDIN_DESTROY_DELAY", "0"))
        if mark and delay:
            Path(mark).write_text("destroying\n")
            time.sleep(delay)
        if mark:
            Path(mark).write_text("destroyed\n")


# --- helpers ---------------------------------------------------------------------------------


def mount_entry(path: Path) -> Mount:
    """The mount on ``path`` (the topmost one)."""
    found = [m for m in read_mounts() if m.mount_point == os.path.realpath(path)]
    assert found, f"{path} is not mounted"
    return found[-1]


def daemon_pids(mountpoint: Path) -> list[int]:
    """Live processes running qvdfs or the stand-in with ``mountpoint`` in argv."""
    return [p.pid for p in processes.with_argument(mountpoint)
            if p.pid != os.getpid() and processes.alive(p.pid)
            and any(b"qvdfs" in a or b"test_daemon" in a for a in p.argv[:2])]


def umount_and_wait(mnt: Path) -> None:
    """``umount`` as the node does; assert that the daemon serving ``mnt`` then exits."""
    pids = daemon_pids(mnt)
    subprocess.run(["umount", str(mnt)], check=True, timeout=30)
    assert processes.wait_gone(pids, timeout=15), f"daemon {pids} still running after umount"


def wait_unmounted(path: Path, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_mounted(path):
            return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def cleanup(mountpoint: Path) -> Iterator[None]:
    """Whatever a test leaves behind on ``mountpoint``: unmount it and kill its daemons."""
    try:
        yield
    finally:
        for cmd in (["umount", str(mountpoint)], ["umount", "-l", str(mountpoint)]):
            if is_mounted(mountpoint):
                subprocess.run(cmd, capture_output=True, timeout=30)
        for pid in daemon_pids(mountpoint):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def dirs(dirs: dict[str, Path]) -> dict[str, Path]:
    """The node's layout in miniature: a base with a file, an empty upper and mountpoint."""
    (dirs["base"] / "hello").write_text("from base\n")
    return dirs


def node_argv(d: dict[str, Path]) -> list[str]:
    return [*NODE_OPTIONS, node_branches(d), str(d["mnt"])]


def run_entry(command: list[str], argv: list[str], **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run([*command, *argv], capture_output=True, text=True, timeout=60,
                          env=kwargs.pop("env", STANDIN_ENV), **kwargs)  # type: ignore[arg-type]


def errors(stderr: str) -> list[str]:
    """The lines of ``stderr`` that are not warnings (max_files=32000 warns on this machine)."""
    return [line for line in stderr.splitlines() if not line.startswith("qvdfs: warning: ")]


def assert_one_line_failure(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0
    lines = errors(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("qvdfs: ")
    for word in words:
        assert word in lines[0]


# --- the node's life cycle -------------------------------------------------------------------


def test_node_command_line_mounts_and_umount_ends_daemon(dirs: dict[str, Path]) -> None:
    mnt = dirs["mnt"]
    with cleanup(mnt):
        result = run_entry(ENTRY, node_argv(dirs))
        assert result.returncode == 0, result.stderr
        # Exit 0 means mounted and serving: the very next request is answered.
        assert is_mounted(mnt)
        os.stat(mnt)
        mount = mount_entry(mnt)
        assert (mount.fs_type, mount.source) == ("fuse.qvdfs", "qvdfs")
        assert "nosuid" not in mount.options and "nodev" not in mount.options
        assert {"allow_other", "default_permissions"} <= set(mount.super_options)
        assert (mnt / "hello").read_text() == "from base\n"
        pids = daemon_pids(mnt)
        assert len(pids) == 1, pids
        # The daemon detached: its own session, cwd /, no terminal, umask 0 (the filesystem
        # applies the modes its callers ask for).
        assert os.getsid(pids[0]) == pids[0]
        assert os.readlink(f"/proc/{pids[0]}/cwd") == "/"
        assert [os.readlink(f"/proc/{pids[0]}/fd/{fd}") for fd in (0, 1, 2)] == ["/dev/null"] * 3
        assert processes.status(pids[0])["Umask"] == "0000"

        umount_and_wait(mnt)
        assert not is_mounted(mnt)


def test_mount_widens_the_read_ahead_window(dirs: dict[str, Path]) -> None:
    mnt = dirs["mnt"]
    with cleanup(mnt):
        assert run_entry(ENTRY, node_argv(dirs)).returncode == 0
        device = mount_entry(mnt).device
        window = Path(f"/sys/class/bdi/{device}/read_ahead_kb").read_text()
        assert int(window) == daemon.READ_AHEAD_KIB
        umount_and_wait(mnt)


def test_graft_serves_home_from_its_own_branch(dirs: dict[str, Path], tmp_path: Path) -> None:
    home, mnt = tmp_path / "homefs", dirs["mnt"]
    home.mkdir()
    (home / "notes").write_text("mine\n")
    argv = [*NODE_OPTIONS, f"{dirs['upper']}=RW:{dirs['base']}=RO:{home}=RW@/home", str(mnt)]
    with cleanup(mnt):
        assert run_entry(ENTRY, argv).returncode == 0
        assert (mnt / "home" / "notes").read_text() == "mine\n"
        (mnt / "home" / "new").write_text("x")
        assert (home / "new").read_text() == "x"
        assert not (dirs["upper"] / "home" / "new").exists()
        umount_and_wait(mnt)


def test_relative_paths_survive_chdir_to_root(dirs: dict[str, Path], tmp_path: Path) -> None:
    mnt = dirs["mnt"]
    with cleanup(mnt):
        result = run_entry(ENTRY, ["upper=RW:./base", "mnt"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert (mnt / "hello").read_text() == "from base\n"
        umount_and_wait(mnt)


def test_read_only_union_warns_and_mounts(dirs: dict[str, Path]) -> None:
    mnt = dirs["mnt"]
    with cleanup(mnt):
        result = run_entry(ENTRY, [f"{dirs['base']}=RO", str(mnt)])
        assert result.returncode == 0
        assert result.stderr == f"qvdfs: warning: no writable branch in '{dirs['base']}=RO': " \
                                "the union is read-only\n"
        with pytest.raises(OSError) as refused:
            (mnt / "new").write_text("x")
        assert refused.value.errno == errno.EROFS
        umount_and_wait(mnt)


def test_debug_flag_logs_fuse_requests_in_foreground(dirs: dict[str, Path]) -> None:
    mnt = dirs["mnt"]
    with cleanup(mnt):
        proc = subprocess.Popen([*ENTRY, "-d", f"{dirs['upper']}=RW:{dirs['base']}", str(mnt)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while not is_mounted(mnt):
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.05)
            os.listdir(mnt)
            subprocess.run(["umount", str(mnt)], check=True, timeout=30)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0
        assert "qvdfs: debug: mounting with MountConfig(" in err
        assert "qvdfs: debug: FUSE INIT: kernel 7." in err
        assert "qvdfs: debug: FUSE READDIRPLUS node 1" in err  # every request, with -d


def test_fusermount_u_ends_daemon(dirs: dict[str, Path]) -> None:
    mnt = dirs["mnt"]
    with cleanup(mnt):
        assert run_entry(ENTRY, node_argv(dirs)).returncode == 0
        pids = daemon_pids(mnt)
        assert pids
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True, timeout=30)
        assert processes.wait_gone(pids, timeout=15)
        assert not is_mounted(mnt)


def wait_logged(proc: subprocess.Popen, log_file: Path, text: str, timeout: float = 30) -> None:
    """Wait until ``text`` appears in ``log_file``, failing early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while text not in (log_file.read_text() if log_file.exists() else ""):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{text!r} never logged"
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["umount", "SIGTERM", "SIGINT"])
def test_foreground_exits_0_after_umount_or_signal(dirs: dict[str, Path], tmp_path: Path,
                                                   how: str) -> None:
    mnt, log_file = dirs["mnt"], tmp_path / "qvdfs.log"
    with cleanup(mnt):
        proc = subprocess.Popen([*ENTRY, "-f", "-o", f"debug_file={log_file}", *node_argv(dirs)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_logged(proc, log_file, f"serving {mnt}")
            assert (mnt / "hello").read_text() == "from base\n"
            if how == "umount":
                subprocess.run(["umount", str(mnt)], check=True, timeout=30)
            else:
                proc.send_signal(getattr(signal, how))
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        assert not is_mounted(mnt)
        assert f"unmounted {mnt}" in log_file.read_text()


def test_foreground_umount_racing_the_start_still_exits_0(dirs: dict[str, Path]) -> None:
    """An umount as soon as the mount shows up, maybe before the daemon's own first request."""
    mnt = dirs["mnt"]
    with cleanup(mnt):
        proc = subprocess.Popen([*ENTRY, "-f", *node_argv(dirs)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while not is_mounted(mnt):
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.001)
            subprocess.run(["umount", str(mnt)], check=True, timeout=30)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        assert not is_mounted(mnt)


def test_second_signal_during_shutdown_does_not_kill(dirs: dict[str, Path],
                                                     tmp_path: Path) -> None:
    mnt, mark = dirs["mnt"], tmp_path / "destroyed"
    env = {**STANDIN_ENV, "QVDFS_STANDIN_DESTROY_MARK": str(mark),
           "QVDFS_STANDIN_DESTROY_DELAY": "1"}
    with cleanup(mnt):
        proc = subprocess.Popen([*STANDIN, "-f", *node_argv(dirs)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while not is_mounted(mnt):
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            while not mark.exists():  # now inside destroy(), the shutdown under way
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        assert mark.read_text() == "destroyed\n"
        assert wait_unmounted(mnt)


def test_sigterm_unmounts_daemon(dirs: dict[str, Path]) -> None:
    mnt = dirs["mnt"]
    with cleanup(mnt):
        assert run_entry(ENTRY, node_argv(dirs)).returncode == 0
        pids = daemon_pids(mnt)
        assert len(pids) == 1
        os.kill(pids[0], signal.SIGTERM)
        assert processes.wait_gone(pids, timeout=15)
        assert wait_unmounted(mnt)


def test_debug_file_gets_the_log_and_destroy_is_called(dirs: dict[str, Path],
                                                       tmp_path: Path) -> None:
    mnt, log_file, mark = dirs["mnt"], tmp_path / "qvdfs.log", tmp_path / "destroyed"
    env = {**STANDIN_ENV, "QVDFS_STANDIN_DESTROY_MARK": str(mark)}
    with cleanup(mnt):
        result = run_entry(STANDIN, ["-o", f"debug_file={log_file}", *node_argv(dirs)], env=env)
        assert result.returncode == 0, result.stderr
        assert errors(result.stderr) == []
        assert stat.S_IMODE(os.stat(mnt).st_mode) == STANDIN_ROOT_MODE
        assert not mark.exists()
        umount_and_wait(mnt)
    assert mark.read_text() == "destroyed\n"
    text = log_file.read_text()
    assert f"serving {mnt}" in text
    assert f"unmounted {mnt}" in text


@pytest.mark.parametrize(("option", "expect"), [
    # The kernel only knows allow_other; libfuse itself turns away users other than root.
    ("allow_root", lambda m: "allow_other" in m.super_options),
    ("nosuid,nodev", lambda m: {"nosuid", "nodev"} <= set(m.options)),
    ("fsname=base7,subtype=union", lambda m: (m.fs_type, m.source) == ("fuse.union", "base7")),
    ("relaxed_permissions", lambda m: "default_permissions" not in m.super_options),
    ("nonempty,use_ino,kernel_cache,big_writes,async_read,auto_cache,max_read=65536,"
     "direct_io,noinitgroups,preserve_branch", lambda m: True),
])
def test_options_reach_the_kernel(dirs: dict[str, Path], option: str, expect: object) -> None:
    mnt = dirs["mnt"]
    (dirs["mnt"] / "old").write_text("")  # a non-empty mountpoint is fine, as with nonempty
    with cleanup(mnt):
        result = run_entry(ENTRY, ["-o", option, f"{dirs['upper']}=RW:{dirs['base']}", str(mnt)])
        assert result.returncode == 0, result.stderr
        assert expect(mount_entry(mnt))  # type: ignore[operator]
        os.stat(mnt)
        umount_and_wait(mnt)


def test_session_refused_at_init_leaves_nothing_mounted(dirs: dict[str, Path]) -> None:
    """libfuse ends the session while answering the kernel's INIT: exit 1, nothing mounted.

    On the pyfuse3 backend, where libfuse 3 refuses max_read unless init() repeats it, which
    pyfuse3 cannot do.
    """
    mnt = dirs["mnt"]
    env = {**STANDIN_ENV, "QVDFS_STANDIN_MAX_READ": "65536"}
    with cleanup(mnt):
        result = run_entry(STANDIN, ["-o", "backend=pyfuse3",
                                     f"{dirs['upper']}=RW:{dirs['base']}", str(mnt)], env=env)
        assert result.returncode == 1
        # Which comes first is a race: the loop ending, or the refused readiness check.
        assert errors(result.stderr) in (
            ["qvdfs: the FUSE session ended before the mount answered"],
            ["qvdfs: the mount refused its first request (Connection refused)"])
        assert not is_mounted(mnt)
        assert processes.wait_gone(daemon_pids(mnt), timeout=15)


# --- failures: one line on stderr, non-zero, nothing mounted ---------------------------------


def test_missing_branch(dirs: dict[str, Path]) -> None:
    missing = dirs["base"].parent / "nope"
    result = run_entry([QVDFS], [*NODE_OPTIONS, f"{dirs['upper']}=RW:{missing}=RO",
                                 str(dirs["mnt"])])
    assert_one_line_failure(result, str(missing), "does not exist")
    assert not is_mounted(dirs["mnt"])


def test_branch_not_a_directory(dirs: dict[str, Path]) -> None:
    file_branch = dirs["base"] / "hello"
    result = run_entry([QVDFS], [f"{dirs['upper']}=RW:{file_branch}", str(dirs["mnt"])])
    assert_one_line_failure(result, str(file_branch), "not a directory")
    assert not is_mounted(dirs["mnt"])


def test_mountpoint_missing_or_not_a_directory(dirs: dict[str, Path]) -> None:
    branches = f"{dirs['upper']}=RW:{dirs['base']}=RO"
    missing = dirs["mnt"] / "nope"
    assert_one_line_failure(run_entry([QVDFS], [branches, str(missing)]), "does not exist")
    a_file = dirs["base"] / "hello"
    assert_one_line_failure(run_entry([QVDFS], [branches, str(a_file)]), "not a directory")
    assert not is_mounted(a_file)


def test_mountpoint_busy(dirs: dict[str, Path]) -> None:
    mnt = dirs["mnt"]
    with cleanup(mnt):
        subprocess.run(["mount", "-t", "tmpfs", "qvdfs-test", str(mnt)], check=True, timeout=30)
        before = mount_entry(mnt)
        result = run_entry([QVDFS], node_argv(dirs))
        assert_one_line_failure(result, "busy")
        assert mount_entry(mnt) == before  # nothing stacked on top
        subprocess.run(["umount", str(mnt)], check=True, timeout=30)
    assert not is_mounted(mnt)


def test_dead_mount_of_a_killed_daemon_is_busy(dirs: dict[str, Path]) -> None:
    """A daemon killed outright leaves a dead mount (its requests fail); a new start must say busy."""
    mnt = dirs["mnt"]
    with cleanup(mnt):
        assert run_entry(STANDIN, node_argv(dirs)).returncode == 0
        pids = daemon_pids(mnt)
        os.kill(pids[0], signal.SIGKILL)
        assert processes.wait_gone(pids, timeout=15)
        with pytest.raises(OSError) as dead:
            os.listdir(mnt)  # a stat could be answered from the kernel's attribute cache
        assert dead.value.errno in DEAD_MOUNT_ERRNOS
        assert_one_line_failure(run_entry([QVDFS], node_argv(dirs)), "busy")
        subprocess.run(["umount", str(mnt)], check=True, timeout=30)
    assert not is_mounted(mnt)


def test_branch_inside_mountpoint_is_refused(dirs: dict[str, Path]) -> None:
    inner = dirs["mnt"] / "inner"
    inner.mkdir()
    result = run_entry([QVDFS], [f"{inner}=RW:{dirs['base']}", str(dirs["mnt"])])
    assert_one_line_failure(result, "inside the mountpoint")
    assert not is_mounted(dirs["mnt"])


def test_bad_command_line_is_one_line(dirs: dict[str, Path]) -> None:
    result = run_entry([QVDFS], ["-o", "frobnicate", f"{dirs['base']}", str(dirs["mnt"])])
    assert_one_line_failure(result, "unknown option 'frobnicate'")
    result = run_entry([QVDFS], [f"{dirs['upper']}=RX", str(dirs["mnt"])])
    assert_one_line_failure(result, "bad mode 'RX'")


def test_unopenable_debug_file(dirs: dict[str, Path]) -> None:
    log_file = dirs["base"] / "no-such-dir" / "qvdfs.log"
    result = run_entry([QVDFS], ["-o", f"debug_file={log_file}", str(dirs["base"]),
                                 str(dirs["mnt"])])
    assert_one_line_failure(result, "cannot open debug_file", str(log_file))
    assert not is_mounted(dirs["mnt"])


def test_version_and_help() -> None:
    result = run_entry([QVDFS], ["--version"])
    assert result.returncode == 0
    assert result.stdout == f"qvdfs {__import__('qvdfs').__version__} (unionfs-fuse compatible)\n"
    result = run_entry([QVDFS], ["-h"])
    assert result.returncode == 0 and "usage: qvdfs" in result.stdout


def test_check_fuse_device_on_fake_paths(tmp_path: Path) -> None:
    # Removing the real /dev/fuse is not safe on a shared machine; the check takes its path.
    with pytest.raises(MountError, match="is missing"):
        daemon.check_fuse_device(str(tmp_path / "fuse"))
    (tmp_path / "regular").write_text("")
    with pytest.raises(MountError, match="not a character device"):
        daemon.check_fuse_device(str(tmp_path / "regular"))
    daemon.check_fuse_device("/dev/fuse")  # the real one passes


def test_daemon_failing_before_ready_reports_through_parent(dirs: dict[str, Path],
                                                            tmp_path: Path) -> None:
    """The mount never answers: the first process exits 1 with the daemon's reason, unmounted."""
    mnt, log_file = dirs["mnt"], tmp_path / "qvdfs.log"
    env = {**STANDIN_ENV, "QVDFS_STANDIN_FAIL_ROOT": "1"}
    with cleanup(mnt):
        result = run_entry(STANDIN, ["-o", f"debug_file={log_file}", *node_argv(dirs)], env=env)
        # The bug answers the first request with EIO, which fails the start.
        assert_one_line_failure(result, "the mount refused its first request (Input/output error)")
        assert not is_mounted(mnt)
        assert processes.wait_gone(daemon_pids(mnt), timeout=15)
    text = log_file.read_text()
    assert "Traceback" in text and "getattr fails on purpose" in text


def test_handler_crash_answers_eio_logs_traceback_and_the_mount_survives(
        dirs: dict[str, Path], tmp_path: Path) -> None:
    """A bug in a handler costs that one request, never the mount."""
    mnt, log_file = dirs["mnt"], tmp_path / "qvdfs.log"
    with cleanup(mnt):
        result = run_entry(STANDIN, ["-o", f"debug_file={log_file}", *node_argv(dirs)],
                           env=STANDIN_ENV)
        assert result.returncode == 0, result.stderr
        with pytest.raises(OSError) as info:
            os.stat(mnt / "crash")
        assert info.value.errno == errno.EIO
        assert stat.S_IMODE(os.stat(mnt).st_mode) == STANDIN_ROOT_MODE  # still answering
        umount_and_wait(mnt)
    text = log_file.read_text()
    assert "Traceback" in text and "stand-in lookup crashes on purpose" in text


# --- max_files -------------------------------------------------------------------------------


def _limit_nofile(soft: int, hard: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _daemon_nofile(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc/PID/limits")


def test_max_files_above_hard_limit_warns_and_mounts(dirs: dict[str, Path]) -> None:
    mnt = dirs["mnt"]
    with cleanup(mnt):
        result = run_entry(ENTRY, node_argv(dirs), preexec_fn=lambda: _limit_nofile(1024, 20000))
        assert result.returncode == 0, result.stderr
        assert result.stderr.splitlines() == [
            "qvdfs: warning: max_files=32000 exceeds the hard limit 20000; using 20000"]
        pids = daemon_pids(mnt)
        assert _daemon_nofile(pids[0]) == (20000, 20000)
        umount_and_wait(mnt)


def test_max_files_below_hard_limit_is_silent(dirs: dict[str, Path]) -> None:
    mnt = dirs["mnt"]
    argv = ["-o", "max_files=4096", f"{dirs['upper']}=RW:{dirs['base']}", str(mnt)]
    with cleanup(mnt):
        result = run_entry(ENTRY, argv, preexec_fn=lambda: _limit_nofile(1024, 20000))
        assert result.returncode == 0 and result.stderr == ""
        pids = daemon_pids(mnt)
        assert _daemon_nofile(pids[0]) == (4096, 20000)
        umount_and_wait(mnt)


if __name__ == "__main__":
    # The stand-in program: qvdfs's daemon code serving StandinFilesystem.
    sys.exit(daemon.run(sys.argv[1:], make_filesystem=StandinFilesystem))
