"""The qemu-img edge against the real qemu-img."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from hostvold.core.errors import QemuImgError
from hostvold.storage import qemuimg
from hostvold.storage.qemuimg import Limits

pytestmark = pytest.mark.integration
LIMITS = Limits()


def qemu_io(path: Path, fmt: str, command: str) -> None:
    subprocess.run(["qemu-io", "-f", fmt, "-c", command, str(path)], check=True,
                   capture_output=True)


async def test_create_and_info(tmp_path: Path) -> None:
    base = tmp_path / "volume-base"
    await qemuimg.create(base, "raw", 1 << 20)
    over = tmp_path / "volume-over"
    await qemuimg.create(over, "qcow2", 1 << 20, backing=base.name, backing_fmt="raw")
    top = await qemuimg.info(over, "qcow2", LIMITS)
    assert top.backing_filename == base.name  # relative, as created
    assert top.backing_filename_format == "raw"
    below = await qemuimg.info(base, "raw", LIMITS)
    assert below.format == "raw" and below.virtual_size == 1 << 20


async def test_create_overlay_does_not_open_backing(tmp_path: Path) -> None:
    """-u: the backing file need not even exist, so the chain below is never read."""
    over = tmp_path / "over"
    await qemuimg.create(over, "qcow2", 1 << 20, backing="missing", backing_fmt="qcow2")
    info = await qemuimg.info(over, "qcow2", LIMITS)
    assert info.backing_filename == "missing"


async def test_overlay_requires_backing_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        await qemuimg.create(tmp_path / "x", "qcow2", 1 << 20, backing="y")


async def test_resize_convert_commit_rebase_measure_check(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    await qemuimg.create(base, "qcow2", 1 << 20)
    qemu_io(base, "qcow2", "write -P 0x11 0 64k")
    top = tmp_path / "top.qcow2"
    await qemuimg.create(top, "qcow2", 1 << 20, backing=base.name, backing_fmt="qcow2")
    qemu_io(top, "qcow2", "write -P 0x22 64k 64k")
    progress: list[float] = []
    flat = tmp_path / "flat.raw"
    await qemuimg.convert(top, "qcow2", flat, "raw", limits=LIMITS, on_progress=progress.append)
    assert progress and progress[-1] == 1.0
    qemu_io(flat, "raw", "read -P 0x11 0 64k")
    qemu_io(flat, "raw", "read -P 0x22 64k 64k")
    await qemuimg.commit(top, "qcow2", limits=LIMITS)
    qemu_io(base, "qcow2", "read -P 0x22 64k 64k")
    other = tmp_path / "other.qcow2"
    await qemuimg.create(other, "qcow2", 1 << 20)
    await qemuimg.rebase_unsafe(top, "qcow2", other.name, "qcow2", limits=LIMITS)
    assert (await qemuimg.info(top, "qcow2", LIMITS)).backing_filename == other.name
    await qemuimg.resize(base, "qcow2", 2 << 20, limits=LIMITS)
    assert (await qemuimg.info(base, "qcow2", LIMITS)).virtual_size == 2 << 20
    measured = await qemuimg.measure(base, "qcow2", "raw", LIMITS)
    assert measured.required == 2 << 20
    checked = subprocess.run(["qemu-img", "check", "-f", "qcow2", "--output=json", str(base)],
                             capture_output=True, text=True, check=True)
    assert json.loads(checked.stdout).get("corruptions", 0) == 0


async def test_failure_carries_stderr(tmp_path: Path) -> None:
    with pytest.raises(QemuImgError) as info:
        await qemuimg.info(tmp_path / "absent", "qcow2", LIMITS)
    assert "No such file" in str(info.value)
    assert info.value.returncode == 1


async def test_format_is_pinned_not_probed(tmp_path: Path) -> None:
    """A raw file holding a qcow2 header (a guest can write one) stays raw."""
    inner = tmp_path / "inner.qcow2"
    await qemuimg.create(inner, "qcow2", 1 << 20, backing="/etc/passwd", backing_fmt="raw")
    disguised = tmp_path / "volume-raw"
    disguised.write_bytes(inner.read_bytes())
    info = await qemuimg.info(disguised, "raw", LIMITS)
    assert info.format == "raw" and info.backing_filename is None


async def test_info_runs_under_limits(tmp_path: Path) -> None:
    image = tmp_path / "img"
    await qemuimg.create(image, "qcow2", 1 << 20)
    with pytest.raises(QemuImgError) as info:
        await qemuimg.info(image, "qcow2", Limits(cpu_seconds=5, address_space=16 << 20))
    assert "address-space=16777216" in str(info.value)
    assert str(info.value).startswith("QemuImgFailed: qemu-img info exited")
    assert (await qemuimg.info(image, "qcow2", LIMITS)).virtual_size == 1 << 20


async def test_cancel_kills_and_reaps_the_child(tmp_path: Path) -> None:
    task = asyncio.create_task(qemuimg.run(["sleep", "30"]))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    leftover = subprocess.run(["pgrep", "-f", "^sleep 30$"], capture_output=True)
    assert leftover.returncode == 1


async def test_timeout_kills_the_child() -> None:
    with pytest.raises(TimeoutError):
        await qemuimg.run(["sleep", "30"], timeout=0.2)


async def test_every_image_reading_subcommand_runs_under_limits(tmp_path: Path) -> None:
    """convert, commit, rebase, resize and measure get the [limits] too (SPEC section 13):
    an address-space limit too small for qemu-img makes each of them fail, naming it."""
    tiny = Limits(cpu_seconds=5, address_space=16 << 20)
    base = tmp_path / "base.qcow2"
    await qemuimg.create(base, "qcow2", 1 << 20)
    top = tmp_path / "top.qcow2"
    await qemuimg.create(top, "qcow2", 1 << 20, backing=base.name, backing_fmt="qcow2")
    attempts = [
        qemuimg.convert(top, "qcow2", tmp_path / "flat.raw", "raw", limits=tiny),
        qemuimg.commit(top, "qcow2", limits=tiny),
        qemuimg.rebase_unsafe(top, "qcow2", base.name, "qcow2", limits=tiny),
        qemuimg.resize(base, "qcow2", 2 << 20, limits=tiny),
        qemuimg.measure(base, "qcow2", "raw", tiny),
    ]
    for attempt in attempts:
        with pytest.raises(QemuImgError, match="address-space=16777216"):
            await attempt
