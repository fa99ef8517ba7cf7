"""Shared pieces of the qvdctl tests: running the real CLI on a throwaway root.

Every root made by ``qvd_root`` is cleaned on the way out: whatever is still
mounted under it is unmounted, deepest first.
"""

from __future__ import annotations

import contextlib
import os
import pty
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path

from qvdctl.container.query import Monitor, monitors
from qvdproc.mountinfo import mounts_under
from tests.support.mounts import force_unmount
from tools.cli import Cli as Cli  # re-exported: the tests and benchmarks import it here
from tools.sandbox import QVDCTL  # noqa: F401 (the tests import it from here)

STOCK_UNIONFS = "/usr/bin/unionfs"
# The image name of SPEC §1's examples: extracted to basefs/<osf id>-image.0.22.tgz.
IMAGE = "image.0.22.tgz"


def run_on_terminal(cli: Cli, args: list[str], *typed: str) -> subprocess.CompletedProcess:
    """``qvdctl ARGS`` with a terminal as standard input, typing ``typed`` at each prompt."""
    leader, follower = pty.openpty()
    try:
        # A session of its own: no controlling terminal, so getpass asks on stdin, the pty.
        proc = subprocess.Popen(
            cli.argv(*args), stdin=follower,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
        prompts = b""
        for asked, answer in enumerate(typed):
            # Type only once asked: getpass drops what was typed before it turned echo off.
            while prompts.count(b": ") <= asked:
                chunk = os.read(proc.stderr.fileno(), 1024)
                assert chunk, prompts
                prompts += chunk
            os.write(leader, answer.encode() + b"\n")
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(leader)
        os.close(follower)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(),
                                       (prompts + err).decode())


def lxc_monitors(lxcpath: Path) -> list[Monitor]:
    """liblxc's monitors of the containers in ``lxcpath``: one per running container."""
    return [m for m in monitors() if m.lxcpath == lxcpath]


def cleanup_root(root: Path) -> None:
    for point in mounts_under(root):
        force_unmount(point)


def stock_unionfs_wrapper(dest: Path) -> Path:
    """A stand-in for ``command.unionfs-fuse`` that records its argv, then runs the stock binary.

    Stock unionfs raises RLIMIT_NOFILE to max_files and refuses to start when that
    exceeds the hard limit: 20000 here, and this machine's root lacks
    CAP_SYS_RESOURCE, so the limit cannot be raised. The wrapper passes every word
    through unchanged except max_files=32000, lowered to the hard limit; the tests
    check the recorded argv (``<dest>.argv``) is exactly SPEC §3's line.
    """
    hard = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 32000)
    dest.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$0" "$@" > "{dest}.argv"\n'
        "for a in \"$@\"; do\n"
        f'  [ "$a" = max_files=32000 ] && a=max_files={hard}\n'
        '  set -- "$@" "$a"; shift\n'
        "done\n"
        f'exec {STOCK_UNIONFS} "$@"\n'
    )
    dest.chmod(0o755)
    return dest


@contextlib.contextmanager
def scratch_lxcpath(parent: Path) -> Iterator[Path]:
    """An empty lxcpath under ``parent``; whatever a failed test left running in it (and
    only in it) is stopped by name on the way out."""
    path = parent / "lxc"
    path.mkdir()
    try:
        yield path
    finally:
        for entry in path.iterdir():
            subprocess.run(["lxc-stop", "-P", str(path), "-n", entry.name, "-k"], capture_output=True)
