"""hostvolctl: the command-line client. It talks to hostvold over D-Bus only.

The parser, and :func:`main`, the one error boundary: every failure raised as a
:class:`~hostvold.client.connection.CliError` becomes a sentence on stderr and an exit code
(see :data:`~hostvold.client.connection.EXIT_CODES`).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

from hostvold import __version__
from hostvold.client.wire import (
    EXIT_BROKEN_PIPE,
    EXIT_CODES,
    EXIT_CONFIG,
    CliError,
    WireClient,
    drive,
    wire_only,
)
from hostvold.core.units import parse_size

if TYPE_CHECKING:  # argparse loads only where the parser is built
    import argparse
    from collections.abc import Callable
    from pathlib import Path

with wire_only():  # dbus_fast's wire format alone: its bus layers load when a command needs them
    from hostvold.client import commands

# the commands that only read: one connection, a call or two, no event loop (see wire.py)
READING = (commands.cmd_status, commands.cmd_shares, commands.cmd_volumes, commands.cmd_show,
           commands.cmd_connection_info, commands.cmd_snapshots, commands.cmd_jobs,
           commands.cmd_group_list, commands.cmd_group_show)
# `hostvolctl __complete KIND...`: the ids the bash completion offers, one a line; KIND is
# the command that lists them (as the completion names it) or the kind of object
COMPLETE = {"volumes": "volumes", "snapshots": "snapshots", "jobs": "jobs",
            "group list": "groups", "groups": "groups"}


def lazy(module: str, name: str) -> Callable[..., Any]:
    """A command function of a module imported only when that command runs."""
    def command(*args: Any) -> Any:
        import importlib
        return getattr(importlib.import_module(module), name)(*args)
    command.__name__ = command.__qualname__ = name
    command.__doc__ = f"{module}.{name}, imported when it runs"
    return command


def size_arg(text: str) -> int:
    import argparse

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="hostvolctl", description="hostvold client",
                                     epilog=EXIT_CODES)
    parser.add_argument("--version", action="version", version=f"hostvolctl {__version__}")
    parser.add_argument("--bus", default=os.environ.get("HOSTVOLD_BUS", "system"),
                        help="system (default) or a D-Bus address; env HOSTVOLD_BUS")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--no-wait", action="store_true",
                        help="print the job path instead of waiting for the job")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[..., Any], help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text)
        command.set_defaults(func=func)
        return command

    add("status", commands.cmd_status, "daemon status and health")
    add("shares", commands.cmd_shares, "shares and their capacity")
    add("volumes", commands.cmd_volumes, "list volumes")
    add("show", commands.cmd_show, "one volume's properties").add_argument("volume")
    add("connection-info", commands.cmd_connection_info,
        "how another tool opens the volume: export, mount point, path, format"
        ).add_argument("volume")
    add("snapshots", commands.cmd_snapshots, "list snapshots").add_argument("volume", nargs="?")
    add("jobs", commands.cmd_jobs, "list jobs")
    job = add("job", commands.cmd_job, "one job's properties")
    job.add_argument("job")
    job.add_argument("--cancel", action="store_true")
    create = add("create", commands.cmd_create, "create a volume")
    create.add_argument("size", type=size_arg, help="size with unit: 10G, 512M")
    create.add_argument("--format", choices=["raw", "qcow2"])
    create.add_argument("--thick", action="store_true")
    create.add_argument("--thin", action="store_true")
    create.add_argument("--id")
    create.add_argument("--share")
    imp = add("import", commands.cmd_import, "create a volume from an image file")
    imp.add_argument("path")
    imp.add_argument("--source-format", choices=["raw", "qcow2"])
    imp.add_argument("--format", choices=["raw", "qcow2"])
    imp.add_argument("--size", type=size_arg)
    imp.add_argument("--id")
    imp.add_argument("--share")
    add("delete", commands.cmd_delete, "delete a volume and all its files").add_argument("volume")
    extend = add("extend", commands.cmd_extend, "grow a volume")
    extend.add_argument("volume")
    extend.add_argument("size", type=size_arg)
    export = add("export", commands.cmd_export, "write a volume to a standalone image file")
    export.add_argument("volume")
    export.add_argument("destination")
    export.add_argument("--format", choices=["raw", "qcow2"], default="raw")
    changes = add("export-changes", lazy("hostvold.client.changes", "cmd_export_changes"),
                  "write the blocks changed between two points in time to a sparse raw file "
                  "OUTPUT, and their extent map to OUTPUT.json (an incremental backup)")
    changes.description = (
        "The daemon serves the 'to' point in time read-only over NBD on a connection it "
        "hands to hostvolctl, which reads the changed extents into OUTPUT (a raw file of the "
        "volume's size; everything else is a hole) and writes OUTPUT.json: {volume, from, to, "
        "fallback, size, context, extents: [{start, length, dirty, zero}]}, where 'from' is "
        "the snapshot actually counted from (\"\" for a full copy). The volume stays locked "
        "until the copy is done. Restore with restore-changes onto a full copy at 'from' "
        "(the first one from `export VOL FILE --format raw`, or export-changes without "
        "--from restored onto an empty file of the volume's size). It always waits: the copy is "
        "hostvolctl's own work (--no-wait does not apply).")
    changes.add_argument("volume", metavar="VOL")
    changes.add_argument("output", metavar="OUTPUT",
                         help="the new file (never overwritten); its map goes to OUTPUT.json")
    changes.add_argument("--from", dest="since", metavar="SNAPSHOT",
                         help="count the changes from this snapshot (default: everything, "
                              "a full copy); a deleted one falls back to the nearest older "
                              "snapshot and says so")
    changes.add_argument("--to", metavar="SNAPSHOT",
                         help="the point in time exported (default: now)")
    changes.add_argument("--full-if-needed", action="store_true",
                         help="a full copy when --from is gone and no older snapshot is left")
    restore = add("restore-changes", lazy("hostvold.client.changes", "cmd_restore_changes"),
                  "apply an increment of export-changes (INCREMENT and INCREMENT.json) onto "
                  "BASE, a raw full copy of the volume at the increment's --from point in "
                  "time (offline: the daemon is not asked)")
    restore.description = (
        "Copies every dirty extent of INCREMENT onto BASE at the same offset (an extent "
        "that reads as zeros is punched as a hole, or written as zeros where the file "
        "system cannot), then syncs BASE. Refused when BASE's size is not the volume's. "
        "BASE must hold the volume at the increment's 'from': applying it elsewhere gives "
        "a file that is neither point in time.")
    restore.add_argument("base", metavar="BASE",
                         help="a raw file of the volume's size, changed in place")
    restore.add_argument("increment", metavar="INCREMENT",
                         help="a file export-changes wrote, with its map INCREMENT.json")
    restore.set_defaults(offline=True)
    clone = add("clone", commands.cmd_clone, "a new volume with a volume's current content")
    clone.add_argument("volume")
    for command in (clone,):
        command.add_argument("--id")
        command.add_argument("--size", type=size_arg)
        command.add_argument("--format", choices=["raw", "qcow2"])
        command.add_argument("--share")
    revert = add("revert", commands.cmd_revert, "go back to the newest snapshot")
    revert.add_argument("volume")
    revert.add_argument("snapshot")
    repair = add("repair", commands.cmd_repair, "rebuild a damaged chain map; confirm a format; "
                 "settle an undecided pivot")
    repair.add_argument("volume")
    repair.add_argument("--choose", choices=("base", "overlay"),
                        help="which file holds the newest data after an undecided pivot "
                             "(repair without it shows where they differ)")
    repair.add_argument("--format", choices=["raw", "qcow2"],
                        help="confirm the base file's format (a volume adopted without "
                             "trusted metadata is raw until confirmed; `show` prints what "
                             "its header says)")
    attach = add("attach", commands.cmd_attach, "hot-plug a volume into a running domain")
    attach.add_argument("volume")
    attach.add_argument("domain")
    attach.add_argument("--target", help="disk target, e.g. sdb (default: the next free)")
    add("detach", commands.cmd_detach, "unplug a volume from its domain").add_argument("volume")
    snapshot = add("snapshot", commands.cmd_snapshot, "snapshot create|delete|create-volume")
    snapshot.add_argument("action", choices=["create", "delete", "create-volume"])
    snapshot.add_argument("target", help="the volume (create) or the snapshot")
    snapshot.add_argument("--id")
    snapshot.add_argument("--size", type=size_arg)
    snapshot.add_argument("--format", choices=["raw", "qcow2"])
    snapshot.add_argument("--share")
    group_parser = sub.add_parser("group", help="group snapshots: one point in time across "
                                  "volumes (create|list|show|delete|revert|create-volumes)")
    group = group_parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def add_group(name: str, func: Callable[..., Any],
                  help_text: str) -> argparse.ArgumentParser:
        command = group.add_parser(name, help=help_text)
        command.set_defaults(func=func)
        return command

    group_create = add_group("create", commands.cmd_group_create,
                             "one point in time across the volumes named and the volumes "
                             "attached to the domains named")
    group_create.add_argument("volumes", nargs="*", metavar="VOL", help="a volume id")
    group_create.add_argument("--domain", action="append", dest="domains", metavar="DOM",
                              help="every hostvold volume attached to this domain (repeat "
                                   "for several domains)")
    group_create.add_argument("--consistency", choices=["crash", "quiesced", "suspend"],
                              help="crash (default): atomic per domain; quiesced: every "
                                   "guest must freeze; suspend: the domains are paused "
                                   "together for the switch")
    group_create.add_argument("--quiesce", choices=["try", "require", "never"],
                              help="freezing the guests (default: the daemon's [libvirt] "
                                   "quiesce)")
    add_group("list", commands.cmd_group_list, "list group snapshots")
    add_group("show", commands.cmd_group_show, "one group's properties").add_argument("group")
    add_group("delete", commands.cmd_group_delete,
              "delete a group and its members' snapshots").add_argument("group")
    add_group("revert", commands.cmd_group_revert,
              "take every member (all detached) back to the group's point in time, all or "
              "none").add_argument("group")
    group_volumes = add_group("create-volumes", commands.cmd_group_create_volumes,
                              "a new volume with each member's content at the group's point "
                              "in time")
    group_volumes.add_argument("group")
    group_volumes.add_argument("--share")
    add("monitor", lazy("hostvold.client.monitor", "cmd_monitor"),
        "print what changes as it happens (until Ctrl-C)")
    check = sub.add_parser("check-config", help="validate a configuration file (offline)")
    check.add_argument("path", type=Path, nargs="?", default=None)
    return parser


async def run(args: argparse.Namespace) -> None:
    from hostvold.client.connection import Client

    client = await Client.connect(args.bus)
    try:
        await args.func(client, args)
    finally:
        client.bus.disconnect()


def quick_parse(words: list[str]) -> Any:
    """The plainest reading commands (``[--json] [--bus B] status|volumes|show VOL|...``)
    parsed without building the parser (its dozens of subparsers, and the modules argparse
    loads for help and messages, cost more than the call); None for anything else, which
    the parser then reads, as it reads everything with an error or --help in it."""
    values = {"json": False, "no_wait": False, "bus": os.environ.get("HOSTVOLD_BUS", "system")}
    index = 0
    while index < len(words) and words[index].startswith("-"):
        word = words[index]
        if word in ("--json", "--no-wait"):
            values[word[2:].replace("-", "_")] = True
        elif word.startswith("--bus=") and len(word) > 6:
            values["bus"] = word[6:]
        elif word == "--bus" and index + 1 < len(words) and words[index + 1][:1] not in "-":
            index += 1
            values["bus"] = words[index]
        else:
            return None
        index += 1
    command, rest = words[index:index + 1], words[index + 1:]
    if any(word[:1] in ("-", "") for word in rest) or not command:
        return None
    arity = {"status": (0, 0), "shares": (0, 0), "volumes": (0, 0), "jobs": (0, 0),
             "show": (1, 1), "connection-info": (1, 1), "snapshots": (0, 1)}
    low, high = arity.get(command[0], (-1, -1))
    if not low <= len(rest) <= high:
        return None
    func = getattr(commands, f"cmd_{command[0].replace('-', '_')}")
    from types import SimpleNamespace  # as argparse.Namespace, read by attribute only

    return SimpleNamespace(**values, command=command[0], func=func,
                              **({"volume": rest[0] if rest else None}
                                 if high else {}))


def run_reading(args: argparse.Namespace) -> None:
    """A reading command on a blocking connection (no event loop, no bus layers)."""
    with wire_only():
        client = WireClient(args.bus)
        try:
            drive(args.func(client, args))
        finally:
            client.close()


def complete(words: list[str]) -> int:
    """``__complete KIND``: the ids of that kind of object, one a line, nothing else (the
    bash completion waits for it at every Tab). Quiet: a failure is an exit status only."""
    kind = COMPLETE.get(" ".join(words))
    if kind is None:
        return 2
    try:
        with wire_only():
            client = WireClient(os.environ.get("HOSTVOLD_BUS", "system"))
            try:
                ids = client.child_ids(kind)
            finally:
                client.close()
    except CliError as exc:
        return exc.code
    sys.stdout.write("".join(f"{each}\n" for each in ids))
    return 0


def check_config(path: Path | None) -> int:
    from hostvold.core.config import load_config
    from hostvold.core.errors import ConfigError

    try:
        load_config(path)
    except ConfigError as exc:
        print(f"hostvolctl: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{path or 'the default configuration'}: valid")
    return 0


def dispatch(argv: list[str] | None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if words[:1] == ["__complete"]:
        return complete(words[1:])
    args = quick_parse(words) or build_parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args.path)
    try:  # the one error boundary: every failure becomes a sentence and an exit code
        if getattr(args, "offline", False):  # works on files only, without the daemon
            args.func(args)
        elif args.func in READING:
            run_reading(args)
        else:
            import asyncio
            asyncio.run(run(args))
    except CliError as exc:
        print(f"hostvolctl: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        code = dispatch(argv)
        sys.stdout.flush()  # here, where a reader that went away can still be told apart
    except BrokenPipeError:
        # the reader closed the pipe (`| head`): stop quietly, as other programs do. What
        # is still buffered goes nowhere, so the flush at exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    return code


if __name__ == "__main__":
    sys.exit(main())
