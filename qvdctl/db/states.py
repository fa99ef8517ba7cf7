"""The values of a VM's ``state`` column, as a type.

Below both the data access (``store``), which writes and filters on them, and the state
machine (``qvdctl/vm/state.py``), which says which moves are allowed and imports ``store``:
so this module imports nothing of the project, and states are one type everywhere.
"""

from __future__ import annotations

import enum


class VmState(enum.StrEnum):
    """The ``state`` column of a VM (SPEC: ``vm list``); the values are the stock names."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    ZOMBIE = "zombie"
    # The stock node's state for a VM held for inspection; qvdctl never enters it, but
    # a VM found in it (a database shared with a stock node) can be stopped.
    DEBUGGING = "debugging"
