"""``qvdctl web`` on a socket handed over by systemd's socket activation protocol, as
``make demo`` serves it: bound on the host's loopback, the server in a network namespace."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support.web import Client
from tools.sandbox import QVDCTL, scratch_node, socket_on_stdin_argv
from tools.webserver import serving

pytestmark = pytest.mark.timeout(180)


def test_a_handed_over_socket_serves_the_host_from_inside_a_namespace(tmp_path: Path) -> None:
    with scratch_node(tmp_path / "root", prefix="qvdweb") as node:
        node.qvdctl("admin", "add", "login=alice", "password=pw")
        with socket.create_server(("127.0.0.1", 0)) as sock:
            server = node.web(sock)
            port = sock.getsockname()[1]
        with serving(server) as url:
            assert url == f"http://127.0.0.1:{port}/"
            # The server itself is in the demo's namespace, its socket in this one.
            assert os.readlink(f"/proc/{server.pid}/ns/net") != os.readlink("/proc/self/ns/net")
            environ = Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0")
            assert b"LISTEN_FDS=1" in environ  # as it was started: no --listen of its own
            client = Client(url)
            assert client.log_in("alice", "pw").status == 303
            assert client.request("/vms").status == 200


def _handed(root: Path, script: str, sock: socket.socket, *args: str) -> str:
    """The error of ``qvdctl web ARGS`` given ``sock`` on stdin by ``script``."""
    argv = ["sh", "-c", script, "sh", QVDCTL, "--root", str(root), "web", *args]
    done = subprocess.run(argv, stdin=sock.fileno(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1, (done.stdout, done.stderr)
    (line,) = done.stderr.splitlines()
    return line


def test_a_bad_hand_over_is_one_line(tmp_path: Path) -> None:
    good = socket_on_stdin_argv([])[2]
    with socket.create_server(("127.0.0.1", 0)) as sock:
        assert "--listen and a socket handed over" in _handed(
            tmp_path, good, sock, "--listen", "127.0.0.1:0")
        assert "takes one socket by activation, not LISTEN_FDS='2'" in _handed(
            tmp_path, good.replace("LISTEN_FDS=1", "LISTEN_FDS=2"), sock)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        assert "not a listening stream socket" in _handed(tmp_path, good, udp)
    with socket.socket() as unbound:
        assert "not a listening stream socket" in _handed(tmp_path, good, unbound)
    assert re.search(r"LISTEN_PID=\$\$", good)
