"""A node for the web admin's tests: two cheap VMs, an admin and a viewer, the server up.

VMs start root-only (``vm.start.mount_only=1``, a qvdfs mount of the busybox image and
no container), so a start or a stop takes a fraction of a second and the tests check
the web admin, not LXC. The root is shared by a module's tests; each test leaves the
VMs as it found them (stopped, unblocked).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.qvdctl import Cli, cleanup_root
from tests.support.web import web_server

ADMIN = ("alice", "alice-password")
VIEWER = ("victor", "victor-password")
# Names an attacker would pick: shown escaped on every page, or the test fails.
EVIL_USER = "<script>alert(1)</script>"
EVIL_OSF = "<script>alert(2)</script>"
EVIL_VM = "<script>alert(3)</script>"


@dataclasses.dataclass
class Site:
    cli: Cli
    url: str


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, tarball: Path) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("web") / "root"
    cli = Cli(root)
    try:
        cli.run("config", "set", "vm.hypervisor=lxc", "vm.start.mount_only=1")
        cli.run("osf", "add", "name=o")
        cli.run("osf", "add", f"name={EVIL_OSF}")
        cli.run("di", "add", f"path={tarball}", "osf=o")
        cli.run("user", "add", "login=u", "password=p")
        cli.run("user", "add", f"login={EVIL_USER}", "password=p")
        cli.run("vm", "add", "name=v1", "user=u", "osf=o")
        cli.run("vm", "add", "name=v2", f"user={EVIL_USER}", "osf=o")
        cli.run("vm", "add", f"name={EVIL_VM}", "user=u", f"osf={EVIL_OSF}")
        cli.run("admin", "add", f"login={ADMIN[0]}", f"password={ADMIN[1]}")
        cli.run("admin", "add", f"login={VIEWER[0]}", f"password={VIEWER[1]}", "role=viewer")
        with web_server(cli) as url:
            yield Site(cli, url)
    finally:
        cleanup_root(root)
