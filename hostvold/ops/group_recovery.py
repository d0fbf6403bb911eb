"""Group snapshots interrupted by a crash, a lost libvirt or a failed switch: each group
finished or undone as a whole, under all its members' locks (SPEC section 5a; the steps
are in :mod:`hostvold.ops.groups`).

Forward once the group's point in time was taken anywhere (a member finished or linked in
its info file, a running domain on its overlay, a gone domain's overlay written into): a
domain still on its old files is switched now (still paused under ``suspend``, so the point
holds) and every member is linked. Otherwise back: overlays removed, nothing anyone saw
changes. Thaws and resumes the dead run owed are always done.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

from hostvold.core import crash
from hostvold.core.chainmap import SnapshotMap
from hostvold.core.errors import Failed, HostvoldError, HypervisorError, HypervisorUnavailable
from hostvold.core.groups import member_extra
from hostvold.core.layout import VolumeFiles
from hostvold.core.records import VolumeMeta, utc_now
from hostvold.ops.store import share_call
from hostvold.storage.atomic import unlink_durable
from hostvold.storage.infofile import read_info, write_info
from hostvold.storage.qcow2 import qcow2_is_empty
from hostvold.storage.volumefiles import remove_temp_files
from hostvold.virt.guest import DiskInfo, Execution, Guest

if TYPE_CHECKING:
    from hostvold.ops.groups import GroupSnapshots

log = logging.getLogger(__name__)

NAME = "group-snapshot"
_NO_DISK = DiskInfo("", None, None, None, None, None)


class GroupRecovery:
    def __init__(self, groups: GroupSnapshots) -> None:
        self.groups = groups
        self.ops = groups.ops
        self.store = groups.store
        self.store.recoverers[NAME] = self._recover_member

    async def finish(self, meta: VolumeMeta, files: VolumeFiles, quiesced: bool,
                      paused: float | None = None, follow: bool | None = None) -> None:
        """The member's snapshot in its info file, then in its record with the group."""
        op = meta.operation or {}
        sid, overlay = op["snapshot"], op["overlay"]
        chain_map: SnapshotMap = await share_call(self.store, meta, read_info, files)
        if chain_map.snapshots.get(sid) != overlay:
            await share_call(self.store, meta, write_info, files,
                             chain_map.with_snapshot(sid, overlay), self.store.file_mode)
        crash.point("group-snapshot:member-info")
        extra = {"created": op.get("created") or utc_now(), "quiesced": quiesced,
                 **member_extra(op["group"], op["members"], op["consistency"], paused)}
        await self.store.record(files, meta.evolve(
            active=overlay, operation=None, snapshots={**meta.snapshots, sid: extra}))
        crash.point("group-snapshot:member-finished")
        if follow if follow is not None else "domain" not in op:
            await self.ops.access.follow_definitions(files, meta.id)

    # ---- recovery -------------------------------------------------------------------------

    async def _recover_member(self, files: VolumeFiles, meta: VolumeMeta) -> None:
        """A member is never recovered alone: its group is, under all its locks."""
        raise Failed(f"volume {meta.id} is a member of group snapshot "
                     f"{(meta.operation or {}).get('group')}, recovered as a whole")

    async def recover(self, alive: set[str] | None = None) -> None:
        """Every interrupted group whose host is this one or gone (``alive``: the hosts
        in the group; None: this one alone), each as a whole."""
        mine = self.store.host_id
        groups: dict[str, list[str]] = {}
        for meta in self.store.list_volumes():
            op = meta.operation or {}
            if op.get("name") != NAME or self.store.locks.busy(meta.id):
                continue
            owner = str(op.get("host") or mine)
            if owner != mine and owner in (alive or {mine}):
                continue
            groups.setdefault(str(op["group"]), sorted(op.get("members") or {meta.id: ""}))
        for group_id, volume_ids in groups.items():
            try:
                async with self.groups.locked(volume_ids):
                    fresh = [m for vid in volume_ids
                             if (m := await self.store.refresh(vid, ours_too=True)) is not None
                             and (m.operation or {}).get("group") == group_id]
                    for meta in fresh:  # writes the crash cut short
                        await share_call(self.store, meta, remove_temp_files,
                                         self.store.files_of(meta))
                    if fresh:
                        log.warning("recovery: group snapshot %s (%d members unfinished)",
                                    group_id, len(fresh), extra={"GROUP_ID": group_id})
                        await self.settle(fresh)
            except Exception as exc:  # one group's trouble must not stop the others
                log.error("recovery of group snapshot %s failed, left as it is: %s", group_id,
                          exc, exc_info=not isinstance(exc, HostvoldError))

    async def settle(self, metas: list[VolumeMeta], crashed: bool = True) -> None:
        """Finish or undo the group these unfinished members belong to (under their locks).
        ``crashed``: the run that took it died, and may have left guests frozen or paused."""
        if not metas:
            return
        forward = any((m.operation or {}).get("step") == "switch" for m in metas)
        live = self.ops.live
        guests: dict[str, Guest | None] = {}
        for meta in metas:
            domain = (meta.operation or {}).get("domain")
            if domain and domain not in guests:
                if live is None:
                    raise HypervisorUnavailable("a group member was live: libvirt is needed")
                guests[domain] = await live.attachments.running_guest(domain)
        forward = forward and await self._taken(metas, guests)
        if forward:
            await self._switch_left(metas, guests)
        owed = {str(d) for m in metas for d in (m.operation or {}).get("suspend", [])}
        for name in owed if crashed else ():  # paused for the switch by the run that died
            guest = guests.get(name)
            with contextlib.suppress(HypervisorError):
                if guest is not None and await Execution(guest).is_paused():
                    await Execution(guest).resume()
        for guest in guests.values() if crashed else ():
            if guest is not None and live is not None:
                with contextlib.suppress(HypervisorError):
                    await guest.thaw()  # the run that died may have frozen it
        for meta in metas:
            files, op = self.store.files_of(meta), meta.operation or {}
            at_rest = "domain" not in op or guests.get(str(op["domain"])) is None
            if forward:
                await self.finish(meta, files, False, follow=at_rest)
            else:
                await share_call(self.store, meta, unlink_durable, files.directory / op["overlay"])
                await self.store.record(files, meta.evolve(operation=None))
                if "domain" in op and at_rest:  # its definition may name the overlay
                    await self.ops.access.follow_definitions(files, meta.id)

    async def _taken(self, metas: list[VolumeMeta], guests: dict[str, Guest | None]) -> bool:
        """Whether the group's point in time has been taken anywhere: a member finished or
        in its info file, a running domain on its overlay, or the overlay of a domain gone
        written into. If not, undoing it changes nothing anyone has seen."""
        first = metas[0].operation or {}
        for volume_id, snapshot_id in (first.get("members") or {}).items():
            done = self.store.find(str(volume_id))
            if done is not None and snapshot_id in done.snapshots:
                return True
        for meta in metas:
            op, files = meta.operation or {}, self.store.files_of(meta)
            linked = await share_call(self.store, meta, read_info, files)
            if linked.snapshots.get(op["snapshot"]) == op["overlay"]:
                return True  # half-finished: its info file names it
            if "domain" not in op:
                continue
            path = files.directory / op["overlay"]
            guest = guests.get(op["domain"])
            if guest is None:
                if await share_call(self.store, meta, _written, path):
                    return True
            elif (await guest.disk(op["target"]) or _NO_DISK).source == str(path):
                return True
        return False

    async def _switch_left(self, metas: list[VolumeMeta],
                           guests: dict[str, Guest | None]) -> None:
        """Domains still running on their old files switch now, each in one call."""
        for name, guest in guests.items():
            if guest is None:
                continue  # gone: its members' files are at rest, linked offline
            disks = await guest.disks()
            batch = {str(op["target"]): str(self.store.files_of(m).directory / op["overlay"])
                     for m in metas if (op := m.operation or {}).get("domain") == name}
            left = {t: path for t, path in batch.items()
                    if next((d.source for d in disks if d.target == t), None) != path}
            if left:
                others = [d.target for d in disks if d.target not in left]
                await guest.snapshot_disks(left, others)
                log.warning("recovery: switched %s of domain %s to the group's overlays",
                            ", ".join(sorted(left)), name, extra={"DOMAIN": name})



def _written(path: Any) -> bool:
    return os.path.exists(path) and not qcow2_is_empty(path)
