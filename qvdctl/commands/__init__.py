"""One module per object of ``qvdctl <object> <command>``.

Each module has ``COMMANDS``: a dict from command name to a function taking a
``Request`` (see ``base.py``). ``OBJECTS`` below is the dispatch table.
"""

from __future__ import annotations

from qvdctl.commands import config, di, host, osf, user, vm

OBJECTS = {
    "config": config.COMMANDS,
    "osf": osf.COMMANDS,
    "di": di.COMMANDS,
    "user": user.COMMANDS,
    "vm": vm.COMMANDS,
    "host": host.COMMANDS,
}

# The commands that take --dry-run.
DRY_RUN = {("di", "commit")}
