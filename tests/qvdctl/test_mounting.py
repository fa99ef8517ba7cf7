"""qvdctl.mounting on a real node: a stop leaves nothing serving the VM's root, even when
another process holds a copy of the mount in a mount namespace of its own."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from qvdproc import mountinfo, processes
from tools.cli import Cli


def _daemons(rootfs: Path) -> list[int]:
    return [p.pid for p in processes.with_argument(rootfs)
            if any(b"qvdfs" in word for word in p.argv[:2])]


def _rootfs(cli: Cli) -> Path:
    [rootfs] = (cli.root / "rootfs").glob("*-fs")
    return rootfs


@pytest.mark.timeout(180)
def test_a_stop_ends_the_daemon_of_a_root_another_namespace_still_holds(
        cli: Cli, tarball: Path) -> None:
    cli.run("config", "set", "vm.hypervisor=lxc", "vm.start.mount_only=1")
    cli.run("osf", "add", "name=o")
    cli.run("di", "add", f"path={tarball}", "osf=o")
    cli.run("user", "add", "login=u", "password=p")
    cli.run("vm", "add", "name=v", "user=u", "osf=o")
    cli.run("vm", "start", "-f", "name=v")
    rootfs = _rootfs(cli)
    [daemon] = _daemons(rootfs)
    # An admin's `unshare -m` shell, opened while the VM runs: it holds a copy of the root.
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                               "sleep", "600"])
    try:
        deadline = time.monotonic() + 10
        while processes.alive(holder.pid) and f"{rootfs}" not in Path(
                f"/proc/{holder.pid}/mountinfo").read_text():
            assert time.monotonic() < deadline, "the namespace never got its copy"
            time.sleep(0.02)
        cli.run("vm", "stop", "-f", "name=v")
        assert cli.vm("v")["State"] == "stopped"
        assert not mountinfo.is_mounted(rootfs)
        assert not processes.alive(daemon), "the root's qvdfs still serves the held copy"
        # The copy is dead, not a second way into the overlay.
        looked = subprocess.run(["nsenter", f"--mount=/proc/{holder.pid}/ns/mnt", "ls",
                                 str(rootfs)], capture_output=True, text=True, timeout=30)
        assert looked.returncode != 0 and "not connected" in looked.stderr, looked
        # The next start serves the overlay with one daemon, as the first did.
        cli.run("vm", "start", "-f", "name=v")
        assert len(_daemons(rootfs)) == 1
        cli.run("vm", "stop", "-f", "name=v")
        assert _daemons(rootfs) == []
    finally:
        holder.kill()
        holder.wait(timeout=10)
