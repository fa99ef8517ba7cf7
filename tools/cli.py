"""``qvdctl`` run as a subprocess, as an admin types it: for the tests, the demo's and
the tools' harnesses (``tools/fleet.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from tools.sandbox import QVDCTL, netns_argv


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

    def run(self, *args: str, check: bool = True, env: dict[str, str] | None = None,
            preexec_fn: Callable[[], object] | None = None, timeout: float = 120,
            stdin: IO[bytes] | None = None) -> subprocess.CompletedProcess[str]:
        """``stdin``: a file the command reads (``vm exec`` passes it on), else none."""
        result = subprocess.run(
            self.argv(*args), stdin=stdin,
            capture_output=True, text=True, timeout=timeout,
            env={**os.environ, **(env or {})}, preexec_fn=preexec_fn,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"qvdctl {' '.join(args)} failed: {result.stderr}")
        return result

    def fails(self, *args: str, **kw: Any) -> str:
        """Run a command that must fail; return its one error line."""
        result = self.run(*args, check=False, **kw)
        assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
        return lines[0]

    def json(self, *args: str) -> Any:
        return json.loads(self.run("--json", *args).stdout)

    def vm(self, name: str) -> dict[str, Any]:
        row: dict[str, Any]
        (row,) = self.json("vm", "list", "-f", f"name={name}")
        return row

    def db_dump(self) -> list[str]:
        """The SQLite database as SQL: equal before and after means nothing changed.

        Less the audit log, which records every command, a refused one too.
        """
        with contextlib.closing(sqlite3.connect(self.root / "qvd.db")) as db:
            return [line for line in db.iterdump() if "audit_log" not in line]
