"""``qvdctl``: the node's admin command line, in qvd-admin.pl's grammar.

    qvdctl [--root DIR] [--config FILE] [--db URL] [-q] [--json] [-v] <object> <command>
           [-f k=v[,k=v]]... [key=value ...]
    qvdctl vm exec -f name=VM -- COMMAND [ARG ...]
    qvdctl [--config FILE] hkd          (a fleet node's daemon, in the foreground)
    qvdctl [<object> [<command>]] --help (or the word help in place of --help)

Global options may come anywhere. Every failure an admin can cause prints one
line, ``Error: ...``, on stderr and exits 1 having changed nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from qvdctl.commands import DRY_RUN, OBJECTS, Command, commands_of
from qvdctl.errors import QvdError

# Only what parsing and help need is imported up here: a command's module (and the
# database layer with it) is imported once the command is known, so that `--help`
# answers at once and each command loads only what it uses (commands/__init__.py).

log = logging.getLogger(__name__)

USAGE = """qvdctl [options] <object> <command> [-f K=V[,K=V]]... [key=value ...]
       qvdctl [options] vm exec -f name=VM -- COMMAND [ARG ...]
       qvdctl [options] hkd
       qvdctl [options] web [--listen ADDR:PORT] [--cert FILE --key FILE]"""
HKD = "a fleet node's daemon, in the foreground (no command)"
WEB = "the web admin, in the foreground (no command)"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse prints usage over several lines; we want one
        raise QvdError(message)


def _parser() -> argparse.ArgumentParser:
    lines = {name: line for name, (_, line) in OBJECTS.items()} | {"hkd": HKD, "web": WEB}
    width = max(map(len, lines)) + 2
    objects = "\n".join(f"  {name:<{width}}{line}" for name, line in lines.items())
    parser = _Parser(
        prog="qvdctl",
        usage=USAGE,
        allow_abbrev=False,
        add_help=False,  # -h is ours: help of qvdctl, of an object, or of one command
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Administer a QVD LXC node.\n\nobjects:\n{objects}",
        epilog="qvdctl OBJECT --help lists its commands; qvdctl OBJECT COMMAND --help shows one."
        "\nExample: qvdctl vm list -f name=Test*",
    )
    parser.add_argument("-h", "--help", action="store_true",
                        help="this help; after an object or a command, theirs")
    parser.add_argument(
        "--root", type=Path, default=os.environ.get("QVD_ROOT") or None, metavar="DIR",
        help="storage root holding the database too (env QVD_ROOT; default /var/lib/qvd/storage)",
    )
    parser.add_argument(
        "--config", type=Path, default=None, metavar="FILE",
        help="node config file (env QVD_NODE_CONF; default /etc/qvd/node.conf if it exists)",
    )
    parser.add_argument(
        "--db", default=None, metavar="URL",
        help="database URL, e.g. postgresql://user@host/qvd (env QVD_DB; beats the node config)",
    )
    parser.add_argument("--no-wait", action="store_true",
                        help="in a fleet, vm start/stop return once the commands are queued")
    parser.add_argument("--listen", default=None, metavar="ADDR:PORT",
                        help="web: where to serve (default 127.0.0.1:8080)")
    parser.add_argument("--cert", type=Path, default=None, metavar="FILE",
                        help="web: serve HTTPS with this certificate (and --key)")
    parser.add_argument("--key", type=Path, default=None, metavar="FILE",
                        help="web: the certificate's private key")
    parser.add_argument("-q", "--quiet", action="store_true", help="no table headers")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--dry-run", action="store_true",
                        help="show what the command would change, change nothing (di commit)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    parser.add_argument("-f", "--filter", action="append", default=[], metavar="K=V[,K=V]",
                        help="select objects; * and ? are wildcards")
    parser.add_argument("object", nargs="?", default=None, help=argparse.SUPPRESS)
    parser.add_argument("command", nargs="?", default=None, help=argparse.SUPPRESS)
    parser.add_argument("words", nargs="*", help=argparse.SUPPRESS)
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
        parser = _parser()
        ns = parser.parse_intermixed_args(argv)
        topic = _help_topic(ns)
        if topic is not None:
            print(_help(parser, *topic), end="")
            return 0
        if ns.object is None:
            raise QvdError("an object is missing (qvdctl --help lists them)")
        level = {0: logging.WARNING, 1: logging.INFO}.get(ns.verbose, logging.DEBUG)
        logging.basicConfig(
            level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
            if ns.object == "hkd" else "%(levelname)s %(name)s: %(message)s"
        )
        if ns.object == "hkd":
            return _hkd(ns)
        if ns.object == "web":
            return _web(ns)
        commands = commands_of(ns.object)
        if ns.command is None:
            raise QvdError(
                f"{ns.object}: a command is missing (qvdctl {ns.object} --help lists them)"
            )
        command = _command(ns.object, ns.command, commands)
        if ns.dry_run and (ns.object, ns.command) not in DRY_RUN:
            raise QvdError(f"{ns.object} {ns.command} has no --dry-run")
        _run(command, ns, rest)
    except QvdError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    return 0


def run() -> NoReturn:
    """The ``qvdctl`` program: ``main``, then leave without the interpreter's teardown.

    By the time ``main`` returns, the node and its database engine are closed; what is
    left is output to flush. Tearing down SQLAlchemy's objects and every module would
    only cost time, so once stdout and stderr are flushed the process exits at once.
    What the interpreter's exit would wait for is still waited for: worker threads of
    a ``vm start`` interrupted by Ctrl+C each finish their VM (``vm/parallel.py``).
    """
    try:
        status = main()
    except SystemExit as exc:  # e.g. `vm start` of several VMs, one of which failed
        if exc.code is None or isinstance(exc.code, int):
            status = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            status = 1
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # the reader went away (`| head`), or it was closed
            status = status or 1
    os._exit(status)


def _command(obj: str, name: str, commands: dict[str, Command]) -> Command:
    command = commands.get(name)
    if command is None:
        raise QvdError(f"unknown command '{name}' for {obj} (commands: {', '.join(commands)})")
    return command


def _run(command: Command, ns: argparse.Namespace, rest: list[str]) -> None:
    # The command's module has imported these already.
    from qvdctl.commands.base import Request, parse_filters
    from qvdctl.node import Node
    from qvdctl.output import Output

    from qvdctl import audit

    filters = parse_filters(ns.filter)
    node = Node(ns.root, config=ns.config, db_url=ns.db)
    result = "failed"
    try:
        out = Output(quiet=ns.quiet, as_json=ns.json)
        command(Request(ns.object, ns.command, node, out, filters, ns.words, rest,
                        no_wait=ns.no_wait, dry_run=ns.dry_run))
        result = audit.OK
    except QvdError as exc:
        result = str(exc)
        raise
    finally:
        if ns.command not in audit.NOT_CHANGES and not ns.dry_run:
            audit.record_cli(node.db, f"{ns.object} {ns.command}",
                             ",".join(f"{k}={v}" for k, v in filters), ns.words, result)
        node.close()


def _help_topic(ns: argparse.Namespace) -> tuple[str | None, str | None] | None:
    """What help was asked for, as (object, command), either None; None: no help.

    ``--help`` anywhere, or the word ``help`` as the object or command:
    ``qvdctl help``, ``qvdctl vm help``, ``qvdctl vm help start``, ``qvdctl help vm``.
    """
    words = [w for w in (ns.object, ns.command, *ns.words) if w is not None]
    if not ns.help and "help" not in words[:2]:
        return None
    topic = [w for w in words if w != "help"][:2] + [None, None]
    return topic[0], topic[1]


def _help(parser: argparse.ArgumentParser, obj: str | None, name: str | None) -> str:
    """The help text of qvdctl, of object ``obj``, or of its command ``name``.

    Raises:
        QvdError: no such object or command.
    """
    if obj is None:
        return parser.format_help()
    if obj == "hkd":
        return f"usage: qvdctl [options] hkd\n\n{_doc(_hkd)}\n"
    if obj == "web":
        return f"usage: {USAGE.splitlines()[-1].strip()}\n\n{_doc(_web)}\n"
    commands = commands_of(obj)
    if name is not None:
        return _doc(_command(obj, name, commands)) + "\n\nqvdctl --help shows the options.\n"
    lines = [_summary(obj, n, commands[n]) for n in sorted(commands)]
    return (f"usage: qvdctl [options] {obj} <command> [-f K=V[,K=V]]... [key=value ...]\n\n"
            f"{obj} commands (qvdctl {obj} COMMAND --help shows one):\n"
            + "".join(f"  {line}\n" for line in lines))


def _doc(function: Callable[..., object]) -> str:
    """A command's docstring, dedented, without reST's double backquotes."""
    import textwrap  # here: only help needs it

    first, _, body = (function.__doc__ or "").strip().partition("\n")
    return (first + "\n" + textwrap.dedent(body)).strip().replace("``", "")


def _summary(obj: str, name: str, function: Command) -> str:
    """A command's line in its object's help: its docstring's first paragraph, on one line."""
    summary = " ".join(_doc(function).split("\n\n")[0].split()).removesuffix(".")
    if summary.startswith(f"{obj} {name}"):
        return summary
    return f"{obj} {name}: {summary}" if summary else f"{obj} {name}"


