"""Side-by-side benchmarks of qvdfs against the union filesystems it replaces.

One run mounts every target (plain directory, kernel overlayfs, unionfs-fuse, fuse-overlayfs,
qvdfs) over the same read-only lower tree, runs each workload on a fresh mount with an empty
upper branch, interleaving the targets so machine noise hits them alike, and reports medians
and ratios against unionfs-fuse.

Modules:
    fixture    builds and caches the lower tree (a slice of the host's /usr plus big files)
    targets    mounts and unmounts each target, measures mount time, finds daemon pids
    workloads  the timed workloads; each returns named measurements
    report     medians, ratios, goal checks, JSON, Markdown table and PNG chart
    run        the command line: ``python -m benchmarks.run``
"""

from __future__ import annotations

# Everything the harness creates lives below this folder: cached fixtures and per-run scratch.
DEFAULT_CACHE = "/var/tmp/qvd-bench"
