"""Parsed small files, reused while the file on disk is the same one and unchanged.

A volume's state files are read again at every step (the share is the truth), and at chain
depth 256 parsing them costs more than reading them. An entry is used only while the file's
device, inode, size, mtime and ctime are those seen before it was read: any write changes the
ctime, which no one can set back, and a file put in its place has another inode or ctime.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")
Stamp = tuple[int, int, int, int, int]


class StampedCache(Generic[T]):
    def __init__(self, limit: int = 16384) -> None:
        self.limit = limit
        self._entries: dict[str, tuple[Stamp, T]] = {}
        self._lock = threading.Lock()

    def get(self, path: Path, parse: Callable[[], T]) -> T:
        """``parse()``'s result for ``path``, parsed again only when the file changed.
        Anything but a regular file is never cached (``parse`` names the problem)."""
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return parse()
        key = str(path)
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with self._lock:
            hit = self._entries.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        value = parse()  # read after the stamp: a change in between shows as a new stamp
        with self._lock:
            if len(self._entries) >= self.limit:
                self._entries.clear()
            self._entries[key] = (stamp, value)
        return value
