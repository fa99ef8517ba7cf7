"""The timed workloads. Each runs on one fresh mount and returns named measurements.

A workload gets a ``Context`` (the mount, the fixture, a way to drop the caches) and returns
``{metric name: value}``; ``METRICS`` says each metric's unit. All values are "lower is better"
(seconds or MiB), so the ratio ``unionfs-fuse / target`` reads as "times better than
unionfs-fuse" everywhere.

"cold" means: the mount is fresh (no daemon cache) and the kernel's page, dentry and inode
caches were just dropped. "warm" means: the same thing again right after, on the same mount.

Workloads that write put new names under ``bench-*`` at the top of the union, so on the plain
target ``Fixture.repair()`` can undo them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks import targets
from benchmarks.fixture import SCRATCH_PREFIX, Fixture
from benchmarks.targets import Mounted

CHUNK = 1 << 20
COMMAND_TIMEOUT = 600  # a hung daemon fails its workload instead of hanging the run

# Imported by the boot-like Python workload: a typical service start-up.
PYTHON_MODULES = (
    "argparse", "asyncio", "collections", "decimal", "email.parser", "http.client", "json",
    "logging", "pathlib", "sqlite3", "subprocess", "typing", "xml.etree.ElementTree",
)


class WorkloadError(Exception):
    """A workload ran but the target gave a wrong result (checked, so no number is faked)."""


@dataclasses.dataclass
class Context:
    """What a workload may use: where to work, the fixture, and cache control."""

    mounted: Mounted
    fixture: Fixture
    # An empty folder (not created yet) where a workload may mount more of the same target.
    more: Path | None = None
    # Caveats about this run's numbers, shown under the table (e.g. a daemon that was not
    # asked every time).
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.mounted.root

    def scratch(self, name: str) -> Path:
        """A new folder at the top of the union for the workload's own files."""
        path = self.root / f"{SCRATCH_PREFIX}{name}"
        path.mkdir()
        return path

    def drop_caches(self) -> None:
        drop_caches()


