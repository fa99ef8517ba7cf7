"""What a desktop's root can do to the node, asked from inside real containers (issue 14).

Each test boots the busybox image on a qvdfs root (the node's command line), in both
modes: privileged and hardened, and unprivileged (a user namespace whose ids are node
ids ``IDMAP_START`` on, the root an idmapped mount of the union). It then
runs commands in it as the container's root with ``lxc-attach``, and also reads what
the container's own init got (``/proc/1/status``), since an attached command could be
confined differently from the processes the desktop runs. The busybox image has no
compiler, so ``tests/support/probe.c`` is built statically here and copied into the root; it
prints the errno the kernel answered, which is what these tests compare.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from qvdctl.container import config as config_mod
from qvdctl.container.config import ContainerSpec, render_config
from qvdctl.container.launch import halt, launch
from qvdctl.container.runtime import exec_in
from tests.support.mounts import NODE_OPTIONS, qvdfs_mount
from tests.support.qvdctl import scratch_lxcpath
from tools.imagebuild import build_busybox_rootfs

PROBE_SOURCE = Path(__file__).parent.parent / "support" / "probe.c"
EPERM = str(1)
IDMAP_START = 1_000_000
# In the image: a set-uid program, and one with a file capability (v2, as tar extracts it).
SETUID_PROGRAM, CAPABLE_PROGRAM = "usr/bin/probe-setuid", "usr/bin/probe-capable"
CAP_NET_RAW = 13
# Bits of /proc/<pid>/status CapEff and CapBnd (linux/capability.h).
CAP_DAC_READ_SEARCH, CAP_SYS_MODULE, CAP_SYS_RAWIO, CAP_SYS_ADMIN = 2, 16, 17, 21
CAP_SYS_TIME, CAP_MAC_OVERRIDE, CAP_MAC_ADMIN = 25, 32, 33
DROPPED = (CAP_SYS_MODULE, CAP_SYS_RAWIO, CAP_SYS_TIME, CAP_MAC_OVERRIDE, CAP_MAC_ADMIN)
DENIED = ("init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
          "open_by_handle_at", "add_key", "keyctl", "request_key")  # fmt: skip


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("probe") / "probe"
    subprocess.run(
        ["gcc", "-static", "-O", "-o", str(out), str(PROBE_SOURCE)], check=True, timeout=120
    )
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, probe: Path) -> Path:
    root = build_busybox_rootfs(tmp_path_factory.mktemp("img") / "base")
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    shutil.copy(probe, root / "usr/bin/probe")
    shutil.copy(probe, root / SETUID_PROGRAM)
    os.chmod(root / SETUID_PROGRAM, 0o4755)
    shutil.copy(probe, root / CAPABLE_PROGRAM)
    subprocess.run(["setcap", "cap_net_raw+ep", str(root / CAPABLE_PROGRAM)], check=True)
    os.makedirs(root / "srv/user", exist_ok=True)
    os.chown(root / "srv/user", 1000, 1000)
    return root


@pytest.fixture
def work() -> Iterator[Path]:
    """A scratch folder the containers' root may pass through (pytest's are 0700).

    liblxc refuses to start an unprivileged container whose root or lxcpath the
    mapped root cannot reach; qvdctl's storage folders are searchable for that.
    """
    path = Path(tempfile.mkdtemp(prefix="qvd-isolation-"))
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def lxcpath(work: Path) -> Iterator[Path]:
    with scratch_lxcpath(work) as path:
        yield path


class Desktop:
    """A running busybox container on a qvdfs root, with the probe in /usr/bin."""

    def __init__(self, spec: ContainerSpec, lxcpath: Path, overlay: Path, pid: int) -> None:
        self.spec, self.lxcpath, self.overlay, self.pid = spec, lxcpath, overlay, pid
        self.unprivileged = spec.idmap_start is not None

    async def sh(self, script: str) -> str:
        done = await exec_in(self.spec.name, ["sh", "-c", script], self.lxcpath)
        assert done.returncode == 0, (script, done.stderr)
        return done.stdout.decode()

    async def probe(self, *what: str) -> str:
        return (await self.sh("probe " + " ".join(what))).strip()


@pytest.fixture(params=["privileged", "unprivileged"])
async def desktop(
    request: pytest.FixtureRequest, work: Path, base: Path, lxcpath: Path
) -> AsyncIterator[Desktop]:
    unprivileged = request.param == "unprivileged"
    overlay, home, mnt = work / "overlay", work / "home", work / "root"
    for folder in (overlay, home, mnt):
        folder.mkdir()
    spec = ContainerSpec.for_vm(
        vm_id=random.randint(10_000, 99_999), vm_name="isolated", rootfs=mnt,
        ip=None, netmask=None, gateway=None, bridge=None,
        idmap_start=IDMAP_START if unprivileged else None,
    )  # fmt: skip
    idmap = ["-o", "idmap"] if unprivileged else []
    with qvdfs_mount(f"{overlay}=RW:{base}=RO:{home}=RW@/home", mnt, *NODE_OPTIONS, *idmap):
        pid = await launch(spec, lxcpath)
        try:
            yield Desktop(spec, lxcpath, overlay, pid)
        finally:
            assert await halt(spec.name, spec.veth, lxcpath, timeout=20)


def _status(text: str) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _host_disk() -> tuple[int, int]:
    """Major and minor of the block device holding the node's root filesystem."""
    dev = os.stat("/").st_dev
    return os.major(dev), os.minor(dev)


