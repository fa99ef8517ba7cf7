"""Admin verbs of qvd-admin beyond the workflow: vm block / unblock."""

from __future__ import annotations

import pytest

from tests.support.qvdctl import Cli, cleanup_root
from tools.imagebuild import build_busybox_rootfs, build_image_tarball


@pytest.mark.timeout(180)
def test_a_blocked_vm_cannot_start_and_list_shows_it(tmp_path):
    rootfs = build_busybox_rootfs(tmp_path / "busybox")
    tarball = build_image_tarball(tmp_path / "image.tgz", rootfs)
    cli = Cli(tmp_path / "root")
    try:
        cli.run("config", "set", "vm.hypervisor=lxc", "vm.start.mount_only=1")
        cli.run("osf", "add", "name=o")
        cli.run("di", "add", f"path={tarball}", "osf=o")
        cli.run("user", "add", "login=u", "password=p")
        cli.run("vm", "add", "name=v", "user=u", "osf=o")
        assert "needs a filter" in cli.fails("vm", "block")
        cli.run("vm", "block", "-f", "name=v")
        assert cli.vm("v")["Blocked"] == 1
        assert "is blocked" in cli.fails("vm", "start", "-f", "name=v")
        assert cli.vm("v")["State"] == "stopped"
        cli.run("vm", "unblock", "-f", "name=v")
        assert cli.vm("v")["Blocked"] == 0
        cli.run("vm", "start", "-f", "name=v")
        cli.run("vm", "stop", "-f", "name=v")
    finally:
        cleanup_root(cli.root)
