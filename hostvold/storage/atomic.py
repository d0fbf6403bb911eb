"""Atomic, durable file writes: the only way hostvold writes a state file.

temp file in the same directory -> write -> fsync -> rename over the target -> fsync the
directory. A crash leaves either the old or the new content, never a mix; a leftover temp
file is named ``.<target>.<random>.tmp`` so its owner can be recognised and removed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from hostvold.core.layout import temp_name
from hostvold.storage.stamped import Stamp, stamp_of


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(target: Path, data: bytes, mode: int = 0o644,
                 before_rename: Callable[[], None] | None = None) -> Stamp:
    """Returns the stamp of the file written, taken from its own descriptor after the
    rename: what a later fresh open of ``target`` shows while the file is still ours.
    ``before_rename`` may refuse, by raising, at the last moment (a lapsed lease)."""
    tmp = temp_name(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fchmod(fd, mode)  # the umask must not decide the mode
            os.fsync(fd)
            if before_rename is not None:
                before_rename()
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        stamp = stamp_of(os.fstat(fd))
    finally:
        os.close(fd)
    fsync_dir(target.parent)
    return stamp


def unlink_durable(path: Path) -> bool:
    """Remove ``path`` if present and make the removal durable. Returns whether it existed."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True
