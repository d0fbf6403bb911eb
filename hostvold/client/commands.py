"""hostvolctl's commands: one ``cmd_<command>`` per command, each given the connected
:class:`~hostvold.client.connection.Client` and the parsed arguments. Failures are raised as
:class:`~hostvold.client.connection.CliError`; the caller prints them."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dbus_fast.signature import Variant  # not the package: it imports the whole bus

from hostvold.client.output import emit, fields, plain, table
from hostvold.client.wire import (
    EXIT_DENIED,
    PREFIX,
    ROOT_PATH,
    CliError,
    object_id,
    os_error,
    resolve,
)
from hostvold.core.units import human_size

if TYPE_CHECKING:  # the reading commands also run on a WireClient (see hostvold.client.wire)
    import argparse

    from hostvold.client.connection import Client

# the operations whose job ends with the volume they made or changed as its last object
MAKES_VOLUME = ("create-volume", "import-volume", "clone", "create-volume-from-snapshot",
                "attach", "detach")


def options_of(**values: Any) -> dict[str, Variant]:
    signatures = {int: "t", str: "s", bool: "b"}
    return {key: Variant(signatures[type(value)], value)
            for key, value in values.items() if value is not None}


def of_kind(objects: dict[str, dict[str, dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    return [{"path": path, **ifaces[f"{PREFIX}{kind}"]} for path, ifaces in sorted(
        objects.items()) if f"{PREFIX}{kind}" in ifaces]


# ---- reading ---------------------------------------------------------------------------

async def cmd_status(client: Client, args: argparse.Namespace) -> None:
    (status,) = await client.call(ROOT_PATH, f"{PREFIX}Manager", "Status")
    data = plain(status)
    emit(args, data, fields(data, 13))


async def cmd_shares(client: Client, args: argparse.Namespace) -> None:
    shares = of_kind(await client.objects(), "Share")
    emit(args, shares, lambda: table(
        [[s["Address"], "yes" if s["Mounted"] else "NO", s.get("StoragePath", ""),
          human_size(s["Total"]), human_size(s["Free"]), human_size(s["Allocated"]),
          human_size(s["Provisioned"])]
         for s in shares],
        ["SHARE", "MOUNTED", "PATH", "TOTAL", "FREE", "ALLOCATED", "PROVISIONED"]))


async def cmd_volumes(client: Client, args: argparse.Namespace) -> None:
    """The table from ListVolumes (one small row a volume); ``--json`` gives every
    property, from GetManagedObjects."""
    if args.json:
        emit(args, of_kind(await client.objects(), "Volume"), str)
        return
    try:
        (rows,) = await client.call(ROOT_PATH, f"{PREFIX}Manager", "ListVolumes", "a{sv}",
                                    [{}])
    except CliError as exc:  # a daemon from before ListVolumes, or a bus policy that
        if exc.code != EXIT_DENIED and "UnknownMethod" not in str(exc):  # lists methods
            raise
        rows = [(v["path"], v["Id"], v["Size"], v["Format"], v["State"], len(v["Snapshots"]),
                 v["Problems"]) for v in of_kind(await client.objects(), "Volume")]
    print(table([[volume_id, human_size(size), fmt, state, str(snapshots), "; ".join(problems)]
                 for _path, volume_id, size, fmt, state, snapshots, problems in rows],
                ["VOLUME", "SIZE", "FORMAT", "STATE", "SNAPSHOTS", "PROBLEMS"]))


async def cmd_show(client: Client, args: argparse.Namespace) -> None:
    path = resolve("volumes", args.volume)
    props = {"path": path, **await client.properties(path, f"{PREFIX}Volume")}
    emit(args, props, fields(props, 13))


async def cmd_connection_info(client: Client, args: argparse.Namespace) -> None:
    """Where the volume's active file is and how to open it (Cinder's NFS shape)."""
    path = resolve("volumes", args.volume)
    info = (await client.properties(path, f"{PREFIX}Volume"))["ConnectionInfo"]
    emit(args, info, fields(info, 18))


async def cmd_snapshots(client: Client, args: argparse.Namespace) -> None:
    objects = await client.objects()
    snaps = of_kind(objects, "Snapshot")
    if args.volume:
        wanted = resolve("volumes", args.volume)
        if wanted not in objects:
            raise CliError(f"NotFound: volume {object_id(wanted)} does not exist")
        snaps = [s for s in snaps if s["Volume"] == wanted]
    emit(args, snaps, lambda: table(
        [[s["Id"], object_id(s["Volume"]), s["Created"], "yes" if s["Quiesced"] else "no"]
         for s in snaps],
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
    emit(args, props, fields(props, 28))


# ---- changing: each change is a job ----------------------------------------------------

async def start_job(client: Client, args: argparse.Namespace, path: str, interface: str,
                    member: str, options: dict[str, Variant],
                    leading: tuple[str, list[Any]] = ("", [])) -> dict[str, Any] | None:
    """Run a job-returning method and wait for it: the ended job's properties. With
    --no-wait, print the job's path instead, and None."""
    if args.no_wait:
        (job,) = await client.call(path, f"{PREFIX}{interface}", member,
                                   f"{leading[0]}a{{sv}}", [*leading[1], options])
        emit(args, {"job": str(job)}, lambda: str(job))
        return None
    show = sys.stderr.isatty() and not args.json
    return await client.run_job(path, member, options, interface, show, leading)


