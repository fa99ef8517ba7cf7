"""``qvdctl di add/list/tag/untag/del``: disk images and their tags.

Tags are unique within an OSF: tagging a DI takes the tag off the DI of the
same OSF that had it. ``di add`` tags the new image with its version and
``head``, and with ``default`` when it is the OSF's first image. A VM names
its image by tag (``di_tag``, default ``default``), resolved at each start.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from sqlalchemy import Connection

from qvdctl.commands.base import Request
from qvdctl.commands.osf import check_halt_signal
from qvdctl.db import store
from qvdctl.db.store import Row
from qvdctl.errors import QvdError
from qvdctl.images.halt import facts_path, override, recorded
from qvdctl.node import Node
from qvdctl.progress import status

log = logging.getLogger(__name__)

KEYS = ["id", "osf", "version", "path", "tags"]
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}")


def add(req: Request) -> None:
    """``di add path=FILE osf=NAME [version=V] [halt_signal=SIG]``: import from staging and tag.

    ``halt_signal`` is what stops the image's VMs (``SIGRTMIN+3``, ``SIGPWR``, ...) when
    what its ``/sbin/init`` looks like is not enough (``images/halt.py``).
    """
    req.no_filter()
    args = req.args(required=["path", "osf"], optional=["version", "halt_signal"])
    storage = req.node.storage()
    storage.ensure()
    added = add_image(req.node, _source_path(args["path"], storage.staging), args)
    req.out.message(f"DI added with id {added.id}", id=added.id, version=args.get("version"),
                    sha256=added.sha256)


@dataclasses.dataclass(frozen=True)
class Added:
    id: int
    version: str
    sha256: str


def add_image(node: Node, source: Path, args: Mapping[str, str]) -> Added:
    """What ``di add`` does once it knows the file (the web admin's form too): import
    ``source`` into images/ as the next DI of OSF ``args["osf"]``, with ``args``'
    optional ``version`` and ``halt_signal``, and tag it."""
    from qvdctl.images.importer import check_image_name, import_image  # libarchive: only here

    name = check_image_name(source.name)
    version = args.get("version") or None
    if version is not None:
        check_tag(version)
    halt_signal = check_halt_signal(args.get("halt_signal", "")) or None
    with node.db.reader() as conn:
        osf = store.osf_by_name(conn, args.get("osf", ""))
        if any(d["path"] == name for d in store.list_dis(conn)):
            raise QvdError(f"a disk image with file name '{name}' already exists")
    imported = import_image(source, node.storage().images)
    di_id = _register(
        node, osf["id"], name, version, imported.sha256, imported.size, [], halt_signal
    )
    with node.db.reader() as conn:
        return Added(di_id, store.get_di(conn, di_id)["version"], imported.sha256)


def _register(node: Node, osf_id: int, name: str, version: str | None, sha256: str,
              size: int, tags: list[str], halt_signal: str | None = None) -> int:
    """Record images/``name`` as the OSF's next version, tagged with it, ``head``,
    ``default`` if it is the OSF's first and ``tags``; on any failure the file goes
    too, so images/ never holds a file the database does not know."""
    try:
        with node.db.writer() as conn:
            if version is None:
                version = _next_version(conn, osf_id)
            for tag_ in tags:
                _refuse_taken(conn, osf_id, tag_)
            di_id = store.add_di(conn, osf_id, name, version, sha256, size, halt_signal)
            di = store.get_di(conn, di_id)
            for tag_ in (version, "head", *tags):
                store.tag_di(conn, di, tag_)
            if store.count_dis(conn, osf_id) == 1:
                store.tag_di(conn, di, "default")
    except BaseException:
        node.storage().image(name).unlink(missing_ok=True)
        raise
    return di_id


def _refuse_taken(conn: Connection, osf_id: int, tag_: str) -> None:
    taken = store.di_for_tag(conn, osf_id, tag_)
    if taken is not None:
        raise QvdError(
            f"tag '{tag_}' is already on DI {taken['id']} (version {taken['version']}) of this"
            " OSF; choose another, or move it later with di tag"
        )


def _source_path(path: str, staging: Path) -> Path:
    """An absolute path, or a name relative to staging/ (then to the current folder)."""
    candidate = Path(path)
    if not candidate.is_absolute() and (staging / candidate).exists():
        return staging / candidate
    return candidate.absolute()


def _next_version(conn: Connection, osf_id: int) -> str:
    """QVD's default version: today's date and a counter, e.g. ``2026-11-24-000``."""
    today = datetime.date.today().isoformat()
    taken = set(store.versions_like(conn, osf_id, today))
    return next(f"{today}-{n:03d}" for n in range(10_000) if f"{today}-{n:03d}" not in taken)


def check_tag(tag: str) -> str:
    if not _TAG.fullmatch(tag):
        raise QvdError(f"bad tag '{tag}': letters, digits and . _ + - only")
    return tag


def _rows(conn: Connection) -> list[Row]:
    rows = store.list_dis(conn)
    for row in rows:
        row["tags"] = ",".join(row["tags"])
    return rows


def list_(req: Request) -> None:
    """``di list [-f ...]``: the images, their tags, and the signal that halts their VMs.

    ``HaltFrom`` says whose ``HaltSignal`` it is: the DI's, its OSF's, or what the
    image's init wants (``-`` until its first start has examined it).
    """
    req.args()
    with req.node.db.reader() as conn:
        rows = req.select(_rows(conn), KEYS, need=False)
    storage = req.node.storage()
    req.out.table(
        ["Id", "OSF", "Version", "Path", "Tags", "Size", "HaltSignal", "HaltFrom"],
        [[r["id"], r["osf"], r["version"], r["path"], r["tags"], r["size"],
          *_halt(storage.extraction(r["path"]), r["halt_signal"], r["osf_halt_signal"])]
         for r in rows],
    )  # fmt: skip


def _halt(tree: Path, di_signal: str | None, osf_signal: str | None) -> tuple[str | None, str]:
    """The signal a VM of this image gets at its next start, and whose setting it is."""
    chosen = override(di_signal, osf_signal)
    if chosen is not None:
        return chosen
    facts = recorded(tree)
    return (facts.halt_signal if facts else None), "init"


def tag(req: Request) -> None:
    """``di tag -f id=N tag=T``: the filter must pick exactly one DI."""
    tag_ = check_tag(req.args(required=["tag"])["tag"])
    with req.node.db.writer() as conn:
        di = _one(req, conn)
        store.tag_di(conn, di, tag_)
    req.out.message(f"DI {di['id']} tagged {tag_}", id=di["id"], tag=tag_)


def untag(req: Request) -> None:
    """``di untag -f id=N tag=T``: remove tag T from the disk image."""
    tag_ = req.args(required=["tag"])["tag"]
    with req.node.db.writer() as conn:
        di = _one(req, conn)
        if not store.untag_di(conn, di, tag_):
            raise QvdError(f"DI {di['id']} has no tag '{tag_}'")
    req.out.message(f"DI {di['id']} untagged {tag_}", id=di["id"], tag=tag_)


def _one(req: Request, conn: Connection) -> Row:
    rows = req.select(_rows(conn), KEYS, need=True)
    if len(rows) != 1:
        raise QvdError(f"the filter matches {len(rows)} disk images; it must match one")
    return rows[0]


def del_(req: Request) -> None:
    """``di del -f ...``: refused while a VM runs the image; removes its file and extraction."""
    req.args()
    storage = req.node.storage()
    with req.node.db.writer() as conn:
        rows = req.select(_rows(conn), KEYS, need=True)
        for row in rows:
            users = store.vms_using_di(conn, row["id"])
            if users:
                raise QvdError(f"DI {row['id']} is in use by VM {', '.join(users)}")
        for row in rows:
            store.del_di(conn, row)
    for row in rows:
        # After the commit: a crash here leaves files without a row, never a row without files.
        storage.image(row["path"]).unlink(missing_ok=True)
        own_entry = re.compile(r"[0-9]+-" + re.escape(row["path"]))
        for entry in storage.basefs.iterdir():
            if own_entry.fullmatch(entry.name) and entry.is_symlink():
                entry.unlink()
        tree = storage.extraction(row["path"])
        if tree.exists():
            shutil.rmtree(tree)
        facts_path(tree).unlink(missing_ok=True)
        req.out.message(f"DI {row['id']} deleted", id=row["id"])


def commit(req: Request) -> None:
    """``di commit vm=NAME [tag=TAG] [--dry-run]``: a stopped VM's base with its overlay
    applied, as the next disk image of its OSF (tagged with its version, ``head`` and TAG).

    The VM, its overlay and its image stay as they were; the VM keeps its di_tag.
    ``--dry-run`` lists what the new image would add, change and remove, and
    writes nothing.
    """
    from qvdctl.images import commit as committing  # libarchive's writer: only here
    from qvdctl.images import merge
    from qvdctl.images.extract import ensure_extracted, find_root
    from qvdctl.images.importer import check_image_name
    from qvdctl.db.states import VmState
    from qvdctl.vm.state import locked

    req.no_filter()
    args = req.args(required=["vm"], optional=["tag"])
    tag_ = check_tag(args["tag"]) if "tag" in args else None
    with req.node.db.reader() as conn:
        row = store.vm_by_name(conn, args["vm"])
    # The VM's lock: no start can write to the overlay while it is read.
    with locked(req.node, row["id"]) as vm:
        if vm.state is not VmState.STOPPED:
            raise QvdError(f"VM '{vm.name}' is {vm.state}; stop it before committing it")
        with req.node.db.reader() as conn:
            row = store.get_vm(conn, vm.id)
            if row["current_di_id"] is None:
                raise QvdError(f"VM '{vm.name}' has never been started: nothing to commit")
            di = store.get_di(conn, row["current_di_id"])
            if tag_ is not None:
                _refuse_taken(conn, di["osf_id"], tag_)
        storage = req.node.storage()
        overlay = storage.overlay(di["id"], vm.id)
        if not overlay.is_dir() or overlay.is_symlink():
            raise QvdError(f"VM '{vm.name}' has no overlay {overlay.name} to commit")
        tree = storage.extraction(di["path"])
        ensure_extracted(storage.image(di["path"]), tree)
        root = find_root(tree)
        outer = None if root == tree else tree
        if req.dry_run:
            changes = merge.changes(overlay, root)
            rows = [["added", p] for p in changes.added] + [
                ["changed", p] for p in changes.changed] + [
                ["removed", p] for p in changes.removed]
            req.out.table(["Change", "Path"], rows)
            return
        with req.node.db.reader() as conn:
            version = _next_version(conn, di["osf_id"])
            osf = store.get_osf(conn, di["osf_id"])
        name = check_image_name(_image_name(osf["name"], version))
        with status(f"committing VM {vm.name} as {name}"):
            written = committing.write_image(overlay, root, storage.image(name), outer=outer)
        # The new image keeps its base's halt_signal override; without one, its init is
        # looked at again when it is first extracted.
        di_id = _register(req.node, di["osf_id"], name, version, written.sha256, written.size,
                          [tag_] if tag_ else [], di["halt_signal"])
    req.out.message(f"DI added with id {di_id}", id=di_id, version=version, path=name,
                    sha256=written.sha256)


def _image_name(osf: str, version: str) -> str:
    """``<OSF>-<version>.tar.gz``, the OSF's name made a plain file name."""
    plain = re.sub(r"[^A-Za-z0-9._+-]", "_", osf).lstrip(".-") or "osf"
    return f"{plain}-{version}.tar.gz"


COMMANDS = {"add": add, "list": list_, "tag": tag, "untag": untag, "del": del_, "commit": commit}