def drop_caches() -> None:
    """Write back dirty data, then drop the page cache, dentries and inodes (needs root)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def cached_mib() -> float:
    """The page cache's size now: /proc/meminfo ``Cached``, in MiB."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) / 1024
    raise WorkloadError("/proc/meminfo has no Cached line")


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _run(argv: list[str], keep_output: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command from ``/``; its stdout is kept, or discarded if ``keep_output`` is False."""
    stdout = subprocess.PIPE if keep_output else subprocess.DEVNULL
    done = subprocess.run(argv, cwd="/", stdout=stdout, stderr=subprocess.PIPE, text=True,
                          timeout=COMMAND_TIMEOUT)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise WorkloadError(f"{Path(argv[0]).name} exited {done.returncode}: {tail}")
    return done


# --- 1. sequential read -------------------------------------------------------------------------

def _read_all(path: Path) -> int:
    buf = bytearray(CHUNK)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total


def seqread(ctx: Context) -> dict[str, float]:
    path = ctx.root / ctx.fixture.big_path("seq.bin")
    size = ctx.fixture.big["seq.bin"]
    ctx.drop_caches()
    result = {}
    for phase in ("cold", "warm"):
        start = time.perf_counter()
        got = _read_all(path)
        result[f"seqread-{phase}"] = time.perf_counter() - start
        if got != size:
            raise WorkloadError(f"read {got} bytes of {path}, expected {size}")
    return result


# --- 2. random 4 KiB reads with fio -------------------------------------------------------------

def _fio_seconds(path: Path, size: int, io_size: int, depth: int) -> float:
    engine = ["--ioengine=psync"] if depth == 1 else ["--ioengine=io_uring", f"--iodepth={depth}"]
    done = _run([
        "fio", "--name=randread", f"--filename={path}", "--rw=randread", "--bs=4k", "--readonly",
        # invalidate=0: fio must not drop the page cache itself, or "re-read" would be cold too.
        "--invalidate=0", "--randrepeat=1", f"--size={size}", f"--io_size={io_size}",
        "--output-format=json", *engine,
    ])
    read = json.loads(done.stdout)["jobs"][0]["read"]
    if read["io_bytes"] != io_size:
        raise WorkloadError(f"fio read {read['io_bytes']} bytes, expected {io_size}")
    if depth == 1:
        # One request at a time: the run lasts the sum of the latencies. fio's own runtime
        # is whole milliseconds, too coarse for cached re-reads.
        return float(read["lat_ns"]["mean"] * read["total_ios"] / 1e9)
    return float(read["io_bytes"] / read["bw_bytes"])


def randread(ctx: Context) -> dict[str, float]:
    """Queue depth 1 (psync) and 16 (io_uring); first touch after a cache drop, then re-read.

    fio's seed is fixed (randrepeat), so the re-read visits the same offsets.
    """
    path = ctx.root / ctx.fixture.big_path("rand.bin")
    size = ctx.fixture.big["rand.bin"]
    io_size = ctx.fixture.spec.random_io
    result = {}
    for depth in (1, 16):
        ctx.drop_caches()
        result[f"randread-qd{depth}-first"] = _fio_seconds(path, size, io_size, depth)
        result[f"randread-qd{depth}-reread"] = _fio_seconds(path, size, io_size, depth)
    return result


# --- 3. sequential write ------------------------------------------------------------------------

def seqwrite(ctx: Context) -> dict[str, float]:
    size = ctx.fixture.spec.big_size
    path = ctx.scratch("seqwrite") / "new.bin"
    block = os.urandom(CHUNK)

    def write() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for _ in range(size // CHUNK):
                os.write(fd, block)
            os.fsync(fd)
        finally:
            os.close(fd)

    seconds = _timed(write)
    if path.stat().st_size != size // CHUNK * CHUNK:
        raise WorkloadError(f"{path} has {path.stat().st_size} bytes after the write")
    return {"seqwrite": seconds}


# --- 4. copy-up ---------------------------------------------------------------------------------

def copyup(ctx: Context) -> dict[str, float]:
    """Append one byte to a big base file, which copies it to the upper branch first.

    The base file is read into the page cache beforehand (directly, not through the union), so
    this measures the copy path rather than the disk.
    """
    rel = ctx.fixture.big_path("copyup.bin")
    size = ctx.fixture.big["copyup.bin"]
    _read_all(ctx.fixture.lower / rel)
    path = ctx.root / rel

    def append() -> None:
        with open(path, "ab", buffering=0) as f:
            f.write(b"x")

    seconds = _timed(append)
    if path.stat().st_size != size + 1:
        raise WorkloadError(f"{path} has {path.stat().st_size} bytes after the append")
    upper = ctx.mounted.upper
    if upper is not None and (upper / rel).stat().st_size != size + 1:
        raise WorkloadError(f"the upper branch's copy of {rel} has the wrong size")
    return {"copyup": seconds}


# --- 5. stat walk, and daemon memory after it ---------------------------------------------------

def stat(ctx: Context) -> dict[str, float]:
    paths = [str(ctx.root / p) for p in ctx.fixture.dirs + ctx.fixture.entries]
    ctx.drop_caches()
    result = {}
    for phase in ("cold", "warm"):
        start = time.perf_counter()
        for p in paths:
            os.lstat(p)
        result[f"stat-{phase}"] = time.perf_counter() - start
    rss = ctx.mounted.daemon_rss_mib()
    if rss is not None:
        result["daemon-rss"] = rss
    return result


# --- 6. readdir of every directory --------------------------------------------------------------

def readdir(ctx: Context) -> dict[str, float]:
    paths = [ctx.root / d for d in ctx.fixture.dirs]
    expected = len(ctx.fixture.dirs) - 1 + len(ctx.fixture.entries)
    ctx.drop_caches()
    result = {}
    for phase in ("cold", "warm"):
        start = time.perf_counter()
        seen = 0
        for p in paths:
            with os.scandir(p) as it:
                for _ in it:
                    seen += 1
        result[f"readdir-{phase}"] = time.perf_counter() - start
        if seen != expected:
            raise WorkloadError(f"readdir saw {seen} entries, expected {expected}")
    return result


# --- 7. many small files ------------------------------------------------------------------------

def smallfiles(ctx: Context) -> dict[str, float]:
    """Create, write 4 KiB to and close N files (100 per folder), then delete them all."""
    top = ctx.scratch("small")
    count = ctx.fixture.spec.small_files
    folders = [top / f"d{i:03d}" for i in range((count + 99) // 100)]
    files = [folders[i // 100] / f"f{i:05d}" for i in range(count)]
    data = os.urandom(4096)

    def create() -> None:
        for folder in folders:
            os.mkdir(folder)
        for path in files:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.close(fd)

    def delete() -> None:
        for path in files:
            os.unlink(path)
        for folder in folders:
            os.rmdir(folder)

    result = {"smallfiles-create": _timed(create)}
    result["smallfiles-delete"] = _timed(delete)
    if os.listdir(top):
        raise WorkloadError(f"{top} is not empty after deleting every file")
    return result


# --- 8. untar -----------------------------------------------------------------------------------

def untar(ctx: Context) -> dict[str, float]:
    dest = ctx.scratch("untar")
    seconds = _timed(lambda: _run(["tar", "-xf", str(ctx.fixture.tarball), "-C", str(dest)]))
    return {"untar": seconds}


# --- 9. boot-like mix ---------------------------------------------------------------------------

def python(ctx: Context) -> dict[str, float]:
    """Start the fixture's interpreter from the union and import a dozen modules.

    ``-I -S`` keeps it from reading anything outside its own prefix, which Python derives from
    the executable's location, so its standard library is read through the union; every
    imported module's ``__file__`` is checked to lie inside the union.
    """
    if ctx.fixture.python is None:
        raise WorkloadError("this fixture has no interpreter")
    code = (
        "import importlib, json, sys\n"
        f"mods = [importlib.import_module(m) for m in {PYTHON_MODULES!r}]\n"
        "print(json.dumps([sys.prefix] + [m.__file__ for m in mods]))\n"
    )
    argv = [str(ctx.root / ctx.fixture.python), "-I", "-S", "-c", code]
    ctx.drop_caches()
    result = {}
    for phase in ("cold", "warm"):
        start = time.perf_counter()
        done = _run(argv)
        result[f"python-{phase}"] = time.perf_counter() - start
        outside = [f for f in json.loads(done.stdout) if not f.startswith(str(ctx.root) + "/")]
        if outside:
            raise WorkloadError(f"the interpreter read {outside[0]} from outside the union")
    return result


# --- 10. ls -lR and find -----------------------------------------------------------------------

def lstree(ctx: Context) -> dict[str, float]:
    """``ls -lR`` over the whole tree, cold and warm, then ``find -type f``."""
    ctx.drop_caches()
    result = {}
    for phase in ("cold", "warm"):
        start = time.perf_counter()
        _run(["ls", "-lR", str(ctx.root)], keep_output=False)
        result[f"ls-lR-{phase}"] = time.perf_counter() - start
    start = time.perf_counter()
    _run(["find", str(ctx.root), "-type", "f"], keep_output=False)
    result["find-warm"] = time.perf_counter() - start
    return result


# --- 11. page cache shared between mounts of one base ------------------------------------------

PAGECACHE_MOUNTS = 4


def pagecache(ctx: Context) -> dict[str, float]:
    """Four mounts of the same target over the one base, each reading the same base file once.

    Measures how much the page cache grows (``Cached`` in /proc/meminfo, after a sync and a
    cache drop taken with all four mounts up, so the daemons' own start-up is not counted).
    Kernel overlayfs keeps one copy, the base file's own; a FUSE union without passthrough
    keeps one per mount plus the base file's. On the plain directory the four reads are of
    one file. Other processes' file I/O during the reads lands in the figure too.
    """
    if ctx.more is None:
        raise WorkloadError("this run gave the workload no folder for its extra mounts")
    rel = ctx.fixture.big_path("seq.bin")
    size = ctx.fixture.big["seq.bin"]
    with contextlib.ExitStack() as stack:
        roots = [ctx.root]
        for i in range(1, PAGECACHE_MOUNTS):
            more = stack.enter_context(targets.mount(ctx.mounted.target, ctx.fixture.lower,
                                                     ctx.more / f"pagecache-{i}"))
            roots.append(more.root)
        ctx.drop_caches()
        before = cached_mib()
        for root in roots:
            got = _read_all(root / rel)
            if got != size:
                raise WorkloadError(f"read {got} bytes of {root / rel}, expected {size}")
        grown = cached_mib() - before
    return {"pagecache-4mounts": grown}


# --- 12. daemon CPU per null-ish request --------------------------------------------------------

# Below this share of stats reaching the daemon, the row says its attributes were cached.
REACHED_SHARE = 0.95


def getattr_(ctx: Context) -> dict[str, float]:
    """``os.stat`` of the mount's root N times on a mount with a zero attribute timeout.

    Every stat then costs the daemon one GETATTR (the root needs no LOOKUP). Reports the
    caller's wall time per stat (every target) and the daemon's CPU time per request
    (/proc/<pid>/stat utime + stime; FUSE targets). The daemon's read calls
    (/proc/<pid>/io syscr, one per request read from /dev/fuse) check that the stats did reach
    it; if they did not, a note says so and the CPU figure is per stat, not per request.
    """
    calls = ctx.fixture.spec.null_requests
    root = str(ctx.root)
    mounted = ctx.mounted
    os.stat(root)
    cpu, reads = mounted.daemon_cpu_seconds(), mounted.daemon_read_calls()
    start = time.perf_counter()
    for _ in range(calls):
        os.stat(root)
    result = {"getattr-latency": (time.perf_counter() - start) / calls * 1e6}
    cpu_after, reads_after = mounted.daemon_cpu_seconds(), mounted.daemon_read_calls()
    if cpu is not None and cpu_after is not None:
        result["getattr-daemon-cpu"] = (cpu_after - cpu) / calls * 1e6
    if reads is not None and reads_after is not None:
        share = (reads_after - reads) / calls
        if share < REACHED_SHARE:
            options = " ".join(mounted.target.uncached_attr_options()) or "no option"
            ctx.notes.append(f"only {share:.0%} of the {calls} stats reached the "
                             f"daemon with {options} (its read calls on /dev/fuse); its "
                             "daemon CPU figure is per stat, not per request")
    return result


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    summary: str
    run: Callable[[Context], dict[str, float]]
    needs_python: bool = False  # only runs on fixtures that carry an interpreter
    # Mount with ``Target.uncached_attr_options()``, so every stat reaches the daemon.
    uncached_attrs: bool = False


ALL = (
    Workload("seqread", "sequential read of a 256 MiB base file, cold then warm", seqread),
    Workload("randread", "fio random 4 KiB reads, QD1 and QD16, first touch and re-read",
             randread),
    Workload("seqwrite", "write a new 256 MiB file, then fsync", seqwrite),
    Workload("copyup", "append one byte to a 256 MiB base file", copyup),
    Workload("stat", "lstat every entry, cold then warm; daemon RSS after", stat),
    Workload("readdir", "list every directory, cold then warm", readdir),
    Workload("smallfiles", "create+write 4 KiB+close 10k files, then delete them", smallfiles),
    Workload("untar", "tar -xf a 5k-file tarball into the union", untar),
    Workload("python", "run python3.11 from the union, import 13 modules, cold then warm",
             python, needs_python=True),
    Workload("lstree", "ls -lR over the tree cold and warm, then find", lstree),
    Workload("pagecache", f"{PAGECACHE_MOUNTS} mounts of one base each read one 256 MiB base "
             "file: page cache growth", pagecache),
    Workload("getattr", "os.stat of the root with attr_timeout=0: daemon CPU per GETATTR",
             getattr_, uncached_attrs=True),
)
BY_NAME = {w.name: w for w in ALL}

# Metric name -> (unit, what it measures). Mount time is gathered from every mount.
METRICS: dict[str, tuple[str, str]] = {
    "seqread-cold": ("s", "sequential read, cold"),
    "seqread-warm": ("s", "sequential read, warm"),
    "randread-qd1-first": ("s", "random 4 KiB reads QD1, first touch"),
    "randread-qd1-reread": ("s", "random 4 KiB reads QD1, re-read"),
    "randread-qd16-first": ("s", "random 4 KiB reads QD16, first touch"),
    "randread-qd16-reread": ("s", "random 4 KiB reads QD16, re-read"),
    "seqwrite": ("s", "sequential write + fsync"),
    "copyup": ("s", "copy-up: append 1 byte to a base file"),
    "stat-cold": ("s", "lstat every entry, cold"),
    "stat-warm": ("s", "lstat every entry, warm"),
    "readdir-cold": ("s", "readdir every directory, cold"),
    "readdir-warm": ("s", "readdir every directory, warm"),
    "smallfiles-create": ("s", "create + write 4 KiB + close small files"),
    "smallfiles-delete": ("s", "delete the small files"),
    "untar": ("s", "untar a tarball"),
    "python-cold": ("s", "python start + imports, cold"),
    "python-warm": ("s", "python start + imports, warm"),
    "ls-lR-cold": ("s", "ls -lR, cold"),
    "ls-lR-warm": ("s", "ls -lR, warm"),
    "find-warm": ("s", "find -type f, warm"),
    "pagecache-4mounts": ("MiB", f"page cache growth, {PAGECACHE_MOUNTS} mounts read one base "
                          "file"),
    "getattr-daemon-cpu": ("µs", "daemon CPU per GETATTR (attr_timeout=0)"),
    "getattr-latency": ("µs", "os.stat of the root, attr_timeout=0, wall time per call"),
    "daemon-rss": ("MiB", "daemon RSS after the stat walk"),
    "mount-time": ("s", "mount time (command start to mounted)"),
    "unmount-time": ("s", "umount until the daemon has exited"),
}
