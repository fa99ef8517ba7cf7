"""qvdproc.mountinfo: the kernel's lines parsed, escapes undone, and a real mount found."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from qvdproc.mountinfo import Mount, is_mounted, mounts_under, parse_line, read_mounts

# proc(5)'s example line, with a propagation field and a subtype.
EXAMPLE = (b"36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root "
           b"rw,errors=continue")


def test_every_field_of_a_line() -> None:
    assert parse_line(EXAMPLE) == Mount(
        mount_id=36, parent_id=35, device="98:0", root="/mnt1", mount_point="/mnt2",
        options=("rw", "noatime"), optional_fields=("master:1",), fs_type="ext3",
        source="/dev/root", super_options=("rw", "errors=continue"),
    )  # fmt: skip


@pytest.mark.parametrize("optional", [b"", b" shared:12", b" shared:3 master:1 unbindable"])
def test_optional_fields_of_any_number(optional: bytes) -> None:
    line = b"40 1 0:45 / /srv rw,relatime" + optional + b" - tmpfs qvd rw,size=1024k"
    mount = parse_line(line)
    assert mount.optional_fields == tuple(optional.decode().split())
    assert (mount.mount_point, mount.fs_type, mount.source) == ("/srv", "tmpfs", "qvd")


def test_escaped_space_tab_newline_and_backslash_are_undone() -> None:
    line = (rb"41 1 0:46 /a\040b /srv/with\040space\011tab\012nl\134back rw - "
            rb"fuse.qvdfs my\040source rw")
    mount = parse_line(line)
    assert mount.mount_point == "/srv/with space\ttab\nnl\\back"
    assert mount.root == "/a b"
    assert (mount.fs_type, mount.source) == ("fuse.qvdfs", "my source")


def test_a_backslash_not_followed_by_three_octal_digits_stays() -> None:
    # The kernel escapes every backslash, so these only come from a hand-written table; a
    # digit 8 or 9 is not octal.
    assert parse_line(rb"1 1 0:1 / /a\19b\x rw - t s rw").mount_point == "/a\\19b\\x"


def test_bytes_that_are_not_utf8_decode_as_file_names() -> None:
    mount = parse_line(b"42 1 0:47 / /srv/caf\xe9 rw - tmpfs tmpfs rw")
    assert mount.mount_point == os.fsdecode(b"/srv/caf\xe9")
    assert os.fsencode(mount.mount_point) == b"/srv/caf\xe9"


@pytest.mark.parametrize("line", [b"", b"36 35 98:0 / /mnt rw", b"x 35 98:0 / /m rw - t s rw",
                                  b"36 35 98:0 / /m rw - ext3"])
def test_a_line_without_mountinfos_fields_is_a_clear_error(line: bytes) -> None:
    with pytest.raises(ValueError, match="not a mountinfo line"):
        parse_line(line)


def test_mounts_under_and_is_mounted_on_a_table(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_bytes(b"1 0 0:1 / / rw - ext4 /dev/vda rw\n"
                      b"2 1 0:2 / /srv/vm rw - tmpfs t rw\n"
                      b"3 2 0:3 / /srv/vm/home\\040dir rw - tmpfs t rw\n"
                      b"4 2 0:4 / /srv/vm rw - fuse.qvdfs q rw\n"
                      b"5 1 0:5 / /srv/vmx rw - tmpfs t rw\n")
    assert mounts_under("/srv/vm", str(table)) == ["/srv/vm/home dir", "/srv/vm", "/srv/vm"]
    assert is_mounted("/srv/vm/home dir", str(table))
    assert not is_mounted("/srv/v", str(table))
    assert [m.mount_id for m in read_mounts(str(table))] == [1, 2, 3, 4, 5]


@pytest.mark.timeout(60)
def test_a_real_mount_on_a_path_that_needs_escapes(tmp_path: Path) -> None:
    point = tmp_path / "a dir\twith\\odd\nname"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "qvd proc test", str(point)],
                   check=True, timeout=30)
    try:
        (mount,) = [m for m in read_mounts() if m.mount_point == str(point)]
        assert (mount.fs_type, mount.source) == ("tmpfs", "qvd proc test")
        assert is_mounted(point)
        assert mounts_under(tmp_path) == [str(point)]
        assert os.stat(point).st_dev == os.makedev(*map(int, mount.device.split(":")))
    finally:
        subprocess.run(["umount", str(point)], check=True, timeout=30)
    assert not is_mounted(point)
    assert mounts_under(tmp_path) == []
