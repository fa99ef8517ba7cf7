"""Turn raw samples into medians, ratios, goal checks, JSON, a Markdown table and a PNG chart.

Every metric is "lower is better" (seconds or MiB). A target's ratio is
``median(unionfs-fuse) / median(target)``: 2.0 means twice as good as unionfs-fuse. When a run
leaves unionfs-fuse out (``--targets``), the first target that ran is the baseline instead, and
the outputs say so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.targets import BASELINE
from benchmarks.workloads import METRICS

log = logging.getLogger(__name__)

QVDFS = "qvdfs"

# The speed goals for qvdfs, as (metric, minimum ratio against unionfs-fuse).
WARM_GOAL = 3.0
WARM_METRICS = ("seqread-warm", "randread-qd1-reread", "randread-qd16-reread", "stat-warm",
                "readdir-warm", "python-cold", "python-warm", "ls-lR-cold", "ls-lR-warm",
                "find-warm")
COPYUP_GOAL = 3.0
KERNEL_SEQREAD_GOAL = 0.8  # warm sequential read, as a fraction of kernel overlayfs' speed
RSS_LIMIT_MIB = 40.0
MOUNT_LIMIT_S = 0.3

CHART_CLIP = 100.0  # bars longer than this many times unionfs-fuse are cut here


@dataclasses.dataclass
class Results:
    """Everything one run measured, as it was measured."""

    targets: list[str]  # targets that ran, in display order
    skipped: dict[str, str]  # target -> why it did not run
    samples: dict[str, dict[str, list[float]]]  # target -> metric -> values
    errors: dict[str, dict[str, list[str]]]  # target -> workload -> error messages
    meta: dict[str, Any]

    @property
    def baseline(self) -> str | None:
        if BASELINE in self.targets:
            return BASELINE
        return self.targets[0] if self.targets else None

    def median(self, target: str, metric: str) -> float | None:
        values = self.samples.get(target, {}).get(metric)
        return statistics.median(values) if values else None

    def ratio(self, target: str, metric: str) -> float | None:
        """How many times better than the baseline; None if either side has no value."""
        if self.baseline is None:
            return None
        base, value = self.median(self.baseline, metric), self.median(target, metric)
        if base is None or value is None or value <= 0:
            return None
        return base / value

    def metrics(self) -> list[str]:
        """Metrics that have a value for some target, in the canonical order."""
        seen = {m for per in self.samples.values() for m in per}
        return [m for m in METRICS if m in seen]


@dataclasses.dataclass
class Goal:
    text: str
    value: float | None
    passed: bool | None  # None when it could not be checked


def goals(results: Results) -> list[Goal]:
    """Check the issue's goals for qvdfs against this run's numbers."""
    if QVDFS not in results.targets or results.baseline != BASELINE:
        return []
    checks = []
    for metric in results.metrics():
        if metric in ("daemon-rss", "mount-time", "unmount-time"):
            continue
        ratio = results.ratio(QVDFS, metric)
        minimum = 1.0
        if metric in WARM_METRICS:
            minimum = WARM_GOAL
        elif metric == "copyup":
            minimum = COPYUP_GOAL
        checks.append(_at_least(f"{metric}: ≥ {minimum:g}× unionfs-fuse", ratio, minimum))
        rival = results.ratio("fuse-overlayfs", metric)
        if rival is not None:
            checks.append(_at_least(f"{metric}: ≥ fuse-overlayfs ({rival:.2f}×)", ratio, rival))
    kernel = results.median("kernel-overlay", "seqread-warm")
    ours = results.median(QVDFS, "seqread-warm")
    if kernel and ours:
        text = f"seqread-warm: ≥ {KERNEL_SEQREAD_GOAL:g}× kernel overlayfs' speed"
        checks.append(_at_least(text, kernel / ours, KERNEL_SEQREAD_GOAL))
    rss = results.median(QVDFS, "daemon-rss")
    checks.append(Goal(f"daemon RSS after the stat walk ≤ {RSS_LIMIT_MIB:g} MiB", rss,
                       None if rss is None else rss <= RSS_LIMIT_MIB))
    mount = results.median(QVDFS, "mount-time")
    checks.append(Goal(f"mount time ≤ {MOUNT_LIMIT_S * 1000:g} ms", mount,
                       None if mount is None else mount <= MOUNT_LIMIT_S))
    return checks


def _at_least(text: str, value: float | None, minimum: float) -> Goal:
    return Goal(text, value, None if value is None else value >= minimum)


def to_json(results: Results) -> dict[str, Any]:
    metrics = {}
    for metric in results.metrics():
        unit, summary = METRICS[metric]
        metrics[metric] = {
            "unit": unit,
            "summary": summary,
            "targets": {
                t: {"samples": results.samples.get(t, {}).get(metric, []),
                    "median": results.median(t, metric),
                    "ratio": results.ratio(t, metric)}
                for t in results.targets if metric in results.samples.get(t, {})
            },
        }
    return {
        "meta": results.meta,
        "baseline": results.baseline,
        "targets": results.targets,
        "skipped": results.skipped,
        "errors": results.errors,
        "metrics": metrics,
        "goals": [dataclasses.asdict(g) for g in goals(results)],
    }


def _fmt(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1000:.3g} ms" if value < 1 else f"{value:.3g} s"
    return f"{value:.3g} {unit}"


def markdown(results: Results) -> str:
    """The table: one row per metric, one column per target, "median (ratio×)"."""
    lines = [
        "| metric | " + " | ".join(results.targets) + " |",
        "|---|" + "---:|" * len(results.targets),
    ]
    for metric in results.metrics():
        unit, _ = METRICS[metric]
        cells = []
        for target in results.targets:
            value = results.median(target, metric)
            if value is None:
                failed = any(results.errors.get(target, {}).values())
                cells.append("error" if failed and metric in _expected(results, target) else "–")
                continue
            ratio = results.ratio(target, metric)
            cells.append(_fmt(value, unit) + (f" ({ratio:.2f}×)" if ratio is not None else ""))
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    notes = [f"- {t} skipped: {why}" for t, why in results.skipped.items()]
    for target, per in results.errors.items():
        for workload, messages in per.items():
            notes.append(f"- {target} failed {workload} ({len(messages)}×): {messages[0]}")
    checks = goals(results)
    if checks:
        if notes:
            notes.append("")
        notes.append("qvdfs goals (ratio = unionfs-fuse median / qvdfs median):")
        notes.append("")
        for g in checks:
            mark = {True: "met", False: "MISSED", None: "not measured"}[g.passed]
            value = "" if g.value is None else f" — {g.value:.3g}"
            notes.append(f"- {mark}: {g.text}{value}")
    meta = results.meta
    header = (f"Run of {meta.get('date', '?')} (qvdfs at {meta.get('qvdfs_version', '?')}, "
              f"{meta.get('fixture_entries', '?')} files, {meta.get('cpus', '?')} CPUs): medians "
              f"of {meta.get('reps')} repetition(s); in brackets, {results.baseline}'s median "
              "divided by the target's (higher is better).")
    return "\n".join([header, "", *lines, "", *notes]).rstrip() + "\n"


def _expected(results: Results, target: str) -> set[str]:
    """Metrics some other target measured, so a gap here means this target failed."""
    return {m for t, per in results.samples.items() if t != target for m in per}


def chart(results: Results, path: Path) -> None:
    """Draw each target's ratio to unionfs-fuse per metric as grouped horizontal bars."""
    import matplotlib

    matplotlib.use("Agg")  # no display on the node
    import matplotlib.pyplot as plt

    metrics = [m for m in results.metrics()
               if any(results.ratio(t, m) is not None for t in results.targets)]
    targets = [t for t in results.targets if t != results.baseline]
    height = 0.8 / max(len(targets), 1)
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(metrics) * max(len(targets), 1) / 2 + 2))
    for i, target in enumerate(targets):
        ys, xs = [], []
        for row, metric in enumerate(metrics):
            ratio = results.ratio(target, metric)
            if ratio is not None:
                ys.append(row + i * height)
                xs.append(min(ratio, CHART_CLIP))
                if ratio > CHART_CLIP:
                    # e.g. copy-up on the plain directory, which copies nothing: keep the
                    # scale readable and print the value instead.
                    ax.text(CHART_CLIP, ys[-1], f" {ratio:.0f}×", va="center", fontsize=7)
        ax.barh(ys, xs, height=height, label=target)
    ax.axvline(1.0, color="black", linewidth=1, linestyle="--")
    ax.set_xscale("log")
    ax.set_yticks([row + height * (len(targets) - 1) / 2 for row in range(len(metrics))])
    ax.set_yticklabels(metrics)
    ax.invert_yaxis()
    ax.set_xlabel(f"times better than {results.baseline} (median; log scale; dashed line = 1)")
    ax.set_title(f"Median ratio to {results.baseline}, {results.meta.get('reps')} repetition(s)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(results: Results, out: Path) -> tuple[Path, Path, Path]:
    """Write ``latest.json``, ``latest.md`` and ``latest.png`` into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = out / "latest.json", out / "latest.md", out / "latest.png"
    json_path.write_text(json.dumps(to_json(results), indent=2) + "\n")
    md_path.write_text(markdown(results))
    chart(results, png_path)
    return json_path, md_path, png_path


def from_json(data: dict[str, Any]) -> Results:
    """Rebuild the results of an earlier run from its ``latest.json``."""
    samples: dict[str, dict[str, list[float]]] = {}
    for metric, info in data["metrics"].items():
        for target, figures in info["targets"].items():
            samples.setdefault(target, {})[metric] = figures["samples"]
    return Results(data["targets"], data["skipped"], samples, data["errors"], data["meta"])


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.report JSON [--chart PNG]``: print an earlier run's table again."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                     description="Print the Markdown table of a saved run.")
    parser.add_argument("json", type=Path, help="a latest.json written by benchmarks.run")
    parser.add_argument("--chart", type=Path, help="also redraw the chart into this PNG")
    args = parser.parse_args(argv)
    try:
        results = from_json(json.loads(args.json.read_text()))
    except (OSError, ValueError, KeyError) as exc:
        print(f"bench: cannot read {args.json}: {exc}", file=sys.stderr)
        return 1
    print(markdown(results), end="")
    if args.chart:
        chart(results, args.chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
