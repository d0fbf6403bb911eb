"""``hostvolctl export-changes`` and ``restore-changes`` (SPEC section 5b): the blocks that
changed between two points in time of a volume, as a sparse file plus its extent map, and
their application onto a full copy. With ``export VOL FILE --format raw`` for the first full
copy, a backup chain a user can script.

The increment ``OUTPUT`` is a raw file of the volume's size holding the bytes of the changed
extents (everything else is a hole); ``OUTPUT.json`` is the map, in ovirt-imageio's shape::

    {"volume": ID, "from": SNAPSHOT or "" (everything), "to": SNAPSHOT or "" (then),
     "fallback": bool, "size": BYTES, "context": "qemu:dirty-bitmap:...",
     "extents": [{"start": ..., "length": ..., "dirty": bool, "zero": bool}, ...]}

A dirty extent with ``zero`` reads as zeros at ``to``; restore punches a hole there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import errno
import json
import os
import stat
import sys
import time
from collections.abc import Callable
from typing import Any

from hostvold.client.commands import options_of
from hostvold.client.connection import PREFIX, Client, CliError, object_id, os_error, resolve
from hostvold.client.nbd import NBDClient, NBDError
from hostvold.client.output import draw_progress, emit, plain
from hostvold.core.units import human_size

COPY_CHUNK = 8 << 20
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
Extents = list[dict[str, Any]]


def check_extents(extents: Extents, size: int, where: str) -> None:
    """The extents cover the volume once, in order, from 0 to ``size``."""
    offset = 0
    for extent in extents:
        if (set(extent) != {"start", "length", "dirty", "zero"}
                or not all(isinstance(extent[k], int) and not isinstance(extent[k], bool)
                           for k in ("start", "length"))
                or not all(isinstance(extent[k], bool) for k in ("dirty", "zero"))):
            raise CliError(f"{where}: an extent is not {{start, length, dirty, zero}}: "
                           f"{extent!r}")
        if extent["start"] != offset or extent["length"] <= 0:
            raise CliError(f"{where}: the extents do not cover the volume in order (at "
                           f"{offset}: {extent!r})")
        offset += extent["length"]
    if offset != size:
        raise CliError(f"{where}: the extents cover {offset} bytes, not the volume's {size}")


# ---- export-changes --------------------------------------------------------------------

def create_new(path: str) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                       | os.O_CLOEXEC, 0o666)
    except FileExistsError:
        raise CliError(f"AlreadyExists: {path} already exists; export-changes never "
                       "overwrites a file") from None
    except OSError as exc:
        raise os_error("create", path, exc) from None


def write_increment(nbd_fd: int, out_fd: int, extents: Extents, size: int,
                    progress: Callable[[int], None]) -> int:
    """Read the dirty extents that hold data from the NBD export (closed at the end: the
    daemon's job ends with it) into ``out_fd``, sparse; the bytes written."""
    written = 0
    with NBDClient.from_fd(nbd_fd) as nbd:
        if nbd.size != size:
            raise CliError(f"the NBD export is {nbd.size} bytes, the volume {size}")
        os.ftruncate(out_fd, size)
        for extent in extents:
            if not extent["dirty"] or extent["zero"]:
                continue  # unchanged, or zeros: a hole
            for start, data in nbd.reads(extent["start"], extent["length"]):
                os.pwrite(out_fd, data, start)
                written += len(data)
                progress(written)
    os.fsync(out_fd)
    return written


def write_json(fd: int, document: dict[str, Any]) -> None:
    with os.fdopen(fd, "w", closefd=False) as out:
        json.dump(document, out, indent=1)
        out.write("\n")
        out.flush()
        os.fsync(fd)


async def cmd_export_changes(client: Client, args: argparse.Namespace) -> None:
    """Ask for the export, read it over NBD into OUTPUT, write OUTPUT.json, close the
    connection and wait for the daemon's export job to end."""
    path = resolve("volumes", args.volume)
    output, map_path = args.output, f"{args.output}.json"
    options = options_of(**{"full-if-needed": True if args.full_if_needed else None})
    out_fd = create_new(output)
    try:
        map_fd = create_new(map_path)
    except CliError:
        os.close(out_fd)
        os.unlink(output)
        raise
    done = False
    try:
        waiter = await client.job_waiter()
        body, fds = await client.call_with_fds(
            path, f"{PREFIX}Volume", "ExportChanges", "ssa{sv}",
            [args.since or "", args.to or "", options])
        index, runs, info = body[0], body[1], plain(body[2])
        if not 0 <= index < len(fds):
            for fd in fds:
                os.close(fd)
            raise CliError("the daemon's answer came without its NBD connection")
        for fd in fds[:index] + fds[index + 1:]:
            os.close(fd)
        size = int(info["size"])
        extents = [{"start": int(start), "length": int(length), "dirty": bool(dirty),
                    "zero": bool(zero)} for start, length, dirty, zero in runs]
        try:
            check_extents(extents, size, "the daemon's extent map")
        except CliError:
            os.close(fds[index])
            raise
        changed = sum(e["length"] for e in extents if e["dirty"])
        to_copy = sum(e["length"] for e in extents if e["dirty"] and not e["zero"])
        started = time.monotonic()

        def progress(written: int) -> None:
            if sys.stderr.isatty() and not args.json:
                elapsed = max(time.monotonic() - started, 1e-6)
                draw_progress(written / max(to_copy, 1), written / elapsed)

        try:
            written = await asyncio.to_thread(write_increment, fds[index], out_fd, extents,
                                              size, progress)
        except NBDError as exc:
            raise CliError(f"reading the export failed: {exc}") from None
        except OSError as exc:
            raise os_error("write", output, exc) from None
        if sys.stderr.isatty() and not args.json and to_copy:
            sys.stderr.write("\n")
        job = await waiter.wait(str(info["job"]))  # the connection is closed: the job ends
        document = {"volume": object_id(path), "from": info["from"], "to": args.to or "",
                    "fallback": bool(info["fallback"]), "size": size,
                    "context": info["context"], "extents": extents}
        write_json(map_fd, document)
        done = True
    finally:
        os.close(out_fd)
        os.close(map_fd)
        if not done:
            for name in (output, map_path):
                with contextlib.suppress(OSError):
                    os.unlink(name)
    since = document["from"] or "the start (a full copy)"
    fell_back = (f" (snapshot {args.since} is gone: fell back to "
                 f"{document['from'] or 'a full copy'})" if document["fallback"] else "")
    emit(args, {**document, "changed": changed, "written": written, "output": output,
                "map": map_path, "job": job["job"]}, lambda: (
        f"{output}: {human_size(changed)} changed from {since} to "
        f"{args.to or 'now'}{fell_back}; {human_size(written)} of data, "
        f"{sum(1 for e in extents if e['dirty'])} changed extents in {map_path}"))


# ---- restore-changes -------------------------------------------------------------------

def read_map(path: str) -> dict[str, Any]:
    try:
        with open(path) as source:
            document = json.load(source)
    except OSError as exc:
        raise os_error("read", path, exc) from None
    except ValueError as exc:
        raise CliError(f"{path} is not an extent map (JSON): {exc}") from None
    if (not isinstance(document, dict) or not isinstance(document.get("size"), int)
            or not isinstance(document.get("extents"), list)):
        raise CliError(f"{path} is not an extent map: it needs a size and extents")
    check_extents(document["extents"], document["size"], path)
    return document


def open_file(path: str, flags: int) -> tuple[int, int]:
    """A regular file or block device, opened; its size."""
    try:
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise os_error("open", path, exc) from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise CliError(f"{path} is neither a regular file nor a block device")
    return fd, os.lseek(fd, 0, os.SEEK_END)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, start: int, length: int) -> bool:
    """Make the range read as zeros by deallocating it; False when the file system cannot
    (the caller writes zeros instead)."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start, length) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
        return False
    raise OSError(code, os.strerror(code))


def apply(base: int, increment: int, extents: Extents) -> tuple[int, int]:
    """Copy every dirty extent of ``increment`` onto ``base`` (zero ones made zeros);
    the bytes copied and zeroed."""
    copied = zeroed = 0
    zeros = bytes(COPY_CHUNK)
    for extent in extents:
        if not extent["dirty"]:
            continue
        start, end = extent["start"], extent["start"] + extent["length"]
        if extent["zero"]:
            zeroed += extent["length"]
            if punch_hole(base, start, extent["length"]):
                continue
        for offset in range(start, end, COPY_CHUNK):
            length = min(COPY_CHUNK, end - offset)
            data = zeros[:length] if extent["zero"] else os.pread(increment, length, offset)
            if len(data) != length:
                raise CliError(f"the increment ends at {offset + len(data)}, inside an "
                               "extent it should hold")
            os.pwrite(base, data, offset)
            copied += 0 if extent["zero"] else length
    os.fsync(base)
    return copied, zeroed


def cmd_restore_changes(args: argparse.Namespace) -> None:
    """Offline: only the two files and the map are read; the daemon is not asked."""
    document = read_map(f"{args.increment}.json")
    size = document["size"]
    increment, increment_size = open_file(args.increment, os.O_RDONLY)
    try:
        if increment_size != size:
            raise CliError(f"{args.increment} is {increment_size} bytes, its map says {size}")
        base, base_size = open_file(args.base, os.O_RDWR)
        try:
            if base_size != size:
                raise CliError(f"{args.base} is {base_size} bytes, the increment {size}: "
                               "not a full copy of this volume")
            try:
                copied, zeroed = apply(base, increment, document["extents"])
            except OSError as exc:
                raise os_error("write", args.base, exc) from None
        finally:
            os.close(base)
    finally:
        os.close(increment)
    result = {"base": args.base, "increment": args.increment, "volume": document.get("volume"),
              "from": document.get("from"), "to": document.get("to"), "size": size,
              "copied": copied, "zeroed": zeroed}
    emit(args, result, lambda: (
        f"{args.base}: {human_size(copied)} copied, {human_size(zeroed)} zeroed; it holds "
        f"volume {document.get('volume')} at {document.get('to') or 'the time of the export'}"))
