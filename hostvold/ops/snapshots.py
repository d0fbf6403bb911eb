"""Snapshot steps on files no domain uses (``qemu-img`` only): create, delete at any
position, revert. Called by :mod:`hostvold.ops.operations` under the volume's lock.

Each is a small state machine recorded in the volume's metadata
(``operation={"name": ..., "step": ...}``) before each side effect. Every step is
idempotent, so recovery simply resumes at the recorded step.

create-snapshot (S, overlay O = ``volume-<id>.<S>``)
    ``overlay``: intent recorded; next: create O (empty, ``-u``, relative backing, format
    given), then write the info file (``active=O``, ``S=O``), then the metadata.
    Recovery: the info file decides. S in it: finish (metadata follows the info file).
    Not in it: remove O; the volume is as before.

delete-snapshot (S; top = info[S], base = its backing, higher = the layer above top)
    ``commit``: ``qemu-img commit -d top`` into base. Waits for qemu-img. Re-running it is
        harmless: top is unchanged and still shadows base, so every reader of the chain sees
        the same bytes. Next: ``relink``.
    ``relink``: ``qemu-img rebase -u`` higher onto base (metadata only), then the info file
        without S (``active=base`` when top was active), then the metadata. Next: ``remove``.
    ``remove``: unlink top, clear the operation.
    Recovery: resume at the recorded step (forward only: once commit may have started, the
    snapshot's own data is no longer guaranteed, while all other data is).

revert (to the newest snapshot S)
    ``replace``: intent recorded; an empty overlay on S's data is written under a temp name
    and renamed over info[S] (one atomic step). Recovery: remove temp files, clear it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from hostvold.core import crash
from hostvold.core.chainmap import SnapshotMap
from hostvold.core.changes import tombstoned
from hostvold.core.errors import InvalidState, NotFound
from hostvold.core.images import Layer
from hostvold.core.layout import VolumeFiles, temp_name
from hostvold.core.planning import plan_delete
from hostvold.core.records import VolumeMeta, utc_now
from hostvold.ops.store import VolumeStore, share_call
from hostvold.storage import qemuimg
from hostvold.storage.atomic import fsync_dir, unlink_durable
from hostvold.storage.files import make_overlay
from hostvold.storage.infofile import read_info, write_info
from hostvold.storage.qcow2 import pair_safe
from hostvold.storage.space import require_space
from hostvold.storage.volumefiles import allocated_bytes

log = logging.getLogger(__name__)


class SnapshotOps:
    def __init__(self, store: VolumeStore) -> None:
        self.store = store
        store.recoverers.update({
            "create-snapshot": self._recover_create,
            "delete-snapshot": self._resume_delete,
            "revert": self._recover_revert,
        })

    async def create(self, files: VolumeFiles, meta: VolumeMeta, chain_map: SnapshotMap,
                     chain: list[Layer], sid: str) -> VolumeMeta:
        store = self.store
        overlay = files.overlay_name(sid)
        meta = await store.record(files, meta.evolve(operation={
            "name": "create-snapshot", "snapshot": sid, "overlay": overlay, "step": "overlay"}))
        crash.point("create-snapshot:intent")
        new_map = chain_map.with_snapshot(sid, overlay)

        def link() -> None:  # in the overlay's trip to the share, once it is durable
            crash.point("create-snapshot:overlay")
            write_info(files, new_map, store.file_mode, [Layer(overlay, "qcow2"), *chain])

        try:
            await make_overlay(store.share_of(meta).io.run, files.directory / overlay,
                               meta.size, chain[0], store.file_mode, then=link)
            crash.point("create-snapshot:info")
        except BaseException:
            await self._recover_create(files, meta)
            raise
        return await store.record(files, meta.evolve(
            active=overlay, operation=None,
            snapshots={**meta.snapshots, sid: {"created": utc_now(), "quiesced": False}}))

    async def _recover_create(self, files: VolumeFiles, meta: VolumeMeta) -> None:
        assert meta.operation is not None
        sid, overlay = meta.operation["snapshot"], meta.operation["overlay"]
        chain_map = await share_call(self.store, meta, read_info, files)
        if chain_map.snapshots.get(sid) == overlay:  # the info file was written: finish
            await self.store.record(files, meta.evolve(
                active=chain_map.active, operation=None,
                snapshots={**meta.snapshots, sid: {"created": utc_now(), "quiesced": False}}))
        else:  # not taken: the overlay is new, empty and referenced by nothing
            await share_call(self.store, meta, unlink_durable, files.directory / overlay)
            await self.store.record(files, meta.evolve(operation=None))

    async def delete(self, files: VolumeFiles, meta: VolumeMeta, chain_map: SnapshotMap,
                     chain: list[Layer], sid: str) -> None:
        store = self.store
        plan = plan_delete(chain, chain_map, sid)
        # the chain is the validated header walk (every name, format and feature checked);
        # no tool opens the layers beyond the two the delete works on
        # the top's data lands in the base: at most its allocated bytes more on the share
        share = store.share_of(meta)
        top_size = await share.io.run(allocated_bytes, files.directory / plan.top.name)
        await require_space(share, top_size, f"deleting snapshot {sid} (its data "
                                  f"merged into {plan.base.name})")
        meta = await store.record(files, meta.evolve(operation={
            "name": "delete-snapshot", "snapshot": sid, "step": "commit",
            "top": plan.top.name, "base": plan.base.name, "base_format": plan.base.format,
            "higher": plan.higher.name if plan.higher else None},
            deleted=tombstoned(meta, chain, chain_map, sid)))
        crash.point("delete-snapshot:intent")
        await self._resume_delete(files, meta)

    async def _resume_delete(self, files: VolumeFiles, meta: VolumeMeta) -> None:
        """Run the delete from its recorded step to the end (also the recovery)."""
        op: dict[str, Any] = dict(meta.operation or {})
        directory = files.directory
        top, base, higher = op["top"], op["base"], op["higher"]
        if op["step"] == "commit":
            cache = await share_call(self.store, meta, qemuimg.write_cache, directory / base,
                                     op["base_format"])
            if await share_call(self.store, meta, pair_safe, directory / top, directory / base,
                                op["base_format"]):
                await qemuimg.commit_pair(directory / top, directory / base, op["base_format"],
                                          limits=self.store.limits, cache=cache)
            else:  # clusters that do not line up: qemu-img opens the chain below too
                await qemuimg.commit(directory / top, "qcow2", drop=True,
                                     limits=self.store.limits, cache=cache)
            crash.point("delete-snapshot:commit")
            op["step"] = "relink"
            meta = await self.store.record(files, meta.evolve(operation=op))
            crash.point("delete-snapshot:relink-recorded")
        if op["step"] == "relink":
            if higher is not None:
                await qemuimg.rebase_unsafe(directory / higher, "qcow2", base, op["base_format"],
                                            limits=self.store.limits)
                crash.point("delete-snapshot:rebase")
            chain_map = await share_call(self.store, meta, read_info, files)
            new_map = chain_map.without(op["snapshot"], active=base if higher is None else None)
            await share_call(self.store, meta, write_info, files, new_map, self.store.file_mode)
            crash.point("delete-snapshot:info")
            op["step"] = "remove"
            snapshots = {k: v for k, v in meta.snapshots.items() if k != op["snapshot"]}
            meta = await self.store.record(files, meta.evolve(active=new_map.active, operation=op,
                                                          snapshots=snapshots))
            crash.point("delete-snapshot:remove-recorded")
        if op["step"] == "remove":
            await share_call(self.store, meta, unlink_durable, directory / top)
            crash.point("delete-snapshot:unlinked")
            await self.store.record(files, meta.evolve(operation=None))

    async def revert(self, files: VolumeFiles, meta: VolumeMeta, chain_map: SnapshotMap,
                     chain: list[Layer], sid: str) -> None:
        """Throw away what was written since the newest snapshot."""
        store = self.store
        if sid not in chain_map.snapshots:
            raise NotFound(f"snapshot {sid} of volume {meta.id} does not exist")
        if chain_map.snapshots[sid] != chain_map.active:
            raise InvalidState(f"snapshot {sid} is not the newest snapshot of volume "
                               f"{meta.id}; delete the newer snapshots first")
        overlay, backing = chain[0], chain[1]
        meta = await store.record(files, meta.evolve(operation={
            "name": "revert", "snapshot": sid, "step": "replace"}))
        crash.point("revert:intent")
        target = files.directory / overlay.name
        tmp = temp_name(target)

        def replace() -> None:  # in the overlay's trip to the share, once it is durable
            crash.point("revert:overlay")
            os.replace(tmp, target)
            fsync_dir(files.directory)

        try:
            await make_overlay(store.share_of(meta).io.run, tmp, meta.size, backing,
                               store.file_mode, then=replace)
            crash.point("revert:replaced")
        finally:
            tmp.unlink(missing_ok=True)
            await store.record(files, meta.evolve(operation=None))

    async def _recover_revert(self, files: VolumeFiles, meta: VolumeMeta) -> None:
        # temp files are already gone; the overlay is either the old one or the new empty one
        await self.store.record(files, meta.evolve(operation=None))
