"""The lower tree every target is mounted over, built once and cached.

A fixture is a folder ``<cache>/<spec name>-v<VERSION>/`` holding:

    lower/          the read-only branch: slices of the host's /usr (mixed real files, symlinks,
                    a Python 3.11 interpreter with its standard library) and ``big/*.bin``,
                    files of random bytes
    untar.tar       an uncompressed tarball of real files for the untar workload
    manifest.json   what the tree holds, so workloads need not walk it again

The folder is built under a temporary name and renamed into place, so an interrupted build never
leaves a half fixture that looks finished. Bump ``VERSION`` whenever the content changes.

The plain-directory target works on ``lower/`` itself, so workloads that write restore it
afterwards; ``Fixture.repair()`` undoes whatever an interrupted run left behind.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import tarfile
from pathlib import Path

log = logging.getLogger(__name__)

VERSION = 1

# Names the workloads create at the top of the union; anything else there belongs to the fixture.
SCRATCH_PREFIX = "bench-"

CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class FixtureSpec:
    """How to build one fixture.

    ``slices`` are host folders copied to the same path below ``lower/``. ``python`` copies the
    host's ``/usr/bin/python3.11`` and its standard library, so an interpreter can run entirely
    from the union. ``tar_source`` is the folder (relative to ``lower/``) whose first
    ``tar_files`` files, in sorted order, go into the tarball.
    """

    name: str
    slices: tuple[str, ...]
    big_files: tuple[str, ...]
    big_size: int
    tar_source: str
    tar_files: int
    python: bool
    small_files: int  # how many files the small-files workload creates
    random_io: int  # bytes each fio run reads, 4 KiB at a time
    null_requests: int  # how many GETATTRs the per-request workload sends


FULL = FixtureSpec(
    name="full",
    # About 20k entries of every size: headers, docs, zoneinfo, Python packages.
    slices=(
        "/usr/include",
        "/usr/share/doc",
        "/usr/share/zoneinfo",
        "/usr/lib/python3",
    ),
    big_files=("seq.bin", "rand.bin", "copyup.bin"),
    big_size=256 << 20,
    tar_source="usr/include",
    tar_files=5000,
    python=True,
    small_files=10_000,
    random_io=32 << 20,
    null_requests=30_000,
)

# For the harness's own smoke test: a few hundred files, small big files, no interpreter.
TINY = FixtureSpec(
    name="tiny",
    slices=("/usr/share/zoneinfo/Europe", "/usr/share/zoneinfo/America"),
    big_files=("seq.bin", "rand.bin", "copyup.bin"),
    big_size=8 << 20,
    tar_source="usr/share/zoneinfo/America",
    tar_files=100,
    python=False,
    small_files=200,
    random_io=1 << 20,
    null_requests=3_000,
)

SPECS = {spec.name: spec for spec in (FULL, TINY)}

PYTHON_EXE = "usr/bin/python3.11"
PYTHON_LIB = "usr/lib/python3.11"


@dataclasses.dataclass
class Fixture:
    """A built fixture: where it is and what it holds (paths are relative to ``lower``)."""

    root: Path
    spec: FixtureSpec
    entries: list[str]  # every non-directory entry, files and symlinks
    dirs: list[str]  # every directory, "" for the top
    big: dict[str, int]  # name under big/ -> size
    python: str | None  # the interpreter, or None when the spec has none

    @property
    def lower(self) -> Path:
        return self.root / "lower"

    @property
    def tarball(self) -> Path:
        return self.root / "untar.tar"

    def big_path(self, name: str) -> str:
        return f"big/{name}"

    def repair(self, expected: bool = False) -> None:
        """Undo changes a run on the plain directory made, or left behind, in ``lower/``.

        ``expected`` is True right after a plain-directory run, whose changes are no news.
        """
        report = log.debug if expected else log.warning
        for child in self.lower.iterdir():
            if child.name.startswith(SCRATCH_PREFIX):
                report("removing leftover %s from the fixture", child)
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        for name, size in self.big.items():
            path = self.lower / self.big_path(name)
            if path.stat().st_size != size:
                report("restoring the size of %s", path)
                os.truncate(path, size)


def ensure_fixture(spec: FixtureSpec, cache: str | os.PathLike[str]) -> Fixture:
    """Return the fixture for ``spec`` under ``cache``, building it first if needed."""
    root = Path(cache) / f"{spec.name}-v{VERSION}"
    if not (root / "manifest.json").exists():
        _build(spec, root)
    fixture = _load(spec, root)
    fixture.repair()
    return fixture


def _load(spec: FixtureSpec, root: Path) -> Fixture:
    manifest = json.loads((root / "manifest.json").read_text())
    return Fixture(
        root=root,
        spec=spec,
        entries=manifest["entries"],
        dirs=manifest["dirs"],
        big=manifest["big"],
        python=manifest["python"],
    )


def _build(spec: FixtureSpec, root: Path) -> None:
    tmp = root.with_name(root.name + f".building-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    print(f"building the {spec.name} fixture in {root} (once; it is cached)", file=sys.stderr)
    lower = tmp / "lower"
    lower.mkdir(parents=True)
    try:
        for source in spec.slices:
            # symlinks=True keeps links as links; copy2 keeps mtimes, so .pyc files stay valid.
            shutil.copytree(source, lower / source.lstrip("/"), symlinks=True)
        python = None
        if spec.python:
            (lower / PYTHON_EXE).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2("/usr/bin/python3.11", lower / PYTHON_EXE)
            shutil.copytree("/" + PYTHON_LIB, lower / PYTHON_LIB, symlinks=True)
            python = PYTHON_EXE
        (lower / "big").mkdir()
        for name in spec.big_files:
            _write_random(lower / "big" / name, spec.big_size)
        _make_tarball(lower, spec.tar_source, spec.tar_files, tmp / "untar.tar")
        entries, dirs = _walk(lower)
        manifest = {
            "version": VERSION,
            "entries": entries,
            "dirs": dirs,
            "big": {name: spec.big_size for name in spec.big_files},
            "python": python,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        root.parent.mkdir(parents=True, exist_ok=True)
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("fixture %s: %d entries, %d dirs", root, len(entries), len(dirs))


def _write_random(path: Path, size: int) -> None:
    # Random bytes, so neither compression nor zero-page tricks flatter anyone.
    with open(path, "wb") as f:
        for _ in range(size // CHUNK):
            f.write(os.urandom(CHUNK))
        f.write(os.urandom(size % CHUNK))


def _make_tarball(lower: Path, source: str, count: int, dest: Path) -> None:
    files = []
    for dirpath, dirnames, filenames in os.walk(lower / source):
        dirnames.sort()
        for name in sorted(filenames):
            files.append(Path(dirpath, name))
    files = files[:count]
    with tarfile.open(dest, "w") as tar:
        for path in files:
            tar.add(path, arcname=str(path.relative_to(lower)), recursive=False)


def _walk(lower: Path) -> tuple[list[str], list[str]]:
    entries: list[str] = []
    dirs: list[str] = [""]
    for dirpath, dirnames, filenames in os.walk(lower):
        rel = os.path.relpath(dirpath, lower)
        rel = "" if rel == "." else rel
        # os.walk lists symlinks to directories among dirnames; they are entries, not dirs.
        for name in dirnames + filenames:
            path = os.path.join(rel, name)
            if name in dirnames and not os.path.islink(os.path.join(dirpath, name)):
                dirs.append(path)
            else:
                entries.append(path)
    return entries, dirs