def _hkd(ns: argparse.Namespace) -> int:
    """``hkd``: the node's house-keeping daemon, in the foreground, logging to stderr.

    It registers this node in the fleet's database, reconciles what runs here with it,
    then renews its lease and runs the vm start and stop commands queued for this host.
    SIGTERM: it finishes what runs, stops this node's VMs and exits 0.
    """
    from qvdctl.fleet import hkd  # here: only the daemon needs it
    from qvdctl.node import Node

    if ns.command is not None or ns.words or ns.filter:
        raise QvdError("hkd takes no command, filter or arguments")
    if ns.verbose == 0:
        logging.getLogger().setLevel(logging.INFO)  # a daemon's log is its record
    node = Node(ns.root, config=ns.config, db_url=ns.db)
    try:
        return hkd.main(node)
    finally:
        node.close()


def _web(ns: argparse.Namespace) -> int:
    """``web``: the web admin on this node's database, in the foreground, until SIGTERM.

    --listen ADDR:PORT says where (default 127.0.0.1:8080; port 0: any free one), unless
    a socket is handed over by systemd's socket activation (LISTEN_FDS, fd 3);
    --cert FILE --key FILE serve HTTPS. Log in with an account of `qvdctl admin add`.
    """
    from qvdctl.node import Node
    from qvdctl.web import server  # here: only the web admin loads Starlette and uvicorn

    if ns.command is not None or ns.words or ns.filter:
        raise QvdError("web takes no command, filter or arguments")
    node = Node(ns.root, config=ns.config, db_url=ns.db)
    try:
        return server.serve(node, ns.listen, ns.cert, ns.key)
    finally:
        node.close()


if __name__ == "__main__":
    run()
