"""Parsed small files, reused while the file on disk is the same one and unchanged.

A volume's state files and its chain's headers are read again at every step (the share is
the truth), and at chain depth 256 parsing them costs more than reading them. An entry is
used only while the file's device, inode, size, mtime and ctime are those seen before it was
read: any write changes the ctime, which no one can set back, and a file put in its place has
another inode or ctime. The stamp comes from ``fstat`` of a fresh ``open``: on NFS an open
revalidates the attributes with the server (close-to-open), a bare ``stat`` may not.
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
_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_stamped(path: Path | str) -> tuple[int, Stamp] | None:
    """An open descriptor of the regular file ``path`` and its stamp, or None when it is
    anything else (a symbolic link, a device, a FIFO: the caller's checks name it)."""
    try:
        fd = os.open(path, _FLAGS)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: a symbolic link
            return None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return fd, stamp_of(st)


def stamp_of(st: os.stat_result) -> Stamp:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class StampedCache(Generic[T]):
    def __init__(self, limit: int = 16384, min_size: int = 0) -> None:
        self.limit = limit
        self.min_size = min_size  # smaller files are parsed every time: cheap, and no memory
        self._entries: dict[str, tuple[Stamp, T]] = {}
        self._lock = threading.Lock()

    def get(self, path: Path | str, parse: Callable[[], T],
            parse_fd: Callable[[int], T] | None = None, key: str | None = None) -> T:
        """``parse()``'s result for ``path``, parsed again only when the file changed
        (``parse_fd`` reads the descriptor already open, when given; ``key`` when the
        result depends on more than the file). Anything but a regular file is never
        cached: ``parse`` names the problem."""
        return self.get_stamped(path, parse, parse_fd, key)[0]

    def get_stamped(self, path: Path | str, parse: Callable[[], T],
                    parse_fd: Callable[[int], T] | None = None,
                    key: str | None = None) -> tuple[T, Stamp | None]:
        """:meth:`get`, and the stamp of the file read (None: not a regular file)."""
        opened = open_stamped(path)
        if opened is None:
            return parse(), None
        fd, stamp = opened
        if stamp[2] < self.min_size:
            try:
                return (parse_fd(fd) if parse_fd is not None else parse()), stamp
            finally:
                os.close(fd)
        key = str(path) if key is None else key
        try:
            with self._lock:
                hit = self._entries.get(key)
            if hit is not None and hit[0] == stamp:
                return hit[1], stamp
            value = parse_fd(fd) if parse_fd is not None else parse()
        finally:
            os.close(fd)
        self._keep(key, stamp, value)
        return value, stamp

    def remember(self, path: Path | str, stamp: Stamp, value: T) -> None:
        """``value`` is what ``path`` holds while its stamp is ``stamp``: for a file this
        process just wrote (atomically), so that its next read parses nothing."""
        if stamp[2] >= self.min_size:
            self._keep(str(path), stamp, value)

    def _keep(self, key: str, stamp: Stamp, value: T) -> None:
        with self._lock:  # a change after the stamp was taken shows as a new stamp
            if len(self._entries) >= self.limit:
                self._entries.clear()
            self._entries[key] = (stamp, value)
