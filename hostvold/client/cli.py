"""hostvolctl: the command-line client. It talks to hostvold over D-Bus only.

Exit codes: 0 success; 1 the operation failed (the message names the error); 2 usage
error; 3 hostvold is not running or the bus cannot be reached; 4 permission denied;
78 invalid configuration file (check-config).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from hostvold import __version__
from hostvold.core.config import load_config
from hostvold.core.errors import ConfigError
from hostvold.core.units import format_size, parse_size
from hostvold.server.bus import BUS_NAME, ROOT_PATH, object_path

EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_DENIED, EXIT_CONFIG = 1, 2, 3, 4, 78
PREFIX = "org.hostvold1."


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def plain(value: Any) -> Any:
    """D-Bus values (variants, structs) as JSON-ready Python values."""
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def _error(name: str, text: str, bus: str) -> CliError:
    if name in ("org.freedesktop.DBus.Error.ServiceUnknown",
                "org.freedesktop.DBus.Error.NameHasNoOwner"):
        return CliError(f"hostvold is not running (nobody owns {BUS_NAME} on the {bus} bus)",
                        EXIT_NOT_RUNNING)
    if name in ("org.freedesktop.DBus.Error.AccessDenied", f"{PREFIX}Error.NotAuthorized"):
        return CliError(f"permission denied: {text.split(';')[0]} (changing volumes needs root "
                        "or membership of the hostvold admin group)", EXIT_DENIED)
    if name in ("org.freedesktop.DBus.Error.UnknownObject",
                "org.freedesktop.DBus.Error.UnknownInterface"):
        return CliError(f"NotFound: {text}")
    short = name.removeprefix(f"{PREFIX}Error.")
    return CliError(f"{short}: {text}")


class Client:
    def __init__(self, bus: MessageBus, address: str) -> None:
        self.bus = bus
        self.address = address
        self.handlers: list[Callable[[Message], None]] = []
        bus.add_message_handler(self._dispatch)

    @classmethod
    async def connect(cls, address: str) -> Client:
        try:
            if address == "system":
                bus = MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
            else:
                bus = MessageBus(bus_address=address, bus_type=BusType.SYSTEM,
                                 negotiate_unix_fd=True)
            return cls(await bus.connect(), address)
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot reach the D-Bus {address} bus ({exc}); is hostvold "
                           "running?", EXIT_NOT_RUNNING) from None

    def _dispatch(self, message: Message) -> None:
        if message.message_type == MessageType.SIGNAL:
            for handler in self.handlers:
                handler(message)

    async def call(self, path: str, interface: str, member: str, signature: str = "",
                   body: list[Any] | None = None, destination: str = BUS_NAME) -> list[Any]:
        body, fds = with_fd_indexes(body or [])
        reply = await self.bus.call(Message(destination=destination, path=path,
                                            interface=interface, member=member,
                                            signature=signature, body=body or [],
                                            unix_fds=fds))
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            raise _error(reply.error_name or "", str(reply.body[0]) if reply.body else "",
                         self.address)
        return list(reply.body)

    async def objects(self) -> dict[str, dict[str, dict[str, Any]]]:
        (managed,) = await self.call(ROOT_PATH, "org.freedesktop.DBus.ObjectManager",
                                     "GetManagedObjects")
        return {str(path): {iface: plain(props) for iface, props in ifaces.items()}
                for path, ifaces in managed.items()}

    async def properties(self, path: str, interface: str) -> dict[str, Any]:
        (props,) = await self.call(path, "org.freedesktop.DBus.Properties", "GetAll", "s",
                                   [interface])
        return dict(plain(props))

    async def watch_jobs(self) -> None:
        """Subscribe to job signals, and to the daemon leaving the bus, before any call,
        so none can be missed."""
        for rule in (f"type='signal',sender='{BUS_NAME}',path_namespace='{ROOT_PATH}/jobs'",
                     "type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',"
                     f"arg0='{BUS_NAME}'"):
            await self.call("/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s",
                            [rule], destination="org.freedesktop.DBus")

    async def run_job(self, path: str, member: str, options: dict[str, Variant],
                      interface: str, show_progress: bool) -> dict[str, Any]:
        """Call a job-returning method and wait for the job's Completed signal."""
        await self.watch_jobs()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[bool, str, str]] = loop.create_future()
        job_path: list[str] = []
        early: dict[str, tuple[bool, str, str]] = {}

        def on_signal(message: Message) -> None:
            if (message.member == "NameOwnerChanged" and message.body[0] == BUS_NAME
                    and not message.body[2] and not done.done()):
                done.set_exception(CliError(
                    "hostvold stopped while the job ran; it finishes or undoes the operation "
                    "when it starts again", EXIT_NOT_RUNNING))
            elif message.member == "Completed":
                result = (bool(message.body[0]), str(message.body[1]), str(message.body[2]))
                if job_path and message.path == job_path[0]:
                    if not done.done():
                        done.set_result(result)
                else:
                    early[str(message.path)] = result
            elif (show_progress and message.member == "PropertiesChanged" and job_path
                  and message.path == job_path[0]):
                changed = plain(message.body[1])
                if "Progress" in changed:
                    draw_progress(float(changed["Progress"]), float(changed.get("Rate", 0)))

        self.handlers.append(on_signal)
        (job,) = await self.call(path, f"{PREFIX}{interface}", member, "a{sv}", [options])
        job_path.append(str(job))
        if str(job) in early:
            done.set_result(early[str(job)])
        else:
            props = await self.properties(str(job), f"{PREFIX}Job")
            if props["State"] != "running" and not done.done():
                error = props["Error"]
                done.set_result((props["State"] == "completed", error[0], error[1]))
        success, error_name, message = await done
        if show_progress:
            sys.stderr.write("\n")
        props = await self.properties(str(job), f"{PREFIX}Job")
        if not success:
            raise _error(error_name, message, self.address)
        return {"job": str(job), **props}


