"""One module per object of ``qvdctl <object> <command>``, imported only when used.

Each module has ``COMMANDS``: a dict from command name to a function taking a
``Request`` (see ``base.py``). A function's docstring is its help: the first
paragraph is its line in ``qvdctl <object> --help``, the whole of it
``qvdctl <object> <command> --help``.

``OBJECTS`` names each object's module without importing it: qvdctl loads the
one module a command needs (and what that module imports), never all of them.
A command module keeps to light imports at its top (SQLAlchemy, the database
layer); liblxc, trio, pyroute2 and libarchive are imported inside the commands
that use them, so that ``vm list`` or ``config get`` start in a fraction of the
second those would cost together.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from qvdctl.errors import QvdError

if TYPE_CHECKING:
    from qvdctl.commands.base import Request

Command = Callable[["Request"], None]

# Object -> (its module in this package, its line in `qvdctl --help`).
OBJECTS: dict[str, tuple[str, str]] = {
    "config": ("config", "the node's settings"),
    "osf": ("osf", "OS flavours: the hardware profile of a group of VMs"),
    "di": ("di", "disk images of an OSF, and their tags"),
    "user": ("user", "the users who own VMs"),
    "vm": ("vm", "virtual machines: add, start, stop, list, exec, console"),
    "host": ("host", "the nodes that run VMs"),
    "admin": ("admin", "the accounts of the web admin (qvdctl web)"),
    "log": ("log", "the audit log of every change, from the CLI and the web"),
}

# The commands that take --dry-run.
DRY_RUN = {("di", "commit")}


def commands_of(obj: str) -> dict[str, Command]:
    """The commands of object ``obj``, importing its module and no other.

    Raises:
        QvdError: no such object.
    """
    if obj not in OBJECTS:
        raise QvdError(f"unknown object '{obj}' (objects: {', '.join(OBJECTS)})")
    module = importlib.import_module(f"{__name__}.{OBJECTS[obj][0]}")
    commands: dict[str, Command] = module.COMMANDS
    return commands
