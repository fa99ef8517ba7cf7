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
KERNEL = "kernel-overlay"
RIVAL = "fuse-overlayfs"

# Issue 10's goals for qvdfs. Every workload: at least as good as unionfs-fuse, and at least
# fuse-overlayfs' ratio to it. The rows below have goals of their own (or none).
BASELINE_GOAL = 1.0
OWN_GOAL = ("pagecache-4mounts", "getattr-daemon-cpu", "getattr-latency", "daemon-rss",
            "mount-time", "unmount-time")
# Reads and writes of file data: at least this fraction of kernel overlayfs' speed.
DATA_METRICS = ("seqread-cold", "seqread-warm", "randread-qd1-first", "randread-qd1-reread",
                "randread-qd16-first", "randread-qd16-reread", "seqwrite")
KERNEL_DATA_GOAL = 0.8
PAGECACHE_METRIC = "pagecache-4mounts"
PAGECACHE_LIMIT = 1.25  # page cache growth, times kernel overlayfs'
GETATTR_METRIC = "getattr-daemon-cpu"
GETATTR_LIMIT_US = 20.0
RSS_LIMIT_MIB = 20.0
MOUNT_LIMIT_S = 0.05
COUNTER_TOP = 5  # opcodes shown per workload in the counters table

CHART_CLIP = 100.0  # bars longer than this many times unionfs-fuse are cut here


@dataclasses.dataclass
class Results:
    """Everything one run measured, as it was measured."""

    targets: list[str]  # targets that ran, in display order
    skipped: dict[str, str]  # target -> why it did not run
    samples: dict[str, dict[str, list[float]]]  # target -> metric -> values
    errors: dict[str, dict[str, list[str]]]  # target -> workload -> error messages
    meta: dict[str, Any]
    # target -> workload -> caveats about its numbers (see workloads.Context.notes)
    notes: dict[str, dict[str, list[str]]] = dataclasses.field(default_factory=dict)
    # workload -> one ``qvdfs stats --json`` object per repetition, when qvdfs has the command
    counters: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)

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

    def versus_kernel(self, target: str, metric: str) -> float | None:
        """The target's median divided by kernel overlayfs' (so 1.25 = 25 % more, or slower)."""
        kernel, value = self.median(KERNEL, metric), self.median(target, metric)
        if kernel is None or value is None or kernel <= 0:
            return None
        return value / kernel

    def metrics(self) -> list[str]:
        """Metrics that have a value for some target, in the canonical order."""
        seen = {m for per in self.samples.values() for m in per}
        return [m for m in METRICS if m in seen]


@dataclasses.dataclass
class Goal:
    text: str
    value: float | None
    passed: bool | None  # None when it could not be checked
    unit: str = "×"  # of ``value``: "×" for a ratio, else "MiB", "µs", "s"
    metric: str | None = None  # the table row it is about


def goals(results: Results) -> list[Goal]:
    """Check issue 10's goals for qvdfs against this run's numbers."""
    if QVDFS not in results.targets:
        return []
    checks = []
    if results.baseline == BASELINE:
        for metric in results.metrics():
            if metric in OWN_GOAL:
                continue
            ratio = results.ratio(QVDFS, metric)
            text = f"{metric}: ≥ {BASELINE_GOAL:g}× unionfs-fuse"
            checks.append(_at_least(metric, text, ratio, BASELINE_GOAL))
            rival = results.ratio(RIVAL, metric)
            if rival is not None:
                checks.append(_at_least(metric, f"{metric}: ≥ {RIVAL} ({rival:.2f}×)", ratio,
                                        rival))
    measured = results.samples.get(QVDFS, {})
    for metric in DATA_METRICS:
        if metric in measured:
            share = results.versus_kernel(QVDFS, metric)
            speed = None if not share else 1 / share
            text = f"{metric}: ≥ {KERNEL_DATA_GOAL:g}× kernel overlayfs' speed"
            checks.append(_at_least(metric, text, speed, KERNEL_DATA_GOAL))
    share = results.versus_kernel(QVDFS, PAGECACHE_METRIC)
    checks.append(Goal(f"{PAGECACHE_METRIC}: page cache growth ≤ {PAGECACHE_LIMIT:g}× kernel "
                       "overlayfs'", share, None if share is None else share <= PAGECACHE_LIMIT,
                       "×", PAGECACHE_METRIC))
    cpu = results.median(QVDFS, GETATTR_METRIC)
    others = [f"{t} {results.median(t, GETATTR_METRIC):.3g} µs" for t in results.targets
              if t != QVDFS and results.median(t, GETATTR_METRIC) is not None]
    checks.append(Goal(f"{GETATTR_METRIC}: daemon CPU per GETATTR ≤ {GETATTR_LIMIT_US:g} µs"
                       + (f" ({', '.join(others)})" if others else ""), cpu,
                       None if cpu is None else cpu <= GETATTR_LIMIT_US, "µs", GETATTR_METRIC))
    rss = results.median(QVDFS, "daemon-rss")
    checks.append(Goal(f"daemon-rss: daemon RSS after the stat walk ≤ {RSS_LIMIT_MIB:g} MiB", rss,
                       None if rss is None else rss <= RSS_LIMIT_MIB, "MiB", "daemon-rss"))
    mount = results.median(QVDFS, "mount-time")
    checks.append(Goal(f"mount-time: mount time ≤ {MOUNT_LIMIT_S * 1000:g} ms", mount,
                       None if mount is None else mount <= MOUNT_LIMIT_S, "s", "mount-time"))
    return checks