# --- the config -----------------------------------------------------------------------


def test_config_carries_the_hardening(tmp_path: Path) -> None:
    spec = ContainerSpec.for_vm(
        vm_id=4, vm_name="v", rootfs=tmp_path / "r", ip=None, netmask=None, gateway=None,
        bridge=None,
    )  # fmt: skip
    text = render_config(spec, tmp_path).splitlines()
    assert "lxc.cap.drop = mac_admin mac_override sys_time sys_module sys_rawio" in text
    assert f"lxc.seccomp.profile = {tmp_path}/qvd-4/seccomp" in text
    prefix = "lxc.cgroup2" if config_mod.cgroup_version() == 2 else "lxc.cgroup"
    devices = [line for line in text if line.startswith(f"{prefix}.devices.")]
    assert devices[0] == f"{prefix}.devices.deny = a"
    assert f"{prefix}.devices.allow = c 10:229 rwm" in devices
    assert not any(" b " in line and "rw" in line for line in devices)  # no disk is readable
    policy = config_mod.seccomp_policy().splitlines()
    assert policy[:4] == ["2", "denylist", "reject_force_umount", "[all]"]
    assert sorted(line.split()[0] for line in policy[4:]) == sorted(DENIED)
    assert all(line.endswith(" errno 1") for line in policy[4:])


def test_write_config_puts_the_policy_beside_the_config(tmp_path: Path) -> None:
    spec = ContainerSpec.for_vm(
        vm_id=6, vm_name="v", rootfs=tmp_path, ip=None, netmask=None, gateway=None, bridge=None
    )
    path = config_mod.write_config(spec, tmp_path / "lxc")
    assert (path.parent / "seccomp").read_text() == config_mod.seccomp_policy()
    assert sorted(p.name for p in path.parent.iterdir()) == [".qvdctl", "config", "seccomp"]


# --- from inside: privileged, hardened ------------------------------------------------


@pytest.mark.timeout(120)
async def test_capabilities_and_seccomp_of_init_and_attached_commands(desktop: Desktop) -> None:
    for who in ("1", "self"):
        status = _status(await desktop.sh(f"cat /proc/{who}/status"))
        assert status["Seccomp"] == "2", who
        for field in ("CapEff", "CapBnd"):
            caps = int(status[field], 16)
            assert [c for c in DROPPED if caps >> c & 1] == [], (who, field)
            # Kept on purpose: systemd images need it (see config.py).
            assert caps >> CAP_SYS_ADMIN & 1, (who, field)
    # What the node sees: init runs with that bounding set too.
    host_status = _status(Path(f"/proc/{desktop.pid}/status").read_text())
    assert [c for c in DROPPED if int(host_status["CapBnd"], 16) >> c & 1] == []


