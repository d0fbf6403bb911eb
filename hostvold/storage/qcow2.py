"""Backing-chain validation (SPEC section 13), before qemu-img opens anything.

The chain is walked by reading each qcow2 header in-process (a few hundred bytes per
layer, no process spawned), so a crafted backing reference is refused before any tool
follows it. Every backing file must be a plain name in the volume's own directory, one
of the volume's own image files, with its format recorded; qcow2 external data files and
unknown incompatible features are refused.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from hostvold.core.errors import (
    BackingFileOutsideVolume,
    ExternalDataFile,
    ForeignBackingFile,
    UnknownImageFeature,
    UnsafeFile,
    UnsafeImage,
)
from hostvold.core.images import Format, Layer, Qcow2Header, pair_commit_safe
from hostvold.core.layout import VolumeFiles
from hostvold.storage.safefile import open_regular, require_regular
from hostvold.storage.stamped import Stamp, StampedCache

QCOW2_MAGIC = b"QFI\xfb"
_EXT_END = 0
_EXT_BACKING_FORMAT = 0xE2792ACA
_EXT_DATA_FILE = 0x44415441
_INCOMPAT_DATA_FILE = 1 << 2
_INCOMPAT_KNOWN = 0x1F  # dirty, corrupt, external data file, compression type, extended L2
_MAX_HEADER = 1 << 16
_MAX_L1_ENTRIES = 1 << 22  # 32 MiB of L1 table: a 256 TiB image with 64 KiB clusters
QCOW2_KNOWN_SAFE = _INCOMPAT_KNOWN & ~_INCOMPAT_DATA_FILE


def read_qcow2_header(path: Path) -> Qcow2Header:
    """Parse the fixed header and extensions of a qcow2 file (UnsafeImage if malformed).

    The file is opened without following symbolic links and must be a regular file."""
    fd = open_regular(path)
    try:
        return read_qcow2_header_fd(fd, path.name)
    finally:
        os.close(fd)


def read_head(fd: int) -> bytes:
    """The first bytes of an image: the header, its extensions and the backing name."""
    head = os.pread(fd, 4096, 0)
    if len(head) == 4096 and not _complete(head):
        head += os.pread(fd, _MAX_HEADER - 4096, 4096)
    return head


def read_qcow2_header_fd(fd: int, name: str) -> Qcow2Header:
    """:func:`read_qcow2_header` of an open file (read with pread: the offset is kept)."""
    return parse_qcow2_header(read_head(fd), name)


def parse_qcow2_header(head: bytes, name: str) -> Qcow2Header:
    """Parse a qcow2 header from the first bytes of an image named ``name``."""
    path = Path(name)
    if head[:4] != QCOW2_MAGIC or len(head) < 72:
        raise UnsafeImage(f"{path.name} is not a qcow2 image")
    version, backing_offset, backing_size = struct.unpack_from(">IQI", head, 4)
    (cluster_bits,) = struct.unpack_from(">I", head, 20)
    (size,) = struct.unpack_from(">Q", head, 24)
    l1_size, l1_table_offset = struct.unpack_from(">IQ", head, 36)
    incompatible, header_length = 0, 72
    if version >= 3:
        if len(head) < 104:
            raise UnsafeImage(f"{path.name}: truncated qcow2 v3 header")
        (incompatible,) = struct.unpack_from(">Q", head, 72)
        (header_length,) = struct.unpack_from(">I", head, 100)
    elif version != 2:
        raise UnknownImageFeature(f"{path.name}: qcow2 version {version} is not supported")
    backing_file = None
    if backing_offset:
        if backing_size > 1023 or backing_offset + backing_size > len(head):
            raise UnsafeImage(f"{path.name}: backing file name out of bounds")
        backing_file = head[backing_offset:backing_offset + backing_size].decode(
            "utf-8", errors="surrogateescape")
    backing_format = data_file = None
    offset = header_length
    while offset + 8 <= len(head):
        ext_type, ext_len = struct.unpack_from(">II", head, offset)
        if ext_type == _EXT_END:
            break
        data = head[offset + 8:offset + 8 + ext_len]
        if ext_type == _EXT_BACKING_FORMAT:
            backing_format = data.decode("ascii", errors="replace")
        elif ext_type == _EXT_DATA_FILE:
            data_file = data.decode("utf-8", errors="replace")
        offset += 8 + ((ext_len + 7) & ~7)
    return Qcow2Header(version, size, backing_file, backing_format, incompatible, data_file,
                       l1_size, l1_table_offset, cluster_bits)


def _complete(head: bytes) -> bool:
    """Whether ``head`` holds the backing file name and the end of the extension list."""
    if len(head) < 104:
        return False
    backing_offset, backing_size = struct.unpack_from(">QI", head, 8)
    if backing_offset + backing_size > len(head):
        return False
    version = struct.unpack_from(">I", head, 4)[0]
    offset = struct.unpack_from(">I", head, 100)[0] if version >= 3 else 72
    while offset + 8 <= len(head):
        ext_type, ext_len = struct.unpack_from(">II", head, offset)
        if ext_type == _EXT_END:
            return True
        offset += 8 + ((ext_len + 7) & ~7)
    return False


def qcow2_is_empty(path: Path) -> bool:
    """True when a qcow2 image holds no data of its own (no L2 table allocated): removing it
    loses nothing. Used by repair to tell a stale empty overlay from one holding writes."""
    fd = open_regular(path)
    try:
        header = read_qcow2_header_fd(fd, path.name)
        if header.l1_size > _MAX_L1_ENTRIES:  # a crafted header: never read 32 GiB
            return False
        table = os.pread(fd, header.l1_size * 8, header.l1_table_offset)
    finally:
        os.close(fd)
    return len(table) == header.l1_size * 8 and not any(table)


def sniff_format(path: Path) -> str:
    """raw or qcow2 from the magic alone. Never decides a volume's format (SPEC section 13):
    only used to describe what a header claims, for an operator to confirm."""
    fd = open_regular(path)
    try:
        return "qcow2" if os.pread(fd, 4, 0) == QCOW2_MAGIC else "raw"
    finally:
        os.close(fd)


def check_backing_name(files: VolumeFiles, name: str) -> None:
    """Refuse a backing reference that is not one of the volume's own image files."""
    if ":" in name or name.startswith("/") or "/" in name or name in ("", ".", ".."):
        if name.startswith("/") and Path(name).parent == files.directory and "/../" not in name:
            name = Path(name).name  # an absolute path into the volume's own directory
        else:
            raise BackingFileOutsideVolume(
                f"backing file {name!r} of volume {files.base_name} is not a file in the "
                f"volume's own directory")
    if not files.is_image(name):
        raise ForeignBackingFile(
            f"backing file {name!r} is not one of the files of {files.base_name}")


