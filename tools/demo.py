"""``make demo``: the SPEC §5 workflow end to end, on LXC containers and qvdfs.

    .venv/bin/python -m tools.demo [--vms N] [--image busybox|debian] [--privileged]

Builds a busybox image tarball (quick, the default), or with ``--image debian`` takes the
cached Debian bookworm + systemd image (``tools/debian_image.py``; built once, about half a
minute), then drives the real ``qvdctl`` CLI as an admin would: settings, OSF, disk image,
users, N VMs (2 by default), ``vm start``, ``vm list``, a command in each VM (on Debian:
systemd's own verdict on its boot), which node ids the VM's root is (unprivileged, the
default: an ordinary uid of the node; ``--privileged``: the node's root, hardened), the
proof that writes inside landed in the VM's overlay (base untouched) and in its homefs
(``/home``), a VM reaching the other and the gateway
(busybox: ping; Debian minbase has no ping, so a TCP connection that the far end refuses),
``vm stop`` (each with the halt signal found from its image).

Once the VMs run, it serves the web admin (``qvdctl web``) on the host's loopback,
``http://127.0.0.1:8080/`` (another free port if that one is taken), prints the address
and a login, and checks that the VMs page shows every desktop running. The server runs
in the demo's namespace (starts and stops from the page need the namespace's bridge) on
a socket bound in the host's, handed over by socket activation. On a terminal the demo
waits for Enter before it stops the desktops; the server stops with the demo.

It leaves the host as it found it: the storage root is a temporary folder and
every qvdctl command runs inside a network namespace made for the demo (a scratch
node, ``tools/sandbox.py``), holding the bridge and the VMs' veths. The
containers live in an lxcpath inside the temporary root (setting ``vm.lxc.lxcpath``),
so they never meet a node's own ``qvd-<id>``; while the demo runs an admin can watch
them from its namespace: ``ip netns exec <ns> lxc-ls -P <root>/lxc -f`` (both printed).
On any failure it still stops the VMs, unmounts, deletes the namespace and the
temporary folder, and exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import http.cookiejar
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from pyroute2 import netns
from rich.console import Console

from qvdctl.container.query import monitors
from qvdproc.mountinfo import mounts_under
from tools import debian_image
from tools.imagebuild import build_busybox_rootfs, build_image_tarball
from tools.sandbox import ScratchNode, reachable_by_mapped_root, scratch_node
from tools.webserver import serving

IMAGE = "busybox-demo.tar.gz"
IMAGES = ("busybox", "debian")
# Debian minbase has no ping: a TCP connection to a closed port that the far end refuses
# (ECONNREFUSED, 111) proves the packets went there and back.
REACH = "import socket; c = socket.socket(); c.settimeout(3); print(c.connect_ex(('{}', 9)))"
REFUSED = "111"
NET = "10.213.77"  # only ever configured inside the demo's own namespace
BRIDGE = "qvddemo0"
WEB = ("127.0.0.1", 8080)  # qvdctl web's default address; any free port if it is taken
WEB_LOGIN = ("admin", "demo-admin")

# soft_wrap: long command lines stay whole when the output is a log, not a terminal.
console = Console(highlight=False, soft_wrap=True)


class DemoError(Exception):
    """A step of the demo failed; the message is one line."""


class Demo:
    """One run: a scratch node, and the qvdctl commands it shows as it runs them."""

    def __init__(self, node: ScratchNode) -> None:
        self.node = node
        self.root = node.root

    def qvdctl(self, *args: str, show: bool = True) -> str:
        """Run ``qvdctl --root ROOT ARGS`` in the namespace; print and return its stdout."""
        if show:
            console.print(f"[bold cyan]$ qvdctl {' '.join(args)}[/]")
        done = subprocess.run(self.node.qvdctl_argv(*args), capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        if show and done.stdout.strip():
            console.print(done.stdout.rstrip(), markup=False)
        if done.returncode != 0:
            why = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
            raise DemoError(f"qvdctl {' '.join(args)}: {why[0]}")
        return done.stdout

    def in_vm(self, vm_name: str, script: str) -> subprocess.CompletedProcess[str]:
        """Run ``sh -c SCRIPT`` inside a VM with ``qvdctl vm exec``; print its output."""
        console.print(f"[bold cyan]$ qvdctl vm exec -f name={vm_name} -- sh -c {script!r}[/]")
        done = subprocess.run(
            self.node.qvdctl_argv("vm", "exec", "-f", f"name={vm_name}", "--", "sh", "-c", script),
            # Not the admin's terminal: vm exec hands its stdin to the command, and a
            # terminal there makes lxc-attach give the command a terminal of its own.
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if done.stdout.strip():
            console.print(done.stdout.rstrip(), markup=False)
        return done


def _step(text: str) -> None:
    console.print(f"\n[bold green]==> {text}[/]")


def _id_from(message: str) -> int:
    """The N of "... added with id N"."""
    return int(message.strip().rsplit(" ", 1)[1])


def _image(kind: str, root: Path, workdir: Path) -> Path:
    """The tarball ``di add`` takes for ``kind``."""
    if kind == "debian":
        _step("The Debian bookworm + systemd image (built once, then cached)")
        try:
            tarball = debian_image.ensure_tarball().tarball
        except debian_image.ImageError as exc:
            raise DemoError(f"building the Debian image failed: {exc}") from None
    else:
        _step("Building a bootable busybox image tarball")
        rootfs = build_busybox_rootfs(workdir / "image-root")
        staging = root / "staging"
        staging.mkdir(parents=True, exist_ok=True)
        tarball = build_image_tarball(staging / IMAGE, rootfs, compression="gz")
    console.print(f"{tarball} ({tarball.stat().st_size // 1024} KiB)")
    return tarball


def _listen() -> socket.socket:
    try:
        return socket.create_server(WEB)
    except OSError:
        return socket.create_server((WEB[0], 0))


def _web_admin(node: ScratchNode) -> contextlib.AbstractContextManager[str]:
    """``qvdctl web`` on the host's loopback for the node: its address; stops on exit."""
    with _listen() as sock:
        return serving(node.web(sock))


