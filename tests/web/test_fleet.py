"""The web admin of a fleet: on PostgreSQL, its buttons queue commands for an HKD.

One node's HKD (``tools/fleet.py``, root-only VMs) and the web admin run as
separate processes on one PostgreSQL of the test's own; the web server's process is on
no node, as an admin's machine would be.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from qvdctl.db.engine import Database
from qvdctl.vm import usage
from tools.fleet import Fleet, until
from tests.support.postgres import PgServer, database_url, postgres  # noqa: F401
from tests.support.web import Client, web_server

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def fleet(postgres: PgServer, tmp_path: Path) -> Iterator[Fleet]:  # noqa: F811
    f = Fleet(tmp_path, postgres.url(), ("node-a",), vms=2)
    try:
        f.start()
        yield f
    finally:
        f.close()


def _feed_until(url: str, cookie: str, vm_id: int, state: str, timeout: float = 60) -> float:
    """Read the live feed until VM ``vm_id`` is in ``state``; return how long it took."""
    request = urllib.request.Request(url + "events/vms",
                                     headers={"Cookie": f"qvd_session={cookie}"})
    began = time.monotonic()
    with urllib.request.urlopen(request, timeout=timeout) as feed:
        for raw in feed:
            line = raw.decode().strip()
            if line.startswith("data: "):
                states = {vm["id"]: vm for vm in json.loads(line[6:])}
                if states[vm_id]["state"] == state:
                    return time.monotonic() - began
            assert time.monotonic() - began < timeout, f"VM {vm_id} never {state}"
    raise AssertionError("the feed ended")


def test_a_fleet_start_and_stop_from_the_web_are_queued_for_the_hkd(fleet: Fleet) -> None:
    fleet.admin.run("admin", "add", "login=alice", "password=pw")
    with web_server(fleet.admin) as url:
        client = Client(url)
        assert client.log_in("alice", "pw").status == 303
        token = client.csrf()
        json_reply = {"Accept": "application/json"}
        reply = client.request("/act/vm", {"action": "start", "id": "1", "csrf": token},
                               headers=json_reply)
        assert json.loads(reply.body) == [{"what": "vm start v1", "error": None}]
        assert client.cookie is not None
        _feed_until(url, client.cookie, 1, "running")
        assert fleet.admin.vms()["v1"]["Host"] == "node-a"
        assert "node-a" in client.request("/").body  # the dashboard's hosts

        # A blocked host takes no new VM: the HKD's placement says so in one line.
        client.request("/act/host", {"action": "block", "id": "1", "csrf": token})
        reply = client.request("/act/vm", {"action": "start", "id": "2", "csrf": token},
                               headers=json_reply)
        (line,) = json.loads(reply.body)
        assert line["error"] and "host" in line["error"], line
        assert fleet.admin.vms()["v2"]["State"] == "stopped"
        client.request("/act/host", {"action": "unblock", "id": "1", "csrf": token})

        reply = client.request("/act/vm", {"action": "stop", "id": "1", "csrf": token},
                               headers=json_reply)
        assert json.loads(reply.body) == [{"what": "vm stop v1", "error": None}]
        _feed_until(url, client.cookie, 1, "stopped")
        until(lambda: fleet.admin.vms()["v1"]["State"] == "stopped", "v1 stopped", 60)
        actions = [(r["Who"], r["Action"], r["Object"]) for r in fleet.admin.json("log", "list")]
        assert ("alice", "vm start", "v1") in actions and ("alice", "vm stop", "v1") in actions
        assert ("alice", "host block", "node-a") in actions


@pytest.fixture(params=["sqlite", "postgresql"])
def one_node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    """One HKD and two VMs on either database (SQLite: a file beside the nodes)."""
    f = Fleet(tmp_path, database_url(request, tmp_path), ("node-a",), vms=2)
    try:
        # The HKD reads its settings when it starts, or at a NOTIFY: before the start.
        f.admin.run("config", "set", "vm.lxc.unionfs.type=qvdfs", "hkd.usage.interval=1")
        f.start()
        yield f
    finally:
        f.close()


def test_a_vm_page_shows_what_its_hkd_published_and_the_hkd_writes_once_a_period(
    one_node: Fleet
) -> None:
    fleet = one_node
    fleet.admin.run("admin", "add", "login=alice", "password=pw")
    fleet.admin.run("vm", "start", "-f", "name=v1")
    database = Database(fleet.url)

    def published_at() -> float | None:
        with database.reader() as conn:
            found = usage.published(conn, 1)
        return None if found is None else found[1].at

    try:
        until(lambda: published_at() is not None, "v1's usage published", 30)
        # One write per period: over 5 s, about five distinct readings, never many more; at
        # least two (it goes on writing), since a loaded machine may delay a period or two.
        seen = set()
        began = time.monotonic()
        while time.monotonic() - began < 5:
            seen.add(published_at())
            time.sleep(0.1)
        assert 2 <= len(seen) <= 7, sorted(seen)  # type: ignore[type-var]
        with web_server(fleet.admin) as url:  # on no node: it can only read the database
            client = Client(url)
            assert client.log_in("alice", "pw").status == 303
            page = client.request("/vms/1").body
            assert re.search(r"Published by host node-a&#39;s HKD \d+ s ago", page), page[-3000:]
            opcodes = re.search(r'<table id="root-opcodes">.*?</table>', page, re.S)
            assert opcodes and re.search(r"<td>GETATTR</td><td class=\"num\">[1-9]",
                                         opcodes.group(0)), page[-3000:]
            assert "- (no container)" in page  # a root-only VM has no cgroup
        fleet.admin.run("vm", "stop", "-f", "name=v1")
        until(lambda: published_at() is None, "v1's usage gone once stopped", 30)
    finally:
        database.close()