def _at_least(metric: str, text: str, value: float | None, minimum: float) -> Goal:
    return Goal(text, value, None if value is None else value >= minimum, "×", metric)


def goal_marks(checks: list[Goal]) -> dict[str, str]:
    """Per table row, "met" if all its goals were met, "MISSED" if any was missed."""
    marks: dict[str, str] = {}
    for g in checks:
        if g.metric is None or g.passed is None:
            continue
        if g.passed is False:
            marks[g.metric] = "MISSED"
        else:
            marks.setdefault(g.metric, "met")
    return marks


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
        "notes": results.notes,
        "counters": results.counters,
    }


def _fmt(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1000:.3g} ms" if value < 1 else f"{value:.3g} s"
    if unit == "×":
        return f"{value:.3g}×"
    # 1303 MiB, not 1.3e+03 MiB
    return f"{value:.0f} {unit}" if abs(value) >= 1000 else f"{value:.3g} {unit}"


def markdown(results: Results) -> str:
    """The table: one row per metric, one column per target, "median (ratio×)".

    Then the comparison with kernel overlayfs, skips, failures and notes, issue 10's goals
    (met / MISSED per line), and qvdfs' own per-opcode counters when it has them.
    """
    checks = goals(results)
    marks = goal_marks(checks)
    # A last column marks each row met / MISSED when qvdfs ran.
    goal_column = bool(checks)
    lines = [
        "| metric | " + " | ".join(results.targets) + " |" + (" qvdfs goals |" if goal_column
                                                             else ""),
        "|---|" + "---:|" * len(results.targets) + ("---|" if goal_column else ""),
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
            cells.append(_fmt(value, unit) + (f" ({ratio:.2f}×)" if ratio is not None else "")
                         + (" (see the notes)" if _noted(results, target, metric) else ""))
        if goal_column:
            cells.append(marks.get(metric, ""))
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    if GETATTR_METRIC in results.metrics():
        lines += ["", f"{GETATTR_METRIC} is the daemon's CPU time (/proc/PID/stat utime + stime) "
                  "per `os.stat` of the mount's root on a mount with a zero attribute timeout "
                  "(`-o attr_timeout=0`; fuse-overlayfs: `-o timeout=0`); the targets without a "
                  "daemon have none. getattr-latency is the caller's wall time per stat."]
    lines += _kernel_table(results)
    notes = [f"- {t} skipped: {why}" for t, why in results.skipped.items()]
    for target, per in results.errors.items():
        for workload, messages in per.items():
            notes.append(f"- {target} failed {workload} ({len(messages)}×): {messages[0]}")
    for target, per in results.notes.items():
        for workload, messages in per.items():
            notes += [f"- {target}, {workload}: {m}" for m in messages]
    if checks:
        if notes:
            notes.append("")
        notes.append("qvdfs goals (issue 10; a ratio to unionfs-fuse is its median / qvdfs', "
                     "to kernel overlayfs as the line says):")
        notes.append("")
        for g in checks:
            mark = {True: "met", False: "MISSED", None: "not measured"}[g.passed]
            shown = "" if g.value is None else f" — {_fmt(g.value, g.unit)}"
            notes.append(f"- {mark}: {g.text}{shown}")
    meta = results.meta
    header = (f"Run of {meta.get('date', '?')} (qvdfs at {meta.get('qvdfs_version', '?')}, "
              f"{meta.get('fixture_entries', '?')} files, {meta.get('cpus', '?')} CPUs): medians "
              f"of {meta.get('reps')} repetition(s); in brackets, {results.baseline}'s median "
              "divided by the target's (higher is better).")
    return "\n".join([header, "", *lines, "", *notes, *_counter_table(results)]).rstrip() + "\n"


def _noted(results: Results, target: str, metric: str) -> bool:
    """Whether the workload that measured ``metric`` left a note for ``target``.

    A workload's metrics are named after it (``getattr`` measures ``getattr-daemon-cpu``).
    """
    return any(metric.startswith(workload + "-") and messages
               for workload, messages in results.notes.get(target, {}).items())


def _kernel_table(results: Results) -> list[str]:
    """Every target against kernel overlayfs, for the rows whose goals are set against it."""
    rows = [m for m in (*DATA_METRICS, PAGECACHE_METRIC) if m in results.metrics()]
    if KERNEL not in results.targets or not rows:
        return []
    lines = ["", "Against kernel overlayfs: for file data, its median divided by the target's "
             "(speed; higher is better); for the page cache, the target's growth divided by "
             "its (lower is better).", "",
             "| metric | " + " | ".join(results.targets) + " |",
             "|---|" + "---:|" * len(results.targets)]
    for metric in rows:
        cells = []
        for target in results.targets:
            share = results.versus_kernel(target, metric)
            if share is None or share <= 0:
                cells.append("–")
            elif metric == PAGECACHE_METRIC:
                cells.append(f"{share:.2f}× growth")
            else:
                cells.append(f"{1 / share:.2f}× speed")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return lines


def _counter_table(results: Results) -> list[str]:
    """qvdfs' per-opcode counters per workload (medians over the repetitions), if it had any."""
    rows = []
    order = [w for w in results.meta.get("workloads", []) if w in results.counters]
    order += [w for w in results.counters if w not in order]
    for workload in order:
        runs = [r for r in results.counters[workload]
                if isinstance(r, dict) and isinstance(r.get("opcodes"), dict)]
        if not runs:
            continue
        opcodes: dict[str, tuple[float, float]] = {}
        names = {name for r in runs for name in r["opcodes"]}
        for name in names:
            counts = [_number(r["opcodes"].get(name), "count") for r in runs]
            times = [_number(r["opcodes"].get(name), "ns") for r in runs]
            opcodes[name] = (statistics.median(counts), statistics.median(times))
        top = sorted(opcodes.items(), key=lambda item: -item[1][1])[:COUNTER_TOP]
        shown = "; ".join(f"{name} {count:.0f}, {ns / 1e6:.3g} ms" for name, (count, ns) in top)
        cells = []
        for key in ("copy_ups", "passthrough_opens"):
            values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
            cells.append(f"{statistics.median(values):.0f}" if values else "–")
        rows.append(f"| {workload} | {cells[0]} | {cells[1]} | {shown or '–'} |")
    if not rows:
        return []
    return ["", "qvdfs daemon counters per workload (`qvdfs stats MOUNTPOINT --json` just before "
            "the unmount, so mount and workload together; medians over the repetitions; the "
            f"{COUNTER_TOP} opcodes that took the most daemon time):", "",
            "| workload | copy-ups | passthrough opens | opcode count, total daemon time |",
            "|---|---:|---:|---|", *rows]


def _number(entry: Any, key: str) -> float:
    value = entry.get(key) if isinstance(entry, dict) else None
    return float(value) if isinstance(value, (int, float)) else 0.0


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
    marks = goal_marks(goals(results))
    ax.set_yticks([row + height * (len(targets) - 1) / 2 for row in range(len(metrics))])
    # Each row says whether qvdfs met issue 10's goals for it.
    ax.set_yticklabels([f"{m} [{marks[m]}]" if m in marks else m for m in metrics])
    ax.invert_yaxis()
    ax.set_xlabel(f"times better than {results.baseline} (median; log scale; dashed line = 1)"
                  + ("\n[met] / [MISSED]: whether qvdfs met issue 10's goals for the row"
                     if marks else ""))
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
    return Results(data["targets"], data["skipped"], samples, data["errors"], data["meta"],
                   data.get("notes", {}), data.get("counters", {}))


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