@pytest.mark.timeout(120)
async def test_module_kexec_handle_and_keyring_calls_are_refused(desktop: Desktop) -> None:
    answers = {what: await desktop.probe(what) for what in DENIED}
    assert answers == {what: EPERM for what in DENIED}
    assert await desktop.probe("settimeofday") == EPERM


@pytest.mark.timeout(120)
async def test_the_nodes_disk_cannot_be_read(desktop: Desktop) -> None:
    major, minor = _host_disk()
    made = await desktop.sh(f"mknod /root/hostdisk b {major} {minor} 2>&1; echo $?")
    if desktop.unprivileged:
        # No device node can be made in a user namespace at all.
        assert made.splitlines()[-1] != "0", made
        assert not (desktop.overlay / "root/hostdisk").exists()
    else:
        # Privileged: making the node is allowed (LXC's "b *:* m"), opening it is not.
        assert made.strip() == "0", made
        assert await desktop.probe("read", "/root/hostdisk") == EPERM


@pytest.mark.timeout(120)
async def test_cgroupfs_mounts_reach_only_the_containers_groups(desktop: Desktop) -> None:
    # The mount itself is not refused in either mode: CAP_SYS_ADMIN (kept, or owned by
    # the user namespace) may mount cgroupfs, and this node has no LSM that LXC would
    # use to forbid it. The cgroup namespace keeps it to the container's own groups,
    # and release_agent (the classic escape) cannot be written.
    await desktop.sh("mkdir -p /tmp/cg")
    assert await desktop.probe("mount_cgroup", "/tmp/cg") == "ok"
    try:
        done = await exec_in(
            desktop.spec.name, ["sh", "-c", "echo /x > /tmp/cg/release_agent"], desktop.lxcpath
        )
        assert done.returncode != 0
        # Only a hierarchy's root has release_agent; the namespace's root is not that.
        await desktop.sh("test ! -e /tmp/cg/release_agent")
        # The container's own group is the root of what it sees.
        assert (await desktop.sh("cat /proc/1/cgroup | grep memory")).strip().endswith(":/")
    finally:
        await desktop.sh("umount /tmp/cg")


# --- from inside: unprivileged ----------------------------------------------------------


only_unprivileged = pytest.mark.parametrize("desktop", ["unprivileged"], indirect=True)


@only_unprivileged
@pytest.mark.timeout(120)
async def test_init_is_an_ordinary_uid_on_the_node(desktop: Desktop) -> None:
    host = _status(Path(f"/proc/{desktop.pid}/status").read_text())
    assert host["Uid"].split() == [str(IDMAP_START)] * 4
    assert host["Gid"].split() == [str(IDMAP_START)] * 4
    assert int(host["Uid"].split()[0]) > 65535
    inside = _status(await desktop.sh("cat /proc/1/status"))
    assert inside["Uid"].split() == ["0"] * 4
    assert (await desktop.sh("cat /proc/1/uid_map")).split() == ["0", str(IDMAP_START), "65536"]


@only_unprivileged
@pytest.mark.timeout(120)
async def test_the_root_looks_as_in_the_image(desktop: Desktop, base: Path) -> None:
    d = desktop
    owners = await d.sh(f"stat -c '%u:%g %a %n' / /bin/busybox /{SETUID_PROGRAM} /srv/user")
    assert owners.splitlines() == [
        "0:0 755 /", "0:0 755 /bin/busybox", f"0:0 4755 /{SETUID_PROGRAM}", "1000:1000 755 /srv/user",
    ], owners
    # The set-uid bit and the file capability act for an ordinary user inside.
    as_user = "probe as 1000"
    assert (await d.sh(f"{as_user} /usr/bin/probe euid")).strip() == "1000"
    assert (await d.sh(f"{as_user} /{SETUID_PROGRAM} euid")).strip() == "0"
    caps = int((await d.sh(f"{as_user} /{CAPABLE_PROGRAM} permitted")).strip(), 16)
    assert caps == 1 << CAP_NET_RAW
    assert int((await d.sh(f"{as_user} /usr/bin/probe permitted")).strip(), 16) == 0
    # The device nodes LXC provides work.
    await d.sh("echo x > /dev/null && head -c 4 /dev/zero | wc -c && test -c /dev/fuse")