async def job_command(client: Client, args: argparse.Namespace, path: str, interface: str,
                      member: str, options: dict[str, Variant]) -> None:
    """Run a job-returning method; wait for it unless --no-wait; print what it made."""
    result = await start_job(client, args, path, interface, member, options)
    if result is None:
        return
    made = [p for p in result["Objects"] if p.startswith(f"{ROOT_PATH}/volumes/")
            and result["Operation"] in MAKES_VOLUME]
    if made:
        volume = await client.properties(made[-1], f"{PREFIX}Volume")
        emit(args, {"path": made[-1], **volume, "job": result["job"]},
             lambda: f"{volume['Id']}  {human_size(volume['Size'])} {volume['Format']}")
    else:
        emit(args, result, lambda: f"{result['Operation']}: {result['State']}")


async def volume_job(client: Client, args: argparse.Namespace, member: str,
                     options: dict[str, Variant]) -> None:
    """A job-returning method of the volume ``args.volume``."""
    await job_command(client, args, resolve("volumes", args.volume), "Volume", member, options)


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
        raise os_error("open", path, exc) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CliError(f"{path} is not a regular file")
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
    await volume_job(client, args, "Delete", {})


async def cmd_extend(client: Client, args: argparse.Namespace) -> None:
    await volume_job(client, args, "Extend", options_of(size=args.size))


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
        raise os_error("create", dest, exc) from None
    done = False
    try:
        await volume_job(client, args, "Export",
                         {"fd": Variant("h", fd), **options_of(format=args.format)})
        done = True
    finally:
        os.close(fd)
        if not done and not args.no_wait:
            with contextlib.suppress(OSError):
                os.unlink(dest)


async def cmd_clone(client: Client, args: argparse.Namespace) -> None:
    await volume_job(client, args, "Clone", options_of(
        id=args.id, size=args.size, format=args.format, share=args.share))


async def cmd_revert(client: Client, args: argparse.Namespace) -> None:
    await volume_job(client, args, "Revert", options_of(snapshot=args.snapshot))


async def cmd_attach(client: Client, args: argparse.Namespace) -> None:
    await volume_job(client, args, "Attach", options_of(domain=args.domain, target=args.target))


async def cmd_detach(client: Client, args: argparse.Namespace) -> None:
    await volume_job(client, args, "Detach", {})


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


# ---- group snapshots (SPEC section 5a) -------------------------------------------------

GROUP = f"{PREFIX}GroupSnapshot"


def group_text(group: dict[str, Any]) -> Callable[[], str]:
    """A group for a person: its members and snapshots by id, its problems in one line."""
    return fields({**group, "Volumes": " ".join(object_id(p) for p in group["Volumes"]),
                   "Snapshots": " ".join(object_id(p) for p in group["Snapshots"]),
                   "Problems": "; ".join(group["Problems"])}, 11)


async def show_group(client: Client, args: argparse.Namespace, path: str,
                     job: str | None = None) -> None:
    group = {"path": path, **await client.properties(path, GROUP),
             **({"job": job} if job is not None else {})}
    emit(args, group, group_text(group))


async def cmd_group_create(client: Client, args: argparse.Namespace) -> None:
    volumes = [resolve("volumes", volume) for volume in args.volumes]
    options = options_of(consistency=args.consistency, quiesce=args.quiesce)
    if args.domains:
        options["domains"] = Variant("as", list(args.domains))
    result = await start_job(client, args, ROOT_PATH, "Manager", "CreateGroupSnapshot",
                             options, ("ao", [volumes]))
    if result is None:
        return
    made = [p for p in result["Objects"] if p.startswith(f"{ROOT_PATH}/groups/")]
    if not made:
        raise CliError(f"job {object_id(result['job'])} completed without naming its group")
    await show_group(client, args, made[-1], result["job"])


async def cmd_group_list(client: Client, args: argparse.Namespace) -> None:
    groups = of_kind(await client.objects(), "GroupSnapshot")
    emit(args, groups, lambda: table(
        [[g["Id"], g["Created"], g["Consistency"], "yes" if g["Quiesced"] else "no",
          str(len(g["Volumes"])), "; ".join(g["Problems"])] for g in groups],
        ["GROUP", "CREATED", "CONSISTENCY", "QUIESCED", "MEMBERS", "PROBLEMS"]))


async def cmd_group_show(client: Client, args: argparse.Namespace) -> None:
    await show_group(client, args, resolve("groups", args.group))


async def cmd_group_delete(client: Client, args: argparse.Namespace) -> None:
    await job_command(client, args, resolve("groups", args.group), "GroupSnapshot", "Delete",
                      {})


async def cmd_group_revert(client: Client, args: argparse.Namespace) -> None:
    await job_command(client, args, resolve("groups", args.group), "GroupSnapshot", "Revert",
                      {})


async def cmd_group_create_volumes(client: Client, args: argparse.Namespace) -> None:
    """One new volume per member; the job's objects are the group, then the new volumes."""
    result = await start_job(client, args, resolve("groups", args.group), "GroupSnapshot",
                             "CreateVolumes", options_of(share=args.share))
    if result is None:
        return
    volumes = [{"path": path, **await client.properties(path, f"{PREFIX}Volume"),
                "job": result["job"]}
               for path in result["Objects"] if path.startswith(f"{ROOT_PATH}/volumes/")]
    emit(args, volumes, lambda: "\n".join(
        f"{v['Id']}  {human_size(v['Size'])} {v['Format']}" for v in volumes))
