"""A real Debian desktop image (bookworm minbase + systemd) booted once through the CLI.

The image comes from the builder the demo and the benchmarks use (``tools/debian_image.py``),
cached in ``/var/tmp/qvd-images``: on a fresh machine the first run builds it (mmdebstrap,
about a minute), every later run only copies its tarball in with ``di add``.

What this checks, as an admin would: ``vm start`` on a qvdfs root boots systemd to
``running`` or ``degraded`` (systemd's own verdict; the failed units are printed), ``vm exec``
runs commands in it, and ``vm stop`` halts it with the signal found from the image
(SIGRTMIN+3), cleanly and well inside ``vm.stop.timeout``. "Cleanly" is read from the host,
after the stop, in the VM's overlay: the header of the journal file journald wrote says
ONLINE while the VM runs and OFFLINE once journald closed it; a container killed at the
timeout leaves it ONLINE.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.qvdctl.test_vm_containers import Node, lxc_node
from tools import debian_image

NET = "10.219.9"  # only ever configured inside the test's own namespace
STOP_TIMEOUT = 30  # the node's default vm.stop.timeout
BOOT_TIMEOUT = 150
# systemd's journal file header: the 8-byte signature, two 32-bit flag words, then the state.
JOURNAL_SIGNATURE = b"LPKSHHRH"
JOURNAL_STATES = {0: "offline", 1: "online", 2: "archived"}


@pytest.fixture(scope="module")
def image() -> debian_image.Image:
    return debian_image.ensure_tarball()


@pytest.fixture
def node(tmp_path: Path, image: debian_image.Image) -> Iterator[Node]:
    with lxc_node(tmp_path / "root", prefix="qvddeb", net=NET, bridge="qvddeb0",
                  stop_timeout=STOP_TIMEOUT) as n:  # fmt: skip
        n.cli.run("osf", "add", "name=debian", "memory=512")
        n.cli.run("di", "add", f"path={image.tarball}", "osf=debian", timeout=300)
        n.cli.run("user", "add", "login=u", "password=p")
        n.cli.run("vm", "add", "name=deb", "user=u", "osf=debian")
        yield n


def journal_state(path: Path) -> str:
    """The state in the header of the journal file ``path``: online, offline or archived."""
    with open(path, "rb") as f:
        header = f.read(17)
    assert header[:8] == JOURNAL_SIGNATURE, f"{path} is not a journal file"
    return JOURNAL_STATES.get(header[16], f"state {header[16]}")


@pytest.mark.timeout(600)
def test_a_debian_systemd_vm_boots_runs_commands_and_stops_cleanly(
    node: Node, image: debian_image.Image
) -> None:
    started = time.monotonic()
    node.cli.run("vm", "start", "-f", "name=deb", timeout=300)
    started_in = time.monotonic() - started
    config = (node.lxcpath / "qvd-1" / "config").read_text()
    assert "\nlxc.signal.halt = SIGRTMIN+3\n" in config  # found from /sbin/init

    done = node.cli.run("vm", "exec", "-f", "name=deb", "--",
                        "systemctl", "is-system-running", "--wait",
                        check=False, timeout=BOOT_TIMEOUT)  # fmt: skip
    booted_in = time.monotonic() - started
    state = done.stdout.strip()
    failed = node.exec("deb", "systemctl --failed --no-legend --plain | cut -d' ' -f1").stdout
    print(f"vm start {started_in:.2f} s; systemd {state!r} {booted_in:.2f} s after vm start; "
          f"failed units: {failed.split() or 'none'}")
    assert state in ("running", "degraded"), (done.stdout, done.stderr)

    # Commands run in it, with their output and status; the Python of the image runs.
    done = node.exec("deb", ". /etc/os-release; echo $VERSION_CODENAME; "
                     "python3 -c 'import sys; print(sys.version_info[0])'; hostname; exit 4")
    assert (done.returncode, done.stdout.split()) == (4, ["bookworm", "3", "deb"]), done.stderr

    overlay = node.root / "overlayfs" / "1-1-overlayfs"
    journal = overlay / "var/log/journal" / debian_image.MACHINE_ID / "system.journal"
    assert journal_state(journal) == "online"

    started = time.monotonic()
    done = node.cli.run("vm", "stop", "-f", "name=deb", timeout=STOP_TIMEOUT + 60)
    stopped_in = time.monotonic() - started
    print(f"vm stop {stopped_in:.2f} s (vm.stop.timeout {STOP_TIMEOUT} s); "
          f"journal {journal_state(journal)}")
    assert stopped_in < STOP_TIMEOUT / 2
    assert "stopping it hard" not in done.stderr, done.stderr
    assert node.state("deb") == "stopped"
    assert journal_state(journal) in ("offline", "archived")
    # journald's last words in that file are its own stop, not a cut-off boot.
    assert re.search(rb"Journal stopped|Stopping.*Journal Service", journal.read_bytes())
