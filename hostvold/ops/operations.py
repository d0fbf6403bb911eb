"""Every change a caller can ask for, in one thin layer: it checks the ids, takes the
volume's lock, asks libvirt who uses the volume (never trusting our own record), and sends
the work offline (qemu-img) or live (libvirt); only this layer decides between them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from hostvold.core.errors import (
    AlreadyExists,
    Busy,
    HostvoldError,
    InvalidArgument,
    InvalidState,
    NeedsRepair,
    NotFound,
)
from hostvold.core.ids import new_id, valid_id
from hostvold.core.images import Format, Layer
from hostvold.core.layout import VolumeFiles, record_problems
from hostvold.core.models import ExportVolume, ExtendVolume
from hostvold.core.planning import AMBIGUOUS_PIVOT, snapshot_data
from hostvold.core.reconcile import record_changes
from hostvold.core.records import Snapshot, VolumeMeta, snapshot_of
from hostvold.ops.access import VolumeAccess
from hostvold.ops.copies import CopyOps
from hostvold.ops.group_changes import GroupChanges
from hostvold.ops.group_recovery import NAME as GROUP_SNAPSHOT
from hostvold.ops.groups import GroupSnapshots
from hostvold.ops.live import LiveVolumes
from hostvold.ops.repair import RepairOps
from hostvold.ops.snapshots import SnapshotOps
from hostvold.ops.startup import reread_foreign_operations, reread_inflight
from hostvold.ops.store import VolumeStore, share_call
from hostvold.ops.volumes import VolumeOps
from hostvold.storage.coordination import Coordination
from hostvold.storage.safefile import check_caller_fd, create_destination, remove_destination
from hostvold.storage.volumefiles import locked_images

log = logging.getLogger(__name__)


class Operations:
    def __init__(self, store: VolumeStore) -> None:
        self.store = store
        self.access = VolumeAccess(store)  # its live and coordination are set at start
        self.volumes = VolumeOps(store)
        self.snapshots = SnapshotOps(store)
        self.copies = CopyOps(store)
        self.repairs = RepairOps(store)
        self.groups = GroupSnapshots(self)
        self.group_changes = GroupChanges(self.groups)

    @property
    def live(self) -> LiveVolumes | None:
        return self.access.live

    @property
    def coordination(self) -> Coordination | None:
        return self.access.coordination

    @contextlib.asynccontextmanager
    async def _frozen_top(self, files: VolumeFiles, meta: VolumeMeta) -> AsyncIterator[Layer]:
        """The active file of a detached volume, or a temporary point in time (merged
        away after) of an attached one: the layer to copy the current content from."""
        chain_map, chain = await self.store.validated_chain(files, meta)
        if meta.state == "in-use":
            async with self.access.require_live().point_in_time(meta, files, chain_map,
                                                          chain) as frozen:
                yield frozen
        else:
            yield chain[0]

    # ---- volumes -------------------------------------------------------------------------

    async def create_volume(self, **options: Any) -> VolumeMeta:
        self.access.require_session()
        return await self.volumes.create_volume(**options)

    async def import_volume(self, **options: Any) -> VolumeMeta:
        self.access.require_session()
        return await self.volumes.import_volume(**options)

    async def delete_volume(self, volume_id: str) -> None:
        volume_id = valid_id(volume_id, "volume id")
        async with self.access.locked(volume_id):
            meta, files, users = await self.access.observe(volume_id, damaged_ok=True)
            users.refuse_any("delete", volume_id)
            if meta.attachment or meta.state == "in-use":
                raise InvalidState(f"volume {volume_id} is attached to "
                                   f"{(meta.attachment or {}).get('domain', 'a domain')}; "
                                   "detach it first")
            await self.volumes.delete(files, meta)

    async def extend_volume(self, volume_id: str, **options: Any) -> VolumeMeta:
        volume_id = valid_id(volume_id, "volume id")
        request: ExtendVolume = ExtendVolume.parse(**options)
        async with self.access.locked(volume_id):
            _meta, files, users = await self.access.observe(volume_id)
            meta = self.store.require_idle(volume_id)
            if meta.state != "in-use":
                users.refuse_live("extend", volume_id)
            await self.volumes.check_growth(meta, request.size)
            await self.store.validated_chain(files, meta, fresh=True)
            if meta.state == "in-use":
                return await self.access.require_live().extend(meta, files, request.size)
            return await self.volumes.extend(files, meta, request.size)

    async def export_volume(self, volume_id: str, **options: Any) -> Path | None:
        """Flatten the volume's active chain into ``fd`` (the caller's file, written in
        place) or, for root, a new file at ``destination`` (exclusive, removed on failure)."""
        volume_id = valid_id(volume_id, "volume id")
        request: ExportVolume = ExportVolume.parse(**options)
        dest = request.destination
        if request.fd is not None:
            check_caller_fd(request.fd, "fd", write=True)
        elif dest is not None:
            if not dest.parent.is_dir():
                raise NotFound(f"directory {dest.parent} does not exist")
            if dest.exists() or dest.is_symlink():
                raise AlreadyExists(f"{dest} already exists; hostvold never overwrites a file")
        async with self.access.locked(volume_id):
            await self.access.observe(volume_id)
            meta = self.store.require_idle(volume_id)
            files = self.store.files_of(meta)
            fd = request.fd if request.fd is not None else create_destination(dest)
            try:
                async with self._frozen_top(files, meta) as top:
                    await self.volumes.export_layer(files, top, fd, request.format)
            except BaseException:
                if request.fd is None:
                    remove_destination(dest, fd)
                raise
            finally:
                if request.fd is None:
                    os.close(fd)
        log.info("exported volume %s to %s", volume_id, dest or "the caller's file",
                 extra={"VOLUME_ID": volume_id})
        return dest

    async def clone(self, volume_id: str, **options: Any) -> VolumeMeta:
        """A new standalone volume with the current content; leaves no snapshot behind."""
        volume_id = valid_id(volume_id, "volume id")
        async with self.access.locked(volume_id):
            await self.access.observe(volume_id)
            meta = self.store.require_idle(volume_id)
            files = self.store.files_of(meta)
            async with self._frozen_top(files, meta) as top:
                return await self.copies.copy_out(files, top, meta.size, "clone", options)

    # ---- snapshots -----------------------------------------------------------------------

    async def create_snapshot(self, volume_id: str, snapshot_id: str | None = None) -> Snapshot:
        volume_id = valid_id(volume_id, "volume id")
        sid = valid_id(snapshot_id, "snapshot id") if snapshot_id is not None else new_id()
        async with self.access.locked(volume_id):
            _meta, files, users = await self.access.observe(volume_id, top_only=True)
            meta = self.store.require_idle(volume_id)
            chain_map, chain = await self.store.validated_chain(files, meta, fresh=True)
            overlay = files.overlay_name(sid)
            if sid in chain_map.snapshots or await share_call(
                    self.store, meta, os.path.lexists, files.directory / overlay):
                raise AlreadyExists(f"snapshot {sid} of volume {volume_id} already exists")
            if meta.state == "in-use":
                meta = await self.access.require_live().create_snapshot(meta, files, chain_map,
                                                                  chain, sid)
                how = "attached volume"
            else:
                users.refuse_live("take an offline snapshot of", volume_id)
                meta = await self.snapshots.create(files, meta, chain_map, chain, sid)
                await self.access.follow_definitions(files, volume_id)
                how = "volume"
            log.info("created snapshot %s of %s %s", sid, how, volume_id,
                     extra={"VOLUME_ID": volume_id, "SNAPSHOT_ID": sid})
            return snapshot_of(meta, overlay, sid)

    async def delete_snapshot(self, volume_id: str, snapshot_id: str) -> None:
        volume_id = valid_id(volume_id, "volume id")
        sid = valid_id(snapshot_id, "snapshot id")
        async with self.access.locked(volume_id):
            op = self.store.get_volume(volume_id).operation or {}
            if op.get("name") in ("delete-snapshot", "live-delete-snapshot") \
                    and op.get("snapshot") == sid:
                return await self._resume(self.store.get_volume(volume_id))  # a retry
            _meta, files, users = await self.access.observe(volume_id)
            meta = self.store.require_idle(volume_id)
            chain_map, chain = await self.store.validated_chain(files, meta, fresh=True)
            if meta.state == "in-use":
                if sid not in chain_map.snapshots:
                    raise NotFound(f"snapshot {sid} does not exist")
                await self.access.require_live().deleter.delete_snapshot(meta, files, chain_map,
                                                                   chain, sid)
            else:
                users.refuse_live("delete a snapshot of", volume_id)
                await self.snapshots.delete(files, meta, chain_map, chain, sid)
                await self.access.follow_definitions(files, volume_id)
            log.info("deleted snapshot %s of volume %s", sid, volume_id,
                     extra={"VOLUME_ID": volume_id, "SNAPSHOT_ID": sid})

    async def revert(self, volume_id: str, snapshot_id: str) -> None:
        """Throw away what was written since the newest snapshot (detached volumes)."""
        volume_id = valid_id(volume_id, "volume id")
        sid = valid_id(snapshot_id, "snapshot id")
        async with self.access.locked(volume_id):
            _meta, files, users = await self.access.observe(volume_id)
            users.refuse_live("revert", volume_id)
            meta = self.store.require_available(volume_id)
            chain_map, chain = await self.store.validated_chain(files, meta, fresh=True)
            await self.snapshots.revert(files, meta, chain_map, chain, sid)
            log.info("reverted volume %s to snapshot %s", volume_id, sid,
                     extra={"VOLUME_ID": volume_id, "SNAPSHOT_ID": sid})

    async def create_from_snapshot(self, volume_id: str, snapshot_id: str,
                                   **options: Any) -> VolumeMeta:
        """A new standalone volume of the snapshot's point in time; the volume may be
        attached (QEMU only reads below its active file; no block job of ours runs)."""
        volume_id = valid_id(volume_id, "volume id")
        sid = valid_id(snapshot_id, "snapshot id")
        async with self.access.locked(volume_id):
            await self.access.observe(volume_id)
            meta = self.store.require_idle(volume_id)
            files = self.store.files_of(meta)
            chain_map, chain = await self.store.validated_chain(files, meta, fresh=True)
            source = snapshot_data(chain, chain_map, sid)
            size = await self.copies.source_size(files, source)
            return await self.copies.copy_out(files, source, size, "create-from-snapshot",
                                              options)

    # ---- attachment and health -----------------------------------------------------------

    async def attach(self, volume_id: str, domain: str, target: str | None = None) -> VolumeMeta:
        volume_id = valid_id(volume_id, "volume id")
        live = self.access.require_live()
        async with self.access.locked(volume_id):
            meta, files, users = await self.access.observe(volume_id)
            return await live.attach(files, meta, users, domain, target)

    async def detach(self, volume_id: str) -> VolumeMeta:
        volume_id = valid_id(volume_id, "volume id")
        live = self.access.require_live()
        async with self.access.locked(volume_id):
            meta, files, users = await self.access.observe(volume_id, damaged_ok=True)
            return await live.detach(files, meta, users)

    async def repair(self, volume_id: str, fmt: Format | None = None,
                     choice: str | None = None) -> list[str]:
        """Make the info file describe the chain the files form, losing no data still
        present (``fmt``: the base file's format, confirmed by the operator). An undecided
        pivot is settled only by the operator's ``choice`` (``base`` or ``overlay``)."""
        volume_id = valid_id(volume_id, "volume id")
        async with self.access.locked(volume_id):
            before = self.store.find(volume_id)
            meta, files, users = await self.access.observe(volume_id, damaged_ok=True)
            users.refuse_live("repair", volume_id)
            if (meta.operation or {}).get("step") == AMBIGUOUS_PIVOT:
                deleter = self.access.require_live().deleter
                if choice is None:
                    raise NeedsRepair(await deleter.describe_ambiguity(files, meta))
                return [await deleter.resolve_ambiguity(files, meta, choice)]
            if choice is not None:
                raise InvalidArgument(f"volume {volume_id} has no undecided pivot to choose "
                                      "for; repair it without a choice")
            done = []
            if meta.operation is not None and record_problems(files, meta.operation,
                                                              meta.active):
                # a record naming foreign files is never acted on; the chain on disk is
                # rebuilt from the image headers, as for any other damage
                meta = meta.evolve(operation=None)
                done.append("discarded the untrusted operation record of the metadata file")
            if meta.state != "available" or meta.operation is not None:
                raise InvalidState(f"volume {volume_id} is busy; repair needs an idle volume")
            done += await self.repairs.repair(files, meta, fmt)
            return done + [f"metadata file brought in line with the share: {line}" for line
                           in record_changes(before, self.store.find(volume_id))]

    # ---- recovery ------------------------------------------------------------------------

    async def recover(self) -> None:
        """At start: finish or undo every operation a crash interrupted."""
        await reread_inflight(self.store)
        await self.take_over()

    async def take_over(self) -> None:
        """Finish or undo the interrupted operations this host owns, and those of hosts no
        longer in the group, each under the volume's lock; a live host's is left to it."""
        mine = self.store.host_id
        alive = {mine}
        if self.coordination is not None:
            alive = await self.coordination.members()
            await asyncio.to_thread(reread_foreign_operations, self.store)
        for meta in list(self.store.volumes.values()):
            if not (meta.state in ("creating", "deleting") or meta.operation) \
                    or self.store.locks.busy(meta.id) \
                    or (meta.operation or {}).get("name") == GROUP_SNAPSHOT:  # as a whole
                continue
            owner = str((meta.operation or {}).get("host") or mine)
            if owner != mine and owner in alive:
                log.info("volume %s: its %s belongs to host %s, which is alive: left to it",
                         meta.id, (meta.operation or {}).get("name"), owner)
                continue
            try:
                async with self.store.locks.volume(meta.id):
                    # the share's record, not our picture: another host may have finished it
                    fresh = await self.store.refresh(meta.id, ours_too=True)
                    if fresh is None or not (fresh.operation or fresh.state in (
                            "creating", "deleting")):
                        continue
                    meta, owner = fresh, str((fresh.operation or {}).get("host") or mine)
                    if owner != mine and self.coordination is not None and \
                            owner in await self.coordination.members():  # alive again
                        continue
                    if owner != mine and meta.operation is not None:
                        await self._require_unlocked(meta, owner)
                        log.warning("volume %s: taking over the interrupted %s of host %s, "
                                    "which left the group", meta.id, meta.operation.get("name"),
                                    owner, extra={"VOLUME_ID": meta.id})
                        meta = await self.store.record(self.store.files_of(meta), meta.evolve(
                            operation={**meta.operation, "host": mine,
                                       "taken_over_from": owner}))
                    await self._resume(meta)
            except Exception as exc:  # one volume's trouble must not stop the others
                log.error("recovery of volume %s failed, left as it is: %s", meta.id, exc,
                          exc_info=not isinstance(exc, HostvoldError),
                          extra={"VOLUME_ID": meta.id})
        await self.groups.recover(alive)
        await self.group_changes.finish_marked()

    async def _require_unlocked(self, meta: VolumeMeta, owner: str) -> None:
        """A second fence: no file of the volume still held by the departed host's qemu-img."""
        locked = await share_call(self.store, meta, locked_images, self.store.files_of(meta))
        if locked:
            raise Busy(f"volume {meta.id}: {', '.join(locked)} still locked by another process "
                       f"(host {owner}'s qemu-img?); tried again when hosts join or leave")

    async def _resume(self, meta: VolumeMeta) -> None:
        """One volume's interrupted operation, finished or undone (an offline step waits
        while a domain runs on it); definitions follow the chain afterwards."""
        name = str((meta.operation or {}).get("name", ""))
        if self.live is not None and meta.operation and not name.startswith("live-"):
            users = await self.live.attachments.users(self.store.files_of(meta), meta.id)
            users.refuse_live(f"finish {name} on", meta.id)
        await self.store.resume(meta)
        if self.store.find(meta.id) is not None and meta.operation:
            await self.access.follow_definitions(self.store.files_of(meta), meta.id)
