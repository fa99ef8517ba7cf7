"""qvdctl's start-up: a command loads only what it uses; help comes from the docstrings.

No timings here (the machine is shared): what is checked is which libraries a run
imported, which is what the time goes into (``make bench-cli`` measures it).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys

import pytest

from qvdctl.commands import OBJECTS, commands_of

HEAVY = ("lxc", "trio", "pyroute2", "libarchive")

# qvdctl's own main in a fresh interpreter, then what it imported, on the last line.
_PROBE = f"""
import json, sys
from qvdctl.cli import main
status = main(sys.argv[1:])
print(json.dumps({{"status": status, "loaded": sorted(
    m for m in sys.modules if m.split(".")[0] in {(*HEAVY, "sqlalchemy")!r})}}))
"""


def _loaded(cli, *args: str, status: int = 0) -> set[str]:
    """The top-level packages among HEAVY and sqlalchemy that ``qvdctl ARGS`` imported,
    once it returned ``status``."""
    result = subprocess.run([sys.executable, "-c", _PROBE, "--root", str(cli.root), *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    probe = json.loads(result.stdout.splitlines()[-1])
    assert probe["status"] == status, result.stderr
    return {name.split(".")[0] for name in probe["loaded"]}


@pytest.fixture
def with_vms(cli):
    cli.run("osf", "add", "name=o")
    cli.run("user", "add", "login=u", "password=p")
    for name in ("v1", "v2"):
        cli.run("vm", "add", f"name={name}", "user=u", "osf=o")
    return cli


def test_vm_list_and_config_get_load_no_container_network_or_archive_library(with_vms):
    # sqlalchemy shows that the probe sees what the command imported.
    assert _loaded(with_vms, "vm", "list") == {"sqlalchemy"}
    assert _loaded(with_vms, "config", "get") == {"sqlalchemy"}
    assert _loaded(with_vms, "user", "list") == {"sqlalchemy"}


def test_list_and_exec_of_a_running_vm_load_liblxc_only(with_vms):
    """With a VM running, ``vm list`` asks liblxc whether its container still runs, and
    ``vm exec`` whether it can be reached: the container queries, not the start
    machinery (trio, pyroute2), which would cost more than the rest."""
    with_vms.run("config", "set", "vm.hypervisor=lxc", "nodename=n1")
    with contextlib.closing(sqlite3.connect(with_vms.root / "qvd.db")) as db, db:
        db.execute("INSERT INTO hosts (name, address, created) "
                   "VALUES ('n1', '127.0.0.1', CURRENT_TIMESTAMP)")
        db.execute("UPDATE vms SET state = 'running', "
                   "host_id = (SELECT id FROM hosts WHERE name = 'n1')")
    # No container runs: exec finds that out from liblxc, and list marks v1 a zombie
    # for it (its root is not mounted either).
    assert _loaded(with_vms, "vm", "exec", "-f", "name=v2", "--", "true", status=1) == {
        "sqlalchemy", "lxc"}
    assert _loaded(with_vms, "vm", "list") == {"sqlalchemy", "lxc"}
    assert with_vms.vm("v1")["State"] == "zombie"


def test_help_loads_no_library_but_the_one_command_module(cli):
    assert _loaded(cli, "--help") == set()
    assert _loaded(cli, "vm", "--help") <= {"sqlalchemy"}
    assert _loaded(cli, "vm", "start", "--help") <= {"sqlalchemy"}
    assert _loaded(cli, "di", "commit", "--help") <= {"sqlalchemy"}


def test_top_help_lists_every_object_in_one_line(cli):
    out = cli.run("--help").stdout
    for obj in [*OBJECTS, "hkd", "web"]:
        (line,) = [line for line in out.splitlines() if line.split()[:1] == [obj]]
        assert len(line.split()) > 1, line  # the object, then what it is
    assert "--root DIR" in out and "--filter" in out
    assert cli.run("help").stdout == out
    assert not cli.root.exists()  # help touches no root


@pytest.mark.parametrize("obj", list(OBJECTS))
def test_object_help_has_a_line_per_command_from_its_docstring(cli, obj):
    out = cli.run(obj, "--help").stdout
    lines = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    commands = commands_of(obj)
    assert len(lines) == len(commands)
    for name, function in commands.items():
        assert function.__doc__, f"{obj} {name} has no docstring, so no help"
        first = function.__doc__.splitlines()[0].replace("``", "").rstrip(".")
        assert first.startswith(f"{obj} {name}"), first
        (line,) = [line for line in lines if line.split()[:2] == [obj, name]]
        assert line.startswith(first)
    assert cli.run(obj, "help").stdout == out
    assert cli.run("help", obj).stdout == out


def test_command_help_is_its_whole_docstring(cli):
    out = cli.run("vm", "start", "--help").stdout
    assert out.startswith("vm start -f ...: ")
    assert "vm.lifecycle.parallel" in out and "--no-wait" in out and "``" not in out
    assert cli.run("vm", "help", "start").stdout == out
    assert cli.run("help", "vm", "start").stdout == out
    assert cli.run("-f", "name=x", "vm", "start", "name=y", "-h").stdout == out
    assert "lease" in cli.run("hkd", "--help").stdout
    assert "--listen ADDR:PORT" in cli.run("web", "--help").stdout


def test_help_and_missing_words_name_what_is_wrong(cli):
    objects = ", ".join(OBJECTS)
    assert cli.fails("nope", "--help") == f"Error: unknown object 'nope' (objects: {objects})"
    assert cli.fails("vm", "nope", "-h").startswith("Error: unknown command 'nope' for vm")
    assert cli.fails() == "Error: an object is missing (qvdctl --help lists them)"
    assert cli.fails("vm") == "Error: vm: a command is missing (qvdctl vm --help lists them)"


def test_a_failure_of_each_of_several_vms_is_reported_and_exits_1(with_vms):
    # `vm start` of several VMs leaves by SystemExit(1) after its lines: the
    # entry point's quick exit must keep that status and every line.
    with_vms.run("config", "set", "vm.hypervisor=lxc")
    result = with_vms.run("vm", "start", "-f", "name=v*", check=False)
    assert result.returncode == 1
    errors = result.stderr.splitlines()
    assert len(errors) == 2 and all("no disk image tagged 'default'" in e for e in errors)


# cli.run around a stand-in for main: what it leaves must still happen before the exit.
_EXIT = """
import sys, threading, time
from qvdctl import cli

def finishing():
    time.sleep(0.3)
    print("worker finished")  # unflushed: stdout is a pipe here

def main(argv=None):
    threading.Thread(target=finishing).start()
    print("main's output", file=sys.stderr)
    raise SystemExit(int(sys.argv[1]))

cli.main = main
cli.run()
"""


@pytest.mark.parametrize("status", [0, 3])
def test_the_quick_exit_waits_for_workers_flushes_and_keeps_the_status(status):
    result = subprocess.run([sys.executable, "-c", _EXIT, str(status)],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (
        status, "worker finished\n", "main's output\n")
