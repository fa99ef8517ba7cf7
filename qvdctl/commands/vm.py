"""``qvdctl vm add/edit/list/del/start/stop/console/exec/block/unblock``.

Starting and stopping are in ``qvdctl/vm/``; this module parses,
selects the VMs and prints. ``vm start`` / ``vm stop`` work on the matched VMs
concurrently (``vm.lifecycle.parallel`` at a time); each success prints its line
on stdout, each failure one ``Error:`` line on stderr, and any failure makes the
exit status 1. ``vm list`` first reconciles the database with what really runs
(``qvdctl/vm/health.py``). In a fleet, ``vm start`` / ``vm stop`` queue the work for
the hosts' HKDs instead and wait for it (``qvdctl/fleet/client.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection

from qvdctl.commands.base import Request
from qvdctl.commands.di import check_tag
from qvdctl.commands.osf import check_name
from qvdctl.db import store
from qvdctl.db.states import VmState
from qvdctl.db.store import Row
from qvdctl.errors import QvdError
from qvdctl.network import addresses
from qvdctl.node import Node
from qvdctl.vm.health import reconcile
from qvdctl.vm.parallel import run_each
from qvdctl.vm.state import Vm, load_vm, locked

log = logging.getLogger(__name__)

COLUMNS = [
    "Id", "Name", "User", "Ip", "OSF", "DI_Tag", "DI", "Host", "State", "UserState", "Blocked",
]
KEYS = ["id", "name", "user", "ip", "osf", "di_tag", "di", "host", "state", "user_state", "blocked"]


def add(req: Request) -> None:
    """``vm add name=N user=LOGIN osf=NAME [di_tag=T] [ip=A]``: a new, stopped VM.

    It runs the OSF's image tagged ``di_tag`` (``default`` unless given).
    """
    req.no_filter()
    args = req.args(required=["name", "user", "osf"], optional=["di_tag", "ip"])
    name = check_name(args["name"], "VM")
    di_tag = check_tag(args.get("di_tag", "default"))
    settings = req.node.settings()
    # One writer transaction from reading the used IPs to the insert: two
    # concurrent `vm add` cannot pick the same address.
    with req.node.db.writer() as conn:
        user = store.user_by_login(conn, args["user"])
        osf = store.osf_by_name(conn, args["osf"])
        used = store.used_ips(conn)
        if "ip" in args:
            ip = addresses.check_requested(settings, args["ip"], used)
        else:
            ip = addresses.next_free(settings, used)
        vm_id = store.add_vm(conn, name, user["id"], osf["id"], di_tag, ip)
    req.out.message(f"VM added with id {vm_id}", id=vm_id, ip=ip)


EDITABLE = ["name", "di_tag", "ip"]


def edit(req: Request) -> None:
    """``vm edit -f ... [name=N] [di_tag=T] [ip=A]``: rename a VM, or change its tag or address.

    Containers, veths and folders are named by the VM's id, not its name, so a running
    VM can be renamed; its hostname (the name) follows at its next start. ``di_tag`` is
    resolved at each start, so it also applies at the next one. ``ip`` only while the VM
    is stopped: a running container keeps its address, which no other VM may get
    meanwhile. ``name`` and ``ip`` need a filter that picks one VM. The user and the
    OSF stay: the home is named by the user, the overlay by the image.
    """
    args = req.edits(EDITABLE)
    values: dict[str, Any] = {}
    if "name" in args:
        values["name"] = check_name(args["name"], "VM")
    if "di_tag" in args:
        values["di_tag"] = check_tag(args["di_tag"])
    with req.node.db.reader() as conn:
        ids = [row["id"] for row in req.select(listing(conn), KEYS, need=True)]
    if len(ids) != 1 and ("name" in args or "ip" in args):
        which = " and ".join(k for k in ("name", "ip") if k in args)
        raise QvdError(f"the filter matches {len(ids)} VMs; changing the {which} needs one")
    settings = req.node.settings()
    with contextlib.ExitStack() as stack:
        if "ip" in args:
            # The VM's lock: no start can be reading the old address while it changes.
            stack.enter_context(locked(req.node, ids[0]))
        with req.node.db.writer() as conn:
            rows = [row for row in listing(conn) if row["id"] in ids]
            if len(rows) != len(ids):
                raise QvdError("a VM the filter matched was deleted meanwhile; nothing changed")
            for row in rows:
                if "ip" in args:
                    if row["state"] != VmState.STOPPED:
                        raise QvdError(
                            f"VM '{row['name']}' is {row['state']}; stop it before changing its ip"
                        )
                    others = store.used_ips(conn) - {row["ip"]}
                    values["ip"] = addresses.check_requested(settings, args["ip"], others)
                store.edit_vm(conn, row, values)
    for row in rows:
        req.out.message(f"VM {values.get('name', row['name'])} edited", id=row["id"])


def listing(conn: Connection) -> list[Row]:
    """Every VM as `vm list` shows it: with the DI version it runs, or would run."""
    rows = store.list_vms(conn)
    # Looked up once per (OSF, tag): a thousand VMs share a handful of them.
    versions: dict[tuple[int, str], str | None] = {}
    for row in rows:
        if row["state"] != VmState.STOPPED and row["current_di_version"]:
            row["di"] = row["current_di_version"]
            continue
        key = (row["osf_id"], row["di_tag"])
        if key not in versions:
            di = store.di_for_tag(conn, *key)
            versions[key] = di["version"] if di else None
        row["di"] = versions[key]
    return rows


def list_(req: Request) -> None:
    """``vm list [-f ...]``: the VMs and their state; a running VM found dead is marked zombie."""
    req.args()
    reconcile(req.node)
    with req.node.db.reader() as conn:
        rows = req.select(listing(conn), KEYS, need=False)
    # In a fleet the work happens elsewhere: the last failure's line is shown here.
    extra = ["error"] if req.node.fleet else []
    req.out.table(COLUMNS + [k.title() for k in extra],
                  [[r[k] for k in KEYS + extra] for r in rows])


def del_(req: Request) -> None:
    """``vm del -f ...``: stopped VMs only. The home stays on disk for the admin."""
    req.args()
    with req.node.db.writer() as conn:
        rows = req.select(listing(conn), KEYS, need=True)
        for row in rows:
            if row["state"] != VmState.STOPPED:
                raise QvdError(f"VM '{row['name']}' is {row['state']}; stop it before deleting it")
        for row in rows:
            store.del_vm(conn, row)
    remove_leftovers(req.node, rows)
    for row in rows:
        req.out.message(f"VM {row['name']} deleted", id=row["id"])


def remove_leftovers(node: Node, rows: Sequence[Row]) -> None:
    """What deleted VMs leave on this node that is not data: the empty mountpoint and the
    link to the shared image. Homes and overlays are data and stay for the admin."""
    storage = node.storage()
    for row in rows:
        rootfs = storage.rootfs_entry(row["user_id"], row["id"])
        if rootfs.is_dir() and not any(rootfs.iterdir()):
            rootfs.rmdir()
        for entry in storage.basefs.glob(f"{row['id']}-*"):
            if entry.is_symlink():
                entry.unlink()


def _selected(req: Request, optional: tuple[str, ...] = ()) -> list[Vm]:
    req.args(optional=optional)
    with req.node.db.reader() as conn:
        rows = req.select(listing(conn), KEYS, need=True)
    return [load_vm(req.node, row["id"]) for row in rows]


def _parallel(req: Request) -> int:
    return int(req.node.settings()["vm.lifecycle.parallel"])


def _report_failures(results: Sequence[tuple[Vm, object, QvdError | None]]) -> None:
    """One ``Error:`` line per failed VM on stderr; exit status 1 if there was any."""
    failures = [error for _, _, error in results if error is not None]
    if len(failures) == 1 and len(results) == 1:
        raise failures[0]
    for error in failures:
        print(f"Error: {error}", file=sys.stderr)
    if failures:
        raise SystemExit(1)


def start(req: Request) -> None:
    """``vm start -f ...``: start the VMs, ``vm.lifecycle.parallel`` at a time.

    Each VM's root is mounted and its container started; one that fails is left
    stopped (or zombie) with an ``Error:`` line, and the others go on. In a fleet the
    starts are queued for the hosts' HKDs (``host=NAME`` picks the host) and waited for,
    unless ``--no-wait``.
    """
    if req.node.fleet:
        return _fleet_start(req)
    from qvdctl.vm.start import start_vm  # here: the start machinery loads liblxc and trio

    vms = _selected(req)
    results = run_each(lambda vm: start_vm(req.node, vm), vms, _parallel(req))
    for vm, mounted, _ in results:
        if mounted is not None:
            how = " (root mounted only)" if mounted.settings["vm.start.mount_only"] == "1" else ""
            req.out.message(f"VM {vm.name} started{how}", id=vm.id, rootfs=str(mounted.rootfs))
    _report_failures(results)


def stop(req: Request) -> None:
    """``vm stop -f ...``: halt the VMs (hard stop after ``vm.stop.timeout``), unmount their roots.

    ``vm.lifecycle.parallel`` at a time; in a fleet the stops are queued for the VMs'
    hosts and waited for, unless ``--no-wait``.
    """
    if req.node.fleet:
        return _fleet_stop(req)
    from qvdctl.vm.stop import stop_vm  # here: the stop machinery loads liblxc and trio

    vms = _selected(req)
    results = run_each(lambda vm: stop_vm(req.node, vm), vms, _parallel(req))
    for vm, _, error in results:
        if error is None:
            req.out.message(f"VM {vm.name} stopped", id=vm.id)
    _report_failures(results)


def _fleet_start(req: Request) -> None:
    from qvdctl.fleet import client  # here: only a fleet's start and stop need it

    pin = req.args(optional=["host"]).get("host")
    outcomes = client.start(req.node, _selected(req, ("host",)), pin=pin, wait=not req.no_wait,
                            say=req.out.progress)
    how = " (root mounted only)" if req.node.settings()["vm.start.mount_only"] == "1" else ""
    for o in outcomes:
        if o.error is None:
            what = f"queued on host {o.host}" if req.no_wait else f"started{how}"
            req.out.message(f"VM {o.vm.name} {what}", id=o.vm.id, host=o.host)
    _report_failures([(o.vm, None, o.error) for o in outcomes])


def _fleet_stop(req: Request) -> None:
    from qvdctl.fleet import client

    outcomes = client.stop(req.node, _selected(req), wait=not req.no_wait)
    for o in outcomes:
        if o.error is None:
            what = "stop queued" if req.no_wait and not o.done else "stopped"
            req.out.message(f"VM {o.vm.name} {what}", id=o.vm.id, host=o.host)
    _report_failures([(o.vm, None, o.error) for o in outcomes])


def _one_running(req: Request, what: str) -> Vm:
    vms = _selected(req)
    if len(vms) != 1:
        raise QvdError(f"the filter matches {len(vms)} VMs; {what} needs exactly one")
    if vms[0].state != VmState.RUNNING:
        raise QvdError(f"VM '{vms[0].name}' is {vms[0].state}, not running")
    if req.node.fleet:
        with req.node.db.reader() as conn:
            host = store.get_vm(conn, vms[0].id)["host"]
        if host != req.node.name():
            raise QvdError(f"VM '{vms[0].name}' runs on host {host}; run this on {host}")
    return vms[0]


def console(req: Request) -> None:
    """``vm console -f ...``: attach to the container's console (Ctrl+a q leaves)."""
    from qvdctl.container import seam  # here: liblxc loads only when needed

    vm = _one_running(req, "a console")
    argv = seam.console_command(vm.id, settings=req.node.settings())
    program = shutil.which(argv[0])
    if program is None:
        raise QvdError(f"{argv[0]} is not installed")
    req.node.close()
    os.execv(program, [program, *argv[1:]])