def with_fd_indexes(body: list[Any]) -> tuple[list[Any], list[int]]:
    """Options given as ``Variant("h", fd)`` travel in the message's descriptor list; the
    body carries their indexes there."""
    if not body or not isinstance(body[0], dict):
        return body, []
    fds: list[int] = []
    options = {}
    for key, value in body[0].items():
        if isinstance(value, Variant) and value.signature == "h":
            fds.append(value.value)
            value = Variant("h", len(fds) - 1)
        options[key] = value
    return [options, *body[1:]], fds


def draw_progress(fraction: float, rate: float) -> None:
    width = 30
    filled = int(width * fraction)
    speed = f" {format_size(int(rate))}/s" if rate >= 1 else ""
    sys.stderr.write(f"\r[{'#' * filled}{' ' * (width - filled)}] {fraction * 100:5.1f}%{speed}")
    sys.stderr.flush()


def resolve(kind: str, value: str) -> str:
    """A volume/snapshot/job given as an id or an object path, as an object path."""
    return value if value.startswith("/") else object_path(kind, value)


def options_of(**values: Any) -> dict[str, Variant]:
    signatures = {int: "t", str: "s", bool: "b"}
    return {key: Variant(signatures[type(value)], value)
            for key, value in values.items() if value is not None}


# ---- output ----------------------------------------------------------------------------

