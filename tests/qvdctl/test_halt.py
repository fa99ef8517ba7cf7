"""How an image's init is halted (``qvdctl/images/halt.py``), found from small real trees.

Each tree is laid out in a temporary folder the way images lay theirs out: links to
systemd or busybox, absolute and relative, through a merged /usr. The hostile ones try to
leave the image towards a "host" tree beside it that does hold a systemd, so a careless
resolver would answer "systemd" where the right answer is "nothing there".
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from qvdctl.container.config import ConfigError, ContainerSpec, render_config
from qvdctl.images import halt
from qvdctl.images.extract import ensure_extracted
from tests.support.qvdctl import Cli, cleanup_root
from tools.imagebuild import build_busybox_rootfs, build_image_tarball

pytestmark = pytest.mark.timeout(60)

ELF = b"\x7fELF" + b"\0" * 60  # stands in for a program that carries no init's marks
SYSVINIT = ELF + b"\0/run/initctl\0INIT_VERSION=sysvinit-3.06\0"
BUSYBOX = ELF + b"\0BusyBox v1.36.1 (Debian 1:1.36.1-9) multi-call binary.\0"


def _tree(
    root: Path, files: dict[str, bytes] | None = None, links: dict[str, str] | None = None
) -> Path:
    """A tree with ``files`` (path -> content), then ``links`` (path -> target)."""
    root.mkdir(parents=True)
    for path, content in (files or {}).items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(content)
    for path, target in (links or {}).items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, root / path)
    return root


def _facts(root: Path) -> tuple[str, str | None, str]:
    facts = halt.detect(root)
    return facts.init, facts.target, facts.halt_signal


# --- each init ------------------------------------------------------------------------


def test_systemd_by_absolute_and_relative_link(tmp_path: Path) -> None:
    program = {"lib/systemd/systemd": ELF}
    absolute = _tree(tmp_path / "a", program, {"sbin/init": "/lib/systemd/systemd"})
    relative = _tree(tmp_path / "r", program, {"sbin/init": "../lib/systemd/systemd"})
    for root in (absolute, relative):
        assert _facts(root) == ("systemd", "/lib/systemd/systemd", "SIGRTMIN+3")


def test_systemd_on_a_merged_usr_as_debian_bookworm(tmp_path: Path) -> None:
    """/sbin and /lib link into /usr, and /usr/sbin/init -> /lib/systemd/systemd: three hops."""
    root = _tree(
        tmp_path / "bookworm",
        {"usr/lib/systemd/systemd": ELF},
        {"sbin": "usr/sbin", "lib": "usr/lib", "usr/sbin/init": "/lib/systemd/systemd"},
    )
    assert _facts(root) == ("systemd", "/usr/lib/systemd/systemd", "SIGRTMIN+3")


def test_busybox_by_link_hard_link_and_copy(tmp_path: Path) -> None:
    linked = build_busybox_rootfs(tmp_path / "busybox")  # the project's own image: init -> busybox
    assert _facts(linked) == ("busybox", "/bin/busybox", "SIGUSR2")
    hard = _tree(tmp_path / "hard", {"bin/busybox": BUSYBOX, "sbin/.keep": b""})
    os.link(hard / "bin/busybox", hard / "sbin/init")
    assert _facts(hard) == ("busybox", "/sbin/init", "SIGUSR2")
    # Recognised by its banner, whatever its name.
    copied = _tree(tmp_path / "copy", {"bin/bb": BUSYBOX}, {"sbin/init": "../bin/bb"})
    assert _facts(copied) == ("busybox", "/bin/bb", "SIGUSR2")


def test_sysvinit_by_its_control_fifo(tmp_path: Path) -> None:
    root = _tree(tmp_path / "sysv", {"sbin/init": SYSVINIT})
    assert _facts(root) == ("sysvinit", "/sbin/init", "SIGPWR")


def test_an_init_not_recognised_gets_liblxcs_default(tmp_path: Path) -> None:
    other = _tree(tmp_path / "other", {"sbin/runit-init": ELF}, {"sbin/init": "runit-init"})
    assert _facts(other) == ("unknown", "/sbin/runit-init", "SIGPWR")
    assert _facts(_tree(tmp_path / "none", {"sbin/.keep": b""})) == ("unknown", None, "SIGPWR")


# --- hostile trees --------------------------------------------------------------------


def test_links_that_try_to_leave_the_image_stay_inside(tmp_path: Path) -> None:
    """Each target exists on the "host" as systemd; inside the image it is absent."""
    host = _tree(tmp_path / "host", {"lib/systemd/systemd": ELF},
                 {"sbin/init": "../lib/systemd/systemd"})  # fmt: skip
    assert _facts(host)[0] == "systemd"
    cases = {
        "dotdot": {"sbin/init": "../../../host/lib/systemd/systemd"},
        "absolute": {"sbin/init": str(host / "lib/systemd/systemd")},
        "folder on the way": {"sbin": str(host / "sbin")},
        "dotdot in a folder link": {"sbin": "../../host/sbin"},
        "chain": {"sbin/init": "/x", "x": "../../../../host/sbin/init"},
    }
    for i, links in enumerate(cases.values()):
        root = _tree(tmp_path / "images" / str(i), {}, links)
        assert _facts(root) == ("unknown", None, halt.FALLBACK), links
    # "/.." is "/" inside the image: the climb lands on the image's own systemd.
    own = _tree(tmp_path / "own", {"lib/systemd/systemd": ELF},
                {"sbin/init": "../../../../lib/systemd/systemd"})  # fmt: skip
    assert _facts(own) == ("systemd", "/lib/systemd/systemd", "SIGRTMIN+3")


def test_link_loops_end(tmp_path: Path) -> None:
    loops = {
        "two": {"sbin/init": "init2", "sbin/init2": "init"},
        "self": {"sbin/init": "init"},
        "folder": {"sbin/init": "/a/init", "a": "/a"},
        # 41 links in a chain: one past the kernel's limit.
        "long": {"sbin/init": "l0", **{f"sbin/l{i}": f"l{i + 1}" for i in range(40)}},
    }
    for name, links in loops.items():
        root = _tree(tmp_path / name, {"sbin/l40": SYSVINIT}, links)
        assert _facts(root) == ("unknown", None, "SIGPWR"), name
    # 40 is allowed, as the kernel allows it.
    chain = {"sbin/init": "l1", **{f"sbin/l{i}": f"l{i + 1}" for i in range(1, 40)}}
    root = _tree(tmp_path / "forty", {"sbin/l40": SYSVINIT}, chain)
    assert _facts(root) == ("sysvinit", "/sbin/l40", "SIGPWR")


def test_fifos_devices_and_folders_as_init_are_never_opened(tmp_path: Path) -> None:
    # A FIFO: opening it to read would block until a writer came.
    fifo = _tree(tmp_path / "fifo", {"sbin/.keep": b""})
    os.mkfifo(fifo / "sbin/init")
    # A device node (here /dev/zero's): reading it would read the host's device.
    device = _tree(tmp_path / "device", {"sbin/.keep": b""})
    os.mknod(device / "sbin/init", 0o644 | stat.S_IFCHR, os.makedev(1, 5))
    folder = _tree(tmp_path / "folder", {"sbin/init/systemd": ELF})
    through_dot = _tree(tmp_path / "dot", {"lib/systemd/x": ELF},
                        {"sbin/init": "/lib/systemd/."})  # fmt: skip
    for root in (fifo, device, folder, through_dot):
        init, _, sig = _facts(root)
        assert (init, sig) == ("unknown", "SIGPWR"), root


def test_a_huge_init_is_read_only_as_far_as_its_head(tmp_path: Path) -> None:
    """An 8 GiB (sparse) init whose banner lies past ``SNIFF_BYTES`` is not recognised."""
    root = _tree(tmp_path / "huge", {"sbin/.keep": b""})
    with open(root / "sbin/init", "wb") as f:
        f.write(ELF)
        f.seek(halt.SNIFF_BYTES + 1)
        f.write(BUSYBOX)
        f.truncate(8 << 30)
    started = time.monotonic()
    assert _facts(root) == ("unknown", "/sbin/init", "SIGPWR")
    assert time.monotonic() - started < 5
    # The same banner in its head is found.
    with open(root / "sbin/init", "r+b") as f:
        f.write(BUSYBOX)
    assert _facts(root)[0] == "busybox"


# --- the signal, the config, the record and the override ------------------------------


def test_signal_names_are_checked() -> None:
    assert halt.check_signal("sigrtmin+3") == "SIGRTMIN+3"
    assert halt.signal_number("SIGRTMIN+3") == 34 + 3
    assert halt.signal_number("SIGUSR2") == 12
    assert halt.signal_number("30") == 30
    for bad in ("SIGNOPE", "USR2", "SIGUSR2; rm -rf /", "SIGRTMIN+99", "SIGUSR2+1", "0", "",
                "SIGRTMIN+3\nlxc.mount.entry = / x"):  # fmt: skip
        with pytest.raises(ValueError):
            halt.check_signal(bad)


def test_the_config_holds_the_signal(tmp_path: Path) -> None:
    for sig in ("SIGRTMIN+3", "SIGPWR", "SIGUSR2"):
        spec = ContainerSpec(name="qvd-3", rootfs=tmp_path, hostname="h", halt_signal=sig)
        assert f"\nlxc.signal.halt = {sig}\n" in render_config(spec, tmp_path)
    with pytest.raises(ConfigError, match="invalid halt signal"):
        render_config(ContainerSpec("qvd-3", tmp_path, "h", halt_signal="SIGNOPE"), tmp_path)


def test_extraction_remembers_the_init_and_a_di_setting_overrides_it(tmp_path: Path) -> None:
    archive = build_image_tarball(tmp_path / "image.tgz", build_busybox_rootfs(tmp_path / "rootfs"))
    tree = tmp_path / "basefs" / ".images" / "image.tgz"
    ensure_extracted(archive, tree)
    facts = json.loads(halt.facts_path(tree).read_text())
    assert facts == {"init": "busybox", "target": "/bin/busybox", "halt_signal": "SIGUSR2"}
    assert halt.halt_signal(tree, tree) == "SIGUSR2"
    assert halt.halt_signal(tree, tree, di_signal="sigpwr") == "SIGPWR"
    # What is remembered is what counts: the tree is not examined again.
    halt.facts_path(tree).write_text(json.dumps({**facts, "halt_signal": "SIGRTMIN+3"}))
    assert halt.halt_signal(tree, tree) == "SIGRTMIN+3"
    # A tree extracted before images were examined (or a spoilt record) is examined once.
    for spoilt in (None, "{not json", json.dumps({**facts, "halt_signal": "SIGX; rm"})):
        if spoilt is None:
            halt.facts_path(tree).unlink()
        else:
            halt.facts_path(tree).write_text(spoilt)
        assert halt.halt_signal(tree, tree) == "SIGUSR2"
        assert json.loads(halt.facts_path(tree).read_text()) == facts


def test_a_dis_signal_wins_over_its_osfs_which_wins_over_the_init(tmp_path: Path) -> None:
    """The choice ``vm start`` writes into the container config, the one ``vm stop`` sends."""
    archive = build_image_tarball(tmp_path / "image.tgz", build_busybox_rootfs(tmp_path / "rootfs"))
    tree = tmp_path / "basefs" / ".images" / "image.tgz"
    ensure_extracted(archive, tree)
    assert halt.halt_signal(tree, tree, None, None) == "SIGUSR2"  # busybox's
    assert halt.halt_signal(tree, tree, None, "sigpwr") == "SIGPWR"
    assert halt.halt_signal(tree, tree, "SIGRTMIN+3", "SIGPWR") == "SIGRTMIN+3"
    assert halt.halt_signal(tree, tree, "", "SIGPWR") == "SIGPWR"  # empty: not set
    assert halt.override(None, "sighup") == ("SIGHUP", "osf")
    assert halt.override("sigterm", "sighup") == ("SIGTERM", "di")
    assert halt.override(None, None) is None
    with pytest.raises(ValueError):
        halt.halt_signal(tree, tree, None, "SIGNOPE")


@pytest.mark.timeout(120)
def test_di_list_shows_the_signal_and_whose_it_is(cli: Cli, tarball: Path, tmp_path: Path) -> None:
    second = tmp_path / "image.0.23.tgz"
    shutil.copy(tarball, second)
    cli.run("config", "set", "vm.hypervisor=lxc", "vm.start.mount_only=1")
    cli.run("osf", "add", "name=o")
    cli.run("di", "add", f"path={tarball}", "osf=o")
    cli.run("di", "add", f"path={second}", "osf=o", "halt_signal=sighup")

    def shown() -> list[tuple[str | None, str]]:
        return [(r["HaltSignal"], r["HaltFrom"]) for r in cli.json("di", "list")]

    assert shown() == [(None, "init"), ("SIGHUP", "di")]  # the first not yet examined
    cli.run("user", "add", "login=u", "password=p")
    cli.run("vm", "add", "name=v", "user=u", "osf=o")
    cli.run("vm", "start", "-f", "name=v")  # extracts the image: its init is examined
    cli.run("vm", "stop", "-f", "name=v")
    assert shown() == [("SIGUSR2", "init"), ("SIGHUP", "di")]
    cli.run("osf", "edit", "-f", "name=o", "halt_signal=sigpwr")
    assert shown() == [("SIGPWR", "osf"), ("SIGHUP", "di")]
    cli.run("osf", "edit", "-f", "name=o", "halt_signal=")
    assert shown()[0] == ("SIGUSR2", "init")


def test_osf_add_takes_a_halt_signal_and_old_databases_gain_the_column(cli: Cli) -> None:
    assert "bad halt_signal" in cli.fails("osf", "add", "name=o", "halt_signal=SIGUSR2+1")
    cli.run("osf", "add", "name=o", "halt_signal=sigrtmin+3")
    with sqlite3.connect(cli.root / "qvd.db") as db:
        assert db.execute("select name, halt_signal from osfs").fetchall() == [("o", "SIGRTMIN+3")]
        # Back to a database of migration 3, without the column: the next run adds it.
        db.execute("alter table osfs drop column halt_signal")
        db.execute("update schema_version set version = 3")
    assert cli.json("osf", "list")[0]["HaltSignal"] is None
    with sqlite3.connect(cli.root / "qvd.db") as db:
        assert db.execute("select halt_signal from osfs").fetchall() == [(None,)]
        assert db.execute("select version from schema_version").fetchone()[0] >= 4


def test_di_add_takes_a_halt_signal_and_old_databases_gain_the_column(tmp_path: Path) -> None:
    root = tmp_path / "root"
    cli = Cli(root)
    try:
        archive = build_image_tarball(tmp_path / "image.0.1.tgz", build_busybox_rootfs(tmp_path / "rootfs"))
        cli.run("osf", "add", "name=o")
        assert "bad halt_signal" in cli.fails(
            "di", "add", f"path={archive}", "osf=o", "halt_signal=SIGNOPE"
        )
        assert not list((root / "images").iterdir())  # a refused add copies nothing
        cli.run("di", "add", f"path={archive}", "osf=o", "halt_signal=sigrtmin+3")
        with sqlite3.connect(root / "qvd.db") as db:
            assert db.execute("select halt_signal from dis").fetchall() == [("SIGRTMIN+3",)]
        # The first start extracts the image and examines it; di del takes the record along.
        cli.run("config", "set", "vm.hypervisor=lxc", "vm.start.mount_only=1")
        cli.run("user", "add", "login=u", "password=p")
        cli.run("vm", "add", "name=v", "user=u", "osf=o")
        cli.run("vm", "start", "-f", "name=v")
        cli.run("vm", "stop", "-f", "name=v")
        facts = root / "basefs" / ".images" / ".image.0.1.tgz.init"
        assert json.loads(facts.read_text())["init"] == "busybox"
        cli.run("vm", "del", "-f", "name=v")
        cli.run("di", "del", "-f", "id=1")
        assert not facts.exists()
        cli.run("di", "add", f"path={archive}", "osf=o", "halt_signal=sigrtmin+3")
        with sqlite3.connect(root / "qvd.db") as db:
            # Back to a database without the column: qvdctl adds it on its next run.
            db.execute("alter table dis drop column halt_signal")
            db.execute("update schema_version set version = 1")
        cli.run("di", "list")
        with sqlite3.connect(root / "qvd.db") as db:
            assert db.execute("select halt_signal from dis").fetchall() == [(None,)]
            assert db.execute("select version from schema_version").fetchone()[0] >= 2
    finally:
        cleanup_root(root)
