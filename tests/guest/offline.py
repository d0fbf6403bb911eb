"""What a volume's filesystem holds, read on the host from a copy (never the file itself):
the ext4 state as e2fsprogs sees it and the writer's records as ``guestio.c`` lays them."""

from __future__ import annotations

import subprocess
import zlib
from dataclasses import dataclass, field
from pathlib import Path

RECORD = 64


@dataclass(frozen=True)
class FsCheck:
    needed_recovery: bool  # the journal had to be replayed (not a clean freeze)
    fsck_clean: bool  # e2fsck -fn found nothing to fix (after the replay, if one was made)
    records: int  # valid records in a row from record 0
    stray: int  # valid records found after the first missing one: a hole, never allowed
    # the other files asked for by name: (valid records in a row, stray records after)
    files: dict[str, tuple[int, int]] = field(default_factory=dict)


def record(seq: int) -> bytes:
    head = f"R {seq:010d}".encode()
    text = head + f" {zlib.crc32(head):08x}".encode()
    return text + b"." * (RECORD - 1 - len(text)) + b"\n"


def count(data: bytes) -> tuple[int, int]:
    """(valid records in a row from 0, valid records after the first that is not)."""
    seq = 0
    while data[seq * RECORD:(seq + 1) * RECORD] == record(seq):
        seq += 1
    stray = sum(1 for later in range(seq + 1, len(data) // RECORD)
                if data[later * RECORD:(later + 1) * RECORD] == record(later))
    return seq, stray


def dump_records(raw: Path, name: str, scratch: Path) -> tuple[int, int]:
    """The records of the filesystem's file ``/name`` (0, 0: no such file)."""
    dump = scratch / f"{raw.name}.{name}"
    subprocess.run(["debugfs", "-R", f"dump /{name} {dump}", str(raw)],
                   check=True, capture_output=True)
    found = count(dump.read_bytes()) if dump.exists() else (0, 0)
    dump.unlink(missing_ok=True)
    return found


def check_image(image: Path, fmt: str, scratch: Path, replay: bool = False,
                files: tuple[str, ...] = ()) -> FsCheck:
    """``image`` copied to raw in ``scratch``; ``replay`` lets e2fsck replay the journal
    (and fix) on the copy first, as a mount after a crash would. ``files``: other files
    of records read too (``FsCheck.files``)."""
    raw = scratch / f"{image.name}.check.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(image), str(raw)],
                   check=True, capture_output=True)
    try:
        header = subprocess.run(["dumpe2fs", "-h", str(raw)], capture_output=True, text=True)
        features = next((line for line in header.stdout.splitlines()
                         if line.startswith("Filesystem features:")), "")
        needed = "needs_recovery" in features
        if replay:
            fixed = subprocess.run(["e2fsck", "-fy", str(raw)], capture_output=True, text=True)
            assert fixed.returncode in (0, 1), f"e2fsck -fy: {fixed.stdout}{fixed.stderr}"
        checked = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
        records, stray = dump_records(raw, "records", scratch)
        return FsCheck(needed, checked.returncode == 0, records, stray,
                       {name: dump_records(raw, name, scratch) for name in files})
    finally:
        raw.unlink(missing_ok=True)