def emit(args: argparse.Namespace, data: Any, human: Callable[[], str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(human())


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines)


def of_kind(objects: dict[str, dict[str, dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    return [{"path": path, **ifaces[f"{PREFIX}{kind}"]} for path, ifaces in sorted(
        objects.items()) if f"{PREFIX}{kind}" in ifaces]


# ---- commands ---------------------------------------------------------------------------

async def cmd_status(client: Client, args: argparse.Namespace) -> None:
    (status,) = await client.call(ROOT_PATH, f"{PREFIX}Manager", "Status")
    data = plain(status)
    emit(args, data, lambda: "\n".join(f"{k:<13} {v}" for k, v in sorted(data.items())))


async def cmd_shares(client: Client, args: argparse.Namespace) -> None:
    shares = of_kind(await client.objects(), "Share")
    emit(args, shares, lambda: table(
        [[s["Address"], "yes" if s["Mounted"] else "NO", format_size(s["Total"]),
          format_size(s["Free"]), format_size(s["Allocated"]), format_size(s["Provisioned"])]
         for s in shares], ["SHARE", "MOUNTED", "TOTAL", "FREE", "ALLOCATED", "PROVISIONED"]))


async def cmd_volumes(client: Client, args: argparse.Namespace) -> None:
    volumes = of_kind(await client.objects(), "Volume")
    emit(args, volumes, lambda: table(
        [[v["Id"], format_size(v["Size"]), v["Format"], v["State"], str(len(v["Snapshots"])),
          "; ".join(v["Problems"])] for v in volumes],
        ["VOLUME", "SIZE", "FORMAT", "STATE", "SNAPSHOTS", "PROBLEMS"]))


async def cmd_show(client: Client, args: argparse.Namespace) -> None:
    path = resolve("volumes", args.volume)
    props = {"path": path, **await client.properties(path, f"{PREFIX}Volume")}
    emit(args, props, lambda: "\n".join(f"{k:<13} {v}" for k, v in sorted(props.items())))


async def cmd_snapshots(client: Client, args: argparse.Namespace) -> None:
    snaps = of_kind(await client.objects(), "Snapshot")
    if args.volume:
        wanted = resolve("volumes", args.volume)
        snaps = [s for s in snaps if s["Volume"] == wanted]
    emit(args, snaps, lambda: table(
        [[s["Id"], s["Volume"].rsplit("/", 1)[1].replace("_", "-"), s["Created"],
          "yes" if s["Quiesced"] else "no"] for s in snaps],
        ["SNAPSHOT", "VOLUME", "CREATED", "QUIESCED"]))


async def cmd_jobs(client: Client, args: argparse.Namespace) -> None:
    jobs = of_kind(await client.objects(), "Job")
    emit(args, jobs, lambda: table(
        [[j["Id"], j["Operation"], j["State"], f"{j['Progress'] * 100:.0f}%",
          j["Error"][1]] for j in jobs], ["JOB", "OPERATION", "STATE", "PROGRESS", "ERROR"]))


async def cmd_job(client: Client, args: argparse.Namespace) -> None:
    path = resolve("jobs", args.job)
    if args.cancel:
        await client.call(path, f"{PREFIX}Job", "Cancel")
    props = {"path": path, **await client.properties(path, f"{PREFIX}Job")}
    emit(args, props, lambda: "\n".join(f"{k:<28} {v}" for k, v in sorted(props.items())))


async def job_command(client: Client, args: argparse.Namespace, path: str, interface: str,
                      member: str, options: dict[str, Variant]) -> None:
    """Run a job-returning method; wait for it unless --no-wait; print what it made."""
    if args.no_wait:
        (job,) = await client.call(path, f"{PREFIX}{interface}", member, "a{sv}", [options])
        emit(args, {"job": str(job)}, lambda: str(job))
        return
    show = sys.stderr.isatty() and not args.json
    result = await client.run_job(path, member, options, interface, show)
    made = [p for p in result["Objects"] if p.startswith(f"{ROOT_PATH}/volumes/")
            and result["Operation"] in ("create-volume", "import-volume", "clone",
                                        "create-volume-from-snapshot", "attach", "detach")]
    if made:
        volume = await client.properties(made[-1], f"{PREFIX}Volume")
        emit(args, {"path": made[-1], **volume, "job": result["job"]},
             lambda: f"{volume['Id']}  {format_size(volume['Size'])} {volume['Format']}")
    else:
        emit(args, result, lambda: f"{result['Operation']}: {result['State']}")


async def cmd_create(client: Client, args: argparse.Namespace) -> None:
    provisioning = "thick" if args.thick else ("thin" if args.thin else None)
    await job_command(client, args, ROOT_PATH, "Manager", "CreateVolume", options_of(
        size=args.size, format=args.format, provisioning=provisioning, id=args.id,
        share=args.share))


def open_image(path: str) -> int:
    """The image to import, opened with the caller's own rights (the daemon never opens a
    path for a caller; it reads the descriptor)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        code = EXIT_DENIED if exc.errno in (errno.EACCES, errno.EPERM) else EXIT_FAILED
        raise CliError(f"cannot open {path}: {exc.strerror}", code) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CliError(f"{path} is not a regular file", EXIT_FAILED)
    return fd


async def cmd_import(client: Client, args: argparse.Namespace) -> None:
    fd = open_image(args.path)
    try:
        await job_command(client, args, ROOT_PATH, "Manager", "ImportVolume", {
            "fd": Variant("h", fd), **options_of(
                source_format=args.source_format, format=args.format, size=args.size,
                id=args.id, share=args.share)})
    finally:
        os.close(fd)


async def cmd_delete(client: Client, args: argparse.Namespace) -> None:
    await job_command(client, args, resolve("volumes", args.volume), "Volume", "Delete", {})


async def cmd_extend(client: Client, args: argparse.Namespace) -> None:
    await job_command(client, args, resolve("volumes", args.volume), "Volume", "Extend",
                      options_of(size=args.size))


async def cmd_export(client: Client, args: argparse.Namespace) -> None:
    """The client creates the new file itself (its owner, its umask) and passes it open; a
    failed export removes it again."""
    dest = args.destination
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o666)
    except FileExistsError:
        raise CliError(f"AlreadyExists: {dest} already exists; export never overwrites a "
                       "file") from None
    except OSError as exc:
        code = EXIT_DENIED if exc.errno in (errno.EACCES, errno.EPERM) else EXIT_FAILED
        raise CliError(f"cannot create {dest}: {exc.strerror}", code) from None
    done = False
    try:
        await job_command(client, args, resolve("volumes", args.volume), "Volume", "Export",
                          {"fd": Variant("h", fd), **options_of(format=args.format)})
        done = True
    finally:
        os.close(fd)
        if not done and not args.no_wait:
            with contextlib.suppress(OSError):
                os.unlink(dest)


async def cmd_clone(client: Client, args: argparse.Namespace) -> None:
    await job_command(client, args, resolve("volumes", args.volume), "Volume", "Clone",
                      options_of(id=args.id, size=args.size, format=args.format,
                                 share=args.share))


async def cmd_revert(client: Client, args: argparse.Namespace) -> None:
    await job_command(client, args, resolve("volumes", args.volume), "Volume", "Revert",
                      options_of(snapshot=args.snapshot))


async def cmd_attach(client: Client, args: argparse.Namespace) -> None:
    await job_command(client, args, resolve("volumes", args.volume), "Volume", "Attach",
                      options_of(domain=args.domain, target=args.target))


async def cmd_detach(client: Client, args: argparse.Namespace) -> None:
    await job_command(client, args, resolve("volumes", args.volume), "Volume", "Detach", {})


async def cmd_repair(client: Client, args: argparse.Namespace) -> None:
    (done,) = await client.call(resolve("volumes", args.volume), f"{PREFIX}Volume", "Repair",
                                "a{sv}", [options_of(format=args.format, choice=args.choose)])
    emit(args, list(done), lambda: "\n".join(done) or "nothing to repair")


async def cmd_snapshot(client: Client, args: argparse.Namespace) -> None:
    if args.action == "create":
        (path,) = await client.call(resolve("volumes", args.target), f"{PREFIX}Volume",
                                    "CreateSnapshot", "a{sv}", [options_of(id=args.id)])
        props = await client.properties(str(path), f"{PREFIX}Snapshot")
        emit(args, {"path": str(path), **props}, lambda: str(props["Id"]))
    elif args.action == "delete":
        await job_command(client, args, resolve("snapshots", args.target), "Snapshot",
                          "Delete", {})
    else:
        await job_command(client, args, resolve("snapshots", args.target), "Snapshot",
                          "CreateVolume", options_of(id=args.id, size=args.size,
                                                     format=args.format, share=args.share))


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hostvolctl", description="hostvold client",
                                     epilog=__doc__.split("\n\n")[1] if __doc__ else None)
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

    add("status", cmd_status, "daemon status and health")
    add("shares", cmd_shares, "shares and their capacity")
    add("volumes", cmd_volumes, "list volumes")
    add("show", cmd_show, "one volume's properties").add_argument("volume")
    add("snapshots", cmd_snapshots, "list snapshots").add_argument("volume", nargs="?")
    add("jobs", cmd_jobs, "list jobs")
    job = add("job", cmd_job, "one job's properties")
    job.add_argument("job")
    job.add_argument("--cancel", action="store_true")
    create = add("create", cmd_create, "create a volume")
    create.add_argument("size", type=size_arg, help="size with unit: 10G, 512M")
    create.add_argument("--format", choices=["raw", "qcow2"])
    create.add_argument("--thick", action="store_true")
    create.add_argument("--thin", action="store_true")
    create.add_argument("--id")
    create.add_argument("--share")
    imp = add("import", cmd_import, "create a volume from an image file")
    imp.add_argument("path")
    imp.add_argument("--source-format", choices=["raw", "qcow2"])
    imp.add_argument("--format", choices=["raw", "qcow2"])
    imp.add_argument("--size", type=size_arg)
    imp.add_argument("--id")
    imp.add_argument("--share")
    add("delete", cmd_delete, "delete a volume and all its files").add_argument("volume")
    extend = add("extend", cmd_extend, "grow a volume")
    extend.add_argument("volume")
    extend.add_argument("size", type=size_arg)
    export = add("export", cmd_export, "write a volume to a standalone image file")
    export.add_argument("volume")
    export.add_argument("destination")
    export.add_argument("--format", choices=["raw", "qcow2"], default="raw")
    clone = add("clone", cmd_clone, "a new volume with a volume's current content")
    clone.add_argument("volume")
    for command in (clone,):
        command.add_argument("--id")
        command.add_argument("--size", type=size_arg)
        command.add_argument("--format", choices=["raw", "qcow2"])
        command.add_argument("--share")
    revert = add("revert", cmd_revert, "go back to the newest snapshot")
    revert.add_argument("volume")
    revert.add_argument("snapshot")
    repair = add("repair", cmd_repair, "rebuild a damaged chain map; confirm a format; "
                 "settle an undecided pivot")
    repair.add_argument("volume")
    repair.add_argument("--choose", choices=("base", "overlay"),
                        help="which file holds the newest data after an undecided pivot "
                             "(repair without it shows where they differ)")
    repair.add_argument("--format", choices=["raw", "qcow2"],
                        help="confirm the base file's format (a volume adopted without "
                             "trusted metadata is raw until confirmed; `show` prints what "
                             "its header says)")
    attach = add("attach", cmd_attach, "hot-plug a volume into a running domain")
    attach.add_argument("volume")
    attach.add_argument("domain")
    attach.add_argument("--target", help="disk target, e.g. sdb (default: the next free)")
    add("detach", cmd_detach, "unplug a volume from its domain").add_argument("volume")
    snapshot = add("snapshot", cmd_snapshot, "snapshot create|delete|create-volume")
    snapshot.add_argument("action", choices=["create", "delete", "create-volume"])
    snapshot.add_argument("target", help="the volume (create) or the snapshot")
    snapshot.add_argument("--id")
    snapshot.add_argument("--size", type=size_arg)
    snapshot.add_argument("--format", choices=["raw", "qcow2"])
    snapshot.add_argument("--share")
    check = sub.add_parser("check-config", help="validate a configuration file (offline)")
    check.add_argument("path", type=Path, nargs="?", default=None)
    return parser


async def run(args: argparse.Namespace) -> None:
    client = await Client.connect(args.bus)
    try:
        await args.func(client, args)
    finally:
        client.bus.disconnect()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        try:
            load_config(args.path)
        except ConfigError as exc:
            print(f"hostvolctl: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        print(f"{args.path or 'the default configuration'}: valid")
        return 0
    try:  # the one error boundary: every failure becomes a sentence and an exit code
        asyncio.run(run(args))
    except CliError as exc:
        print(f"hostvolctl: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
