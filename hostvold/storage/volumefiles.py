"""Whole-volume file chores on a share: measuring it, removing a volume's files.

Each is one blocking call, run in the share's own pool (:mod:`.shareio`)."""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

from hostvold.core import crash
from hostvold.core.layout import Naming, VolumeFiles
from hostvold.storage.atomic import unlink_durable
from hostvold.storage.safefile import require_regular


def own_file(path: Path, mode: int) -> int:
    """Give the new image its mode; its apparent size (for the share's tally)."""
    st = require_regular(path)  # chmod follows links: never someone else's
    os.chmod(path, mode)
    return st.st_size


def allocated_bytes(path: Path) -> int:
    """Bytes the file really holds on disk (a sparse image holds less than its size)."""
    return os.lstat(path).st_blocks * 512


def allocated_in(directory: Path, names: set[str]) -> dict[str, int]:
    return {name: allocated_bytes(directory / name) for name in names}


def measure_directory(directory: Path, naming: Naming) -> tuple[int, int, int]:
    """(total, free, allocated) bytes: the filesystem as unprivileged users see it, and
    the apparent size of the volume images in ``directory`` (one readdir)."""
    st = os.statvfs(directory)
    allocated = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if naming.volume_id_of_image(entry.name) is not None:
                allocated += entry.stat(follow_symlinks=False).st_size
    return st.f_frsize * st.f_blocks, st.f_frsize * st.f_bavail, allocated


def remove_volume_files(files: VolumeFiles) -> int:
    """Remove every file of the volume, the metadata file last, and nothing else; the
    apparent bytes of the images removed (for the share's tally). Its record says
    ``deleting`` all along: a delete cut short, even with the base file gone, is finished
    by whoever reads that record next (:meth:`VolumeStore.refresh` keeps it)."""
    freed = 0
    for path in files.existing():
        if path != files.meta:
            if files.is_image(path.name):
                freed += os.lstat(path).st_size
            unlink_durable(path)
            if path == files.base:
                crash.point("delete:base-removed")
    unlink_durable(files.meta)
    return freed


# struct flock on Linux x86-64/arm64: l_type, l_whence, l_start, l_len, l_pid
_FLOCK = "=hh4xqqi4x"
# QEMU's image locks are byte-range (OFD) locks from byte 100 on: one per permission
_QEMU_LOCK_BYTES = (100, 200)


def locked_images(files: VolumeFiles) -> list[str]:
    """The volume's images some process holds QEMU's write lock on (a qemu-img or QEMU
    still at work; on a share without locks, such as NFS mounted ``nolock``, none show)."""
    locked = []
    for path in files.existing():
        if not files.is_image(path.name):
            continue
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, *_QEMU_LOCK_BYTES, 0)
            answer = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, probe))
            if answer[0] != fcntl.F_UNLCK:
                locked.append(path.name)
        finally:
            os.close(fd)
    return locked


def remove_temp_files(files: VolumeFiles) -> None:
    """Leftovers of interrupted atomic writes: never the only copy of anything."""
    for path in files.existing():
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            unlink_durable(path)
