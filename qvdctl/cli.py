"""``qvdctl``: the node's admin command line, in qvd-admin.pl's grammar.

    qvdctl [--root DIR] [--config FILE] [--db URL] [-q] [--json] [-v] <object> <command>
           [-f k=v[,k=v]]... [key=value ...]
    qvdctl vm exec -f name=VM -- COMMAND [ARG ...]
    qvdctl [--config FILE] hkd          (a fleet node's daemon, in the foreground)

Global options may come anywhere. Every failure an admin can cause prints one
line, ``Error: ...``, on stderr and exits 1 having changed nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from qvdctl.commands import DRY_RUN, OBJECTS
from qvdctl.commands.base import Request, parse_filters
from qvdctl.errors import QvdError
from qvdctl.node import Node
from qvdctl.output import Output

log = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse prints usage over several lines; we want one
        raise QvdError(message)


def _parser() -> argparse.ArgumentParser:
    objects = ", ".join(OBJECTS)
    parser = _Parser(
        prog="qvdctl",
        allow_abbrev=False,
        description=f"Administer a QVD LXC node. Objects: {objects}.",
        epilog="Example: qvdctl vm list -f name=Test*",
    )
    parser.add_argument(
        "--root", type=Path, default=os.environ.get("QVD_ROOT") or None,
        help="storage root holding the database too (env QVD_ROOT; default /var/lib/qvd/storage)",
    )
    parser.add_argument(
        "--config", type=Path, default=None,
        help="node config file (env QVD_NODE_CONF; default /etc/qvd/node.conf if it exists)",
    )
    parser.add_argument(
        "--db", default=None, metavar="URL",
        help="database URL, e.g. postgresql://user@host/qvd (env QVD_DB; beats the node config)",
    )
    parser.add_argument("--no-wait", action="store_true",
                        help="in a fleet, vm start/stop return once the commands are queued")
    parser.add_argument("-q", "--quiet", action="store_true", help="no table headers")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--dry-run", action="store_true",
                        help="show what the command would change, change nothing (di commit)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    parser.add_argument("-f", "--filter", action="append", default=[], metavar="K=V[,K=V]",
                        help="select objects; * and ? are wildcards")
    parser.add_argument("object", help=objects)
    parser.add_argument("command", nargs="?", default=None)
    parser.add_argument("words", nargs="*", metavar="key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after "--" is a command line for `vm exec`, never our options.
    rest: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1:]
    try:
        ns = _parser().parse_intermixed_args(argv)
        level = {0: logging.WARNING, 1: logging.INFO}.get(ns.verbose, logging.DEBUG)
        logging.basicConfig(
            level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
            if ns.object == "hkd" else "%(levelname)s %(name)s: %(message)s"
        )
        if ns.object == "hkd":
            return _hkd(ns)
        if ns.command is None:
            raise QvdError(f"{ns.object}: a command is missing (e.g. qvdctl {ns.object} list)")
        commands = OBJECTS.get(ns.object)
        if commands is None:
            raise QvdError(f"unknown object '{ns.object}' (objects: {', '.join(OBJECTS)})")
        command = commands.get(ns.command)
        if command is None:
            raise QvdError(
                f"unknown command '{ns.command}' for {ns.object} (commands: {', '.join(commands)})"
            )
        if ns.dry_run and (ns.object, ns.command) not in DRY_RUN:
            raise QvdError(f"{ns.object} {ns.command} has no --dry-run")
        filters = parse_filters(ns.filter)
        node = Node(ns.root, config=ns.config, db_url=ns.db)
        try:
            out = Output(quiet=ns.quiet, as_json=ns.json)
            command(Request(ns.object, ns.command, node, out, filters, ns.words, rest,
                            no_wait=ns.no_wait, dry_run=ns.dry_run))
        finally:
            node.close()
    except QvdError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    return 0


def _hkd(ns: argparse.Namespace) -> int:
    """``qvdctl hkd``: the node's daemon, in the foreground, logging to stderr."""
    from qvdctl.fleet import hkd  # here: only the daemon needs it

    if ns.command is not None or ns.words or ns.filter:
        raise QvdError("hkd takes no command, filter or arguments")
    if ns.verbose == 0:
        logging.getLogger().setLevel(logging.INFO)  # a daemon's log is its record
    node = Node(ns.root, config=ns.config, db_url=ns.db)
    try:
        return hkd.main(node)
    finally:
        node.close()


if __name__ == "__main__":
    sys.exit(main())