@only_unprivileged
@pytest.mark.timeout(120)
async def test_files_land_with_the_owner_the_container_meant(desktop: Desktop) -> None:
    d = desktop
    await d.sh(
        "echo mine > /root/note && mkdir /home/alice && chown 1000:1000 /home/alice && "
        "probe as 1000 /bin/sh -c 'echo hers > /home/alice/f' && "
        "chown 1001:1002 /etc/hostname"
    )
    st = (d.overlay / "root/note").stat()
    assert (st.st_uid, st.st_gid) == (0, 0)
    home = d.overlay.parent / "home"
    assert (home / "alice").stat().st_uid == 1000
    st = (home / "alice/f").stat()
    assert (st.st_uid, st.st_gid, (home / "alice/f").read_text()) == (1000, 1000, "hers\n")
    st = (d.overlay / "etc/hostname").stat()
    assert (st.st_uid, st.st_gid) == (1001, 1002)
    # A host id outside the range cannot be given to a file from inside.
    done = await exec_in(d.spec.name, ["chown", "70000", "/root/note"], d.lxcpath)
    assert done.returncode != 0
    assert (d.overlay / "root/note").stat().st_uid == 0


def test_isolated_vms_get_ranges_of_their_own_next_to_each_other() -> None:
    assert [config_mod.idmap_start_for(vm, IDMAP_START, True) for vm in (1, 2, 3)] == [
        IDMAP_START, IDMAP_START + 65536, IDMAP_START + 2 * 65536,
    ]
    assert {config_mod.idmap_start_for(vm, IDMAP_START, False) for vm in (1, 2, 3)} == {
        IDMAP_START}


def test_unprivileged_config_maps_ids_and_mounts_the_root_idmapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def spec(start: int) -> ContainerSpec:
        return ContainerSpec.for_vm(
            vm_id=4, vm_name="v", rootfs=tmp_path / "r", ip=None, netmask=None, gateway=None,
            bridge=None, idmap_start=start,
        )  # fmt: skip

    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    monkeypatch.setattr(config_mod, "SUBORDINATE_FILES", (subuid, subgid))
    text = render_config(spec(IDMAP_START), tmp_path).splitlines()
    assert text[-3:] == [
        f"lxc.idmap = u 0 {IDMAP_START} 65536",
        f"lxc.idmap = g 0 {IDMAP_START} 65536",
        "lxc.rootfs.options = idmap=container",
    ]
    assert "lxc.idmap" not in render_config(
        ContainerSpec(name="qvd-4", rootfs=tmp_path, hostname="v"), tmp_path
    )
    # Never the node's own ids, never past the last mappable id.
    for bad in (0, 65535):
        with pytest.raises(config_mod.ConfigError, match="overlaps the node's ids"):
            render_config(spec(bad), tmp_path)
    with pytest.raises(config_mod.ConfigError, match="passes the last node id"):
        render_config(spec(2**32 - 65536), tmp_path)
    render_config(spec(2**32 - 1 - 65536), tmp_path)  # the last range that fits
    # Root's own subordinate range is what the node gives its containers; another
    # user's is theirs.
    subuid.write_text(f"root:{IDMAP_START}:65536\n")
    subgid.write_text(f"alice:100000:65536\nbob:{IDMAP_START + 65535}:10\n")
    with pytest.raises(config_mod.ConfigError, match=f"bob's {IDMAP_START + 65535}-"):
        render_config(spec(IDMAP_START), tmp_path)
    render_config(spec(IDMAP_START + 65545), tmp_path)