def _web_vms(url: str) -> str:
    """The VMs page as the admin sees it once logged in, over the host's loopback."""
    opener = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    with opener.open(url + "login", timeout=30) as page:
        token = re.search(r'name="csrf" value="([^"]+)"', page.read().decode())
    if token is None:
        raise DemoError("the web admin's login page has no form")
    form = {"login": WEB_LOGIN[0], "password": WEB_LOGIN[1], "csrf": token.group(1)}
    with opener.open(url + "login", urllib.parse.urlencode(form).encode(), timeout=30):
        pass
    with opener.open(url + "vms", timeout=30) as page:
        return str(page.read().decode())


def run(
    node: ScratchNode, workdir: Path, n_vms: int, kind: str = "busybox", privileged: bool = False,
    later: contextlib.ExitStack | None = None,
) -> None:
    """The workflow; raises DemoError at the first step that fails. With ``later``, the
    web admin is served once the VMs run, until ``later`` closes."""
    demo = Demo(node)
    root = node.root
    tarball = _image(kind, root, workdir)

    _step("Settings: LXC containers on qvdfs, network in the demo's namespace")
    mode = "vm.lxc.unprivileged=" + ("0" if privileged else "1")
    demo.qvdctl("config", "set", *node.lxc_settings(net=NET, bridge=BRIDGE), mode)

    _step("An OS flavour, its disk image, users and VMs")
    demo.qvdctl("osf", "add", "name=DemoOSF", "memory=512" if kind == "debian" else "memory=256")
    di_id = _id_from(demo.qvdctl("di", "add", f"path={tarball}", "osf=DemoOSF"))
    vms: list[tuple[int, str, int]] = []  # (vm id, name, user id)
    for i in range(n_vms):
        login = f"user{i + 1}"
        user_id = _id_from(demo.qvdctl("user", "add", f"login={login}", f"password={login}"))
        name = f"Desk{i + 1}"
        vm_id = _id_from(demo.qvdctl("vm", "add", f"name={name}", f"user={login}", "osf=DemoOSF"))
        vms.append((vm_id, name, user_id))

    _step(f"Starting {n_vms} VMs")
    started = time.monotonic()
    demo.qvdctl("vm", "start", "-f", "name=Desk*")
    elapsed = time.monotonic() - started
    console.print(f"vm start of {n_vms} VMs took {elapsed:.2f} s")
    demo.qvdctl("vm", "list")
    table = json.loads(demo.qvdctl("--json", "vm", "list", show=False))
    not_running = [row["Name"] for row in table if row["State"] != "running"]
    if not_running:
        raise DemoError(f"VMs not running after vm start: {', '.join(not_running)}")
    ips = {row["Name"]: row["Ip"] for row in table}

    if later is not None:
        _step("The web admin, on the host's loopback")
        demo.qvdctl("admin", "add", f"login={WEB_LOGIN[0]}", f"password={WEB_LOGIN[1]}")
        url = later.enter_context(_web_admin(node))
        page = _web_vms(url)
        for _, name, _ in vms:
            row = re.search(rf'<tr data-vm="\d+">.*?>{name}</a>.*?</tr>', page, re.S)
            if not row or ">running<" not in row.group(0):
                raise DemoError(f"the web admin's VMs page does not show {name} running")
        console.print(f"[bold]web admin: {url}[/] (log in as {WEB_LOGIN[0]}, password "
                      f"{WEB_LOGIN[1]}); its VMs page shows {n_vms} desktops running")
        if sys.stdin.isatty():
            console.input("Press Enter to go on (the desktops stop at the end, and the web "
                          "admin with them) ")

    _step("A command in each VM: write outside /home and inside /home")
    # busybox's rcS logs its boot; systemd says how its boot went once it is over.
    booted = "systemctl is-system-running --wait" if kind == "debian" else "cat /var/log/boot.log"
    for _, name, _ in vms:
        done = demo.in_vm(
            name,
            f"hostname; echo 'written in {name}' > /root/demo.txt; "
            f"echo 'home of {name}' > /home/notes.txt; {booted}",
        )  # fmt: skip
        if done.returncode != 0:
            raise DemoError(f"command in {name} failed: {done.stderr.strip()[-200:]}")

    _step("Who the desktop's root is on the node (its user namespace's id map)")
    for _, name, _ in vms:
        # "0 <first node id> <count>": the container's uid 0 is that node uid.
        done = demo.in_vm(name, "cat /proc/self/uid_map")
        root_on_node = int(done.stdout.split()[1])
        if (root_on_node == 0) != privileged:
            raise DemoError(f"{name}'s root is node uid {root_on_node}")
        console.print(f"{name}: root is node uid {root_on_node}"
                      + (" (privileged, hardened)" if privileged else ", an ordinary user"))

    _step("Where the writes landed")
    for vm_id, name, user_id in vms:
        overlay = root / "overlayfs" / f"{di_id}-{vm_id}-overlayfs"
        base = root / "basefs" / f"{vm_id}-{tarball.name}"
        home = root / "homefs" / f"{vm_id}-{user_id}-homefs"
        checks = [
            (overlay / "root/demo.txt", f"written in {name}\n"),
            (home / "notes.txt", f"home of {name}\n"),
        ]
        for path, expected in checks:
            found = path.read_text() if path.exists() else None
            if found != expected:
                raise DemoError(f"{path}: expected {expected!r}, found {found!r}")
            console.print(f"{name}: {path.relative_to(root)} = {found.strip()!r}")
        for leaked in (base / "root/demo.txt", overlay / "home/notes.txt"):
            if leaked.exists() or leaked.is_symlink():
                raise DemoError(f"{leaked} exists: a write went to the wrong branch")
        console.print(f"{name}: basefs/{base.name}/root/demo.txt absent: the base is untouched")

    _step("Network: VM to VM and VM to gateway over the bridge")
    first = vms[0][1]
    targets = [ips[name] for _, name, _ in vms[1:]] + [f"{NET}.1"]
    for target in targets:
        if kind == "debian":
            done = demo.in_vm(first, f'python3 -c "{REACH.format(target)}"')
            reached = done.stdout.strip() == REFUSED
            if reached:
                console.print(f"{target} refused port 9 (ECONNREFUSED): it answered")
        else:
            reached = demo.in_vm(first, f"ping -c1 -W2 {target}").returncode == 0
        if not reached:
            raise DemoError(f"{first} cannot reach {target}")

    _step("Stopping the VMs")
    started = time.monotonic()
    demo.qvdctl("vm", "stop", "-f", "name=Desk*")
    console.print(f"vm stop of {n_vms} VMs took {time.monotonic() - started:.2f} s")
    demo.qvdctl("vm", "list")
    for vm_id, _, user_id in vms:
        mountpoint = root / "rootfs" / f"{user_id}-{vm_id}-fs"
        if mountpoint.exists() and any(mountpoint.iterdir()):
            raise DemoError(f"{mountpoint} is not empty after vm stop")


