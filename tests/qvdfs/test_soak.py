"""Load on one real qvdfs mount, bounded in time: every byte checked against a model.

- Several processes hammer one mount at once (create, write, read-verify, rename, unlink,
  mmap, appends to base files); each keeps a model of its own files, and after a remount
  every file's checksum must match the models and nothing else may exist.
- fsx-style: random read / write / truncate / mmap read / mmap write on a base file (so
  through copy-up) and on a new file, each read compared with a bytearray model.

Each test prints the number of operations it verified (run pytest with -s to see them).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qvdproc import processes
from qvdproc.mountinfo import mounts_under
from tests.support.mounts import NODE_OPTIONS, force_unmount, qvdfs_mount

pytestmark = pytest.mark.slow

HAMMER_SECONDS = 25
FSX_SECONDS = 15
WORKERS = 4
BASE_FILES = 48

# One worker: its own folder w<k>/ plus the base files i with i % WORKERS == k, so the
# models never overlap; any mismatch ends the worker with exit status 1 and a message.
_WORKER = r"""
import hashlib, json, mmap, os, random, sys, time
root, k, workers, seconds, base_count, out = sys.argv[1:]
k, workers, seconds, base_count = int(k), int(workers), float(seconds), int(base_count)
rng = random.Random(1000 + k)
mine = os.path.join(root, f"w{k}")
os.mkdir(mine)
model = {}  # path relative to root -> bytes
for i in range(k, base_count, workers):
    with open(os.path.join(root, "base", f"b{i}"), "rb") as f:
        model[f"base/b{i}"] = f.read()
ops = {"create": 0, "write": 0, "verify": 0, "rename": 0, "unlink": 0, "mmap": 0, "append": 0}

def fail(msg):
    sys.stderr.write(f"worker {k}: {msg}\n")
    sys.exit(1)

def verify(rel):
    with open(os.path.join(root, rel), "rb") as f:
        data = f.read()
    if data != model[rel]:
        fail(f"{rel}: read {len(data)} bytes, sha {hashlib.sha256(data).hexdigest()[:12]}, "
             f"model has {len(model[rel])}")
    ops["verify"] += 1

counter = 0
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    op = rng.random()
    own = [r for r in model if r.startswith(f"w{k}/")]
    if op < 0.25 or not own:
        counter += 1
        rel = f"w{k}/f{counter}"
        data = rng.randbytes(rng.choice([0, 1, 100, 4096, 65536, 300000]))
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
        model[rel] = data
        ops["create"] += 1
    elif op < 0.40:
        rel = rng.choice(own)
        buf = bytearray(model[rel])
        off = rng.randrange(0, len(buf) + 1)
        chunk = rng.randbytes(rng.randrange(1, 20000))
        buf[off:off + len(chunk)] = chunk
        with open(os.path.join(root, rel), "r+b") as f:
            f.seek(off)
            f.write(chunk)
        model[rel] = bytes(buf)
        ops["write"] += 1
    elif op < 0.60:
        verify(rng.choice(list(model)))
    elif op < 0.70:
        rel = rng.choice(own)
        counter += 1
        new = f"w{k}/r{counter}"
        os.rename(os.path.join(root, rel), os.path.join(root, new))
        model[new] = model.pop(rel)
        ops["rename"] += 1
    elif op < 0.78:
        rel = rng.choice(own)
        os.unlink(os.path.join(root, rel))
        del model[rel]
        ops["unlink"] += 1
    elif op < 0.90:
        rel = rng.choice([r for r in own if model[r]] or own)
        if not model[rel]:
            continue
        with open(os.path.join(root, rel), "r+b") as f:
            with mmap.mmap(f.fileno(), 0) as m:
                if m[:] != model[rel]:
                    fail(f"{rel}: mmap view differs from the model")
                off = rng.randrange(len(model[rel]))
                chunk = rng.randbytes(min(len(model[rel]) - off, rng.randrange(1, 5000)))
                m[off:off + len(chunk)] = chunk
                m.flush()
        buf = bytearray(model[rel])
        buf[off:off + len(chunk)] = chunk
        model[rel] = bytes(buf)
        ops["mmap"] += 1
    else:
        rel = rng.choice([r for r in model if r.startswith("base/")] or own)
        chunk = rng.randbytes(rng.randrange(1, 3000))
        with open(os.path.join(root, rel), "ab") as f:
            f.write(chunk)
        model[rel] += chunk
        ops["append"] += 1
for rel in list(model):
    verify(rel)
with open(out, "w") as f:
    digests = {r: hashlib.sha256(d).hexdigest() for r, d in model.items()}
    json.dump({"ops": ops, "files": digests}, f)
