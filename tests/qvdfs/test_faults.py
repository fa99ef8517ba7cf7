"""Faults injected into a real qvdfs mount: SIGKILL mid-operation, and a full upper branch.

Each crash test runs the operation in a separate writer process, kills the daemon with
SIGKILL while the operation is under way, clears the dead FUSE mount, mounts the same
branches again and checks the union: every file is its old or its new version (never
partial), nothing deleted comes back, nothing kept is lost, and the leftovers in
``<upper>/.qvdfs.work`` are gone after the remount.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from qvdctl.container.query import monitors
from qvdproc import processes
from qvdproc.mountinfo import is_mounted, mounts_under
from tests.support.mounts import (
    NODE_OPTIONS,
    QVDFS,
    daemon_pids,
    force_unmount,
    node_branches,
    qvdfs_mount,
)
from tests.support.qvdctl import QVDCTL, Cli

if TYPE_CHECKING:
    from tools.sandbox import ScratchNode

WORK = ".qvdfs.work"
MiB = 1 << 20


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def killable_mount(d: dict[str, Path]) -> Iterator[list[int]]:
    """Mount qvdfs with the node's options; yield its daemon pids; clear it however it ended."""
    mnt = str(d["mnt"])
    subprocess.run([QVDFS, *NODE_OPTIONS, node_branches(d), mnt], check=True, timeout=30)
    pids = daemon_pids(mnt)
    assert pids, "no daemon found for the mount"
    try:
        yield pids
    finally:
        force_unmount(mnt)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _kill_daemon(pids: list[int], mnt: Path) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(processes.alive(p) for p in pids):
        assert time.monotonic() < deadline, "daemon survived SIGKILL"
        time.sleep(0.01)
    # A killed daemon leaves a dead FUSE mount (ENOTCONN); the lazy forms clear it.
    force_unmount(mnt)
    assert not is_mounted(mnt)


def _reap(proc: subprocess.Popen) -> None:
    """The writer's pending request fails once the daemon is gone; never leave it behind."""
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _work_entries(upper: Path) -> list[Path]:
    """What is being prepared in the work dir: the entries inside each mount's own folder
    (an empty folder is a live mount's, not a leftover)."""
    work = upper / WORK
    entries: list[Path] = []
    with contextlib.suppress(FileNotFoundError):
        for folder in work.iterdir():
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                entries.extend(folder.iterdir())
    return entries


def _largest_work_entry(upper: Path) -> int:
    """Size of the biggest file being prepared in the work dir (entries come and go)."""
    sizes = [0]
    for path in _work_entries(upper):
        with contextlib.suppress(FileNotFoundError):
            sizes.append(path.lstat().st_size)
    return max(sizes)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.0005)


def _big_file(path: Path, mib: int) -> str:
    """A file of ``mib`` MiB whose every MiB differs, so a partial or shifted copy shows."""
    h = hashlib.sha256()
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for i in range(mib):
            chunk = i.to_bytes(8, "little") + block[8:]
            f.write(chunk)
            h.update(chunk)
    return h.hexdigest()


