"""VMs as LXC containers: the config liblxc reads and the calls that run it.

- ``config``: ``ContainerSpec`` and the config file under the lxcpath (SPEC §4);
- ``runtime``: start, stop, state, exec and console of one container (liblxc);
- ``launch``: ``launch`` / ``halt``, the all-or-nothing steps a VM's start and stop call;
- ``seam``: the blocking calls ``qvdctl/vm/`` makes, in the node's own terms.
"""

from __future__ import annotations

from qvdctl.container.config import (
    DEFAULT_LXCPATH,
    ConfigError,
    ContainerSpec,
    NetworkSpec,
    container_name,
    render_config,
    write_config,
)
from qvdctl.container.runtime import (
    ContainerError,
    ExecResult,
    console,
    console_argv,
    exec_in,
    list_states,
    state,
)
from qvdctl.container.launch import LaunchError, halt, launch

__all__ = [
    "DEFAULT_LXCPATH",
    "ConfigError",
    "ContainerError",
    "ContainerSpec",
    "ExecResult",
    "LaunchError",
    "NetworkSpec",
    "console",
    "console_argv",
    "container_name",
    "exec_in",
    "halt",
    "launch",
    "list_states",
    "render_config",
    "state",
    "write_config",
]
