"""An operator hands a share back and forth between Cinder's own NFS driver and hostvold.

Cinder's steps are done here as its driver does them, with plain ``qemu-img`` and file
operations on real files on a real loop-mounted ext4 share; hostvold must then list
exactly what the share holds (volumes, snapshots, active file), healthy, whether its index
is kept or rebuilt, and its operations must work on the result."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from hostvold.core.ids import new_id
from hostvold.ops.operations import Operations
from hostvold.storage.infofile import read_info
from tests.conftest import Host
from tests.snapshot_lab import MiB, check_consistent, qemu_io

pytestmark = pytest.mark.integration
SIZE = 16 * MiB


# ---- Cinder's NFS driver, by hand ------------------------------------------------------

def _info(mount: Path, volume_id: str) -> dict[str, str]:
    path = mount / f"volume-{volume_id}.info"
    return json.loads(path.read_text()) if path.exists() else {"active": f"volume-{volume_id}"}


def _write_info(mount: Path, volume_id: str, info: dict[str, str]) -> None:
    path = mount / f"volume-{volume_id}.info"
    tmp = path.with_name(path.name + ".cinder-tmp")
    tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _backing(path: Path) -> tuple[str, str]:
    data = json.loads(subprocess.run(["qemu-img", "info", "-f", "qcow2", "--output=json",
                                      str(path)], check=True, capture_output=True,
                                     text=True).stdout)
    return data["backing-filename"], data["backing-filename-format"]


def cinder_create_snapshot(mount: Path, volume_id: str) -> str:
    info = _info(mount, volume_id)
    sid = new_id()
    active = info["active"]
    fmt = "raw" if active == f"volume-{volume_id}" and _is_raw(mount / active) else "qcow2"
    overlay = f"volume-{volume_id}.{sid}"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", active, "-F", fmt,
                    str(mount / overlay), str(SIZE)], check=True, capture_output=True)
    info[sid] = overlay
    info["active"] = overlay
    _write_info(mount, volume_id, info)
    return sid


def _is_raw(path: Path) -> bool:
    with open(path, "rb") as image:
        return image.read(4) != b"QFI\xfb"


def cinder_delete_snapshot(mount: Path, volume_id: str, sid: str) -> None:
    """Offline, as Cinder does it: commit the snapshot's overlay into its backing file;
    the file above it (if any) is re-pointed with ``rebase -u``, else the backing file
    becomes active; the info file is rewritten and the overlay removed."""
    info = _info(mount, volume_id)
    overlay = info[sid]
    backing, backing_fmt = _backing(mount / overlay)
    subprocess.run(["qemu-img", "commit", "-f", "qcow2", str(mount / overlay)],
                   check=True, capture_output=True)
    if info["active"] == overlay:
        info["active"] = backing
    else:
        higher = next(name for name in {*info.values()}
                      if name != overlay and name != f"volume-{volume_id}"
                      and _backing(mount / name)[0] == overlay)
        subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", backing,
                        "-F", backing_fmt, str(mount / higher)], check=True)
    del info[sid]
    _write_info(mount, volume_id, info)
    (mount / overlay).unlink()


# ---- what hostvold must show -----------------------------------------------------------

async def assert_lists_the_share(service: Operations, mount: Path, volumes: set[str]) -> None:
    store = service.store
    assert {m.id for m in store.list_volumes()} == volumes
    for meta in store.list_volumes():
        info = _info(mount, meta.id)
        assert meta.active == info["active"], meta.id
        assert set(meta.snapshots) == set(info) - {"active"}, meta.id
        assert {s.id for s in await store.list_snapshots(meta.id)} == set(meta.snapshots)
        assert all(s["created"] for s in meta.snapshots.values())
        assert meta.problems == [], meta.problems
        assert (mount / f"volume-{meta.id}.meta").exists()
        assert await service.repairs.check(meta.id) == []  # the full check (with a listing) agrees
    assert all(share.mounted for share in store.shares)  # so health is "ok"


def reads(path: Path, written: dict[int, int]) -> None:
    qemu_io(path, "qcow2", [f"read -P {value:#x} {offset}k 64k"
                            for offset, value in written.items()], read_only=True)


async def test_share_handed_to_cinder_and_back(host_factory: Callable[..., Host]) -> None:
    host = host_factory(256)
    service = await host.start()
    mount = service.store.shares[0].mount_point
    kept = await service.create_volume(size=SIZE)
    gone = await service.create_volume(size=SIZE, format="qcow2")
    written: dict[int, int] = {}
    sids = []
    for step in range(3):
        active = mount / read_info(service.store.files_of(kept)).active
        qemu_io(active, "raw" if step == 0 else "qcow2", [f"write -P {0x11 * (step + 1):#x} "
                                                         f"{64 * step}k 64k"])
        written[64 * step] = 0x11 * (step + 1)
        sids.append((await host.ops.create_snapshot(kept.id)).id)
    host.stop()

    # Cinder works on the share: a middle snapshot and the newest one deleted (the active
    # file becomes the oldest snapshot's overlay), a new snapshot taken, a volume made
    # (base file only), a volume deleted with hostvold's .meta left behind
    cinder_delete_snapshot(mount, kept.id, sids[1])
    cinder_delete_snapshot(mount, kept.id, sids[2])
    assert _info(mount, kept.id)["active"] == f"volume-{kept.id}.{sids[0]}"
    new_sid = cinder_create_snapshot(mount, kept.id)
    qemu_io(mount / f"volume-{kept.id}.{new_sid}", "qcow2", ["write -P 0x55 256k 64k"])
    written[256] = 0x55
    made = new_id()
    subprocess.run(["qemu-img", "create", "-f", "raw", str(mount / f"volume-{made}"),
                    str(SIZE)], check=True, capture_output=True)
    (mount / f"volume-{gone.id}").unlink()

    expected = {kept.id, made}
    service = await host.start()  # the index kept: every volume reconciled
    await assert_lists_the_share(service, mount, expected)
    assert set(service.store.get_volume(kept.id).snapshots) == {sids[0], new_sid}
    assert not (mount / f"volume-{gone.id}.meta").exists()  # the leftover is gone
    host.stop()
    for path in host.state_dir.glob("index.sqlite*"):
        path.unlink()
    service = await host.start()  # rebuilt from the share alone
    await assert_lists_the_share(service, mount, expected)
    reads(mount / f"volume-{kept.id}.{new_sid}", written)

    # hostvold's operations work on what Cinder left
    third = await host.ops.create_snapshot(kept.id)
    await host.ops.delete_snapshot(kept.id, sids[0])
    await host.ops.delete_snapshot(kept.id, new_sid)
    check_consistent(service, kept.id)
    reads(mount / read_info(service.store.files_of(kept)).active, written)
    assert set(service.store.get_volume(kept.id).snapshots) == {third.id}
    await host.ops.create_snapshot(made)
    await host.ops.delete_volume(made)
    assert not [p for p in mount.iterdir() if made in p.name]
    await assert_lists_the_share(service, mount, {kept.id})

    # while hostvold runs: Cinder deletes the snapshot; the operation that follows sees it
    # (and repair says what it brought in line), as does a rescan
    cinder_delete_snapshot(mount, kept.id, third.id)
    assert service.store.get_volume(kept.id).snapshots  # stale until looked at again
    done = await host.ops.repair(kept.id)
    assert any("snapshots gone" in line and third.id in line for line in done), done
    await assert_lists_the_share(service, mount, {kept.id})
    other = new_id()
    subprocess.run(["qemu-img", "create", "-f", "raw", str(mount / f"volume-{other}"),
                    str(SIZE)], check=True, capture_output=True)
    sid = cinder_create_snapshot(mount, kept.id)
    assert host.daemon is not None and host.daemon.rescanner is not None
    await host.daemon.rescanner.check()
    await assert_lists_the_share(service, mount, {kept.id, other})
    assert set(service.store.get_volume(kept.id).snapshots) == {sid}
    reads(mount / f"volume-{kept.id}.{sid}", written)


async def test_damage_by_another_writer_is_a_named_problem(
        host_factory: Callable[..., Host]) -> None:
    """What cannot be reconciled is shown, not hidden: an info file naming an overlay
    that is gone, seen at start, becomes a problem; repair fixes it and says so."""
    host = host_factory(256)
    service = await host.start()
    mount = service.store.shares[0].mount_point
    meta = await service.create_volume(size=SIZE)
    sid = (await host.ops.create_snapshot(meta.id)).id
    host.stop()
    info = _info(mount, meta.id)
    ghost = new_id()
    info[ghost] = f"volume-{meta.id}.{ghost}"
    _write_info(mount, meta.id, info)
    service = await host.start()
    problems = service.store.get_volume(meta.id).problems
    assert any(ghost in p for p in problems), problems
    done = await host.ops.repair(meta.id)
    assert any("info file rewritten" in line for line in done)
    assert any("problems cleared" in line for line in done)
    healed = service.store.get_volume(meta.id)
    assert healed.problems == [] and set(healed.snapshots) == {sid}
