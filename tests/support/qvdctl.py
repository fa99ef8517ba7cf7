"""Shared pieces of the qvdctl tests: running the real CLI on a throwaway root.

Every root made by ``qvd_root`` is cleaned on the way out: whatever is still
mounted under it is unmounted, deepest first.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import resource
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from qvdctl.container.query import Monitor, monitors
from qvdproc.mountinfo import mounts_under
from tests.support.mounts import force_unmount
from tools.sandbox import QVDCTL, netns_argv

STOCK_UNIONFS = "/usr/bin/unionfs"
# The image name of SPEC §1's examples: extracted to basefs/<osf id>-image.0.22.tgz.
IMAGE = "image.0.22.tgz"


class Cli:
    """``qvdctl --root ROOT ...`` as a subprocess, as an admin would type it.

    With ``netns``, every command runs inside that network namespace (see
    ``tools/sandbox.py``), as the demo does: the tests' bridges, veths
    and containers never meet the host's network.
    """

    def __init__(self, root: Path, netns: str | None = None) -> None:
        self.root = root
        self.netns = netns

    def argv(self, *args: str) -> list[str]:
        argv = [QVDCTL, "--root", str(self.root), *args]
        return netns_argv(self.netns, argv) if self.netns else argv

    def run(self, *args: str, check: bool = True, env: dict | None = None,
            preexec_fn=None, timeout: float = 120, stdin: IO[bytes] | None = None,
            ) -> subprocess.CompletedProcess:
        """``stdin``: a file the command reads (``vm exec`` passes it on), else none."""
        result = subprocess.run(
            self.argv(*args), stdin=stdin,
            capture_output=True, text=True, timeout=timeout,
            env={**os.environ, **(env or {})}, preexec_fn=preexec_fn,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"qvdctl {' '.join(args)} failed: {result.stderr}")
        return result

    def fails(self, *args: str, **kw) -> str:
        """Run a command that must fail; return its one error line."""
        result = self.run(*args, check=False, **kw)
        assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
        return lines[0]

    def json(self, *args: str):
        return json.loads(self.run("--json", *args).stdout)

    def vm(self, name: str) -> dict:
        (row,) = self.json("vm", "list", "-f", f"name={name}")
        return row

    def db_dump(self) -> list[str]:
        """The SQLite database as SQL: equal before and after means nothing changed.

        Less the audit log, which records every command, a refused one too.
        """
        with contextlib.closing(sqlite3.connect(self.root / "qvd.db")) as db:
            return [line for line in db.iterdump() if "audit_log" not in line]


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
