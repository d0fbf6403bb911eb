"""The volume store: the one place that owns volume state.

It holds the in-memory map of volumes (from the index, a cache of the shares), reads and
writes each volume's records, takes the per-volume locks, names the files, validates the
chain, and keeps the registry of recovery steps. The use cases, offline (``ops.volumes``,
``ops.snapshots``) and live (``ops.live``), build on it and never on each other.

Every multi-step operation records its intent before its first side effect: a row in the
index's ``inflight`` table (a restart re-reads those volumes), then the metadata file.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from hostvold.core import crash
from hostvold.core.chainmap import SnapshotMap
from hostvold.core.config import Config
from hostvold.core.errors import (
    AlreadyExists,
    Failed,
    HostvoldError,
    InfoFileDamaged,
    InvalidState,
    NeedsRepair,
    NoSpace,
    NotFound,
    StorageUnavailable,
    UnsafeFile,
    UntrustedRecord,
)
from hostvold.core.ids import valid_id
from hostvold.core.images import Format, Layer
from hostvold.core.layout import Naming, VolumeFiles, record_problems
from hostvold.core.planning import chain_problems
from hostvold.core.reconcile import busy, merge_record, record_changes
from hostvold.core.records import Snapshot, VolumeMeta, snapshot_of, utc_now
from hostvold.core.shares import Candidate, Placement, choose_share
from hostvold.storage import children
from hostvold.storage.atomic import unlink_durable
from hostvold.storage.chainview import observe_chain
from hostvold.storage.files import is_enospc
from hostvold.storage.index import VolumeIndex
from hostvold.storage.infofile import read_info
from hostvold.storage.locks import LocalLocks
from hostvold.storage.metadata import read_record, write_meta
from hostvold.storage.mounts import Share, find_share
from hostvold.storage.qcow2 import validate_chain
from hostvold.storage.qemuimg import Limits
from hostvold.storage.space import measure
from hostvold.storage.volumefiles import own_file, remove_temp_files, remove_volume_files

log = logging.getLogger(__name__)

Recoverer = Callable[[VolumeFiles, VolumeMeta], Awaitable[None]]
T = TypeVar("T")


class VolumeStore:
    def __init__(self, config: Config, shares: list[Share], index: VolumeIndex,
                 locks: LocalLocks, file_mode: int) -> None:
        self.config, self.shares, self.index, self.locks = config, shares, index, locks
        self.file_mode, self.naming = file_mode, Naming(config.volumes.volume_name_template)
        self.limits = Limits(config.limits.qemu_img_cpu_seconds,
                             config.limits.qemu_img_address_space)
        self.placement = Placement(config.volumes.reserved_percentage,
                                   config.volumes.max_over_subscription_ratio)
        self.host_id = config.coordination.host  # stamped on operations and attachments
        self.volumes: dict[str, VolumeMeta] = {}
        # operation name -> the step that finishes or undoes it after a crash
        self.recoverers: dict[str, Recoverer] = {}
        # told the id of every volume whose record changed (the D-Bus objects follow)
        self.change_listeners: list[Callable[[str], None]] = []
        # the chain a refresh just walked, for the operation that asked (validated_chain)
        self.just_read: dict[str, tuple[SnapshotMap, list[Layer]]] = {}

    # ---- what is there ----------------------------------------------------------------

    def list_volumes(self) -> list[VolumeMeta]:
        return sorted(self.volumes.values(), key=lambda meta: meta.id)

    def find(self, volume_id: str | None) -> VolumeMeta | None:
        """The volume with this (already valid) id, or None: for lookups that may miss."""
        return self.volumes.get(volume_id) if volume_id else None

    def get_volume(self, volume_id: str) -> VolumeMeta:
        volume_id = valid_id(volume_id, "volume id")
        try:
            return self.volumes[volume_id]
        except KeyError:
            raise NotFound(f"volume {volume_id} does not exist") from None

    def mounted_shares(self) -> list[Share]:
        """The shares that can be used now: mounted, their path up, answering."""
        return [share for share in self.shares if share.usable]

    def share_of(self, meta: VolumeMeta) -> Share:
        share = find_share(self.shares, meta.share)
        share.require()
        return share

    def files_of(self, meta: VolumeMeta) -> VolumeFiles:
        return VolumeFiles.of(self.share_of(meta).mount_point, self.naming, meta.id)

    async def list_snapshots(self, volume_id: str) -> list[Snapshot]:
        meta = self.get_volume(volume_id)
        chain_map = await self.share_of(meta).io.run(read_info, self.files_of(meta))
        return sorted((snapshot_of(meta, chain_map.snapshots[sid], sid)
                       for sid in chain_map.snapshots), key=lambda s: (s.created, s.id))

    # ---- what a use case may act on ---------------------------------------------------------

    def require_idle(self, volume_id: str) -> VolumeMeta:
        """An available or attached volume with no operation under way and no problem."""
        meta = self.get_volume(volume_id)
        if meta.state == "in-use":
            if meta.operation is not None:
                raise InvalidState(f"volume {volume_id} has an interrupted "
                                   f"{meta.operation['name']} that must finish first")
            if meta.problems:
                raise NeedsRepair(f"volume {volume_id} needs a repair: "
                                  f"{'; '.join(meta.problems)}")
            return meta
        return self.require_available(volume_id)

    def require_available(self, volume_id: str) -> VolumeMeta:
        meta = self.get_volume(volume_id)
        if meta.state != "available":
            raise InvalidState(f"volume {volume_id} is {meta.state}; this needs an "
                               "available (detached, idle) volume")
        if meta.operation is not None:
            raise InvalidState(f"volume {volume_id} has an interrupted {meta.operation['name']} "
                               "that must finish first (it is resumed at the next start)")
        if meta.problems:
            raise NeedsRepair(f"volume {volume_id} needs a repair: {'; '.join(meta.problems)}")
        return meta

    async def validated_chain(self, files: VolumeFiles, meta: VolumeMeta,
                              fresh: bool = False) -> tuple[SnapshotMap, list[Layer]]:
        """The info file and the chain from its active file down, checked against each other.

        No process is spawned: the chain is read from the image headers. A mismatch (a
        damaged info file, a missing or foreign layer) is recorded on the volume as a health
        problem and raised as NeedsRepair; nothing else is done. ``fresh``: the caller holds
        the volume's lock since its refresh, whose walk is used instead of a second one.
        """
        def read() -> tuple[SnapshotMap, list[Layer]]:
            chain_map = read_info(files)
            top_format = meta.format if chain_map.active == files.base_name else "qcow2"
            return chain_map, validate_chain(files, chain_map.active, top_format)

        walked = self.just_read.pop(meta.id, None) if fresh else None
        try:
            chain_map, chain = walked if walked else await self.share_of(meta).io.run(read)
        except (InfoFileDamaged, UnsafeFile) as exc:  # a symlink, a device: a named problem
            await self.record(files, meta.evolve(problems=[exc.message]))
            raise
        except FileNotFoundError as exc:
            missing = Path(str(exc.filename)).name
            problems = [f"{missing}, a file of the chain, is missing"]
        else:  # a walk of the refresh was kept only when it found nothing wrong
            problems = [] if walked else chain_problems(files, chain, chain_map)
        if problems:
            await self.record(files, meta.evolve(problems=problems))
            raise NeedsRepair(f"volume {meta.id} needs a repair: {'; '.join(problems)}")
        return chain_map, chain

    # ---- the share's word ---------------------------------------------------------------

    async def refresh(self, volume_id: str, share: Share | None = None,
                      top_only: bool = False, ours_too: bool = False) -> VolumeMeta | None:
        """The volume re-read from its share (in its pool) and reconciled; None when it is
        not a volume. The info file and chain decide the snapshots and the active file, the
        metadata file the rest; a volume whose base file is gone is forgotten, unless its record
        says it is being created or deleted (recovery finishes that). Left as they
        are: this host's own operation under way (unless ``ours_too``: a recovery under the
        lock, as another host may have taken it over), another writer's in-flight record.
        Damaged files are recorded as a problem, then raised. ``top_only``: see
        :func:`observe_chain` (a snapshot create)."""
        known = self.volumes.get(volume_id)
        self.just_read.pop(volume_id, None)  # only this refresh's own walk may be used
        walked: list[tuple[SnapshotMap, list[Layer]]] = []
        if known is not None and self.index.is_inflight(volume_id) and not ours_too \
                and self.locks.busy(volume_id):  # a note of no running one: the share says
            return known
        if share is None:
            share = next((s for s in self.shares if known and s.spec.address == known.share),
                         None)
        if share is None or not share.usable:
            return known  # its share is down: nothing to read now
        files = VolumeFiles.of(share.mount_point, self.naming, volume_id)
        address = share.spec.address

        def read() -> tuple[VolumeMeta | None, bool, VolumeMeta | None, HostvoldError | None]:
            on_share = read_record(share, files.meta, volume_id) \
                if os.path.lexists(files.meta) else None
            if not os.path.lexists(files.base) and not (
                    on_share and on_share.state in ("creating", "deleting")):
                return on_share, True, None, None  # not a volume (a delete cut short is)
            meta = on_share or known
            if meta is None:
                return on_share, False, None, None
            if meta.share != address:
                meta = meta.evolve(share=address)
            if busy(meta):
                return on_share, False, meta, None
            view = observe_chain(files, meta.format, set(meta.snapshots), top_only)
            if view.chain_map is not None and view.chain and not view.problems:
                walked.append((view.chain_map, view.chain))
            return on_share, False, merge_record(meta, view), view.error

        on_share, gone, found, error = await share.io.run(read)
        if gone:
            await self._gone(share, files, known, on_share)
            return None
        if found is None:
            return None
        meta = found
        changes = record_changes(known, meta) if known is not None else []
        if changes:
            log.warning("volume %s changed on share %s: %s", volume_id, share.spec.address,
                        "; ".join(changes), extra={"VOLUME_ID": volume_id})
        if meta != on_share and not busy(meta):
            await self.record(files, meta)
        elif meta != known:  # the share's record as it is: memory and index follow
            self.index.queue_put(meta)
            self.volumes[volume_id] = meta
            self._changed(volume_id)
        if error is not None:
            raise error
        if walked:
            self.just_read[volume_id] = walked[0]
        return meta

    async def _gone(self, share: Share, files: VolumeFiles, known: VolumeMeta | None,
                    on_share: VolumeMeta | None) -> None:
        """The base file is gone: not a volume. An idle leftover metadata file goes too."""
        if on_share is not None and not busy(on_share):
            await share.io.run(unlink_durable, files.meta)
        if known is not None:
            log.warning("volume %s: its base file %s is gone from %s; forgotten", known.id,
                        files.base_name, known.share, extra={"VOLUME_ID": known.id})
            await self.forget(known.id)

    # ---- changing files and records ---------------------------------------------------------

    async def record(self, files: VolumeFiles, meta: VolumeMeta) -> VolumeMeta:
        """Persist ``meta``: an in-flight note in the index first when an operation is under
        way, then the metadata file on the share (atomically, in the share's pool), then
        memory and, once the operation ended, the index (a restart re-reads a noted volume)."""
        meta = meta.stamped(self.host_id)
        busy = meta.operation is not None or meta.state in ("creating", "deleting")
        share = find_share(self.shares, meta.share)
        share.require_reachable()  # refused before the in-flight note, not after it
        # a host whose lock or lease lapsed writes nothing more: checked before, at the
        # rename (a stall may come between) and after (then it is not acknowledged)
        still_ours = functools.partial(self.locks.check, meta.id)
        still_ours()
        children.recorded(meta.id, meta.operation)
        if busy:  # durable before the share hears of the operation (a no-op once noted)
            await self.index.note_inflight(meta.id, meta.share)
        text = await share.io.run(write_meta, files.meta, meta, self.file_mode, still_ours)
        still_ours()
        if not busy:  # a cache of the share: not waited for
            self.index.queue_put(meta, text=text)
        self.volumes[meta.id] = meta
        self._changed(meta.id)
        return meta

    async def forget(self, volume_id: str) -> None:
        self.index.queue_remove(volume_id)
        self.volumes.pop(volume_id, None)
        self._changed(volume_id)

    def _changed(self, volume_id: str) -> None:
        for listener in self.change_listeners:
            try:
                listener(volume_id)
            except Exception:
                log.exception("change listener failed for volume %s", volume_id)

    async def create_new(self, volume_id: str, size: int, fmt: Format, thin: bool,
                         share_name: str | None, make: Callable[[Path], Awaitable[None]], *,
                         operation: str, space_needed: int = 0) -> VolumeMeta:
        """Create a volume whose image ``make`` writes; undone completely on any failure.

        ``create``/``import``/``clone``/``create-from-snapshot``: ``intent`` (metadata
        ``state=creating`` written) -> ``made`` (image written) -> done. Recovery: the
        caller never heard of success, so every file of the new volume is removed."""
        async with self.locks.volume(volume_id):
            await self._require_new(volume_id)
            share = await self._pick_share(size, thin, share_name, space_needed)
            files = VolumeFiles.of(share.mount_point, self.naming, volume_id)
            meta = VolumeMeta(id=volume_id, size=size, format=fmt,
                              provisioning="thin" if thin else "thick", created=utc_now(),
                              state="creating", share=share.spec.address,
                              active=files.base_name, operation={"name": operation})
            try:
                await self.record(files, meta)  # the durable intent, before the image exists
                crash.point(f"{operation}:intent")
                await make(files.base)
                share.tally(await share.io.run(own_file, files.base, self.file_mode))
                crash.point(f"{operation}:made")
                meta = await self.record(files, meta.evolve(state="available", operation=None))
            except BaseException as exc:  # a lapsed lock: the record stays, for whoever
                if (lapsed := self.locks.lapsed(volume_id)) is not None:  # holds it now
                    raise (lapsed if isinstance(exc, Exception) else exc) from None
                with contextlib.suppress(StorageUnavailable):  # then recovery removes them
                    await share.io.run(remove_volume_files, files)
                    await self.forget(volume_id)
                if is_enospc(exc) and not isinstance(exc, NoSpace):
                    raise NoSpace(f"share {share.spec.address} ran out of space while "
                                  f"creating volume {volume_id}") from None
                raise
            log.info("created volume %s (%d bytes, %s, %s) on %s", volume_id, size, fmt,
                     meta.provisioning, share.spec.address, extra={"VOLUME_ID": volume_id})
            return meta

    async def _pick_share(self, size: int, thin: bool, share_name: str | None,
                          space_needed: int) -> Share:
        shares = self.mounted_shares()
        if share_name is not None:
            shares = [s for s in self.shares if share_name in (s.id, s.spec.address)]
            if not shares:
                raise NotFound(f"share {share_name!r} is not configured")
            shares[0].require()
        candidates = []
        for share in shares:
            try:
                measured = await measure(share, self.naming, self.volumes.values(),
                                         rescan=False)
            except StorageUnavailable as exc:
                if share_name is not None:
                    raise
                log.warning("share %s left out of placement: %s", share.spec.address, exc)
                continue
            candidates.append(Candidate(share.spec, measured))
        chosen = choose_share(candidates, size, not thin, self.placement)
        if space_needed > chosen.capacity.free:
            raise NoSpace(f"share {chosen.spec.address} has {chosen.capacity.free} bytes free; "
                          f"{space_needed} are needed")
        return next(s for s in shares if s.spec == chosen.spec)

    async def _require_new(self, volume_id: str) -> None:
        if volume_id in self.volumes:
            raise AlreadyExists(f"volume {volume_id} already exists")
        for share in self.mounted_shares():  # three lookups, not a scan of the share
            files = VolumeFiles.of(share.mount_point, self.naming, volume_id)
            if await share.io.run(lambda f=files: any(os.path.lexists(path) for path in (
                    f.base, f.info, f.meta))):
                raise AlreadyExists(f"files of volume {volume_id} already exist on "
                                    f"{share.spec.address}")

    # ---- recovery -------------------------------------------------------------------------

    async def resume(self, meta: VolumeMeta) -> None:
        """Finish or undo the interrupted operation of one volume, by its registered step.

        A volume left ``creating`` or ``deleting`` is removed; a record that names files
        which are not the volume's own is never acted on (a named problem instead)."""
        try:
            files = self.files_of(meta)
        except HostvoldError:
            return  # its share is down; recovered when it comes back
        share = self.share_of(meta)
        await share.io.run(remove_temp_files, files)
        if meta.state in ("creating", "deleting"):
            log.warning("recovery: removing volume %s left in state %s", meta.id, meta.state)
            share.tally(-await share.io.run(remove_volume_files, files))
            await self.forget(meta.id)
            return
        assert meta.operation is not None
        untrusted = record_problems(files, meta.operation, meta.active)
        if untrusted:  # the record names files that are not the volume's: touch nothing
            if set(untrusted) - set(meta.problems):
                await self.record(files, meta.evolve(problems=[*meta.problems, *untrusted]))
            log.error("recovery: volume %s: %s", meta.id, "; ".join(untrusted),
                      extra={"VOLUME_ID": meta.id})
            raise UntrustedRecord(f"volume {meta.id}: {'; '.join(untrusted)}")
        name = str(meta.operation.get("name"))
        recoverer = self.recoverers.get(name)
        if recoverer is None:
            raise Failed(f"unknown interrupted operation {name!r}")
        log.warning("recovery: volume %s: resuming %s", meta.id, meta.operation,
                    extra={"VOLUME_ID": meta.id})
        await recoverer(files, meta)


async def share_call(store: VolumeStore, meta: VolumeMeta, function: Callable[..., T],
                     *args: Any) -> T:
    """``function(*args)`` on the volume's share, in its pool (not if our lock lapsed)."""
    store.locks.check(meta.id)
    return await store.share_of(meta).io.run(function, *args)

