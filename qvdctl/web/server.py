"""``qvdctl web``: serve the web admin with uvicorn until SIGINT or SIGTERM.

The listening socket is bound here, before uvicorn starts, so a bad address or a port
in use is one ``Error:`` line, and ``--listen ADDR:0`` picks a free port; either way
the first line on stdout says where the admin is served.

Or the socket is handed over, by systemd's socket activation protocol (sd_listen_fds(3):
``LISTEN_PID`` is this process, ``LISTEN_FDS=1``, the socket is fd 3): a ``.socket``
unit, or ``make demo``, which binds on the host's loopback and runs the server inside
the demo's network namespace, where its VMs' bridge is. No library: the protocol is
two environment variables and a file descriptor.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import ssl
from pathlib import Path

import uvicorn

from qvdctl.errors import QvdError
from qvdctl.node import Node
from qvdctl.web.app import create_app

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8080"
LISTEN_FDS_START = 3  # sd_listen_fds(3): the first socket handed over


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` (``[v6]:PORT`` for IPv6) -> (address, port)."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
        if not sep or not port.isdigit() or int(port) > 65535:
            raise ValueError
    except ValueError:
        raise QvdError(
            f"bad --listen '{text}': expected ADDR:PORT, e.g. {DEFAULT_LISTEN}") from None
    return host, int(port)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise QvdError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    return sock


def handed_over() -> socket.socket | None:
    """The listening socket handed over by socket activation, if this process was given
    one; its variables are removed, so nothing this process starts takes it for its own.

    Raises:
        QvdError: more than one socket, or fd 3 is not a listening stream socket.
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = os.environ.get("LISTEN_FDS", "")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count != "1":
        raise QvdError(f"qvdctl web takes one socket by activation, not LISTEN_FDS={count!r}")
    try:
        sock = socket.socket(fileno=LISTEN_FDS_START)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as exc:
        raise QvdError(f"the socket handed over as fd 3 is unusable: {exc.strerror}") from None
    if sock.type != socket.SOCK_STREAM or not listening:
        sock.detach()
        raise QvdError("the socket handed over as fd 3 is not a listening stream socket")
    os.set_inheritable(sock.fileno(), False)
    return sock


def _check_tls(cert: Path | None, key: Path | None) -> None:
    if (cert is None) != (key is None):
        raise QvdError("--cert and --key go together")
    if cert is not None and key is not None:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise QvdError(f"cannot use --cert {cert} --key {key}: {exc}") from None


def serve(node: Node, listen: str | None, cert: Path | None, key: Path | None) -> int:
    """Serve until told to stop, on ``listen`` (``ADDR:PORT``; None: the socket handed
    over, else ``DEFAULT_LISTEN``); returns the exit status."""
    sock = handed_over()
    if sock is not None and listen is not None:
        sock.close()
        raise QvdError("--listen and a socket handed over (LISTEN_FDS): choose one")
    _check_tls(cert, key)
    if sock is None:
        sock = _bind(*parse_listen(listen or DEFAULT_LISTEN))
    scheme = "https" if cert else "http"
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"qvdctl web: serving {scheme}://{shown}:{port}/", flush=True)
    config = uvicorn.Config(
        create_app(node), ssl_certfile=cert, ssl_keyfile=key, log_level="warning",
        # The live feed is a response that never ends: do not wait for it on shutdown.
        timeout_graceful_shutdown=1,
        ws="wsproto",  # the consoles' WebSockets (web/console.py)
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0
