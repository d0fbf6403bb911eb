"""A minimal NBD client over an already-connected socket: the fixed-newstyle handshake,
``NBD_OPT_GO`` for the default export (""), reads with simple replies, and a clean
disconnect. Enough to read what ``Volume.ExportChanges`` serves; written from the protocol
description (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md)."""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator

NBDMAGIC, IHAVEOPT = 0x4E42444D41474943, 0x49484156454F5054
OPTION_REPLY_MAGIC, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC = 0x3E889045565A9, 0x25609513, 0x67446698
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2  # handshake flags, and the client's echo of them
OPT_GO, REP_ACK, REP_INFO, REP_FLAG_ERROR, INFO_EXPORT = 7, 1, 3, 1 << 31, 0
CMD_READ, CMD_DISC = 0, 2
MAX_READ = 32 << 20  # the largest payload every server must accept


class NBDError(Exception):
    """The server refused, answered out of protocol, or went away."""


class NBDClient:
    """An export opened on ``sock`` (a connected stream socket; the client owns it)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.cookie = 0
        try:
            self.size = self._handshake()
        except BaseException:
            sock.close()
            raise

    @classmethod
    def from_fd(cls, fd: int) -> NBDClient:
        """Takes ownership of ``fd``: closed with the client."""
        return cls(socket.socket(fileno=fd))

    def _recv(self, length: int) -> bytes:
        data = bytearray(length)
        view, got = memoryview(data), 0
        while got < length:
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise NBDError(f"the NBD server closed the connection ({got} of {length} "
                               "bytes received)")
            got += n
        return bytes(data)

    def _handshake(self) -> int:
        magic, opt_magic, flags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise NBDError("not an NBD server speaking the newstyle handshake")
        if not flags & FLAG_FIXED_NEWSTYLE:
            raise NBDError("the NBD server does not speak the fixed newstyle handshake")
        self.sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)))
        name = b""  # the default export; no information asked beyond the size it always sends
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        size = None
        while True:
            magic, option, kind, length = struct.unpack(">QIII", self._recv(20))
            payload = self._recv(length)
            if magic != OPTION_REPLY_MAGIC or option != OPT_GO:
                raise NBDError("unexpected answer to NBD_OPT_GO")
            if kind & REP_FLAG_ERROR:
                text = payload.decode(errors="replace")
                raise NBDError(f"the NBD server refused the export (error {kind & ~REP_FLAG_ERROR}"
                               f"{': ' + text if text else ''})")
            if kind == REP_INFO and len(payload) >= 12 and payload[:2] == b"\0\0":
                (size,) = struct.unpack(">Q", payload[2:10])  # NBD_INFO_EXPORT
            elif kind == REP_ACK:
                if size is None:
                    raise NBDError("the NBD server did not say the export's size")
                return int(size)

    def _request(self, command: int, offset: int, length: int) -> int:
        self.cookie += 1
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, command, self.cookie,
                                      offset, length))
        return self.cookie

    def pread(self, length: int, offset: int) -> bytes:
        """``length`` bytes at ``offset``."""
        return b"".join(data for _, data in self.reads(offset, length))

    def reads(self, offset: int, length: int) -> Iterator[tuple[int, bytes]]:
        """``(start, bytes)`` of the range, read in requests of at most 32 MiB."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise NBDError(f"read of {length} bytes at {offset} beyond the export's "
                           f"{self.size} bytes")
        for start in range(offset, offset + length, MAX_READ):
            part = min(MAX_READ, offset + length - start)
            cookie = self._request(CMD_READ, start, part)
            magic, error, handle = struct.unpack(">IIQ", self._recv(16))
            if magic != SIMPLE_REPLY_MAGIC or handle != cookie:
                raise NBDError("unexpected reply to NBD_CMD_READ")
            if error:
                raise NBDError(f"the NBD server failed a read of {part} bytes at {start} "
                               f"(error {error})")
            yield start, self._recv(part)

    def close(self) -> None:
        """Say goodbye (``NBD_CMD_DISC``, which has no reply) and close the socket."""
        with contextlib.suppress(OSError):  # a server gone already: closing is all left
            self._request(CMD_DISC, 0, 0)
            self.sock.shutdown(socket.SHUT_WR)
        self.sock.close()

    def __enter__(self) -> NBDClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
