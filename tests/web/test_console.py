"""A running VM's console in the browser, on a real LXC container of a scratch node.

The web server runs in the node's network namespace (where liblxc's console socket
answers) on a socket bound on this test's loopback, as ``make demo`` serves it.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import websocket  # websocket-client, which Selenium brings
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from tests.support.web import Client
from tests.web.test_browser import SCREENSHOTS, _log_in, _until, browser  # noqa: F401
from tests.web.conftest import ADMIN, VIEWER
from tools.sandbox import ScratchNode, scratch_node
from tools.webserver import serving

pytestmark = pytest.mark.timeout(300)


@dataclass
class Console:
    node: ScratchNode
    url: str


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, tarball: Path) -> Iterator[Console]:
    root = tmp_path_factory.mktemp("console") / "root"
    with scratch_node(root, prefix="qvdcons") as node:
        node.qvdctl("config", "set", *node.lxc_settings(net="10.213.79", bridge="qvdcons0"))
        node.qvdctl("osf", "add", "name=o")
        node.qvdctl("di", "add", f"path={tarball}", "osf=o")
        node.qvdctl("user", "add", "login=u", "password=p")
        node.qvdctl("vm", "add", "name=c1", "user=u", "osf=o")
        node.qvdctl("vm", "add", "name=c2", "user=u", "osf=o")
        node.qvdctl("admin", "add", f"login={ADMIN[0]}", f"password={ADMIN[1]}")
        node.qvdctl("admin", "add", f"login={VIEWER[0]}", f"password={VIEWER[1]}",
                    "role=viewer")
        node.qvdctl("vm", "start", "-f", "name=c1")
        try:
            with socket.create_server(("127.0.0.1", 0)) as sock:
                server = node.web(sock)
            with serving(server) as url:
                yield Console(node, url)
        finally:
            node.qvdctl("vm", "stop", "-f", "name=c1")


def _socket(url: str, cookie: str | None, origin: str | None = None) -> websocket.WebSocket:
    address = url.replace("http://", "ws://") + "vms/1/console/socket"
    return websocket.create_connection(
        address, timeout=30, cookie=f"qvd_session={cookie}" if cookie else None,
        origin=origin or url.rstrip("/"))


def test_the_console_socket_answers_an_admin_of_this_site_alone(running: Console) -> None:
    url = running.url
    admin, viewer = Client(url), Client(url)
    assert admin.log_in(*ADMIN).status == 303 and viewer.log_in(*VIEWER).status == 303
    for cookie, origin in [(None, None), (viewer.cookie, None),
                           (admin.cookie, "http://evil.example")]:
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            _socket(url, cookie, origin)
        assert refused.value.status_code == 403, (cookie, origin)
    assert viewer.request("/vms/1/console").status == 403

    ws = _socket(url, admin.cookie)
    try:
        ws.send('{"cols": 120, "rows": 40}')
        seen, deadline = b"", time.monotonic() + 60
        while b"con42sole" not in seen and time.monotonic() < deadline:
            # Enter until the shell answers (lxc-console flushes what came before it).
            ws.send_binary(b"\r" if b"# " not in seen else b"echo con$((6*7))sole; stty size\r")
            ws.settimeout(1)
            try:
                while True:
                    seen += ws.recv()
            except websocket.WebSocketTimeoutException:
                pass
        assert b"con42sole" in seen, seen[-500:]
        assert b"40 120" in seen, seen[-500:]  # the size the page sent
    finally:
        ws.close()
    logged = json.loads(running.node.qvdctl("--json", "log", "list", "-f",
                                            "action=vm?console").stdout)
    assert (ADMIN[0], "c1", "ok") in [(r["Who"], r["Object"], r["Result"]) for r in logged]


def test_the_console_page_types_into_the_vm_in_the_browser(
    running: Console, browser: WebDriver  # noqa: F811
) -> None:
    _log_in(browser, running.url, *ADMIN)
    browser.get(running.url + "vms/1")
    # A container on this node: its cgroup's numbers, read by the web server itself.
    assert browser.find_element(By.ID, "usage-source").text == "Read now on this node."
    cpu, memory = [float(cell.text) for cell in browser.find_elements(By.CSS_SELECTOR,
                                                                      "#usage td")]
    assert cpu >= 0 and memory > 0  # numbers, not "- (no container)"
    browser.save_screenshot(str(SCREENSHOTS / "vm-container.png"))
    browser.find_element(By.ID, "console-link").click()
    _until(browser, "the console", lambda: browser.find_element(
        By.ID, "console-status").text == "connected.")
    keys = browser.find_element(By.CSS_SELECTOR, "#console .xterm-helper-textarea")
    deadline = time.monotonic() + 60
    while "/ #" not in browser.find_element(By.ID, "console").text:  # busybox's prompt
        assert time.monotonic() < deadline, browser.find_element(By.ID, "console").text
        keys.send_keys("\n")
        time.sleep(1)
    keys.send_keys("echo browser-$((6*7))-console\n")
    _until(browser, "the command's output", lambda: "browser-42-console" in
           browser.find_element(By.ID, "console").text)
    browser.save_screenshot(str(SCREENSHOTS / "console.png"))


def test_a_vm_the_server_cannot_reach_names_why(
    running: Console, browser: WebDriver  # noqa: F811
) -> None:
    _log_in(browser, running.url, *ADMIN)
    browser.get(running.url + "vms/2/console")
    assert browser.find_element(By.ID, "console-why").text == (
        "No console: the VM is stopped.")
    # As a fleet's database would have it: c2 running on another node.
    with sqlite3.connect(running.node.root / "qvd.db") as db:
        db.execute("INSERT INTO hosts (name, address, created, state, blocked)"
                   " VALUES ('elsewhere', '', '2026-01-01', 'running', 0)")
        db.execute("UPDATE vms SET state = 'running', host_id = (SELECT id FROM hosts"
                   " WHERE name = 'elsewhere') WHERE name = 'c2'")
    try:
        browser.get(running.url + "vms/2/console")
        assert browser.find_element(By.ID, "console-why").text == (
            "No console: the VM runs on host elsewhere: open its console from a web admin"
            " there.")
    finally:
        with sqlite3.connect(running.node.root / "qvd.db") as db:
            db.execute("UPDATE vms SET state = 'stopped', host_id = NULL WHERE name = 'c2'")