@contextlib.contextmanager
def _scratch_dir() -> Iterator[Path]:
    path = reachable_by_mapped_root(Path(tempfile.mkdtemp(prefix="qvd-demo-")))
    try:
        yield path
    finally:
        if mounts_under(path):
            console.print(f"[red]{path} still has mounts; left in place[/]")
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.demo", description="The SPEC §5 workflow on LXC and qvdfs."
    )
    parser.add_argument("--vms", type=int, default=2, help="how many VMs to start (2..50)")
    parser.add_argument("--image", default="busybox",
                        help="busybox (quick, the default) or debian (bookworm with systemd, "
                             "built once and cached)")  # fmt: skip
    parser.add_argument("--privileged", action="store_true",
                        help="run the desktops privileged (hardened) instead of in user "
                             "namespaces (vm.lxc.unprivileged=0)")  # fmt: skip
    args = parser.parse_args(argv)
    if not 2 <= args.vms <= 50:
        print("Error: --vms must be between 2 and 50", file=sys.stderr)
        return 1
    if args.image not in IMAGES:
        print(f"Error: --image must be one of {', '.join(IMAGES)}", file=sys.stderr)
        return 1
    if os.geteuid() != 0:
        print("Error: the demo mounts and starts containers: run it as root", file=sys.stderr)
        return 1
    for tool in ("lxc-start", "lxc-attach", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            print(f"Error: {tool} is missing; run `make setup`", file=sys.stderr)
            return 1

    started = time.monotonic()
    made: dict[str, Path | str] = {}
    failure = None
    try:
        with contextlib.ExitStack() as stack:
            workdir = made["workdir"] = stack.enter_context(_scratch_dir())
            node = stack.enter_context(scratch_node(workdir / "storage", prefix="qvddemo"))
            made["netns"] = node.netns
            console.print(
                f"storage root {node.root}, lxcpath {node.lxcpath}, network namespace {node.netns}"
            )
            run(node, workdir, args.vms, args.image, args.privileged,
                stack.enter_context(contextlib.ExitStack()))
    except DemoError as exc:
        failure = str(exc)
    except Exception as exc:  # anything else: still one line, after the cleanup above
        failure = f"{type(exc).__name__}: {exc}"
    left = _leftovers(made)
    if left:
        failure = (failure + "; " if failure else "") + f"left on the host: {', '.join(left)}"
    if failure:
        console.print(f"[bold red]demo failed:[/] {failure}")
        print(f"Error: {failure}", file=sys.stderr)
        return 1
    console.print(
        f"\n[bold green]demo finished in {time.monotonic() - started:.1f} s; "
        "checked: no mount, namespace, container or file of it is left on the host[/]"
    )
    return 0


def _leftovers(made: dict[str, Path | str]) -> list[str]:
    """What of this run is still on the host after its cleanup."""
    left = []
    workdir = made.get("workdir")
    if isinstance(workdir, Path):
        left += [f"mount {m}" for m in mounts_under(workdir)]
        if workdir.exists():
            left.append(f"folder {workdir}")
        left += [f"container monitor {m.pid}" for m in monitors()
                 if m.lxcpath.is_relative_to(workdir)]
    name = made.get("netns")
    if isinstance(name, str) and name in netns.listnetns():
        left.append(f"network namespace {name}")
    return left


if __name__ == "__main__":
    sys.exit(main())
