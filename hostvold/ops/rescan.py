"""Fresh views without a coordination backend (SPEC section 8).

Every ``rescan_interval`` seconds the daemon stats each mounted share directory. A
volume's files all live in that directory, so creating or removing a volume or an overlay,
or rewriting an info or metadata file (atomically, by rename) changes the directory's
modification time. Only then is that share's listing read again: volumes that appeared are
read (or adopted, when Cinder made them), volumes whose files are gone are forgotten, and
volumes whose files changed are refreshed (:meth:`VolumeStore.refresh`). Every change
reaches the D-Bus objects through the store's change listeners. Unchanged volumes cost
nothing but their entries in the listing and a stat of their metadata and info files.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from hostvold.core.errors import Busy, HostvoldError, StorageUnavailable
from hostvold.core.layout import Naming, VolumeFiles
from hostvold.ops.startup import adopt
from hostvold.ops.store import VolumeStore
from hostvold.storage.mounts import Share

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Seen:
    """One volume's files in a listing: names, with the mtimes of its metadata and info
    files (0 for images: their names are what matters)."""

    files: tuple[tuple[str, int], ...]

    def has(self, name: str) -> bool:
        return any(entry == name for entry, _ in self.files)


def list_share(directory: Path, naming: Naming) -> dict[str, Seen]:
    """Every volume with a file in ``directory``, by id (one readdir, two stats a volume)."""
    found: dict[str, list[tuple[str, int]]] = {}
    with os.scandir(directory) as entries:
        for entry in entries:
            name = entry.name
            volume_id = naming.volume_id_of_image(name) or naming.volume_id_of_meta(name)
            if volume_id is None and name.endswith(".info"):
                volume_id = naming.volume_id_of_base(name[:-len(".info")])
            if volume_id is None:
                continue
            mtime = 0
            if name.endswith((".meta", ".info")):
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime_ns
                except FileNotFoundError:
                    continue  # removed since the readdir
            found.setdefault(volume_id, []).append((name, mtime))
    return {volume_id: Seen(tuple(sorted(files))) for volume_id, files in found.items()}


class ShareRescanner:
    def __init__(self, store: VolumeStore) -> None:
        self.store = store
        self._mtimes: dict[str, int] = {}  # share id -> directory mtime last scanned in full
        self._seen: dict[str, Seen] = {}   # volume id -> its files when last in step

    async def prime(self) -> None:
        """At start, after the index was loaded (or rebuilt) and reconciled: remember what
        each share holds, and add the volumes made while this daemon was down."""
        for share in self.store.mounted_shares():
            await self._scan_if_changed(share, known_fresh=True)

    async def scan(self, share: Share) -> None:
        """One share read again in full (it came back after being away)."""
        self._mtimes.pop(share.id, None)
        await self._scan_if_changed(share)

    async def check(self) -> None:
        """One round: a stat of each mounted share directory; a changed one is rescanned."""
        for share in self.store.mounted_shares():
            await self._scan_if_changed(share)

    async def _scan_if_changed(self, share: Share, known_fresh: bool = False) -> None:
        try:  # the mtime taken before the listing: a change during the scan shows next time
            mtime = (await share.io.run(os.stat, share.mount_point)).st_mtime_ns
            if self._mtimes.get(share.id) == mtime:
                return
            listing = await share.io.run(list_share, share.mount_point, self.store.naming)
        except (OSError, HostvoldError) as exc:
            log.warning("rescan of share %s failed: %s", share.spec.address, exc)
            return
        if await self.rescan(share, listing, known_fresh):
            self._mtimes[share.id] = mtime

    async def rescan(self, share: Share, listing: dict[str, Seen],
                     known_fresh: bool = False) -> bool:
        """Bring the store in line with one share's listing; False when a volume had to be
        left for the next round (an operation of this daemon holds it, or a read failed)."""
        store, address = self.store, share.spec.address
        ids = set(listing) | {m.id for m in store.volumes.values() if m.share == address}
        complete = True
        for volume_id in sorted(ids):
            seen, known = listing.get(volume_id), store.find(volume_id)
            if known is not None and known.share != address:
                continue  # the same id on another share: that share's volume
            if known is not None and seen is not None and (
                    known_fresh or self._seen.get(volume_id) == seen):
                self._seen[volume_id] = seen
                continue
            if store.locks.busy(volume_id):
                complete = False  # our own operation holds it: looked at next round
                continue
            try:
                # never behind another host's operation (its announcement follows it)
                async with store.locks.volume(volume_id, wait=False, brief=True):
                    await self._sync(share, volume_id, seen)
            except (StorageUnavailable, Busy) as exc:  # etcd or the share away, or another
                # host at work on it (its announcement follows): not in step, next round
                log.warning("volume %s on %s: %s", volume_id, address, exc,
                            extra={"VOLUME_ID": volume_id})
                complete = False
                continue
            except HostvoldError as exc:  # recorded as its problem, or hostile files
                log.warning("volume %s on %s: %s", volume_id, address, exc,
                            extra={"VOLUME_ID": volume_id})
            except OSError as exc:
                log.warning("volume %s on %s could not be read: %s", volume_id, address, exc,
                            extra={"VOLUME_ID": volume_id})
                complete = False
                continue
            if seen is None:
                self._seen.pop(volume_id, None)
            else:
                self._seen[volume_id] = seen
        return complete

    async def _sync(self, share: Share, volume_id: str, seen: Seen | None) -> None:
        """Under the volume's lock: refresh it; adopt a base file that has no metadata."""
        store = self.store
        known = store.find(volume_id)
        meta = await store.refresh(volume_id, share=share)
        files = VolumeFiles.of(share.mount_point, store.naming, volume_id)
        if meta is None and seen is not None and seen.has(files.base_name) \
                and not seen.has(files.meta.name):
            adopt(store, files, share)  # laid out by Cinder: described and recorded
            meta = await store.refresh(volume_id, share=share)
        if known is None and meta is not None:
            log.info("volume %s appeared on share %s (%d snapshots)", volume_id,
                     share.spec.address, len(meta.snapshots), extra={"VOLUME_ID": volume_id})
