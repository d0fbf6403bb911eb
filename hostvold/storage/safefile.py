"""Opening files that are not trusted to be what their names say.

A volume's files live on shared storage that other hosts, and guests' administrators with
access to the share, can change. Every open of such a file goes through here: the name must
be a plain regular file, never followed through a symbolic link (``O_NOFOLLOW``), never a
device, FIFO, socket or directory (opening a FIFO blocks, opening a device can have side
effects, so the type is checked with ``lstat`` before the open and with ``fstat`` after).

File descriptors handed over by callers (D-Bus option ``fd``) are checked here too.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from hostvold.core.errors import AlreadyExists, InvalidArgument, NotFound, UnsafeFile

_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
MAX_STATE_FILE = 1 << 20  # a metadata or info file is a few hundred bytes


def kind(mode: int) -> str:
    """What a file of this mode is, in words."""
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO (pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def require_regular(path: Path) -> os.stat_result:
    """``lstat`` of ``path``; UnsafeFile unless it is a regular file (FileNotFoundError
    when it is absent)."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFile(f"{path.name} is {kind(st.st_mode)}, not a regular file; refused")
    return st


def open_regular(path: Path, flags: int = os.O_RDONLY) -> int:
    """Open a regular file without following a symbolic link; the caller closes the fd."""
    require_regular(path)
    try:
        fd = os.open(path, flags | _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile(f"{path.name} is a symbolic link; refused") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(f"{path.name} is {kind(st.st_mode)}, not a regular file; refused")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: Path, limit: int = MAX_STATE_FILE) -> bytes:
    """The content of a small regular file (UnsafeFile when larger than ``limit``)."""
    fd = open_regular(path)
    chunks: list[bytes] = []
    total = 0
    try:
        while total <= limit and (chunk := os.read(fd, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    content = b"".join(chunks)
    if len(content) > limit:
        raise UnsafeFile(f"{path.name} is larger than {limit} bytes; refused")
    return content


def check_caller_fd(fd: object, option: str, *, write: bool) -> os.stat_result:
    """Check a file descriptor a caller passed: an open regular file, opened by the caller
    for reading (``write=False``) or writing. The daemon reopens it through /dev/fd, with
    its own rights, so the access mode the caller got from the kernel is what limits it:
    an ``O_PATH`` descriptor or one opened for the other direction is refused."""
    if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
        raise InvalidArgument(f"option {option}: expected a file descriptor (D-Bus type 'h')")
    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        raise InvalidArgument(f"option {option}: the file descriptor is not open") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"option {option}: the file descriptor refers to "
                              f"{kind(st.st_mode)}; a regular file is needed (qemu-img needs "
                              "random access, so pipes and sockets are refused)")
    if flags & getattr(os, "O_PATH", 0o10000000):
        raise InvalidArgument(f"option {option}: an O_PATH descriptor grants no access; open "
                              "the file for " + ("writing" if write else "reading"))
    mode = flags & os.O_ACCMODE
    if write and mode not in (os.O_WRONLY, os.O_RDWR):
        raise InvalidArgument(f"option {option}: the file descriptor is not open for writing")
    if not write and mode not in (os.O_RDONLY, os.O_RDWR):
        raise InvalidArgument(f"option {option}: the file descriptor is not open for reading")
    return st


def open_source(path: Path) -> int:
    """Open an image path (root's ``source`` option): a regular file, no symbolic link, no
    device or FIFO (checked before the open: opening those can block or have effects)."""
    try:
        require_regular(path)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                     | os.O_NOCTTY)
    except FileNotFoundError:
        raise NotFound(f"image file {path} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile(f"image file {path} is a symbolic link; give the file itself") \
                from None
        raise InvalidArgument(f"image file {path} cannot be opened: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UnsafeFile(f"image file {path} is {kind(mode)}, not a regular file")
    return fd


def create_destination(dest: Path | None) -> int:
    """A new file at root's ``destination``: exclusive, never through a symbolic link."""
    assert dest is not None
    try:
        return os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                       | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise AlreadyExists(f"{dest} already exists; hostvold never overwrites a file") \
            from None
    except FileNotFoundError:
        raise NotFound(f"directory {dest.parent} does not exist") from None


def remove_destination(dest: Path | None, fd: int) -> None:
    """Remove the file a failed export created, if the name still points at it."""
    assert dest is not None
    st = os.fstat(fd)
    try:
        now = dest.lstat()
    except FileNotFoundError:
        return
    if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
        dest.unlink()
