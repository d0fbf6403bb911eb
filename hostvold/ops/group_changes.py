"""What is done to a group snapshot once taken: delete it, revert to it, make volumes of it.

Each works member by member through the ordinary snapshot use cases (a delete by each
member's own cheapest strategy, live or offline), so the whole-group promise comes from
marks written first on every member, under all their locks, in volume-id order:

- delete: every member's snapshot is marked ``group_deleting`` before the first is
  deleted; the group is shown as absent from then on, and a restart deletes every marked
  member still there.
- revert (detached members only): every member is checked (idle, detached, its snapshot
  the newest) and then marked ``group_reverting``; each revert clears its mark; a restart
  reverts every member still marked.
- create volumes: one new volume per member; on failure the ones made are removed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from hostvold.core import crash
from hostvold.core.errors import Busy, HostvoldError, InvalidState, NeedsRepair, NotFound
from hostvold.core.groups import DELETING, REVERTING, GroupView, collect_groups
from hostvold.core.records import VolumeMeta

if TYPE_CHECKING:
    from hostvold.ops.groups import GroupSnapshots

log = logging.getLogger(__name__)

BUSY_RETRIES = 20  # a member's delete waits this many times for another host's operation


class GroupChanges:
    def __init__(self, groups: GroupSnapshots) -> None:
        self.groups = groups
        self.ops = groups.ops
        self.store = groups.store

    def view(self, group_id: str) -> GroupView:
        view = collect_groups(self.store.list_volumes()).get(group_id)
        if view is None:
            raise NotFound(f"group snapshot {group_id} does not exist")
        return view

    def whole(self, group_id: str) -> GroupView:
        """The group, every member there and none being deleted."""
        view = self.view(group_id)
        if view.deleting:
            raise InvalidState(f"group snapshot {group_id} is being deleted")
        if view.problems:
            raise NeedsRepair(f"group snapshot {group_id} is not whole: "
                              f"{'; '.join(view.problems)}")
        return view

    def _present(self, view: GroupView) -> list[tuple[str, str]]:
        return [(m.volume_id, m.snapshot_id) for m in view.members
                if m.volume_id in view.present]

    async def _mark(self, volume_id: str, snapshot_id: str, mark: str, on: bool) -> VolumeMeta:
        """Set or clear a mark on a member's snapshot record (under its lock)."""
        meta = self.store.get_volume(volume_id)
        extra = dict(meta.snapshots.get(snapshot_id) or {})
        if snapshot_id not in meta.snapshots or bool(extra.get(mark)) == on:
            return meta
        if on:
            extra[mark] = True
        else:
            extra.pop(mark, None)
        return await self.store.record(self.store.files_of(meta), meta.evolve(
            snapshots={**meta.snapshots, snapshot_id: extra}))

    # ---- delete ---------------------------------------------------------------------------

    async def delete(self, group_id: str) -> None:
        view = self.view(group_id)
        members = self._present(view)
        async with self.groups.locked([v for v, _ in members]):
            for volume_id, snapshot_id in members:
                await self.ops.access.observe(volume_id, damaged_ok=True)
                await self._mark(volume_id, snapshot_id, DELETING, True)
        crash.point("group-delete:marked")
        failed: list[HostvoldError] = []
        for volume_id, snapshot_id in members:  # each by its own strategy, under its lock
            try:
                await self._delete_member(volume_id, snapshot_id)
            except HostvoldError as exc:  # the others go on; this one at the next start
                log.error("group %s: deleting snapshot %s of volume %s failed: %s", group_id,
                          snapshot_id, volume_id, exc, extra={"VOLUME_ID": volume_id})
                failed.append(exc)
            crash.point("group-delete:member")
        if failed:
            raise failed[0]
        log.info("deleted group snapshot %s (%d members)", group_id, len(members),
                 extra={"GROUP_ID": group_id})

    async def _delete_member(self, volume_id: str, snapshot_id: str) -> None:
        """One member, waiting its turn behind another host's operation on the volume
        (the delete of another group sharing it), as the group's locks were waited for."""
        for _ in range(BUSY_RETRIES):
            try:
                return await self.ops.delete_snapshot(volume_id, snapshot_id)
            except Busy:
                async with self.groups.locked([volume_id]):
                    pass  # released by the other host: try again
        await self.ops.delete_snapshot(volume_id, snapshot_id)

    # ---- revert ---------------------------------------------------------------------------

    async def revert(self, group_id: str) -> None:
        members = self._present(self.whole(group_id))
        async with self.groups.locked([v for v, _ in members]):
            for volume_id, snapshot_id in members:  # all checked before any is changed
                _meta, files, users = await self.ops.access.observe(volume_id)
                users.refuse_live("revert", volume_id)
                meta = self.store.require_available(volume_id)
                chain_map, _chain = await self.store.validated_chain(files, meta, fresh=True)
                if chain_map.snapshots.get(snapshot_id) != chain_map.active:
                    raise InvalidState(f"snapshot {snapshot_id} of member {volume_id} is not "
                                       "its newest; delete the newer snapshots first")
            for volume_id, snapshot_id in members:
                await self._mark(volume_id, snapshot_id, REVERTING, True)
            crash.point("group-revert:marked")
            for volume_id, snapshot_id in members:
                await self._revert_member(volume_id, snapshot_id)
                crash.point("group-revert:member")
        log.info("reverted %d volumes to group snapshot %s", len(members), group_id,
                 extra={"GROUP_ID": group_id})

    async def _revert_member(self, volume_id: str, snapshot_id: str) -> None:
        meta = self.store.get_volume(volume_id)
        files = self.store.files_of(meta)
        chain_map, chain = await self.store.validated_chain(files, meta)
        await self.ops.snapshots.revert(files, meta, chain_map, chain, snapshot_id)
        await self._mark(volume_id, snapshot_id, REVERTING, False)

    # ---- new volumes ----------------------------------------------------------------------

    async def create_volumes(self, group_id: str, **options: Any) -> list[VolumeMeta]:
        """A standalone volume of each member's point in time (``share``: where); all are
        made or none is kept."""
        made: list[VolumeMeta] = []
        try:
            for volume_id, snapshot_id in self._present(self.whole(group_id)):
                made.append(await self.ops.create_from_snapshot(volume_id, snapshot_id,
                                                                **options))
        except BaseException:
            for meta in made:
                try:
                    await self.ops.delete_volume(meta.id)
                except HostvoldError as exc:
                    log.error("removing volume %s of a failed group copy: %s", meta.id, exc)
            raise
        return made

    # ---- after a restart ------------------------------------------------------------------

    async def finish_marked(self) -> None:
        """Deletes and reverts of groups that a restart cut short, finished."""
        for meta in self.store.list_volumes():
            for snapshot_id, extra in meta.snapshots.items():
                if not (extra.get(DELETING) or extra.get(REVERTING)) \
                        or self.store.locks.busy(meta.id):
                    continue
                try:
                    if extra.get(DELETING):
                        log.warning("finishing the group delete of snapshot %s of volume %s",
                                    snapshot_id, meta.id, extra={"VOLUME_ID": meta.id})
                        await self.ops.delete_snapshot(meta.id, snapshot_id)
                    else:
                        async with self.groups.locked([meta.id]):
                            log.warning("finishing the group revert of volume %s", meta.id,
                                        extra={"VOLUME_ID": meta.id})
                            await self.ops.access.observe(meta.id)
                            self.store.require_available(meta.id)
                            await self._revert_member(meta.id, snapshot_id)
                except Exception as exc:
                    log.error("group change of volume %s left for later: %s", meta.id, exc,
                              exc_info=not isinstance(exc, HostvoldError))