def exec_(req: Request) -> None:
    """``vm exec -f ... -- COMMAND [ARG ...]``: run a command in the VM, exit with its status.

    qvdctl becomes lxc-attach (as ``console`` becomes lxc-console): the command gets
    qvdctl's standard input, output and error as they are, so ``< file`` feeds it,
    output streams as it comes, and its exit status is qvdctl's.
    """
    argv, req.after_dashes = req.after_dashes, []
    if not argv:
        raise QvdError("vm exec needs a command after '--'")
    vm = _one_running(req, "vm exec")
    from qvdctl.container import seam  # here: liblxc loads only when needed

    try:
        attach = seam.exec_command(vm.id, argv, settings=req.node.settings())
    except Exception as exc:
        raise QvdError(f"vm exec in '{vm.name}': {exc}") from exc
    program = shutil.which(attach[0])
    if program is None:
        raise QvdError(f"{attach[0]} is not installed")
    req.node.close()
    sys.stdout.flush()  # nothing qvdctl wrote may come after the command's own output
    sys.stderr.flush()
    os.execv(program, [program, *attach[1:]])


def _set_blocked(req: Request, blocked: int) -> None:
    req.args()
    with req.node.db.writer() as conn:
        rows = req.select(listing(conn), KEYS, need=True)
        for row in rows:
            store.set_vm_blocked(conn, row["id"], blocked)
    word = "blocked" if blocked else "unblocked"
    for row in rows:
        req.out.message(f"VM {row['name']} {word}", id=row["id"])


def block(req: Request) -> None:
    """``vm block -f ...``: a blocked VM cannot be started (a running one keeps running)."""
    _set_blocked(req, 1)


def unblock(req: Request) -> None:
    """``vm unblock -f ...``: the VM can be started again."""
    _set_blocked(req, 0)


COMMANDS = {
    "block": block, "unblock": unblock, "edit": edit,
    "add": add, "list": list_, "del": del_, "start": start, "stop": stop, "console": console,
    "exec": exec_,
}
