"""Small file operations the volume code needs, done in-process (no helper processes)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hostvold.core.errors import Failed, NoSpace
from hostvold.core.images import Format, Layer
from hostvold.core.overlay import overlay_layout
from hostvold.storage import qemuimg
from hostvold.storage.atomic import fsync_dir
from hostvold.storage.safefile import open_regular

# a share's pool: ShareIO.run
ShareRun = Callable[..., Awaitable[Any]]

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, offset: int, length: int) -> None:
    """Allocate real blocks with fallocate(2) mode 0.

    Unlike ``posix_fallocate``, this never falls back to writing zeros: a filesystem that
    cannot allocate says so, and we report it instead of spending minutes writing.
    """
    if _libc.fallocate(fd, 0, offset, length) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(f"not enough free space to allocate {length} bytes")
        if err == errno.EOPNOTSUPP:
            raise Failed("the share's filesystem cannot preallocate (fallocate is not "
                         "supported); create a sparse volume instead")
        raise OSError(err, os.strerror(err))


def create_raw(path: Path, size: int, thick: bool, mode: int) -> None:
    """A new raw image: sparse (a hole of ``size`` bytes) or thick (every block allocated)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        if thick:
            fallocate(fd, 0, size)
        else:
            os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def grow_raw(path: Path, size: int, thick: bool) -> None:
    """Grow a raw image to ``size``; idempotent, so recovery can simply run it again."""
    fd = open_regular(path, os.O_WRONLY)
    try:
        current = os.fstat(fd).st_size
        if thick and size > current:
            fallocate(fd, current, size - current)
        elif size > current:
            os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = open_regular(path)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_enospc(exc: BaseException) -> bool:
    text = str(getattr(exc, "stderr", "")) + str(exc)
    return (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        "No space left on device" in text


def copy_fd_to_new_file(fd: int, path: Path, mode: int) -> None:
    """Copy the whole content of open file ``fd`` into a new file ``path`` (in-kernel where
    the filesystems allow it), never moving ``fd``'s offset."""
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                  mode)
    try:
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                done = os.copy_file_range(fd, out, size - offset, offset, offset)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                chunk = os.pread(fd, min(size - offset, 1 << 20), offset)
                done = os.pwrite(out, chunk, offset) if chunk else 0
            if done == 0:
                break
            offset += done
        os.fsync(out)
    finally:
        os.close(out)


FICLONE = 0x40049409  # _IOW(0x94, 9, int): share every extent of one file with another
NO_CLONE = {errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS}


def reflink(src: Path, dst: Path, mode: int) -> bool:
    """Make ``dst`` a new file sharing all of ``src``'s extents (one FICLONE ioctl: no data
    moves, no space used until either file is written); the caller makes it durable.
    False, with ``dst`` not left behind, where the filesystem cannot (ext4, or two
    filesystems)."""
    source = open_regular(src)
    try:
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                      | os.O_CLOEXEC, mode)
        try:
            fcntl.ioctl(out, FICLONE, source)
        except OSError as exc:
            os.close(out)
            out = -1
            dst.unlink(missing_ok=True)
            if exc.errno in NO_CLONE:
                return False
            raise
        finally:
            if out >= 0:
                os.close(out)
    finally:
        os.close(source)
    return True


def file_mtime(path: Path) -> str:
    """A file's modification time as an ISO 8601 UTC string (for adopted records)."""
    return datetime.fromtimestamp(path.lstat().st_mtime, UTC).isoformat(timespec="seconds")


async def make_overlay(run: ShareRun, path: Path, size: int, backing: Layer, mode: int,
                       then: Callable[[], object] | None = None) -> None:
    """An empty qcow2 overlay on ``backing``: relative name, format given, the chain
    below not opened, mode set, data durable. Written in-process (the layout qemu-img
    makes, see :mod:`hostvold.core.overlay`); qemu-img for what that does not cover.
    ``run`` is the share's pool (:meth:`ShareIO.run`); ``then``, the write that links the
    overlay in, goes to the share in the same trip, once the overlay is durable."""
    backing_fmt: Format = "raw" if backing.format == "raw" else "qcow2"
    try:
        pieces = overlay_layout(size, backing.name, backing_fmt)
    except ValueError:
        await qemuimg.create(path, "qcow2", size, backing=backing.name,
                             backing_fmt=backing_fmt)
        await run(_then, lambda: _own_durably(path, mode), then)
        return
    await run(_then, lambda: write_pieces(path, pieces, mode), then)


def _own_durably(path: Path, mode: int) -> None:
    os.chmod(path, mode)
    fsync_file(path)


def _then(first: Callable[[], None], then: Callable[[], object] | None) -> None:
    first()
    if then is not None:
        then()


def write_pieces(path: Path, pieces: list[tuple[int, bytes]], mode: int) -> None:
    """A new file (never an existing one, never through a link) holding ``pieces`` at
    their offsets, durable before it returns; removed again if writing fails."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        for offset, data in pieces:
            if os.pwrite(fd, data, offset) != len(data):
                raise OSError(errno.EIO, f"short write to {path.name}")
        os.fchmod(fd, mode)  # the umask must not decide the mode
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