_APPEND = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)
os.write(fd, b"NEW")
os.close(fd)
"""


@pytest.mark.timeout(300)
def test_sigkill_during_copy_up_of_a_large_file(dirs: dict[str, Path]) -> None:
    """Killed while copying 200 MiB up: after a remount the file is whole, old or new."""
    old = _big_file(dirs["base"] / "big", 200)
    (dirs["base"] / "small").write_bytes(b"keep")
    caught = 0
    for _attempt in range(5):
        with killable_mount(dirs) as pids:
            writer = subprocess.Popen([sys.executable, "-c", _APPEND, str(dirs["mnt"] / "big")],
                                      stderr=subprocess.DEVNULL)
            try:
                _wait_for(lambda: _work_entries(dirs["upper"]) or writer.poll() is not None,
                          60, "the copy-up to start")
                _kill_daemon(pids, dirs["mnt"])
            finally:
                _reap(writer)
        interrupted = not (dirs["upper"] / "big").exists()
        if interrupted:
            caught += 1
            assert _work_entries(dirs["upper"]), "the interrupted copy left nothing in the work dir"
        with qvdfs_mount(node_branches(dirs), dirs["mnt"], *NODE_OPTIONS) as mnt:
            assert _work_entries(dirs["upper"]) == [], "leftovers survive the remount"
            assert sorted(os.listdir(mnt)) == ["big", "small"]
            size = (mnt / "big").stat().st_size
            if interrupted:
                assert size == 200 * MiB and _sha(mnt / "big") == old
            else:
                # The copy finished: the new version is the old data, maybe plus the append.
                assert size in (200 * MiB, 200 * MiB + 3)
                with open(mnt / "big", "rb") as f:
                    f.seek(200 * MiB)
                    assert f.read() in (b"", b"NEW")
            assert (mnt / "small").read_bytes() == b"keep"
        assert _sha(dirs["base"] / "big") == old, "the base branch changed"
        if caught:
            break
        # The copy won the race: start again from a pristine upper.
        subprocess.run(["rm", "-rf", "--one-file-system", str(dirs["upper"])], check=True)
        dirs["upper"].mkdir()
    assert caught, "never managed to kill the daemon mid-copy"


_RENAME = """
import os, sys
os.rename(sys.argv[1], sys.argv[2])
"""


def _tree_of(root: Path) -> dict[str, str]:
    """Relative path -> sha256 (files) or 'dir', for the whole tree below ``root``."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames:
            out[os.path.relpath(os.path.join(dirpath, n), root)] = "dir"
        for n in filenames:
            p = Path(dirpath) / n
            out[os.path.relpath(p, root)] = _sha(p)
    return out


@pytest.mark.timeout(300)
def test_sigkill_during_rename_of_a_lower_directory(dirs: dict[str, Path]) -> None:
    """Renaming a base directory copies it up; killed mid-way it is whole at one name."""
    tree = dirs["base"] / "d"
    (tree / "sub").mkdir(parents=True)
    for i in range(200):
        (tree / f"f{i:03}").write_bytes(f"small {i}\n".encode())
    (tree / "sub" / "note").write_text("deep")
    _big_file(tree / "sub" / "zbig", 150)
    expected = _tree_of(tree)
    caught = 0
    for _attempt in range(5):
        with killable_mount(dirs) as pids:
            writer = subprocess.Popen(
                [sys.executable, "-c", _RENAME, str(dirs["mnt"] / "d"), str(dirs["mnt"] / "e")],
                stderr=subprocess.DEVNULL)
            try:
                # The big file's copy is the slow step: strike while it is in the work dir.
                _wait_for(lambda: _largest_work_entry(dirs["upper"]) > MiB
                          or writer.poll() is not None, 60, "the big copy to start")
                _kill_daemon(pids, dirs["mnt"])
            finally:
                _reap(writer)
        interrupted = writer.returncode != 0
        caught += interrupted
        with qvdfs_mount(node_branches(dirs), dirs["mnt"], *NODE_OPTIONS) as mnt:
            assert _work_entries(dirs["upper"]) == []
            names = sorted(os.listdir(mnt))
            assert names in (["d"], ["e"]), names
            if interrupted:
                assert names == ["d"], "a rename that never returned took effect"
            assert _tree_of(mnt / names[0]) == expected
        assert _tree_of(tree) == expected, "the base branch changed"
        if caught:
            break
        subprocess.run(["rm", "-rf", "--one-file-system", str(dirs["upper"])], check=True)
        dirs["upper"].mkdir()
    assert caught, "never managed to kill the daemon mid-rename"


