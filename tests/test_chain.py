"""Chain validation: crafted images are refused by name before any tool follows them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hostvold.core.errors import (
    BackingFileOutsideVolume,
    ExternalDataFile,
    ForeignBackingFile,
    UnknownImageFeature,
    UnsafeImage,
)
from hostvold.core.layout import Naming, VolumeFiles
from hostvold.storage.qcow2 import read_qcow2_header, validate_chain

pytestmark = pytest.mark.integration

A = "0a0a0a0a-0000-4000-8000-00000000000a"
B = "0b0b0b0b-0000-4000-8000-00000000000b"
SNAP = "5a5a5a5a-0000-4000-8000-000000000001"
SNAP2 = "5a5a5a5a-0000-4000-8000-000000000002"


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture
def volume(tmp_path: Path) -> VolumeFiles:
    files = VolumeFiles.of(tmp_path, Naming(), A)
    qemu_img("create", "-f", "raw", str(files.base), "1M")
    return files


def overlay(files: VolumeFiles, snap: str, backing: str, backing_fmt: str = "raw") -> str:
    name = files.overlay_name(snap)
    qemu_img("create", "-f", "qcow2", "-u", "-b", backing, "-F", backing_fmt,
             str(files.directory / name), "1M")
    return name


def test_valid_chain_is_walked_top_first(volume: VolumeFiles) -> None:
    first = overlay(volume, SNAP, volume.base_name)
    second = overlay(volume, SNAP2, first, "qcow2")
    layers = validate_chain(volume, second, "qcow2")
    assert [(layer.name, layer.format) for layer in layers] == [
        (second, "qcow2"), (first, "qcow2"), (volume.base_name, "raw")]


def test_absolute_backing_outside_is_refused(volume: VolumeFiles) -> None:
    top = overlay(volume, SNAP, "/etc/passwd")
    with pytest.raises(BackingFileOutsideVolume):
        validate_chain(volume, top, "qcow2")


def test_dotdot_backing_is_refused(volume: VolumeFiles) -> None:
    top = overlay(volume, SNAP, f"../other/volume-{B}")
    with pytest.raises(BackingFileOutsideVolume):
        validate_chain(volume, top, "qcow2")


def test_protocol_backing_is_refused(volume: VolumeFiles) -> None:
    top = overlay(volume, SNAP, "nbd://evil.example/export")
    with pytest.raises(BackingFileOutsideVolume):
        validate_chain(volume, top, "qcow2")


def test_other_volumes_file_is_refused(volume: VolumeFiles) -> None:
    other = VolumeFiles.of(volume.directory, Naming(), B)
    qemu_img("create", "-f", "raw", str(other.base), "1M")
    top = overlay(volume, SNAP, other.base_name)
    with pytest.raises(ForeignBackingFile):
        validate_chain(volume, top, "qcow2")


def test_absolute_path_into_own_directory_is_accepted(volume: VolumeFiles) -> None:
    top = overlay(volume, SNAP, str(volume.base))
    assert [layer.name for layer in validate_chain(volume, top, "qcow2")][-1] == volume.base_name


def test_external_data_file_is_refused(tmp_path: Path) -> None:
    files = VolumeFiles.of(tmp_path, Naming(), A)
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'stolen.raw'}",
             str(files.base), "1M")
    assert read_qcow2_header(files.base).data_file is not None
    with pytest.raises(ExternalDataFile):
        validate_chain(files, files.base_name, "qcow2")


def test_unknown_incompatible_feature_is_refused(tmp_path: Path) -> None:
    files = VolumeFiles.of(tmp_path, Naming(), A)
    qemu_img("create", "-f", "qcow2", str(files.base), "1M")
    with open(files.base, "r+b") as image:
        image.seek(72)
        image.write((1 << 40).to_bytes(8, "big"))
    with pytest.raises(UnknownImageFeature):
        validate_chain(files, files.base_name, "qcow2")


def test_loop_is_refused(volume: VolumeFiles) -> None:
    name = volume.overlay_name(SNAP)
    overlay(volume, SNAP, name, "qcow2")
    with pytest.raises(UnsafeImage, match="loops"):
        validate_chain(volume, name, "qcow2")


def test_unrecorded_backing_format_is_refused(volume: VolumeFiles) -> None:
    top = overlay(volume, SNAP, volume.base_name)
    path = volume.directory / top
    header = read_qcow2_header(path)
    assert header.backing_format == "raw"
    data = bytearray(path.read_bytes())
    at = data.find(b"\xe2\x79\x2a\xca")  # the backing-format header extension
    data[at:at + 4] = b"\x00\x00\x00\x00"  # end of extensions: the format is gone
    path.write_bytes(bytes(data))
    with pytest.raises(UnsafeImage, match="never lets qemu-img probe"):
        validate_chain(volume, top, "qcow2")


def test_top_must_belong_to_volume(volume: VolumeFiles) -> None:
    with pytest.raises(ForeignBackingFile):
        validate_chain(volume, "passwd", "raw")
