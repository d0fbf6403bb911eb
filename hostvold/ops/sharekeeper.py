"""What the daemon does when a share goes away and comes back (SPEC section 10).

A share goes away when the kernel says its network path is down (:mod:`.pathwatch`) or when
a call into it does not return in time (:mod:`.shareio`). From then on every call on its
volumes is refused at once, and its running jobs are stopped at their next recoverable
step (qemu-img is stopped; the operation stays recorded and is resumed later). When it
comes back, by the path's return or by a stuck call's answer, it is brought back without a
restart: mounted again if the mount went away, measured, rescanned, and the operations it
interrupted are resumed. A share whose mount failed is tried again, with back-off.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable

from hostvold.core.backoff import backoff
from hostvold.core.errors import HostvoldError, StorageUnavailable
from hostvold.ops.jobs import Job, JobRunner
from hostvold.ops.store import VolumeStore
from hostvold.storage.mounts import Share, ensure_mounted

log = logging.getLogger(__name__)

MOUNT_SECONDS = 30.0  # a mount that takes longer is killed and tried again later


async def mount_in_time(share: Share, attempts: int) -> None:
    """Mount ``share`` (never when its path is down), within a time limit."""
    if share.path == "unreachable":
        share.mounted, share.error = False, f"not mounted: {share.path_detail}"
        return
    try:
        await asyncio.wait_for(ensure_mounted(share, attempts), MOUNT_SECONDS)
    except TimeoutError:
        share.mounted, share.error = False, f"mount did not finish in {MOUNT_SECONDS:g} s"
        log.error("share %s: %s", share.spec.address, share.error)


async def probe(share: Share) -> bool:
    """Does the mounted share answer a ``statvfs`` in time? (A share that does not is
    marked hung by its pool, and comes back when that call returns.)"""
    if not share.mounted:
        return False
    try:
        await share.io.run(os.statvfs, share.mount_point)
    except (StorageUnavailable, OSError) as exc:
        log.error("share %s does not answer: %s", share.spec.address, exc)
        return False
    return True


class ShareKeeper:
    def __init__(self, store: VolumeStore, jobs: JobRunner, attempts: int,
                 bring_back: Callable[[Share], Awaitable[None]]) -> None:
        self.store = store
        self.jobs = jobs
        self.attempts = attempts
        self.bring_back = bring_back  # rescan and resume: the daemon's to say how
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._was_usable = {share.id: share.usable for share in store.shares}

    def watch(self) -> None:
        for share in self.store.shares:
            share.listeners.append(self._changed)
            if not share.mounted:
                self._start(share)

    def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()

    def _changed(self, share: Share) -> None:
        if not share.reachable:
            self._was_usable[share.id] = False
            reason = StorageUnavailable(
                f"share {share.spec.address} went away ({share.path_detail or share.hung}); "
                "the operation stopped at a recoverable step and is resumed when it is back")
            stopped = self.jobs.stop_where(lambda job: self._on(share, job), reason)
            if stopped:
                log.warning("share %s went away: %d running job(s) stopped",
                            share.spec.address, stopped)
        elif not self._was_usable.get(share.id):
            self._start(share)

    def _on(self, share: Share, job: Job) -> bool:
        """Does ``job`` work on a volume of ``share``?"""
        ids = {meta.id.replace("-", "_") for meta in self.store.volumes.values()
               if meta.share == share.spec.address}
        return any(path.rsplit("/", 1)[-1] in ids for path in job.objects)

    def _start(self, share: Share) -> None:
        if share.id not in self._tasks:
            task = asyncio.get_running_loop().create_task(self._return(share))
            self._tasks[share.id] = task
            task.add_done_callback(lambda _t: self._tasks.pop(share.id, None))

    async def _return(self, share: Share) -> None:
        """Mount (with back-off while it fails), check it answers, then bring it back."""
        pauses = backoff(1.0, 60.0)
        while share.reachable and not (share.mounted and await probe(share)):
            if not share.mounted:
                await mount_in_time(share, 1)
                if share.mounted:
                    continue
            await asyncio.sleep(next(pauses))  # a retry with back-off, not a poll
        if not share.usable:
            return  # it went away again: its next return starts over
        log.warning("share %s is back: rescanning it and resuming its operations",
                    share.spec.address)
        try:
            await self.bring_back(share)
        except HostvoldError as exc:
            log.error("share %s: bringing it back failed: %s", share.spec.address, exc)
            return
        self._was_usable[share.id] = True
