"""Detached volumes on real loop-mounted ext4 shares, through the service facade."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from hostvold.core.errors import (
    AlreadyExists,
    BackingFileOutsideVolume,
    InvalidArgument,
    InvalidState,
    NoSpace,
    NotFound,
    QemuImgError,
    UnsafeImage,
)
from hostvold.core.ids import new_id
from hostvold.ops.operations import Operations
from hostvold.storage.metadata import read_meta, write_meta
from tests.conftest import Host, need

pytestmark = pytest.mark.integration
MiB = 1 << 20
GiB = 1 << 30


def qemu_io(path: Path, fmt: str, command: str) -> None:
    subprocess.run(["qemu-io", "-f", fmt, "-c", command, str(path)], check=True,
                   capture_output=True)


def compare(a: Path, a_fmt: str, b: Path, b_fmt: str) -> bool:
    """Same guest-visible bytes, per qemu-img compare (formats pinned)."""
    result = subprocess.run(["qemu-img", "compare", "-f", a_fmt, "-F", b_fmt, str(a), str(b)],
                            capture_output=True, text=True)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


def volume_path(service: Operations, volume_id: str) -> Path:
    meta = service.store.get_volume(volume_id)
    share = next(s for s in service.store.shares if s.spec.address == meta.share)
    return share.mount_point / meta.active


def share_files(service: Operations) -> dict[str, list[str]]:
    return {share.spec.address: sorted(
        name for name in os.listdir(share.mount_point)
        if name not in ("lost+found", ".cinderSecureEnvIndicator"))
        for share in service.store.shares}


async def test_volumes_survive_restart_and_index_loss(host_factory: Callable[..., Host]) -> None:
    host = host_factory(256)
    service = await host.start()
    first = await service.create_volume(size=64 * MiB)
    second = await service.create_volume(size=32 * MiB, format="qcow2", id=new_id())
    expected = sorted([first, second], key=lambda m: m.id)
    assert service.store.list_volumes() == expected

    service = await host.start()  # a restart: the index is loaded
    assert service.store.list_volumes() == expected

    host.stop()
    (host.state_dir / "index.sqlite").unlink()
    for leftover in host.state_dir.glob("index.sqlite-*"):
        leftover.unlink()
    service = await host.start()  # the index is rebuilt from the share
    assert service.store.list_volumes() == expected
    assert service.store.get_volume(second.id).format == "qcow2"
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "-f", "qcow2", "--output=json", str(volume_path(service, second.id))],
        check=True, capture_output=True, text=True).stdout)
    assert info["virtual-size"] == 32 * MiB


async def test_too_large_volume_fails_with_no_space_and_leaves_nothing(
        host_factory: Callable[..., Host]) -> None:
    host = host_factory(64, 64)
    service = await host.start()
    with pytest.raises(NoSpace, match="no share can hold"):
        await service.create_volume(size=2 * GiB)  # beyond 20 x 64 MiB on both shares
    with pytest.raises(NoSpace):
        await service.create_volume(size=100 * MiB, provisioning="thick")
    assert share_files(service) == {s.spec.address: [] for s in service.store.shares}
    assert service.store.list_volumes() == []


async def test_real_enospc_while_creating_leaves_nothing(
        host_factory: Callable[..., Host]) -> None:
    """The share fills up under us (another writer): fallocate hits ENOSPC for real."""
    host = host_factory(64)
    service = await host.start()
    share = service.store.shares[0]
    volume_id = new_id()
    original = service.store._pick_share

    def pick_then_fill(*args: object) -> object:
        chosen = original(*args)  # type: ignore[arg-type]
        with open(share.mount_point / "other-writer", "wb") as filler:
            os.posix_fallocate(filler.fileno(), 0, 40 * MiB)
        return chosen

    service.store._pick_share = pick_then_fill  # type: ignore[method-assign]
    with pytest.raises(NoSpace):
        await service.create_volume(size=30 * MiB, provisioning="thick", id=volume_id)
    assert share_files(service)[share.spec.address] == ["other-writer"]
    with pytest.raises(NotFound):
        service.store.get_volume(volume_id)


async def test_creation_picks_least_allocated_share(host_factory: Callable[..., Host]) -> None:
    host = host_factory(128, 128)
    service = await host.start()
    first, second = service.store.shares
    big = await service.create_volume(size=32 * MiB, provisioning="thick",
                                      share=first.spec.address)
    assert big.share == first.spec.address
    nxt = await service.create_volume(size=16 * MiB, provisioning="thick")
    assert nxt.share == second.spec.address  # 0 allocated on the second share
    bigger = await service.create_volume(size=48 * MiB, provisioning="thick",
                                         share=second.id)  # by share id (md5)
    assert bigger.share == second.spec.address
    last = await service.create_volume(size=MiB)
    assert last.share == first.spec.address  # 32 MiB allocated < 64 MiB


async def test_thick_volume_is_allocated_without_writing_zeros(
        host_factory: Callable[..., Host]) -> None:
    need(shutil.which("filefrag") is not None, "filefrag (e2fsprogs)")
    host = host_factory(1200)
    service = await host.start()
    meta = await service.create_volume(size=GiB, provisioning="thick")
    path = volume_path(service, meta.id)
    st = path.stat()
    assert st.st_size == GiB
    assert st.st_blocks * 512 >= GiB  # every block allocated
    # fallocate leaves extents "unwritten": no zero was written to the disk
    extents = subprocess.run(["filefrag", "-v", str(path)], capture_output=True, text=True,
                             check=True).stdout.splitlines()
    rows = [line for line in extents if line.strip()[:1].isdigit()]
    assert rows and all("unwritten" in row for row in rows)
    sparse = await service.create_volume(size=GiB)
    assert volume_path(service, sparse.id).stat().st_blocks == 0


async def test_import_raw_and_qcow2_give_same_bytes_and_export_gives_them_back(
        tmp_path: Path, service: Operations) -> None:
    source_raw = tmp_path / "image.raw"
    subprocess.run(["qemu-img", "create", "-f", "raw", str(source_raw), "8M"], check=True,
                   capture_output=True)
    for i, offset in enumerate(range(0, 8 * MiB, MiB)):
        qemu_io(source_raw, "raw", f"write -P {0x10 + i} {offset + 4096} 64k")
    source_qcow2 = tmp_path / "image.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(source_raw),
                    str(source_qcow2)], check=True, capture_output=True)

    from_raw = await service.import_volume(source=str(source_raw))
    from_qcow2 = await service.import_volume(source=str(source_qcow2), format="qcow2")
    assert from_raw.format == "raw" and from_qcow2.format == "qcow2"
    assert from_raw.size == from_qcow2.size == 8 * MiB
    raw_path, qcow2_path = volume_path(service, from_raw.id), volume_path(service, from_qcow2.id)
    assert compare(raw_path, "raw", qcow2_path, "qcow2")
    assert compare(source_raw, "raw", raw_path, "raw")

    for fmt in ("raw", "qcow2"):
        dest = tmp_path / f"export.{fmt}"
        assert await service.export_volume(from_qcow2.id, destination=str(dest),
                                           format=fmt) == dest
        assert compare(source_raw, "raw", dest, fmt)
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(AlreadyExists):
        await service.export_volume(from_raw.id, destination=str(tmp_path / "export.raw"))

    bigger = await service.import_volume(source=str(source_qcow2), size=16 * MiB)
    assert bigger.size == 16 * MiB
    # the same bytes, then zeros up to the larger size (qemu-img compare checks both)
    assert compare(source_raw, "raw", volume_path(service, bigger.id), "raw")
    with pytest.raises(InvalidArgument, match="smaller"):
        await service.import_volume(source=str(source_raw), size=4 * MiB)


async def test_import_refuses_unsafe_images(tmp_path: Path, service: Operations) -> None:
    with_backing = tmp_path / "backed.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-u", "-b", "/etc/passwd", "-F", "raw",
                    str(with_backing), "1M"], check=True, capture_output=True)
    with pytest.raises(UnsafeImage, match="backing file"):
        await service.import_volume(source=str(with_backing))
    with_data_file = tmp_path / "datafile.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-o",
                    f"data_file={tmp_path / 'data.raw'}", str(with_data_file), "1M"],
                   check=True, capture_output=True)
    with pytest.raises(UnsafeImage, match="external data file"):
        await service.import_volume(source=str(with_data_file))
    with pytest.raises(NotFound):
        await service.import_volume(source=str(tmp_path / "absent.raw"))
    with pytest.raises(InvalidArgument):
        await service.import_volume(source="relative/path.raw")
    assert service.store.list_volumes() == []


async def test_import_info_runs_under_configured_limits(
        tmp_path: Path, host_factory: Callable[..., Host]) -> None:
    host = host_factory(64, extra="[limits]\nqemu_img_address_space = 16M\n")
    service = await host.start()
    source = tmp_path / "image.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(source), "1M"], check=True,
                   capture_output=True)
    with pytest.raises(QemuImgError, match="address-space=16777216"):
        await service.import_volume(source=str(source))
    assert share_files(service) == {service.store.shares[0].spec.address: []}


async def test_delete_removes_every_file_of_the_volume_and_nothing_else(
        service: Operations) -> None:
    keep = await service.create_volume(size=MiB)
    gone = await service.create_volume(size=MiB, format="qcow2")
    mount = service.store.shares[0].mount_point
    base = f"volume-{gone.id}"
    strays = [f"{base}.{new_id()}", f"{base}.info", f".{base}.meta.1a2b3c4d.tmp"]
    for name in strays:
        (mount / name).write_bytes(b"x")
    (mount / "notes.txt").write_text("not a volume")
    (mount / f"volume-{gone.id}-lookalike").write_text("not this volume")
    await service.delete_volume(gone.id)
    left = share_files(service)[service.store.shares[0].spec.address]
    assert left == sorted([f"volume-{keep.id}", f"volume-{keep.id}.meta", "notes.txt",
                           f"volume-{gone.id}-lookalike"])
    with pytest.raises(NotFound):
        await service.delete_volume(gone.id)


async def test_delete_refuses_attached_volume(service: Operations) -> None:
    meta = await service.create_volume(size=MiB)
    files_meta = volume_path(service, meta.id).with_name(f"volume-{meta.id}.meta")
    attached = meta.evolve(state="in-use", attachment={"domain": "vm1", "target": "vdb"})
    write_meta(files_meta, attached, 0o660)
    service.store.volumes[meta.id] = attached
    with pytest.raises(InvalidState, match="vm1"):
        await service.delete_volume(meta.id)
    assert volume_path(service, meta.id).exists()


@pytest.mark.parametrize(("fmt", "provisioning"), [("raw", "thin"), ("raw", "thick"),
                                                   ("qcow2", "thin")])
async def test_extend(service: Operations, fmt: str, provisioning: str) -> None:
    meta = await service.create_volume(size=8 * MiB, format=fmt, provisioning=provisioning)
    path = volume_path(service, meta.id)
    qemu_io(path, fmt, "write -P 0x5a 0 64k")
    grown = await service.extend_volume(meta.id, size=24 * MiB)
    assert grown.size == 24 * MiB
    info = json.loads(subprocess.run(["qemu-img", "info", "-f", fmt, "--output=json", str(path)],
                                     check=True, capture_output=True, text=True).stdout)
    assert info["virtual-size"] == 24 * MiB
    qemu_io(path, fmt, "read -P 0x5a 0 64k")
    if provisioning == "thick":
        assert path.stat().st_blocks * 512 >= 24 * MiB
    assert read_meta(path.with_name(f"volume-{meta.id}.meta")).size == 24 * MiB
    with pytest.raises(InvalidArgument, match="larger"):
        await service.extend_volume(meta.id, size=8 * MiB)


async def test_file_modes_follow_secure_permissions(host_factory: Callable[..., Host]) -> None:
    secure = await host_factory(64).start()  # auto on a new install: secure, marker written
    assert (secure.store.shares[0].mount_point / ".cinderSecureEnvIndicator").exists()
    meta = await secure.create_volume(size=MiB)
    assert volume_path(secure, meta.id).stat().st_mode & 0o777 == 0o660
    assert volume_path(secure, meta.id).with_name(
        f"volume-{meta.id}.meta").stat().st_mode & 0o777 == 0o660
    open_host = host_factory(64, extra="[volumes]\nnas_secure_file_permissions = false\n")
    opened = await open_host.start()
    meta = await opened.create_volume(size=MiB)
    assert volume_path(opened, meta.id).stat().st_mode & 0o777 == 0o666


async def test_crafted_chain_stops_operations(tmp_path: Path,
                                              host_factory: Callable[..., Host]) -> None:
    host = host_factory(64)
    service = await host.start()
    meta = await service.create_volume(size=MiB)
    mount = service.store.shares[0].mount_point
    snapshot = new_id()
    overlay = f"volume-{meta.id}.{snapshot}"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-u", "-b", "/etc/passwd", "-F", "raw",
                    str(mount / overlay), "1M"], check=True, capture_output=True)
    (mount / f"volume-{meta.id}.info").write_text(json.dumps({"active": overlay,
                                                              snapshot: overlay}))
    write_meta(mount / f"volume-{meta.id}.meta", meta.evolve(active=overlay), 0o660)
    host.stop()
    (host.state_dir / "index.sqlite").unlink()
    service = await host.start()
    dest = tmp_path / "out.raw"
    with pytest.raises(BackingFileOutsideVolume):
        await service.export_volume(meta.id, destination=str(dest))
    with pytest.raises(BackingFileOutsideVolume):
        await service.extend_volume(meta.id, size=2 * MiB)
    assert not dest.exists() and not list(tmp_path.glob(".out.raw.*"))
    assert service.store.get_volume(meta.id).size == MiB


async def test_bad_ids_and_duplicates(service: Operations) -> None:
    for bad in ("../../etc", "volume-1", "", "0A0A0A0A-0000-4000-8000-00000000000A/"):
        with pytest.raises(InvalidArgument):
            await service.create_volume(size=MiB, id=bad)
        with pytest.raises(InvalidArgument):
            await service.delete_volume(bad)
    with pytest.raises(InvalidArgument, match="size"):
        await service.create_volume(size=1000)  # not a multiple of 512
    with pytest.raises(InvalidArgument):
        await service.create_volume(size=MiB, shell="rm -rf /")
    meta = await service.create_volume(size=MiB)
    with pytest.raises(AlreadyExists):
        await service.create_volume(size=MiB, id=meta.id.upper())
    with pytest.raises(NotFound):
        await service.create_volume(size=MiB, share="nowhere:/x")


async def test_recovery_finishes_or_undoes_interrupted_operations(
        host_factory: Callable[..., Host]) -> None:
    """State a crash leaves behind (intent written, work half done) is repaired at start."""
    host = host_factory(64)
    service = await host.start()
    mount = service.store.shares[0].mount_point
    creating = await service.create_volume(size=MiB)
    deleting = await service.create_volume(size=MiB)
    extending = await service.create_volume(size=MiB)
    write_meta(mount / f"volume-{creating.id}.meta",
               creating.evolve(state="creating", operation={"name": "create"}), 0o660)
    write_meta(mount / f"volume-{deleting.id}.meta", deleting.evolve(state="deleting"), 0o660)
    write_meta(mount / f"volume-{extending.id}.meta",
               extending.evolve(operation={"name": "extend", "size": 4 * MiB}), 0o660)
    (mount / f".volume-{extending.id}.meta.deadbeef.tmp").write_text("{")  # torn write
    host.stop()
    (host.state_dir / "index.sqlite").unlink()
    service = await host.start()
    assert [m.id for m in service.store.list_volumes()] == [extending.id]
    assert service.store.get_volume(extending.id).size == 4 * MiB
    assert service.store.get_volume(extending.id).operation is None
    assert (mount / f"volume-{extending.id}").stat().st_size == 4 * MiB
    assert share_files(service)[service.store.shares[0].spec.address] == [
        f"volume-{extending.id}", f"volume-{extending.id}.meta"]