_REMOVE = """
import os, sys
root, log = sys.argv[1], sys.argv[2]
with open(log, "a", buffering=1) as out:
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for n in filenames:
            p = os.path.join(dirpath, n)
            os.unlink(p)
            out.write(os.path.relpath(p, root) + "\\n")
        if dirpath != root:
            os.rmdir(dirpath)
            out.write(os.path.relpath(dirpath, root) + "\\n")
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kill_after", [50, 900])
def test_sigkill_during_removal_and_whiteouts(dirs: dict[str, Path], kill_after: int) -> None:
    """rm -r of base folders (whiteouts over lower and copied-up files), killed mid-way.

    Every removal reported done stays removed after a remount; every other entry keeps
    its last written content; no whiteout or work-dir leftover shows.
    """
    base = dirs["base"]
    for d in range(6):
        (base / "tree" / f"d{d}" / "inner").mkdir(parents=True)
        for i in range(150):
            (base / "tree" / f"d{d}" / f"f{i}").write_text(f"base {d}/{i}\n")
        (base / "tree" / f"d{d}" / "inner" / "x").write_text("inner\n")
    (base / "outside-the-tree").write_text("kept\n")
    log = dirs["base"].parent / "removed.log"
    with qvdfs_mount(node_branches(dirs), dirs["mnt"], *NODE_OPTIONS) as mnt:
        # Give every third file an upper version: its removal exchanges it for a whiteout.
        for d in range(6):
            for i in range(0, 150, 3):
                (mnt / "tree" / f"d{d}" / f"f{i}").write_text(f"upper {d}/{i}\n")
        expected = {k: v for k, v in _tree_of(mnt / "tree").items()}
    with killable_mount(dirs) as pids:
        writer = subprocess.Popen([sys.executable, "-c", _REMOVE, str(dirs["mnt"] / "tree"),
                                   str(log)], stderr=subprocess.DEVNULL)
        try:
            def removed_enough() -> bool:
                return (log.exists() and log.read_text().count("\n") >= kill_after) or (
                    writer.poll() is not None)
            _wait_for(removed_enough, 60, "removals")
            _kill_daemon(pids, dirs["mnt"])
        finally:
            _reap(writer)
    assert writer.returncode != 0, "the removal finished before the kill"
    done = set(log.read_text().splitlines())
    assert len(done) >= kill_after
    with qvdfs_mount(node_branches(dirs), dirs["mnt"], *NODE_OPTIONS) as mnt:
        assert _work_entries(dirs["upper"]) == []
        assert sorted(os.listdir(mnt)) == ["outside-the-tree", "tree"]
        assert (mnt / "outside-the-tree").read_text() == "kept\n"
        after = _tree_of(mnt / "tree")
        assert not done & set(after), "a removed entry came back"
        missing = set(expected) - set(after) - done
        # At most the one removal in flight at the kill may have happened unreported.
        assert len(missing) <= 1, missing
        assert set(after) <= set(expected), "an entry appeared from nowhere"
        for rel, digest in after.items():
            assert digest == expected[rel], f"{rel} is neither its old nor its new version"
        # And the union keeps working on top of the interrupted state.
        subprocess.run(["rm", "-r", str(mnt / "tree")], check=True, timeout=60)
        assert sorted(os.listdir(mnt)) == ["outside-the-tree"]
    assert len(_tree_of(base / "tree")) == len(expected), "the base branch changed"


# --- a full upper branch --------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "qvdfaults", str(path)],
                   check=True, timeout=30)
    try:
        yield path
    finally:
        force_unmount(path)


@pytest.mark.timeout(120)
def test_enospc_reaches_the_writer_and_the_mount_survives(dirs: dict[str, Path]) -> None:
    (dirs["base"] / "etc").mkdir()
    (dirs["base"] / "etc" / "conf").write_text("base conf\n")
    old_big = _big_file(dirs["base"] / "big", 4)
    with small_tmpfs(dirs["upper"], "2m"), \
            qvdfs_mount(node_branches(dirs), dirs["mnt"], *NODE_OPTIONS) as mnt:
        (mnt / "kept").write_bytes(b"k" * 100_000)
        kept = _sha(mnt / "kept")
        # A new file that outgrows the branch.
        with pytest.raises(OSError) as full:
            with open(mnt / "filler", "wb") as f:
                for _ in range(8):
                    f.write(b"z" * MiB)
                    f.flush()
                os.fsync(f.fileno())
        assert full.value.errno == errno.ENOSPC
        # Copy-up of a base file bigger than what is left: refused, the old data stays.
        with pytest.raises(OSError) as copy:
            with open(mnt / "big", "r+b") as f:
                f.write(b"changed")
        assert copy.value.errno == errno.ENOSPC
        assert _sha(mnt / "big") == old_big
        assert _work_entries(dirs["upper"]) == [], "a failed copy-up left its temp file"
        # Everything else is still served, read and written.
        assert (mnt / "etc" / "conf").read_text() == "base conf\n"
        assert _sha(mnt / "kept") == kept
        os.unlink(mnt / "filler")
        (mnt / "etc" / "conf").write_text("changed after the disk filled\n")
        assert (mnt / "etc" / "conf").read_text() == "changed after the disk filled\n"
        with pytest.raises(OSError) as again:  # the branch still cannot take 4 MiB
            with open(mnt / "big", "r+b") as f:
                f.write(b"still too big")
        assert again.value.errno == errno.ENOSPC
        assert _sha(mnt / "big") == old_big
    assert (dirs["base"] / "etc" / "conf").read_text() == "base conf\n"
    assert _sha(dirs["base"] / "big") == old_big


@pytest.mark.timeout(120)
def test_enospc_on_many_small_files_then_recovery(dirs: dict[str, Path]) -> None:
    """Fill the branch with small files and folders; then free space and carry on."""
    with small_tmpfs(dirs["upper"], "1m"), \
            qvdfs_mount(node_branches(dirs), dirs["mnt"], *NODE_OPTIONS) as mnt:
        written = []
        with pytest.raises(OSError) as full:
            for i in range(100_000):
                p = mnt / f"d{i // 100}"
                p.mkdir(exist_ok=True)
                (p / f"f{i}").write_bytes(b"%d" % i * 500)
                written.append(p / f"f{i}")
        assert full.value.errno == errno.ENOSPC
        # Every file whose write returned holds exactly what was written.
        for p in written:
            i = int(p.name[1:])
            assert p.read_bytes() == b"%d" % i * 500
        for p in written[: len(written) // 2]:
            os.unlink(p)
        (mnt / "after").write_text("room again\n")
        assert (mnt / "after").read_text() == "room again\n"


# --- a node's VMs: the union daemon dies, qvdctl is killed mid-command ----------------------


class Node:
    """A throwaway node (``tools.sandbox.scratch_node``) with two VMs of one image."""

    def __init__(self, scratch: ScratchNode) -> None:
        self.root, self.ns, self.argv = scratch.root, scratch.netns, scratch.qvdctl_argv

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=180)
        if check:
            assert done.returncode == 0, (args, done.stderr)
        return done

    def states(self) -> dict[str, str]:
        return {r["Name"]: r["State"] for r in json.loads(self.run("--json", "vm", "list").stdout)}

    def leftovers(self, vm: str) -> dict[str, list]:
        """Mounts, processes and veths a stopped VM must not have."""
        mounts = mounts_under(self.root / "rootfs")
        vm_id = self.vm_id(vm)
        procs = []
        for process in processes.processes():
            line = process.command_line
            if str(self.root) not in line:
                continue  # another test's VM with the same id
            if f"-{vm_id}-fs" in line or f" qvd-{vm_id} " in line + " ":
                if processes.alive(process.pid):
                    procs.append(line[:80])
        links = subprocess.run(["ip", "-n", self.ns, "-o", "link"], capture_output=True,
                               text=True, timeout=30).stdout
        veths = [w for w in links.split() if w.rstrip(":").split("@")[0] == f"qvd{vm_id}"]
        return {"mounts": [m for m in mounts if f"-{vm_id}-fs" in m], "procs": procs,
                "veths": veths}

    def vm_id(self, vm: str) -> int:
        (row,) = json.loads(self.run("--json", "vm", "list", "-f", f"name={vm}").stdout)
        return int(row["Id"])

    def stop_until_clean(self, vm: str) -> None:
        """vm stop, retried once if it reports a zombie; then nothing of the VM is left."""
        for _ in range(2):
            done = self.run("vm", "stop", "-f", f"name={vm}", check=False)
            if done.returncode:
                lines = done.stderr.strip().splitlines()
                assert len(lines) == 1, done.stderr
            if self.states()[vm] == "stopped":
                break
        assert self.states()[vm] == "stopped"
        assert self.leftovers(vm) == {"mounts": [], "procs": [], "veths": []}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    from tools.imagebuild import build_busybox_rootfs, build_image_tarball
    from tools.sandbox import scratch_node

    tmp = tmp_path_factory.mktemp("node")
    root = tmp / "storage"
    (root / "staging").mkdir(parents=True)
    build_image_tarball(root / "staging" / "img.tar.gz", build_busybox_rootfs(tmp / "image"),
                        compression="gz")
    with scratch_node(root, prefix="qvdfault") as scratch:
        n = Node(scratch)
        n.run("config", "set", *scratch.lxc_settings(net="10.213.79", bridge="qvdfault0"))
        n.run("osf", "add", "name=o")
        n.run("di", "add", "path=img.tar.gz", "osf=o")
        for vm in ("a", "b"):
            n.run("user", "add", f"login={vm}", "password=p")
            n.run("vm", "add", f"name={vm}", f"user={vm}", "osf=o")
        yield n


@pytest.mark.timeout(300)
def test_the_union_daemon_of_a_running_vm_dies(node: Node) -> None:
    """SIGKILL the qvdfs of VM a: vm list shows it broken, vm stop cleans, the next start works."""
    node.run("vm", "start", "-f", "name=*")
    assert node.states() == {"a": "running", "b": "running"}
    node.run("vm", "exec", "-f", "name=a", "--", "sh", "-c", "echo kept > /home/notes")
    # Exactly this node's mountpoint: other tests on the machine run VMs with the same ids.
    (a_root,) = [str(p) for p in (node.root / "rootfs").glob(f"*-{node.vm_id('a')}-fs")]
    assert is_mounted(a_root)
    pids = daemon_pids(a_root)
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while processes.alive(pids[0]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert node.states() == {"a": "zombie", "b": "running"}
    node.stop_until_clean("a")
    assert node.states() == {"a": "stopped", "b": "running"}
    node.run("vm", "start", "-f", "name=a")
    done = node.run("vm", "exec", "-f", "name=a", "--", "cat", "/home/notes")
    assert done.stdout == "kept\n"
    node.run("vm", "exec", "-f", "name=b", "--", "true")
    for vm in ("a", "b"):
        node.stop_until_clean(vm)


def _moment(node: Node, vm_id: int, moment: str) -> Callable[[], bool]:
    """When to strike: a step of the command seen from outside, or a fixed delay."""
    if moment.endswith("s"):
        deadline = time.monotonic() + float(moment[:-1])
        return lambda: time.monotonic() >= deadline

    def mounted() -> bool:
        return any(f"-{vm_id}-fs" in point for point in mounts_under(node.root))

    def container_up() -> bool:
        return any(m.name == f"qvd-{vm_id}" and m.lxcpath == node.root / "lxc"
                   for m in monitors())

    return {"mounted": mounted, "container up": container_up,
            "container gone": lambda: not container_up()}[moment]


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("command", "moment"), [
    ("start", "0.2s"), ("start", "mounted"), ("start", "container up"),
    ("stop", "0.2s"), ("stop", "container gone"),
])
def test_qvdctl_killed_mid_command_leaves_a_state_the_next_command_repairs(
        node: Node, command: str, moment: str) -> None:
    if node.states()["a"] != "stopped":  # an earlier failure must not spill over
        node.stop_until_clean("a")
    if command == "stop":
        node.run("vm", "start", "-f", "name=a")
    strike = _moment(node, node.vm_id("a"), moment)
    proc = subprocess.Popen(node.argv("vm", command, "-f", "name=a"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: strike() or proc.poll() is not None, 60, moment)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the command ended before the kill"
    state = node.states()["a"]
    print(f"\nvm {command} killed at {moment}: state {state}, left {node.leftovers('a')}")
    assert state in ("stopped", "starting", "running", "stopping", "zombie"), state
    # Whatever was left, stop cleans it up, and the VM starts and stops normally again.
    node.stop_until_clean("a")
    node.run("vm", "start", "-f", "name=a")
    assert node.states()["a"] == "running"
    node.run("vm", "exec", "-f", "name=a", "--", "true")
    node.stop_until_clean("a")


# --- di add killed mid-copy, and two di add racing --------------------------------------


@pytest.fixture
def cli(cli: Cli) -> Cli:
    cli.run("osf", "add", "name=o")
    return cli


def _big_image(tmp_path: Path) -> Path:
    from tools.imagebuild import build_busybox_rootfs, build_image_tarball
    root = build_busybox_rootfs(tmp_path / "image-root")
    _big_file(root / "payload", 300)
    return build_image_tarball(tmp_path / "big.tar", root, compression="")


@pytest.mark.timeout(300)
def test_di_add_killed_mid_copy_registers_nothing_and_can_be_redone(cli, tmp_path: Path) -> None:
    tarball = _big_image(tmp_path)
    images = cli.root / "images"
    proc = subprocess.Popen(cli_argv(cli, "di", "add", f"path={tarball}", "osf=o"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: proc.poll() is not None or any(
        p.name.startswith(".tmp-") and p.stat().st_size > 0
        for p in (images.iterdir() if images.exists() else ())), 60, "the copy to start")
    proc.kill()
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "di add finished before the kill"
    assert json.loads(cli.run("--json", "di", "list").stdout) == []
    assert not (images / tarball.name).exists(), "a half copy sits under the real name"
    leftovers = [p.name for p in images.iterdir() if p.name.startswith(".tmp-")]
    print(f"\ndi add killed mid-copy left {leftovers} in images/")
    cli.run("di", "add", f"path={tarball}", "osf=o")
    (row,) = json.loads(cli.run("--json", "di", "list").stdout)
    assert _sha(images / tarball.name) == _sha(tarball)


def test_two_di_add_of_one_file_race_and_one_wins(cli, tmp_path: Path) -> None:
    tarball = _big_image(tmp_path)
    procs = [subprocess.Popen(cli_argv(cli, "di", "add", f"path={tarball}", "osf=o"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 1], results
    loser = next(r for r in results if r[0] == 1)
    assert len(loser[2].strip().splitlines()) == 1 and loser[2].startswith("Error: ")
    (row,) = json.loads(cli.run("--json", "di", "list").stdout)
    images = cli.root / "images"
    assert [p.name for p in images.iterdir()] == [tarball.name]
    assert _sha(images / tarball.name) == _sha(tarball)


def cli_argv(cli, *args: str) -> list[str]:
    return [QVDCTL, "--root", str(cli.root), *args]


@pytest.mark.timeout(300)
def test_start_and_stop_of_one_vm_racing_end_consistent(node: Node) -> None:
    """vm start and vm stop at once: each ends cleanly or with one error line; then it is
    either running (and stops cleanly) or stopped with nothing left."""
    if node.states()["a"] != "stopped":
        node.stop_until_clean("a")
    for delay in (0.0, 0.0, 0.0, 0.05, 0.1, 0.3):
        start = subprocess.Popen(node.argv("vm", "start", "-f", "name=a"),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        stop = subprocess.Popen(node.argv("vm", "stop", "-f", "name=a"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        errors = []
        for proc in (start, stop):
            _out, err = proc.communicate(timeout=120)
            assert proc.returncode in (0, 1), err
            if proc.returncode:
                assert len(err.strip().splitlines()) == 1 and err.startswith("Error: "), err
            errors.append(err.strip())
        state = node.states()["a"]
        left = node.leftovers("a")
        print(f"\nstart and stop {delay}s apart: start {start.returncode}, "
              f"stop {stop.returncode}, state {state}, errors {errors}, left {left}")
        assert state in ("running", "stopped", "zombie"), state
        if state == "stopped":
            assert left == {"mounts": [], "procs": [], "veths": []}, left
        if state == "running":
            node.run("vm", "exec", "-f", "name=a", "--", "true")
        node.stop_until_clean("a")
