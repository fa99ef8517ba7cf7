"""``qvdctl hkd``: a fleet node's house-keeping daemon, in the foreground.

    register   the host row: ``starting``, a fresh lease
    reconcile  what runs here against the database (below); then ``running``
    loop       wait for a NOTIFY (or the poll), renew the lease every heartbeat, mark
               expired hosts lost, claim this host's commands and run each in a worker
               thread (at most ``vm.lifecycle.parallel`` at once); every
               ``hkd.usage.interval`` publish what its VMs use (``vm/usage.py``)
    SIGTERM    take no more commands, finish those running, stop this node's VMs,
               host ``stopped``, exit 0

Reconcile (on start, and whenever the node comes back from a fence or a ``lost``):
containers and mounted roots of VMs the database does not give to this host as
running are stopped and unmounted; this host's VMs recorded running whose root or
container is gone become zombies (``vm/health.py``); and every VM of this host left
``starting``, ``stopping`` or ``zombie`` (a crashed HKD) is cleaned up with
``stop_vm``. Only then are commands taken.

Fencing: after each renewal the database accepted, the HKD tells its fence process
(``fence.py``) how long the lease holds; if no renewal follows in time, that process kills
the node's containers before any other node may call it lost and start those VMs
elsewhere, whether this loop runs, hangs, is paused or was killed. The loop, when it runs,
sees the same deadline pass and cleans up (stops and unmounts what is left, from local
knowledge only); when the database answers again, it re-registers and reconciles.

The work is today's lifecycle, unchanged: ``start_vm`` / ``stop_vm`` of ``qvdctl/vm/``,
run with this node's ``Node`` (its node.conf: nodename, storage root, lxcpath).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import select
import signal
import time
from pathlib import Path
from types import FrameType

from qvdctl import mounting
from qvdproc.mountinfo import mounts_under
from qvdctl.container import seam
from qvdctl.db import store
from qvdctl.db.notify import CONFIG_CHANGED, Listener, vm_commands
from qvdctl.errors import QvdError
from qvdctl.fleet import commands, lease, watchdog
from qvdctl.fleet.commands import Cmd
from qvdctl.fleet.fence import Fence
from qvdctl.fleet.lease import HostState
from qvdctl.fleet.metrics import Metrics
from qvdctl.fleet.sdnotify import Notifier
from qvdctl.node import Node
from qvdctl.settings import Settings
from qvdctl.storage import Storage
from qvdctl.db.states import VmState
from qvdctl.vm.health import reconcile
from qvdctl.vm.parallel import run_each
from qvdctl.vm.start import start_vm
from qvdctl.vm import usage
from qvdctl.vm.state import load_vm
from qvdctl.vm.stop import stop_vm

log = logging.getLogger(__name__)

# The safety-net poll when NOTIFY is there (stock: about a minute); SQLite has only the poll.
POLL_S = 60.0
SQLITE_POLL_S = 0.5
# A renewal that failed is tried again this soon (or at the next heartbeat, if sooner).
RETRY_S = 5.0


class Hkd:
    """One node's daemon; ``run`` returns the exit status."""

    def __init__(self, node: Node) -> None:
        # First: the processes started below (the fence) must not inherit NOTIFY_SOCKET.
        self.systemd = Notifier.from_environment()
        self.node = node
        self.name = node.name()
        self.host_id = 0
        self.settings: Settings = node.settings()
        self.jobs: dict[int, concurrent.futures.Future[None]] = {}
        self.vm_names: dict[int, str] = {}  # VM id -> name, as last read, for log lines
        # As many threads as vm.lifecycle.parallel may ever allow; the claims keep the bound.
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="hkd")
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.stopping = False
        self.fenced = False
        self.last_renewal = time.monotonic()
        # Read once, as the metrics' address: a new device takes an HKD restart.
        if device := self.settings["hkd.fence.watchdog"]:
            watchdog.check_device(device)
        self.fence = Fence(seam.lxcpath_from(self.settings), device)
        self.metrics = Metrics(node, lambda: self.settings, lambda: self.host_id,
                               lambda: time.monotonic() - self.last_renewal)
        self.next_usage = 0.0
        self.usage_job: concurrent.futures.Future[None] | None = None

    # --- the loop -------------------------------------------------------------

    def run(self) -> int:
        signal.set_wakeup_fd(self.wake_w)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        self._join()
        # Read once: a new address takes an HKD restart, as a node.conf change does.
        if listen := self.settings["hkd.metrics.listen"]:
            self.metrics.serve(listen)
        self.systemd.send("READY=1")  # registered, reconciled, holding its first lease
        listener = Listener(self.node.db, [vm_commands(self.host_id), CONFIG_CHANGED])
        poll = SQLITE_POLL_S if self.node.db.is_sqlite else POLL_S
        next_beat = 0.0
        log.info("host %s (id %d) running; lease timeout %.0f s", self.name, self.host_id,
                 lease.timeout(self.settings))
        try:
            while not self.stopping:
                self.fence.check()
                if self.fence.fired() and not self.fenced:
                    # Its deadline passed while this loop stood still; maybe with a
                    # renewal in flight that the database accepted since, too late to
                    # save the VMs, so the renewal's own check would not see the lapse.
                    self._fence("the lease lapsed (the fence killed this node's VMs at"
                                " its deadline)")
                ping_in = self.systemd.ping_due()
                now = time.monotonic()
                if now >= next_beat:
                    held = self._beat()
                    # A renewal that failed is tried again soon: it may yet save the lease,
                    # and a node fenced by a partition rejoins soon after it heals (at
                    # the stock T, a heartbeat is two minutes).
                    beat = lease.heartbeat(self.settings)
                    next_beat = now + (beat if held else min(beat, RETRY_S))
                if not self.fenced:
                    self._take_commands()
                    self._publish_usage()
                self._reap()
                wait = min(next_beat, self.next_usage) - time.monotonic()
                wait = min(wait, poll, ping_in)
                try:
                    received = listener.wait(wait, self.wake_r)
                except QvdError as exc:
                    log.debug("%s", exc)  # the heartbeat says it, and fences if it lasts
                    self._sleep(min(wait, 1.0))
                    continue
                self._drain_wakeups()
                if any(channel == CONFIG_CHANGED for channel, _ in received):
                    try:
                        self._reload_settings("notified")
                    except QvdError as exc:
                        log.debug("re-reading the settings: %s", exc)
        finally:
            listener.close()
        self.systemd.send("STOPPING=1")
        self._shutdown()
        return 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping this node", signum)
        self.stopping = True

    def _sleep(self, seconds: float) -> None:
        select.select([self.wake_r], [], [], max(seconds, 0))
        self._drain_wakeups()

    def _wake(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full: the loop is woken anyway

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _reload_settings(self, how: str) -> None:
        old, self.settings = self.settings, self.node.settings()
        for key in self.settings:
            if old[key] != self.settings[key]:
                log.info("setting %s is now %r (%s)", key, self.settings[key], how)

    # --- joining the fleet, the lease and fencing -----------------------------

    def _join(self) -> None:
        """Register, reconcile, then take commands (``running``)."""
        sent = time.monotonic()
        with self.node.db.writer() as conn:
            self.host_id = lease.register(conn, self.name)
            forgotten = commands.forget_claims(conn, self.host_id)
        if forgotten:
            log.info("dropped %d claims a previous HKD of this host left", forgotten)
        self.settings = self.node.settings()
        self._renewed(sent)
        self.fence.retire_others()
        self._reconcile()
        with self.node.db.writer() as conn:
            lease.set_state(conn, self.host_id, HostState.RUNNING)
        self.fenced = False

    def _beat(self) -> bool:
        """Renew the lease and mark expired hosts lost; fence if renewing keeps failing.
        Whether this node holds its lease now (renewed, or rejoined)."""
        sent = time.monotonic()
        try:
            with self.node.db.writer() as conn:
                renewed = lease.renew(conn, self.host_id)
                if renewed:
                    lease.mark_expired_lost(conn, self.host_id, lease.timeout(self.settings))
            if renewed and not self.fenced:
                silent = sent - self.last_renewal
                if silent < lease.valid_for(lease.timeout(self.settings)):
                    self._renewed(sent)
                    self._reload_settings("heartbeat")  # the safety net under the NOTIFY
                    return True
                why = f"the lease lapsed ({silent:.1f} s unrenewed; this loop was stuck)"
            else:
                why = "this host was marked lost"
        except QvdError as exc:
            silent = time.monotonic() - self.last_renewal
            log.warning("cannot renew the lease (%.1f s without): %s", silent, exc)
            if not self.fenced and silent >= lease.valid_for(lease.timeout(self.settings)):
                self._fence(f"no lease renewal for {silent:.1f} s")
            return False
        # Marked lost behind our back (what we ran may run elsewhere by now), a lease
        # that lapsed (the fence process has killed what ran here), or fenced and the
        # database answers again: in each case, clean up and join afresh.
        if not self.fenced:
            self._fence(why)
        log.info("the database answers again: rejoining")
        try:
            self._join()
        except QvdError as exc:
            log.warning("rejoining failed, retrying in %.0f s: %s",
                        min(lease.heartbeat(self.settings), RETRY_S), exc)
            return False
        return True

    def _renewed(self, sent: float) -> None:
        """The database accepted a renewal sent at ``sent``: the lease holds from then."""
        self.last_renewal = sent
        limit = lease.timeout(self.settings)
        # The watchdog follows the lease (T may have been changed): first, so the fence
        # never judges a new deadline by an old timeout.
        self.fence.set_watchdog(
            watchdog.timeout_for(lease.valid_for(limit), lease.heartbeat(self.settings)),
            lease.margin(limit) / 2)
        self.fence.feed(sent + lease.valid_for(limit))

    def _fence(self, why: str) -> None:
        """Stop everything this node runs, from local knowledge only."""
        log.warning("fencing: %s; stopping every VM on this node", why)
        self.fenced = True
        bound = 0.2 * lease.timeout(self.settings)
        concurrent.futures.wait(list(self.jobs.values()), timeout=bound)
        self._reap()
        for vm_id, rootfs in self._local_vms().items():
            self._remove_local(vm_id, rootfs)
            self.systemd.ping_due()  # progress, VM by VM: this loop is not hung
        log.warning("fenced: nothing runs on this node any more")

    def _local_vms(self) -> dict[int, Path | None]:
        """VM id -> mounted root (or None) of every container and root found on this node."""
        found: dict[int, Path | None] = {}
        if seam.lxcpath_from(self.settings).exists():
            try:
                found.update(dict.fromkeys(seam.vm_container_states(settings=self.settings)))
            except Exception as exc:  # a node without liblxc's folder has no containers
                log.debug("listing containers: %s", exc)
        storage = Storage.from_settings(self.settings)
        for point in mounts_under(storage.rootfs):
            if (vm_id := storage.rootfs_vm(Path(point))) is not None:
                found[vm_id] = Path(point)
        return found

    def _remove_local(self, vm_id: int, rootfs: Path | None) -> None:
        try:
            seam.stop_vm_container(vm_id=vm_id, settings=self.settings)
            if rootfs is not None:
                mounting.unmount_tree(rootfs, lazy_fallback=True)
            log.info("%s: stopped and unmounted on this node", self._vm(vm_id))
        except Exception as exc:
            log.error("%s: could not stop what runs of it here: %s", self._vm(vm_id), exc)

    def _reconcile(self) -> None:
        with self.node.db.reader() as conn:
            rows = store.list_vms(conn)
        self.vm_names.update((row["id"], row["name"]) for row in rows)
        mine = {row["id"]: row for row in rows if row["host_id"] == self.host_id}
        for vm_id, rootfs in self._local_vms().items():
            row = mine.get(vm_id)
            if row is None or row["state"] == VmState.STOPPED:
                log.warning("%s runs here but not in the database: stopping it",
                            self._vm(vm_id))
                self._remove_local(vm_id, rootfs)
                self.systemd.ping_due()
        for name, why in reconcile(self.node):
            log.warning("VM %s: %s; marked zombie", name, why)
        with self.node.db.reader() as conn:
            left = [row["id"] for row in store.list_vms(conn)
                    if row["host_id"] == self.host_id
                    and row["state"] in (VmState.STARTING, VmState.STOPPING, VmState.ZOMBIE)]
        for vm_id in left:
            self.systemd.ping_due()
            try:
                stop_vm(self.node, load_vm(self.node, vm_id))
                log.info("%s: cleaned up what a previous HKD left", self._vm(vm_id))
            except QvdError as exc:
                log.warning("%s", exc)

    # --- commands ---------------------------------------------------------------

    def _take_commands(self) -> None:
        free = int(self.settings["vm.lifecycle.parallel"]) - len(self.jobs)
        if free <= 0:
            return
        try:
            with self.node.db.reader() as conn:
                queued = commands.pending(conn, self.host_id)
        except QvdError as exc:
            log.debug("reading commands: %s", exc)
            return
        for vm_id, name, cmd in queued:
            self.vm_names[vm_id] = name
            if free <= 0:
                break
            if vm_id in self.jobs:
                continue  # a stop queued during its start: taken once the start is done
            try:
                with self.node.db.writer() as conn:
                    waited = commands.claim(conn, self.host_id, vm_id, cmd)
            except QvdError as exc:
                log.debug("claiming: %s", exc)
                return
            if waited is None:
                continue
            log.info("%s: claimed %s (queued %.0f ms ago)", self._vm(vm_id), cmd, waited * 1000)
            self.metrics.pickup_seconds.observe(max(waited, 0.0))
            self.jobs[vm_id] = self.pool.submit(self._run_command, vm_id, cmd)
            free -= 1

    def _vm(self, vm_id: int) -> str:
        """How log lines name VM ``vm_id``: its name and id (the id alone if the name is
        unknown: a container the database does not know)."""
        name = self.vm_names.get(vm_id)
        return f"VM {name} (id {vm_id})" if name is not None else f"VM with id {vm_id}"

    def _run_command(self, vm_id: int, cmd: Cmd) -> None:
        error = None
        try:
            vm = load_vm(self.node, vm_id)
            if cmd is Cmd.START:
                with self.metrics.start_seconds.time():
                    start_vm(self.node, vm)
            else:
                with self.metrics.stop_seconds.time():
                    stop_vm(self.node, vm)
            log.info("%s: %s done", self._vm(vm_id), cmd)
        except QvdError as exc:
            error = str(exc)
            log.warning("%s: %s failed: %s", self._vm(vm_id), cmd, error)
        except Exception as exc:  # a bug: the admin still gets one line, the log the rest
            log.exception("%s: %s crashed", self._vm(vm_id), cmd)
            error = f"{cmd} of VM {vm_id} failed on host {self.name}: {exc}"
        try:
            with self.node.db.writer() as conn:
                commands.finish(conn, vm_id, error)
        except QvdError as exc:
            log.warning("%s: recording the end of %s: %s", self._vm(vm_id), cmd, exc)
        finally:
            self._wake()

    # --- what the VMs use ----------------------------------------------------------

    def _publish_usage(self) -> None:
        """Once per ``hkd.usage.interval``, in a worker thread: a hung qvdfs daemon costs
        that thread its read's timeout, never this loop a heartbeat."""
        if time.monotonic() < self.next_usage or (self.usage_job and not self.usage_job.done()):
            return
        self.next_usage = time.monotonic() + int(self.settings["hkd.usage.interval"])
        self.usage_job = self.pool.submit(self._read_and_publish_usage)

    def _read_and_publish_usage(self) -> None:
        try:
            with self.node.db.reader() as conn:
                running = usage.running_on(conn, self.host_id)
            found = usage.read(Storage.from_settings(self.settings),
                               seam.lxcpath_from(self.settings), running)
            with self.node.db.writer() as conn:
                usage.publish(conn, self.host_id, found)
        except QvdError as exc:
            log.debug("publishing the VMs' usage: %s", exc)  # the next period retries
        except Exception:  # a bug: logged whole; the numbers are not worth the HKD
            log.exception("publishing the VMs' usage")

    def _reap(self) -> None:
        for vm_id, job in list(self.jobs.items()):
            if job.done():
                del self.jobs[vm_id]

    # --- leaving ------------------------------------------------------------------

    def _shutdown(self) -> None:
        concurrent.futures.wait(list(self.jobs.values()))
        self._reap()
        try:
            with self.node.db.writer() as conn:
                lease.set_state(conn, self.host_id, HostState.STOPPING)
                commands.release_queued_starts(
                    conn, self.host_id, f"host {self.name} stopped before it started the VM"
                )
            with self.node.db.reader() as conn:
                mine = [row["id"] for row in store.list_vms(conn)
                        if row["host_id"] == self.host_id and row["state"] != VmState.STOPPED]
            vms = [load_vm(self.node, vm_id) for vm_id in mine]
            limit = int(self.settings["vm.lifecycle.parallel"])
            for vm, _, error in run_each(lambda vm: stop_vm(self.node, vm), vms, limit):
                if error is not None:
                    log.error("%s", error)
            if self.usage_job is not None:
                self.usage_job.result()  # its last write must not land after the next one
            with self.node.db.writer() as conn:
                for vm_id in mine:
                    commands.finish(conn, vm_id, None, drop_queued=True)
                usage.publish(conn, self.host_id, {})  # nothing runs here any more
                lease.set_state(conn, self.host_id, HostState.STOPPED)
            self.fence.stop()  # the host is stopped: no other node takes its VMs over
        except QvdError as exc:
            # The host stays alive in the database and will be called lost: the fence
            # keeps watching until the lease runs out, in case a VM outlived this stop.
            log.error("stopping with the database unreachable: %s; stopping VMs locally", exc)
            for vm_id, rootfs in self._local_vms().items():
                self._remove_local(vm_id, rootfs)
        self.pool.shutdown()
        self.metrics.close()
        log.info("host %s stopped", self.name)


def main(node: Node) -> int:
    """Run the HKD of ``node`` until SIGTERM; the exit status."""
    if not node.fleet:
        log.info("no node config: this HKD works on the embedded SQLite database alone")
    return Hkd(node).run()