# qcow2 headers by file identity: a walk of a deep chain parses only what changed
HEADERS: StampedCache[Qcow2Header] = StampedCache(65536)


def read_cached_header(path: Path | str) -> Qcow2Header:
    """The header of a chain layer, parsed again only when the file changed."""
    name = os.path.basename(path)
    return HEADERS.get(path, lambda: read_qcow2_header(Path(path)),
                       lambda fd: read_qcow2_header_fd(fd, name))


def pair_safe(top: Path, base: Path, base_format: str) -> bool:
    """:func:`pair_commit_safe` for two files of a chain (headers from the cache)."""
    top_header = read_cached_header(top)
    base_header = read_cached_header(base) if base_format == "qcow2" else None
    return pair_commit_safe(top_header, base.name, base_format, base_header)


def validate_chain(files: VolumeFiles, top: str, top_format: str) -> list[Layer]:
    """Walk the chain from ``top`` down and return its layers, top first.

    ``top_format`` is the format hostvold recorded for the active file, never probed.
    """
    if not files.is_image(top):
        raise ForeignBackingFile(f"{top!r} is not one of the files of {files.base_name}")
    layers: list[Layer] = []
    seen: set[str] = set()
    directory = str(files.directory)  # strings, not Paths: a deep chain walks this often
    name, fmt = top, top_format
    while True:
        if name in seen:
            raise UnsafeImage(f"the backing chain of {files.base_name} loops at {name}")
        seen.add(name)
        path = f"{directory}/{name}"
        layers.append(Layer(name, fmt))
        if fmt == "raw":
            require_regular(Path(path))  # no symbolic link, device or FIFO
            return layers
        if fmt != "qcow2":
            raise UnsafeImage(f"{name}: format {fmt!r} is not allowed (raw or qcow2 only)")
        below = _checked_link(files, path, name)
        if below is None:
            return layers
        name, fmt = below


# the chain below each volume's active file as a whole walk (or this process's own write of
# the info file) found it, by the stamp of the info file it holds for (key: its path)
_WALKED: dict[str, tuple[Stamp, list[Layer]]] = {}
_WALKED_LIMIT = 16384


