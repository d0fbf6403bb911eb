"""Following the other hosts through etcd: every committed change of a volume is announced
on its key, and a change announced by another host refreshes just that volume from the share
(cheap: two small reads); when a host leaves the group, what it
left unfinished is taken over. Event-driven: etcd watches, no polling."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any

from hostvold.core.layout import VolumeFiles
from hostvold.ops.operations import Operations
from hostvold.ops.store import VolumeStore
from hostvold.storage.clusterlocks import ClusterLocks
from hostvold.storage.coordination import Coordination

log = logging.getLogger(__name__)


class ClusterFollower:
    def __init__(self, store: VolumeStore, ops: Operations, coordination: Coordination,
                 catch_up: Callable[[], None]) -> None:
        self.store = store
        self.ops = ops
        self.coordination = coordination
        self.catch_up = catch_up  # announcements may have been missed: read the shares again
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stops: list[Callable[[], None]] = []
        self._changed_under_lock: set[str] = set()
        self._again: dict[str, bool] = {}  # volume id -> announced again during its refresh
        self._after_release: set[str] = set()  # announced while this host had the lock's use

    async def start(self) -> None:
        self.store.change_listeners.append(self._changed_here)
        if isinstance(self.store.locks, ClusterLocks):
            self.store.locks.on_released.append(self._released)
        self._stops.append(self.coordination.watch(self._changed_elsewhere, self.catch_up))
        self._stops.append(self.coordination.watch_members(self._members_changed))

    def _members_changed(self) -> None:
        """A host joined or left. One that left may have died between finishing a change
        and announcing it: its work is taken over at once, and the shares are read again
        (only what changed since the last read is looked at)."""
        self._spawn(self.ops.take_over())
        self.catch_up()

    def announce(self, volume_ids: list[str]) -> None:
        """Tell the other hosts of changes made before this follower started."""
        for volume_id in volume_ids:
            self._changed_here(volume_id)

    def stop(self) -> None:
        for stop in self._stops:
            try:
                stop()
            except Exception:  # the watch's connection may already be gone
                log.debug("stopping a watch failed", exc_info=True)
        for task in self._tasks:
            task.cancel()

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _changed_here(self, volume_id: str) -> None:
        """Tell the other hosts, once per operation: while this host holds the volume's
        lock no other host may act on it, so its steps are announced together when the
        lock is let go (one etcd write, off the operation's path)."""
        if self.store.locks.busy(volume_id):
            self._changed_under_lock.add(volume_id)
        else:
            self._spawn(self.coordination.announce(volume_id))

    def _released(self, volume_id: str) -> None:
        if self.store.locks.busy(volume_id):
            return
        if volume_id in self._changed_under_lock:
            self._changed_under_lock.discard(volume_id)
            self._spawn(self.coordination.announce(volume_id))
        if volume_id in self._after_release:
            self._after_release.discard(volume_id)
            self._follow(volume_id)

    def _changed_elsewhere(self, volume_id: str, host: str) -> None:
        if host != self.coordination.host_id:
            self._follow(volume_id)

    def _follow(self, volume_id: str) -> None:
        if volume_id in self._again:  # its refresh is under way: one more after it
            self._again[volume_id] = True
            return
        self._again[volume_id] = False
        self._spawn(self._refresh_until_quiet(volume_id))

    async def _refresh_until_quiet(self, volume_id: str) -> None:
        """One refresh of a volume at a time, and one more for whatever was announced
        while it ran: two refreshes side by side could finish out of order, and an older
        read (the volume still there) would undo a newer one (it is gone)."""
        try:
            while True:
                self._again[volume_id] = False
                await self._refresh(volume_id)
                if not self._again[volume_id]:
                    return
        finally:
            del self._again[volume_id]

    async def _refresh(self, volume_id: str) -> None:
        """Another host changed the volume: read it again from its share. Not under the
        volume's lock (the other host may still hold it): a picture taken mid-operation is
        corrected by the next announcement, and an in-flight record is never rewritten.
        While this host uses the lock itself the read waits for its release."""
        if self.store.locks.busy(volume_id):
            # our own use of the lock (an operation, a look, one refused as Busy) may not
            # have read what was announced: read it once the lock is let go
            self._after_release.add(volume_id)
            return
        try:
            share = None
            if self.store.find(volume_id) is None:  # made elsewhere: find its share
                for candidate in self.store.mounted_shares():
                    meta = VolumeFiles.of(candidate.mount_point, self.store.naming,
                                          volume_id).meta
                    if await candidate.io.run(os.path.lexists, meta):
                        share = candidate
                        break
                else:
                    return
            await self.store.refresh(volume_id, share)
        except Exception as exc:
            log.warning("refreshing volume %s after a change on another host failed: %s",
                        volume_id, exc, extra={"VOLUME_ID": volume_id})
