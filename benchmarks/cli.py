"""``make bench-cli``: how long an admin waits for ``qvdctl``.

    python -m benchmarks.cli [--runs 15] [--vms 5] [--qvdctl PROGRAM]

Runs the installed ``qvdctl`` (next to this Python, i.e. ``.venv/bin/qvdctl``; or
``--qvdctl``, e.g. another checkout's, to compare) as an admin would: ``--help``, ``vm list`` and ``config get``, each a fresh process, on a
throwaway ``--root`` holding a user, an OSF and a few stopped VMs. The commands take
turns, so the machine's noise hits them alike. Printed: each command's median and
90th percentile wall time, from fork to exit, in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

INSTALLED = str(Path(sys.executable).parent / "qvdctl")

COMMANDS = {
    "qvdctl --help": ["--help"],
    "qvdctl vm list": ["vm", "list"],
    "qvdctl config get": ["config", "get"],
}


def _qvdctl(program: str, root: Path, args: list[str]) -> None:
    # QVD_DB or QVD_NODE_CONF in the caller's environment would point elsewhere.
    env = {k: v for k, v in os.environ.items() if not k.startswith("QVD_")}
    result = subprocess.run([program, "--root", str(root), *args], env=env,
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise SystemExit(f"qvdctl {' '.join(args)} failed: {result.stderr.strip()}")


def _populate(program: str, root: Path, vms: int) -> None:
    _qvdctl(program, root, ["osf", "add", "name=bench"])
    _qvdctl(program, root, ["user", "add", "login=bench", "password=bench"])
    for i in range(1, vms + 1):
        _qvdctl(program, root, ["vm", "add", f"name=vm{i}", "user=bench", "osf=bench"])


def run(program: str, runs: int, vms: int) -> dict[str, list[float]]:
    """Wall times in ms of ``runs`` runs of each command, after one warm-up run each."""
    samples: dict[str, list[float]] = {name: [] for name in COMMANDS}
    with tempfile.TemporaryDirectory(prefix="qvd-bench-cli-") as tmp:
        root = Path(tmp) / "root"
        _populate(program, root, vms)
        for args in COMMANDS.values():
            _qvdctl(program, root, args)
        for _ in range(runs):
            for name, args in COMMANDS.items():
                began = time.perf_counter()
                _qvdctl(program, root, args)
                samples[name].append((time.perf_counter() - began) * 1000)
    return samples


def table(samples: dict[str, list[float]]) -> str:
    runs = min(len(values) for values in samples.values())
    lines = [f"| command ({runs} runs) | median ms | p90 ms |", "|---|---:|---:|"]
    for name, values in samples.items():
        p90 = statistics.quantiles(values, n=10, method="inclusive")[-1]
        lines.append(f"| `{name}` | {statistics.median(values):.0f} | {p90:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cli", description=__doc__)
    parser.add_argument("--runs", type=int, default=15, help="runs of each command (default 15)")
    parser.add_argument("--vms", type=int, default=5, help="VMs on the root (default 5)")
    parser.add_argument("--qvdctl", default=INSTALLED, metavar="PROGRAM",
                        help=f"the qvdctl to run (default {INSTALLED})")
    args = parser.parse_args(argv)
    if args.runs < 2:
        parser.error("--runs needs at least 2")
    if not os.access(args.qvdctl, os.X_OK):
        raise SystemExit(f"{args.qvdctl} is not installed (make setup installs it)")
    print(table(run(args.qvdctl, args.runs, args.vms)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
