"""What the daemon does with the shares at start: the index loaded, or rebuilt from the
shares alone (hostvold's metadata files reconciled with the info files and chains, volumes
laid out by Cinder adopted), and the volumes caught mid-operation re-read from their shares
before recovery."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hostvold.core.chainmap import SnapshotMap
from hostvold.core.errors import HostvoldError, InfoFileDamaged, UnsafeImage
from hostvold.core.images import format_problem
from hostvold.core.layout import VolumeFiles
from hostvold.core.planning import chain_problems
from hostvold.core.records import VolumeMeta
from hostvold.ops.store import VolumeStore
from hostvold.storage.files import file_mtime
from hostvold.storage.infofile import read_info
from hostvold.storage.metadata import read_record, write_meta
from hostvold.storage.mounts import Share
from hostvold.storage.qcow2 import header_claim, read_qcow2_header, validate_chain
from hostvold.storage.safefile import require_regular
from hostvold.storage.volumefiles import remove_volume_files

log = logging.getLogger(__name__)


async def rebuild_index(store: VolumeStore) -> None:
    """Read every volume on every mounted share into the index: hostvold's metadata
    files, and volumes laid out by Cinder (no metadata file yet), which are adopted."""
    found: dict[str, VolumeMeta] = {}
    for share in store.mounted_shares():
        names = {entry.name for entry in os.scandir(share.mount_point)}
        for name in sorted(names):
            volume_id = store.naming.volume_id_of_meta(name)
            if volume_id is not None:
                meta = read_record(share, share.mount_point / name, volume_id)
            elif (volume_id := store.naming.volume_id_of_base(name)) is not None and \
                    f"{name}.meta" not in names:
                meta = adopt(store, VolumeFiles.of(share.mount_point, store.naming, volume_id),
                                   share)
            else:
                continue
            if meta is not None:
                found[volume_id] = meta
    await store.index.run(store.index.replace_all, list(found.values()))
    store.volumes = found
    await reconcile_all(store)  # a metadata file is a belief: the info file and chain decide
    log.info("index rebuilt from %d shares: %d volumes",
             len(store.mounted_shares()), len(found))


def adopt(store: VolumeStore, files: VolumeFiles, share: Share) -> VolumeMeta:
    """Describe a volume made by Cinder from its files alone and write its metadata.

    The base format comes from trusted records only: the backing format an overlay
    recorded for it. Bytes a guest could have written never decide it (SPEC section
    13): without such a record the base is raw, and when its first bytes look like a
    qcow2 header that is reported as a problem for an operator to confirm
    (``repair --format``). Problems found on the way are recorded, not fixed.
    """
    present = {p.name for p in files.existing() if files.is_image(p.name)}
    recorded = _recorded_base_format(files, present)
    base_format = recorded or "raw"
    problems: list[str] = []
    if recorded is None:
        claim = header_claim(files.base)
        if claim is not None:
            problems.append(format_problem(files.base_name, claim))
    chain_map = SnapshotMap(files.base_name)
    try:
        require_regular(files.base)
        chain_map = read_info(files)
        fmt = base_format if chain_map.active == files.base_name else "qcow2"
        chain = validate_chain(files, chain_map.active, fmt)
        problems += chain_problems(files, chain, chain_map, present)
        active = files.directory / chain_map.active
        size = read_qcow2_header(active).size if fmt == "qcow2" else active.stat().st_size
    except (InfoFileDamaged, UnsafeImage) as exc:
        problems.append(exc.message)
        size = files.base.lstat().st_size
    except FileNotFoundError as exc:
        problems.append(f"{Path(str(exc.filename)).name}, a file of the chain, is missing")
        size = files.base.lstat().st_size
    st = files.base.lstat()
    meta = VolumeMeta(
        id=store.naming.volume_id_of_base(files.base_name) or "", size=size,
        format="qcow2" if base_format == "qcow2" else "raw",
        provisioning="thick" if st.st_blocks * 512 >= st.st_size else "thin",
        created=file_mtime(files.base), state="available", share=share.spec.address,
        active=chain_map.active, problems=problems,
        snapshots={sid: {"created": file_mtime(files.directory / name), "quiesced": False}
                   for sid, name in chain_map.snapshots.items()
                   if (files.directory / name).exists()})
    log.warning("adopted volume %s from %s (%d snapshots%s)", meta.id, share.spec.address,
                len(meta.snapshots), f"; problems: {'; '.join(problems)}" if problems else "")
    write_meta(files.meta, meta, store.file_mode)
    return meta


def _recorded_base_format(files: VolumeFiles, present: set[str]) -> str | None:
    """The format an overlay recorded for the base file, if any overlay sits on it."""
    for name in sorted(present - {files.base_name}):
        try:
            header = read_qcow2_header(files.directory / name)
        except (UnsafeImage, OSError):
            continue
        if header.backing_file == files.base_name and header.backing_format in ("raw", "qcow2"):
            return header.backing_format
    return None


async def load_index(store: VolumeStore) -> None:
    store.volumes = {meta.id: meta for meta in store.index.load()}
    await reconcile_all(store)


async def reconcile_all(store: VolumeStore) -> None:
    """Every known volume brought in line with its share (:meth:`VolumeStore.refresh`);
    one volume's trouble is logged (and recorded as its problem) and never stops the
    others."""
    for volume_id in sorted(store.volumes):
        try:
            await store.refresh(volume_id)
        except (HostvoldError, OSError) as exc:
            log.error("volume %s could not be reconciled with its share: %s", volume_id,
                      exc, extra={"VOLUME_ID": volume_id})



async def reread_inflight(store: VolumeStore) -> None:
    """At start: the volumes the index says were mid-operation, re-read from their
    shares (the truth); a volume whose metadata file never came to be is removed."""
    for volume_id, share_address in store.index.inflight():
        share = next((s for s in store.shares if s.spec.address == share_address), None)
        if share is None or not share.usable:
            continue  # its share is down; recovered when it comes back
        files = VolumeFiles.of(share.mount_point, store.naming, volume_id)
        if files.meta.exists() or files.meta.is_symlink():
            meta = read_record(share, files.meta, volume_id)
            if meta is not None:
                store.volumes[volume_id] = meta
        else:  # the crash came before the metadata file was written, or after delete
            await share.io.run(remove_volume_files, files)
            await store.forget(volume_id)


def reread_foreign_operations(store: VolumeStore) -> None:
    """The volumes whose metadata files on the shares record an operation of another host:
    re-read, so that a host which left the group can be taken over even where this host
    never heard of the volume (one directory listing per share, then only those files)."""
    for share in store.mounted_shares():
        with os.scandir(share.mount_point) as entries:
            names = [entry.name for entry in entries]
        for name in names:
            volume_id = store.naming.volume_id_of_meta(name)
            if volume_id is None or store.locks.busy(volume_id):
                continue
            meta = read_record(share, share.mount_point / name, volume_id)
            host = (meta.operation or {}).get("host") if meta is not None else None
            if meta is not None and host not in (None, store.host_id):
                store.volumes[volume_id] = meta
