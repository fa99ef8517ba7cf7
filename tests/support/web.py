"""The web admin for tests: a real ``qvdctl web`` on loopback, and a plain HTTP client.

``web_server`` starts the server on a free port of 127.0.0.1 and stops it (SIGTERM,
then SIGKILL) on the way out. ``Client`` speaks HTTP with urllib, keeps the session
cookie, never follows redirects (the tests check where they point), and reads the
CSRF token out of a page as a browser's form would send it.
"""

from __future__ import annotations

import contextlib
import re
import ssl
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path

from tests.support.qvdctl import Cli
from tools.webserver import serving

COOKIE = "qvd_session"
START_TIMEOUT_S = 60  # a busy machine: the interpreter and Starlette's imports


@contextlib.contextmanager
def web_server(cli: Cli, *extra: str) -> Iterator[str]:
    """``qvdctl web`` on ``cli``'s root; yields its base URL (``http://127.0.0.1:PORT/``)."""
    proc = subprocess.Popen(cli.argv("web", "--listen", "127.0.0.1:0", *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with serving(proc, START_TIMEOUT_S) as url:
        yield url


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


@dataclass
class Reply:
    status: int
    headers: Message
    body: str

    @property
    def location(self) -> str | None:
        return self.headers.get("location")

    def set_cookie(self, name: str) -> str:
        """The Set-Cookie header of cookie ``name`` (``""`` if the reply sets none)."""
        found = [h for h in self.headers.get_all("set-cookie") or [] if h.startswith(name + "=")]
        return found[0] if found else ""


@dataclass
class Client:
    base: str
    cookie: str | None = None
    # Self-signed certificates of the TLS tests: this is loopback, the test made the cert.
    context: ssl.SSLContext | None = field(default=None)

    def request(self, path: str, form: dict[str, str | list[str]] | None = None,
                headers: dict[str, str] | None = None) -> Reply:
        data = None if form is None else urllib.parse.urlencode(form, doseq=True).encode()
        req = urllib.request.Request(urllib.parse.urljoin(self.base, path), data=data,
                                     headers=headers or {})
        if self.cookie:
            cookies = [req.get_header("Cookie"), f"qvd_session={self.cookie}"]
            req.add_header("Cookie", "; ".join(c for c in cookies if c))
        handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
        if self.context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=self.context))
        opener = urllib.request.build_opener(*handlers)
        try:
            with opener.open(req, timeout=60) as response:
                return Reply(response.status, response.headers, response.read().decode())
        except urllib.error.HTTPError as exc:
            return Reply(exc.code, exc.headers, exc.read().decode())

    def log_in(self, login: str, password: str) -> Reply:
        """Log in as a browser does: read the login form (its CSRF token and cookie), post it."""
        form = self.request("/login")
        cookie = form.headers.get("set-cookie", "").split(";")[0]
        match = re.search(r'name="csrf" value="([^"]+)"', form.body)
        assert form.status == 200 and cookie.startswith("qvd_login=") and match, form
        reply = self.request("/login", {"login": login, "password": password,
                                        "csrf": match.group(1)}, headers={"Cookie": cookie})
        if reply.status == 303:
            self.cookie = reply.set_cookie(COOKIE).split(";")[0].partition("=")[2]
        return reply

    def csrf(self, path: str = "/vms") -> str:
        page = self.request(path)
        assert page.status == 200, page
        match = re.search(r'name="csrf" value="([^"]+)"', page.body)
        assert match, "no CSRF token on the page"
        return match.group(1)

    def revisions(self, path: str, form: str = "[^\"]+") -> dict[str, str]:
        """Object id -> how form ``form`` of page ``path`` names it (``ID:DIGEST``)."""
        page = self.request(path)
        assert page.status == 200, page
        found = re.findall(rf'name="id" value="([0-9]+:[0-9a-f]+)" form="{form}"', page.body)
        return {rev.partition(":")[0]: rev for rev in found}


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate and key for 127.0.0.1, made with openssl."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key