def remember_chain(files: VolumeFiles, info_stamp: Stamp, chain: list[Layer]) -> None:
    """``chain`` (validated, top first) is the chain of the info file with ``info_stamp``."""
    if len(_WALKED) >= _WALKED_LIMIT:
        _WALKED.clear()
    _WALKED[str(files.info)] = (info_stamp, chain)


def chain_from_top(files: VolumeFiles, info_stamp: Stamp, top: str,
                   top_format: str) -> list[Layer] | None:
    """The chain, opening only its top, or None when a whole walk is needed.

    Every change hostvold makes below the active file, on any host, rewrites the info file
    (and runs under an in-flight record that stops other operations); a revert replaces the
    top alone. So while the info file is the very file a walk was made for, only the top
    can differ, and it is opened (fresh) and its link checked again. Used where nothing
    opens the layers below (a snapshot create, SPEC section 5); every other operation walks
    the whole chain."""
    known = _WALKED.get(str(files.info))
    if known is None or known[0] != info_stamp or known[1][0] != Layer(top, top_format):
        return None
    chain = known[1]
    if top_format == "raw":
        require_regular(Path(f"{files.directory}/{top}"))
        return chain if len(chain) == 1 else None
    below = _checked_link(files, f"{files.directory}/{top}", top)
    expected = (chain[1].name, chain[1].format) if len(chain) > 1 else None
    return chain if below == expected else None


# each layer's link to the one below, checked for the volume named in the key: a walk of a
# deep chain repeats no check for a file that has not changed since it was checked
LINKS: StampedCache[tuple[str, Format] | None] = StampedCache(65536)


def _checked_link(files: VolumeFiles, path: str, name: str) -> tuple[str, Format] | None:
    """The (name, format) of the layer below the qcow2 file ``path``, every check of its
    header passed (None: it has no backing file)."""
    return LINKS.get(path, lambda: _link_of(files, read_qcow2_header(Path(path)), name),
                     lambda fd: _link_of(files, read_qcow2_header_fd(fd, name), name),
                     key=f"{files.base_name}:{path}")


def _link_of(files: VolumeFiles, header: Qcow2Header, name: str) -> tuple[str, Format] | None:
    if header.data_file is not None or header.incompatible_features & _INCOMPAT_DATA_FILE:
        raise ExternalDataFile(f"{name} uses an external data file {header.data_file!r}; refused")
    unknown = header.incompatible_features & ~_INCOMPAT_KNOWN
    if unknown:
        raise UnknownImageFeature(f"{name} has unknown incompatible features {unknown:#x}")
    if header.backing_file is None:
        return None
    check_backing_name(files, header.backing_file)
    if header.backing_format not in ("raw", "qcow2"):
        raise UnsafeImage(
            f"{name}: backing format {header.backing_format!r} is not recorded as raw or "
            f"qcow2; hostvold never lets qemu-img probe it")
    below: Format = "raw" if header.backing_format == "raw" else "qcow2"
    return header.backing_file.rsplit("/", 1)[-1], below


def standalone_qcow2(head: bytes, what: str) -> Qcow2Header:
    return standalone_qcow2_header(parse_qcow2_header(head, what), what)


def standalone_qcow2_header(header: Qcow2Header, what: str) -> Qcow2Header:
    """Refuse a qcow2 image that could make qemu-img open anything but itself."""
    if header.backing_file is not None:
        raise UnsafeImage(f"{what} has a backing file {header.backing_file!r}; import a "
                          "standalone image")
    if header.data_file is not None or header.incompatible_features & 4:
        raise ExternalDataFile(f"{what} uses an external data file "
                               f"{header.data_file!r}; refused")
    if header.incompatible_features & ~QCOW2_KNOWN_SAFE:
        raise UnsafeImage(f"{what} uses unknown qcow2 features; refused")
    return header


def header_claim(path: Path) -> str | None:
    """What the first bytes of a file claim to be, if they look like a qcow2 header."""
    try:
        header = read_qcow2_header(path)
    except UnsafeFile:
        return None
    except (UnsafeImage, OSError):
        try:
            fd = open_regular(path)
        except (UnsafeImage, OSError):
            return None
        try:
            magic = os.pread(fd, 4, 0)
        finally:
            os.close(fd)
        return "a qcow2 magic with a malformed header" if magic == QCOW2_MAGIC else None
    backing = f", backing file {header.backing_file!r}" if header.backing_file else ""
    data = f", external data file {header.data_file!r}" if header.data_file else ""
    return f"a qcow2 v{header.version} header, virtual size {header.size} bytes{backing}{data}"
