"""Overlays written in-process are the files qemu-img makes, byte for byte."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from hostvold.core.images import Layer
from hostvold.core.overlay import MAX_SIMPLE_SIZE, overlay_layout
from hostvold.storage.files import make_overlay

SIZES = [512, 65536, 8 << 20, (1 << 30) + 512, 512 << 20, (512 << 20) + 1, 100 << 30,
         MAX_SIMPLE_SIZE - 512, MAX_SIMPLE_SIZE]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(("backing", "fmt"), [("volume-a1", "raw"),
                                              ("volume-a1.0f3c" + "9" * 60, "qcow2")])
async def test_same_bytes_as_qemu_img(tmp_path: Path, size: int, backing: str,
                                      fmt: str) -> None:
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    await make_overlay(asyncio.to_thread, ours, size, Layer(backing, fmt),  # type: ignore[arg-type]
                       0o640)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt,
                    str(theirs), str(size)], check=True)
    assert ours.read_bytes() == theirs.read_bytes()
    assert ours.stat().st_mode & 0o777 == 0o640
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(tmp_path / backing), "1M"],
                   check=True)
    subprocess.run(["qemu-img", "check", "-q", "-f", "qcow2", str(ours)], check=True)


def test_what_it_does_not_cover_is_refused() -> None:
    for size, name in [(MAX_SIMPLE_SIZE + 512, "volume-a"), (0, "volume-a"),
                       (1 << 20, "../volume-a"), (1 << 20, "x" * 1024)]:
        with pytest.raises(ValueError):
            overlay_layout(size, name, "raw")


async def test_an_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_bytes(b"data")
    with pytest.raises(FileExistsError):
        await make_overlay(asyncio.to_thread, target, 1 << 20, Layer("volume-a", "raw"), 0o600)
    assert target.read_bytes() == b"data"


async def test_the_write_that_links_it_in_follows_once_it_is_durable(tmp_path: Path) -> None:
    """``then`` runs in the same trip to the share, after the overlay is whole; a failed
    overlay never runs it."""
    target, seen = tmp_path / "overlay", []
    await make_overlay(asyncio.to_thread, target, 1 << 20, Layer("volume-a", "raw"), 0o600,
                       then=lambda: seen.append(target.stat().st_size))
    assert seen == [target.stat().st_size] and seen[0] > 0
    with pytest.raises(FileExistsError):
        await make_overlay(asyncio.to_thread, target, 1 << 20, Layer("volume-a", "raw"), 0o600,
                           then=lambda: seen.append(-1))
    assert seen == [target.stat().st_size]