"""


def _tree_hashes(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for n in files:
            p = Path(dirpath) / n
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.timeout(180)
def test_processes_hammering_one_mount_lose_no_byte(tmp_path: Path) -> None:
    base, upper, mnt = tmp_path / "base", tmp_path / "upper", tmp_path / "mnt"
    for p in (base / "base", upper, mnt):
        p.mkdir(parents=True)
    rng = random.Random(7)
    for i in range(BASE_FILES):
        (base / "base" / f"b{i}").write_bytes(rng.randbytes(rng.choice([0, 10, 5000, 200_000])))
    base_before = _tree_hashes(base)
    branches = f"{upper}=RW:{base}=RO"
    results = [tmp_path / f"worker{k}.json" for k in range(WORKERS)]
    try:
        with qvdfs_mount(branches, mnt, *NODE_OPTIONS) as root:
            procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(root), str(k),
                                       str(WORKERS), str(HAMMER_SECONDS), str(BASE_FILES),
                                       str(results[k])], stderr=subprocess.PIPE, text=True)
                     for k in range(WORKERS)]
            errors = []
            for proc in procs:
                _out, err = proc.communicate(timeout=HAMMER_SECONDS + 90)
                if proc.returncode:
                    errors.append(err.strip().splitlines()[-1] if err.strip() else proc.returncode)
            assert not errors, errors
    finally:
        force_unmount(mnt)
    expected: dict[str, str] = {}
    totals: dict[str, int] = {}
    for path in results:
        report = json.loads(path.read_text())
        expected.update(report["files"])
        for op, n in report["ops"].items():
            totals[op] = totals.get(op, 0) + n
    # Base files nobody appended to are still the base's.
    for rel, digest in _tree_hashes(base).items():
        expected.setdefault(rel, digest)
    with qvdfs_mount(branches, mnt, *NODE_OPTIONS) as root:
        assert _tree_hashes(root) == expected
        assert sorted(os.listdir(root)) == ["base", *(f"w{k}" for k in range(WORKERS))]
    assert _tree_hashes(base) == base_before, "the base branch changed"
    total_bytes = sum((upper / rel).stat().st_size for rel in expected if (upper / rel).exists())
    print(f"\nsoak: {WORKERS} processes, {HAMMER_SECONDS}s, {sum(totals.values())} operations "
          f"{totals}, {len(expected)} files ({total_bytes} bytes in the upper branch) verified")
    assert totals["verify"] > 100 and totals["mmap"] > 10 and totals["rename"] > 10


class _Fsx:
    """Random operations on one file, every read checked against a bytearray model."""

    MAX_SIZE = 1 << 20

    def __init__(self, path: Path, rng: random.Random) -> None:
        self.path, self.rng = path, rng
        self.model = bytearray(path.read_bytes())
        self.fd = os.open(path, os.O_RDWR)
        self.ops = {"read": 0, "write": 0, "truncate": 0, "mapread": 0, "mapwrite": 0,
                    "reopen": 0}

    def close(self) -> None:
        os.close(self.fd)

    def step(self) -> None:
        rng, size = self.rng, len(self.model)
        op = rng.choice(list(self.ops))
        if op == "read":
            off = rng.randrange(0, size + 100)
            n = rng.randrange(0, 70000)
            got = os.pread(self.fd, n, off)
            assert got == bytes(self.model[off:off + n]), f"read {n}@{off} of {self.path.name}"
        elif op == "write":
            off = rng.randrange(0, min(size + 70000, self.MAX_SIZE))
            data = rng.randbytes(rng.randrange(1, 70000))
            os.pwrite(self.fd, data, off)
            if off > size:
                self.model.extend(bytes(off - size))
            self.model[off:off + len(data)] = data
        elif op == "truncate":
            new = rng.randrange(0, self.MAX_SIZE)
            os.ftruncate(self.fd, new)
            if new < size:
                del self.model[new:]
            else:
                self.model.extend(bytes(new - size))
        elif op in ("mapread", "mapwrite"):
            if size == 0:
                return
            with mmap.mmap(self.fd, size) as m:
                off = rng.randrange(size)
                n = rng.randrange(1, min(size - off, 70000) + 1)
                if op == "mapread":
                    assert m[off:off + n] == bytes(self.model[off:off + n]), "mapped read"
                else:
                    data = rng.randbytes(n)
                    m[off:off + n] = data
                    m.flush()
                    self.model[off:off + n] = data
        else:
            os.close(self.fd)
            self.fd = os.open(self.path, os.O_RDWR)
        assert os.fstat(self.fd).st_size == len(self.model), f"size after {op}"
        self.ops[op] += 1


@pytest.mark.timeout(120)
def test_fsx_random_io_on_a_base_file_and_a_new_file(tmp_path: Path) -> None:
    base, upper, mnt = tmp_path / "base", tmp_path / "upper", tmp_path / "mnt"
    for p in (base, upper, mnt):
        p.mkdir()
    rng = random.Random(2024)
    original = rng.randbytes(300_000)
    (base / "from-base").write_bytes(original)
    branches = f"{upper}=RW:{base}=RO"
    with qvdfs_mount(branches, mnt, *NODE_OPTIONS) as root:
        (root / "new").write_bytes(b"")
        testers = [_Fsx(root / "from-base", rng), _Fsx(root / "new", rng)]
        try:
            deadline = time.monotonic() + FSX_SECONDS
            steps = 0
            while time.monotonic() < deadline:
                rng.choice(testers).step()
                steps += 1
        finally:
            for t in testers:
                t.close()
        models = {t.path.name: bytes(t.model) for t in testers}
        counts = [t.ops for t in testers]
    with qvdfs_mount(branches, mnt, *NODE_OPTIONS) as root:
        for name, data in models.items():
            assert (root / name).read_bytes() == data, f"{name} after remount"
    assert (base / "from-base").read_bytes() == original, "the base file changed"
    print(f"\nfsx: {steps} operations verified {counts}")
    assert steps > 500


# --- ten VMs, started and stopped again and again ---------------------------------------

VMS = 10
CYCLES = 3


def _under(root: Path) -> dict[str, object]:
    """What the host holds for the VMs of ``root``: mounts, processes, their fds and memory."""
    prefix = str(root)
    mounts = sorted(p for p in mounts_under(root) if p != str(root))
    procs, fds, rss_kib = [], 0, 0
    for process in processes.processes():
        status = processes.status(process.pid)
        if prefix not in process.command_line or status.get("State", "Z").startswith("Z"):
            continue  # another test's, or it ended meanwhile
        procs.append(os.fsdecode(process.argv[0]))
        fds += len(processes.open_files(process.pid))
        rss_kib += int(status.get("VmRSS", "0 kB").split()[0])
    return {"mounts": mounts, "procs": sorted(procs), "fds": fds, "rss_kib": rss_kib}


def _links(ns: str) -> list[str]:
    from pyroute2 import IPRoute
    with IPRoute(netns=ns) as ipr:
        return sorted(link.get_attr("IFLA_IFNAME") for link in ipr.get_links())


@pytest.mark.timeout(600)
def test_ten_vms_started_and_stopped_repeatedly_leak_nothing(tmp_path: Path) -> None:
    from tools.imagebuild import build_busybox_rootfs, build_image_tarball
    from tools.sandbox import scratch_node

    root = tmp_path / "storage"
    (root / "staging").mkdir(parents=True)
    tarball = build_image_tarball(root / "staging" / "soak.tar.gz",
                                  build_busybox_rootfs(tmp_path / "image-root"), compression="gz")
    figures = []
    with scratch_node(root, prefix="qvdsoak") as node:
        node.qvdctl("config", "set", *node.lxc_settings(net="10.213.78", bridge="qvdsoak0"))
        node.qvdctl("osf", "add", "name=o")
        node.qvdctl("di", "add", f"path={tarball.name}", "osf=o")
        for i in range(VMS):
            node.qvdctl("user", "add", f"login=u{i}", "password=p")
            node.qvdctl("vm", "add", f"name=v{i}", f"user=u{i}", "osf=o")
        idle = _under(root)
        for cycle in range(CYCLES):
            started = time.monotonic()
            node.qvdctl("vm", "start", "-f", "name=v*")
            start_s = time.monotonic() - started
            table = json.loads(node.qvdctl("--json", "vm", "list").stdout)
            assert [r["State"] for r in table] == ["running"] * VMS, table
            running = _under(root)
            links_running = _links(node.netns)
            started = time.monotonic()
            node.qvdctl("vm", "stop", "-f", "name=v*")
            stop_s = time.monotonic() - started
            table = json.loads(node.qvdctl("--json", "vm", "list").stdout)
            assert [r["State"] for r in table] == ["stopped"] * VMS, table
            after = _under(root)
            assert after == idle, f"cycle {cycle} left {after}"
            assert [n for n in _links(node.netns) if n.startswith("qvd") and n != "qvdsoak0"] == []
            figures.append({
                "cycle": cycle, "start_s": round(start_s, 2), "stop_s": round(stop_s, 2),
                "mounts_running": len(running["mounts"]),
                "procs_running": len(running["procs"]),
                "fds_running": running["fds"], "rss_mib_running": running["rss_kib"] // 1024,
                "links_running": len(links_running),
            })
    print("\nten VMs:", *figures, sep="\n  ")
    # Nothing grows from one cycle to the next: the same mounts, processes and fds.
    for key in ("mounts_running", "procs_running", "fds_running", "links_running"):
        assert len({f[key] for f in figures}) == 1, (key, figures)
    assert figures[-1]["rss_mib_running"] <= figures[0]["rss_mib_running"] * 1.2 + 20, figures
