"""``qvdctl web``: serve the web admin with uvicorn until SIGINT or SIGTERM.

The listening socket is bound here, before uvicorn starts, so a bad address or a port
in use is one ``Error:`` line, and ``--listen ADDR:0`` picks a free port; either way
the first line on stdout says where the admin is served.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from pathlib import Path

import uvicorn

from qvdctl.errors import QvdError
from qvdctl.node import Node
from qvdctl.web.app import create_app

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8080"


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


def _check_tls(cert: Path | None, key: Path | None) -> None:
    if (cert is None) != (key is None):
        raise QvdError("--cert and --key go together")
    if cert is not None and key is not None:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise QvdError(f"cannot use --cert {cert} --key {key}: {exc}") from None


def serve(node: Node, listen: str, cert: Path | None, key: Path | None) -> int:
    """Serve until told to stop; returns the exit status."""
    host, port = parse_listen(listen)
    _check_tls(cert, key)
    sock = _bind(host, port)
    scheme = "https" if cert else "http"
    shown = f"[{host}]" if ":" in host else host
    print(f"qvdctl web: serving {scheme}://{shown}:{sock.getsockname()[1]}/", flush=True)
    config = uvicorn.Config(
        create_app(node), ssl_certfile=cert, ssl_keyfile=key, log_level="warning",
        # The live feed is a response that never ends: do not wait for it on shutdown.
        timeout_graceful_shutdown=1,
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0
