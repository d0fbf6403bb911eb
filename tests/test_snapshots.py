"""Snapshot chains of detached volumes, with real bytes on real loop ext4 shares."""

from __future__ import annotations

import json
import os
import random
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from hostvold.core.errors import (
    BackingFileOutsideVolume,
    InfoFileDamaged,
    InvalidState,
    NeedsRepair,
    NotFound,
)
from hostvold.core.ids import new_id
from hostvold.storage.infofile import read_info
from tests.conftest import Host
from tests.snapshot_lab import (
    SIZE,
    Lab,
    MiB,
    backing_of,
    check_consistent,
    expected_reads,
    make_lab,
    qemu_io,
    write_generation,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def host(host_factory: Callable[..., Host]) -> AsyncIterator[Host]:
    host = host_factory(512)
    await host.start()
    yield host
    host.stop()


def lab_on(host: Host) -> Callable[..., object]:
    assert host.daemon is not None and host.daemon.ops is not None
    return lambda count, fmt="raw": make_lab(host.daemon.ops,  # type: ignore[union-attr]
                                             host.ops, count, fmt)


async def test_create_snapshot_makes_a_relative_overlay(host: Host) -> None:
    lab: Lab = await lab_on(host)(1)  # type: ignore[assignment]
    files = lab.files
    chain_map = read_info(files)
    (sid, overlay), = chain_map.snapshots.items()
    assert overlay == f"{files.base_name}.{sid}" == chain_map.active
    info = json.loads(subprocess.run(["qemu-img", "info", "-f", "qcow2", "--output=json",
                                      str(files.directory / overlay)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["backing-filename"] == files.base_name  # relative: works from any mount point
    assert info["backing-filename-format"] == "raw"
    assert json.loads(files.info.read_text()) == {"active": overlay, sid: overlay}
    assert files.info.read_text().startswith('{\n "')  # Cinder's layout: indent 1, sorted
    listed = await lab.snapshots.store.list_snapshots(lab.volume_id)
    assert [s.id for s in listed] == [sid] and listed[0].created
    lab.check_data()
    lab.check_consistent()


ORDERS = {
    "newest-first": lambda ids: list(reversed(ids)),
    "oldest-first": lambda ids: list(ids),
    "middle-out": lambda ids: [ids[2], ids[3], ids[1], ids[4], ids[0], ids[5]],
    "random-seed-7": lambda ids: random.Random(7).sample(ids, len(ids)),
}


@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_delete_in_every_order_keeps_every_point_in_time(host: Host, order: str,
                                                               fmt: str) -> None:
    lab: Lab = await lab_on(host)(6, fmt)  # type: ignore[assignment]
    lab.check_data()
    ids = sorted(lab.generation_of, key=lab.generation_of.__getitem__)
    for sid in ORDERS[order](ids):
        await lab.snapshots.delete_snapshot(lab.volume_id, sid)
        del lab.generation_of[sid]
        lab.check_data()
        lab.check_consistent()
    assert read_info(lab.files).active == lab.files.base_name
    assert lab.volumes.store.get_volume(lab.volume_id).format == fmt


async def test_delete_only_snapshot_and_unknown(host: Host) -> None:
    lab: Lab = await lab_on(host)(1)  # type: ignore[assignment]
    (sid,) = lab.generation_of
    with pytest.raises(NotFound):
        await lab.snapshots.delete_snapshot(lab.volume_id, new_id())
    await lab.snapshots.delete_snapshot(lab.volume_id, sid)
    lab.generation_of.clear()
    lab.check_data()
    lab.check_consistent()


async def test_create_from_snapshot_clone_and_revert(host: Host) -> None:
    lab: Lab = await lab_on(host)(3)  # type: ignore[assignment]
    ids = sorted(lab.generation_of, key=lab.generation_of.__getitem__)
    volumes = lab.volumes

    from_second = await lab.snapshots.create_from_snapshot(
        lab.volume_id, ids[1], size=SIZE + 4 * MiB, format="qcow2")
    assert from_second.size == SIZE + 4 * MiB and from_second.format == "qcow2"
    path = volumes.store.files_of(from_second).base
    qemu_io(path, "qcow2", expected_reads(2), read_only=True)
    assert not read_info(volumes.store.files_of(from_second)).snapshots

    clone = await lab.snapshots.clone(lab.volume_id)
    qemu_io(volumes.store.files_of(clone).base, "raw", expected_reads(4), read_only=True)
    assert set(read_info(lab.files).snapshots) == set(ids)  # no snapshot left behind
    lab.check_consistent()

    with pytest.raises(InvalidState, match="newest"):
        await lab.snapshots.revert(lab.volume_id, ids[0])
    await lab.snapshots.revert(lab.volume_id, ids[2])
    lab.check_data(active_generation=3)
    lab.check_consistent()
    lab.current = 3
    lab.write()  # the volume is usable after a revert
    lab.check_data()


async def test_extend_with_snapshots_keeps_data(host: Host) -> None:
    lab: Lab = await lab_on(host)(2)  # type: ignore[assignment]
    await lab.volumes.extend_volume(lab.volume_id, size=2 * SIZE)
    path, fmt = lab.active()
    info = json.loads(subprocess.run(["qemu-img", "info", "-f", fmt, "--output=json",
                                      str(path)], capture_output=True, text=True).stdout)
    assert info["virtual-size"] == 2 * SIZE
    lab.check_data()
    sid = await lab.snapshot()  # the next overlay has the new size
    assert lab.volumes.store.get_volume(lab.volume_id).size == 2 * SIZE
    await lab.snapshots.delete_snapshot(lab.volume_id, sid)
    del lab.generation_of[sid]
    lab.check_data()
    lab.check_consistent()


async def test_guest_rewritten_backing_stops_every_operation(host: Host) -> None:
    lab: Lab = await lab_on(host)(2)  # type: ignore[assignment]
    files = lab.files
    active = read_info(files).active
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "/etc/shadow", "-F", "raw",
                    str(files.directory / active)], check=True)
    before = {p.name: p.stat().st_mtime_ns for p in files.existing()}
    ids = list(lab.generation_of)
    attempts = [
        lambda: lab.snapshots.create_snapshot(lab.volume_id),
        lambda: lab.snapshots.delete_snapshot(lab.volume_id, ids[0]),
        lambda: lab.snapshots.delete_snapshot(lab.volume_id, ids[1]),
        lambda: lab.snapshots.clone(lab.volume_id),
        lambda: lab.snapshots.create_from_snapshot(lab.volume_id, ids[0]),
        lambda: lab.snapshots.revert(lab.volume_id, ids[1]),
        lambda: lab.volumes.extend_volume(lab.volume_id, size=2 * SIZE),
        lambda: lab.volumes.export_volume(lab.volume_id, destination="/tmp/never-written"),
    ]
    for attempt in attempts:
        with pytest.raises(BackingFileOutsideVolume):
            await attempt()
    assert {p.name: p.stat().st_mtime_ns for p in files.existing()} == before
    assert not Path("/tmp/never-written").exists()
    assert len(lab.volumes.store.list_volumes()) == 1


async def test_a_create_opens_only_the_top_while_the_info_file_is_the_one_walked(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot create opens nothing below the active file (SPEC section 5) while the info
    file is the very file the chain was last walked (or written) for: every change below the
    top, by any host, rewrites it. Once it changed, the whole chain is walked again."""
    import hostvold.storage.stamped as stamped

    lab: Lab = await lab_on(host)(12)  # type: ignore[assignment]
    files = lab.files
    opened: list[str] = []
    real_open = stamped.open_stamped

    def counting(path: Path | str) -> tuple[int, stamped.Stamp] | None:
        opened.append(os.path.basename(path))
        return real_open(path)

    monkeypatch.setattr(stamped, "open_stamped", counting)
    top = read_info(files).active
    await lab.snapshot()
    layers = [n for n in opened if n.startswith(files.base_name) and not n.endswith(
        (".info", ".meta"))]
    assert layers == [top], opened  # the top only: its link re-checked, fresh

    # below the top, a layer's backing rewritten to a file outside the volume, and the
    # info file rewritten as another host's change would (a new file, the same content)
    second = read_info(files).snapshots[next(iter(lab.generation_of))]
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "/etc/shadow", "-F",
                    "raw", str(files.directory / second)], check=True)
    moved = files.info.with_name(files.info.name + ".new")
    moved.write_bytes(files.info.read_bytes())
    os.replace(moved, files.info)
    before = {p.name: p.stat().st_mtime_ns for p in files.existing()}
    opened.clear()
    with pytest.raises(BackingFileOutsideVolume):
        await lab.snapshots.create_snapshot(lab.volume_id)
    assert second in opened  # walked down to it
    assert {p.name: p.stat().st_mtime_ns for p in files.existing()} == before


async def test_cinder_laid_out_share_is_adopted(host_factory: Callable[..., Host]) -> None:
    """Files made the way Cinder makes them (no hostvold metadata) are adopted at start."""
    host = host_factory(256)
    service = await host.start()
    mount = service.store.shares[0].mount_point
    host.stop()
    volume_id, first, second = new_id(), new_id(), new_id()
    base = mount / f"volume-{volume_id}"
    subprocess.run(["qemu-img", "create", "-f", "raw", str(base), str(SIZE)], check=True)
    write_generation(base, "raw", 1)
    for snap, backing, fmt, generation in ((first, base.name, "raw", 2),
                                           (second, f"{base.name}.{first}", "qcow2", 3)):
        overlay = mount / f"{base.name}.{snap}"
        subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", backing, "-F", fmt,
                        str(overlay), str(SIZE)], check=True, capture_output=True)
        write_generation(overlay, "qcow2", generation)
    info = {"active": f"{base.name}.{second}", first: f"{base.name}.{first}",
            second: f"{base.name}.{second}"}
    (mount / f"{base.name}.info").write_text(json.dumps(info, indent=1, sort_keys=True))
    (host.state_dir / "index.sqlite").unlink()

    service = await host.start()
    meta = service.store.get_volume(volume_id)
    assert meta.format == "raw" and meta.size == SIZE and not meta.problems
    assert {s.id for s in await host.ops.store.list_snapshots(volume_id)} == {first, second}
    lab = Lab(service, host.ops, volume_id, {first: 1, second: 2}, current=3)
    lab.check_data()
    await host.ops.delete_snapshot(volume_id, first)  # the oldest: a commit into V
    del lab.generation_of[first]
    lab.check_data()
    lab.check_consistent()


async def test_middle_delete_spawns_constant_qemu_img_processes(
        tmp_path: Path, host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted with a qemu-img shim on PATH: every real spawn is logged."""
    log = tmp_path / "spawns.log"
    shim = tmp_path / "bin"
    shim.mkdir()
    real = subprocess.run(["which", "qemu-img"], capture_output=True, text=True).stdout.strip()
    (shim / "qemu-img").write_text(f'#!/bin/sh\necho "$1" >> {log}\nexec {real} "$@"\n')
    (shim / "qemu-img").chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim}:{os.environ['PATH']}")
    counts = {}
    for depth in (8, 256):
        meta = await host.daemon.ops.create_volume(size=MiB)  # type: ignore[union-attr]
        ids = [(await host.ops.create_snapshot(meta.id)).id for _ in range(depth)]
        log.write_text("")
        await host.ops.delete_snapshot(meta.id, ids[depth // 2])
        counts[depth] = log.read_text().split()
        check_consistent(host.daemon.ops, meta.id)  # type: ignore[union-attr, arg-type]
    print(f"qemu-img spawns for a middle delete: depth 8 {counts[8]}, depth 256 {counts[256]}")
    # the validated header walk replaced `qemu-img info --backing-chain`; the commit names
    # its two files with the backing of the base cut (it opens no other layer)
    assert counts[8] == counts[256] == ["commit", "rebase"]


def test_a_pair_commit_only_where_clusters_line_up() -> None:
    from hostvold.core.images import EXTENDED_L2, Qcow2Header, pair_commit_safe

    def header(bits: int = 16, features: int = 0, backing: str | None = "b",
               backing_format: str | None = "qcow2") -> Qcow2Header:
        return Qcow2Header(3, MiB, backing, backing_format, features, None, cluster_bits=bits)

    assert pair_commit_safe(header(backing_format="raw"), "b", "raw", None)
    assert pair_commit_safe(header(), "b", "qcow2", header(backing=None))
    assert not pair_commit_safe(header(), "b", "qcow2", header(bits=17, backing=None))
    assert not pair_commit_safe(header(features=EXTENDED_L2), "b", "qcow2", header())
    assert not pair_commit_safe(header(), "b", "qcow2", header(features=EXTENDED_L2))
    assert not pair_commit_safe(header(), "other", "qcow2", header())  # not its backing
    assert not pair_commit_safe(header(backing_format="raw"), "b", "qcow2", header())


async def test_stale_state_is_reported_and_repaired(host: Host) -> None:
    lab: Lab = await lab_on(host)(2)  # type: ignore[assignment]
    volumes, files = lab.volumes, lab.files
    good_info = files.info.read_bytes()

    # 1. an empty (truncated) info file, as a crashed Cinder leaves it
    files.info.write_bytes(b"")
    with pytest.raises(InfoFileDamaged):
        await lab.snapshots.create_snapshot(lab.volume_id)
    assert volumes.store.get_volume(lab.volume_id).problems
    with pytest.raises(NeedsRepair):
        await lab.snapshots.clone(lab.volume_id)
    done = await lab.snapshots.repair(lab.volume_id)
    assert any("info file rewritten" in line for line in done)
    assert files.info.read_bytes() == good_info
    lab.check_data()
    lab.check_consistent()

    # 2. an info entry whose file is gone (its overlay was already merged away)
    ghost = new_id()
    data = json.loads(good_info)
    data[ghost] = f"{files.base_name}.{ghost}"
    files.info.write_text(json.dumps(data))
    assert any(ghost in p for p in await lab.snapshots.repairs.check(lab.volume_id))
    await lab.snapshots.repair(lab.volume_id)
    assert ghost not in read_info(files).snapshots
    lab.check_consistent()

    # 3. an overlay not in the info file that holds the newest writes (Cinder's online
    #    create crashed after the VM switched to it): it becomes active, nothing is lost
    orphan_id = new_id()
    orphan = files.directory / f"{files.base_name}.{orphan_id}"
    active = read_info(files).active
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", active, "-F", "qcow2",
                    str(orphan), str(SIZE)], check=True, capture_output=True)
    lab.current += 1
    write_generation(orphan, "qcow2", lab.current)
    assert any("not used" in p or "not in the info" in p
               for p in await lab.snapshots.repairs.check(lab.volume_id))
    await lab.snapshots.repair(lab.volume_id)
    assert read_info(files).active == orphan.name
    lab.generation_of[orphan_id] = lab.current - 1
    lab.check_data()
    lab.check_consistent()

    # 4. an empty stale overlay beside the chain is removed; one holding data is refused
    stray = files.directory / f"{files.base_name}.{new_id()}"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", files.base_name, "-F", "raw",
                    str(stray), str(SIZE)], check=True, capture_output=True)
    await lab.snapshots.repair(lab.volume_id)
    assert not stray.exists()
    lab.check_consistent()
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", files.base_name, "-F", "raw",
                    str(stray), str(SIZE)], check=True, capture_output=True)
    write_generation(stray, "qcow2", 9)
    with pytest.raises(NeedsRepair, match="newer data"):
        await lab.snapshots.repair(lab.volume_id)
    assert stray.exists()
    assert backing_of(files, stray.name) == files.base_name
