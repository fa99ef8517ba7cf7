"""``make demo`` end to end: it must succeed and leave the host as it found it."""

from __future__ import annotations

import glob
import subprocess
import sys

import pytest
from pyroute2 import netns

from qvdctl.container.query import monitors
from qvdproc.mountinfo import read_mounts
from qvdproc.processes import processes
from tests.support import REPO


def _host_state() -> dict[str, set[str]]:
    mounts = {m.mount_point for m in read_mounts() if "qvd-demo-" in m.mount_point}
    lxc = {f"{m.lxcpath} {m.name}" for m in monitors() if "qvd-demo-" in str(m.lxcpath)}
    return {
        "netns": {n for n in netns.listnetns() if n.startswith("qvddemo-")},
        "tmp": set(glob.glob("/tmp/qvd-demo-*")),
        "mounts": mounts,
        "monitors": lxc,
        # The web admin's server (`qvdctl --root /tmp/qvd-demo-.../storage web`) among them.
        "processes": {p.command_line for p in processes() if "qvd-demo-" in p.command_line},
    }


@pytest.fixture(scope="module")
def demo_run() -> tuple[subprocess.CompletedProcess[str], dict, dict]:
    """One run of ``python -m tools.demo``, with the host's state before and after."""
    before = _host_state()
    done = subprocess.run(
        [sys.executable, "-m", "tools.demo"], cwd=REPO, capture_output=True, text=True,
        timeout=580,
    )  # fmt: skip
    return done, before, _host_state()


@pytest.mark.timeout(600)
def test_demo_leaves_the_host_as_it_found_it(demo_run) -> None:
    done, before, after = demo_run
    assert after == before, done.stdout[-2000:]
    # A failed run says why in one line; a good one says it checked the host.
    if done.returncode != 0:
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    else:
        assert "checked: no mount, namespace, container or file of it is left" in done.stdout


@pytest.mark.timeout(600)
def test_demo_runs_the_workflow(demo_run) -> None:
    done, _, _ = demo_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    for expected in (
        "VM Desk1 started", "VM Desk2 started",
        "overlayfs/1-1-overlayfs/root/demo.txt = 'written in Desk1'",
        "homefs/2-2-homefs/notes.txt = 'home of Desk2'",
        "the base is untouched", "1 packets received",
        # Unprivileged, the node's default: the desktop's root is an ordinary node uid.
        "Desk1: root is node uid 1000000, an ordinary user",
        "VM Desk1 stopped", "VM Desk2 stopped",
        # Served on the host's loopback from the demo's namespace, checked over HTTP.
        "web admin: http://127.0.0.1:", "its VMs page shows 2 desktops running",
    ):
        assert expected in done.stdout, expected


def test_demo_refuses_bad_arguments() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tools.demo", "--vms", "1"], cwd=REPO, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip() == "Error: --vms must be between 2 and 50"
    done = subprocess.run(
        [sys.executable, "-m", "tools.demo", "--image", "windows"], cwd=REPO,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip() == "Error: --image must be one of busybox, debian"
