"""Volumes used by libvirt domains: who uses them (libvirt's word, never our record),
attach and detach, live snapshot create and online extend. Live snapshot delete is in
:mod:`hostvold.ops.live_delete`.

live-create-snapshot (S, overlay O)
    ``overlay``: intent recorded; O is made by hostvold (relative backing, format given).
    ``switch``: recorded before the freeze and ``snapshotCreateXML`` (disk-only, reuse-ext,
    no-metadata, atomic); the thaw is always attempted after a freeze attempt; then the
    live chain must show O on top; then the info file, then the metadata.
    Recovery: the guest is thawed first (the daemon may have died between freeze and
    thaw). Domain running: the live chain decides (O on top: finish; else remove O). Domain
    gone (libvirt says so): O counts as taken if the guest wrote into it. libvirt not
    answering: nothing is decided, the operation stays recorded.

live-extend (size N)
    ``resize``: recorded before ``blockResize``. Recovery: domain running: resize to N
    again (idempotent); domain gone: grow the active file offline; then the size is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import libvirt

from hostvold.core import crash
from hostvold.core.aio import uninterrupted
from hostvold.core.chainmap import SnapshotMap
from hostvold.core.config import Config
from hostvold.core.errors import (
    DomainGone,
    Failed,
    HostvoldError,
    HypervisorError,
    InUse,
    InvalidArgument,
    InvalidState,
    NeedsRepair,
)
from hostvold.core.ids import new_id, valid_id
from hostvold.core.images import Layer
from hostvold.core.layout import VolumeFiles
from hostvold.core.records import VolumeMeta, utc_now
from hostvold.core.users import Use, Users
from hostvold.ops.live_delete import LiveDelete
from hostvold.ops.volumes import VolumeService, layer_format
from hostvold.storage import qemuimg
from hostvold.storage.atomic import unlink_durable
from hostvold.storage.files import fsync_file
from hostvold.storage.infofile import read_info, write_info
from hostvold.storage.qcow2 import qcow2_is_empty, validate_chain
from hostvold.virt.guest import DiskInfo, Guest, disk_xml
from hostvold.virt.hypervisor import DEVICE_REMOVED, Hypervisor

log = logging.getLogger(__name__)

# lifecycle events after which the volumes of that domain are looked at again
_WATCHED = {libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STOPPED,
            libvirt.VIR_DOMAIN_EVENT_UNDEFINED, libvirt.VIR_DOMAIN_EVENT_RESUMED,
            DEVICE_REMOVED}


class QuiesceFailed(Failed):
    name = "QuiesceFailed"


class LiveVolumes:
    def __init__(self, config: Config, volumes: VolumeService, hypervisor: Hypervisor) -> None:
        self.volumes = volumes
        self.hypervisor = hypervisor
        self.quiesce = config.libvirt.quiesce
        self.deleter = LiveDelete(volumes, hypervisor, self, config.libvirt.pivot_retries)
        volumes.recoverers.update({"live-create-snapshot": self._recover_create,
                                   "live-extend": self._recover_extend})
        hypervisor.on_lifecycle.append(self._lifecycle)
        hypervisor.on_reconnect.append(self.reconcile)
        self._refreshing: set[asyncio.Task[None]] = set()

    # ---- who uses a volume: libvirt's answer --------------------------------------------

    async def users(self, files: VolumeFiles, volume_id: str) -> Users:
        """Every domain whose live XML (running) or definition (shut off) names a file of
        the volume, by serial or by path."""
        uses: list[Use] = []
        for domain in await self.hypervisor.all_domains():
            try:
                guest = Guest(self.hypervisor, domain)
                running = await guest.is_running()
                disks = await (guest.disks() if running else guest.defined_disks())
                named = [d for d in disks if _names_volume(d, files, volume_id)]
                saved = bool(named) and not running and await guest.has_managed_save()
            except (DomainGone, libvirt.libvirtError):
                continue  # undefined while we looked
            uses += [Use(guest.name, d.target, d.source, running, saved) for d in named]
        return Users(tuple(uses))

    async def observe(self, meta: VolumeMeta) -> tuple[VolumeMeta, Users]:
        """Under the volume's lock: ask libvirt who uses the volume and make the record
        say the same (state and attachment), unless an operation of ours is under way."""
        files = self.volumes.files_of(meta)
        users = await self.users(files, meta.id)
        running = users.running
        if meta.operation is None and meta.state in ("available", "in-use"):
            if running is not None:
                attachment = {"domain": running.domain, "target": running.target}
                if meta.state != "in-use" or meta.attachment != attachment:
                    log.warning("volume %s is in use by domain %s (%s), as libvirt says",
                                meta.id, running.domain, running.target,
                                extra={"VOLUME_ID": meta.id, "DOMAIN": running.domain})
                    meta = self.volumes.record(files, meta.evolve(state="in-use",
                                                                  attachment=attachment))
            elif meta.state == "in-use":
                log.info("volume %s is no longer used by a running domain", meta.id,
                         extra={"VOLUME_ID": meta.id})
                meta = self.volumes.record(files, meta.evolve(state="available",
                                                              attachment=None))
        return meta, users

    async def keep_definitions_in_step(self, files: VolumeFiles, volume_id: str) -> None:
        """Point every shut-off domain's definition that names a file of the volume at the
        active file, so its next start runs on the newest data."""
        chain_map = read_info(files)
        meta = self.volumes.get_volume(volume_id)
        active = str(files.directory / chain_map.active)
        fmt = meta.format if chain_map.active == files.base_name else "qcow2"
        for use in (await self.users(files, volume_id)).stopped:
            if use.source == active:
                continue
            guest = Guest(self.hypervisor, await self.hypervisor.lookup(use.domain))
            await guest.redefine_disk(use.target, active, fmt)
            log.info("definition of domain %s now names %s (was %s)", use.domain,
                     chain_map.active, use.source,
                     extra={"VOLUME_ID": volume_id, "DOMAIN": use.domain})

    async def attachments(self) -> dict[str, tuple[Guest, DiskInfo]]:
        """volume id -> (domain, disk) for every volume a running domain uses, found by
        serial or by any file of its chain, whichever tool attached it."""
        found: dict[str, tuple[Guest, DiskInfo]] = {}
        for domain in await self.hypervisor.running_domains():
            guest = Guest(self.hypervisor, domain)
            try:
                disks = await guest.disks()
            except DomainGone:
                continue
            for disk in disks:
                volume_id = self._volume_of(disk)
                if volume_id is not None:
                    found[volume_id] = (guest, disk)
        return found

    def _volume_of(self, disk: DiskInfo) -> str | None:
        candidates: list[str | None] = [disk.serial] if disk.serial else []
        candidates += [self.volumes.naming.volume_id_of_image(Path(p).name) for p in disk.chain]
        for volume_id in candidates:
            try:
                meta = self.volumes.find(valid_id(volume_id) if volume_id else None)
            except InvalidArgument:
                continue
            if meta is not None:
                with contextlib.suppress(HostvoldError):
                    if _names_volume(disk, self.volumes.files_of(meta), meta.id):
                        return meta.id
        return None

    async def locate(self, meta: VolumeMeta) -> tuple[Guest, DiskInfo]:
        """The running domain and disk of an attached volume."""
        domain = (meta.attachment or {}).get("domain")
        if domain:
            try:
                guest = Guest(self.hypervisor, await self.hypervisor.lookup(domain))
                if await guest.is_running():
                    for disk in await guest.disks():
                        if self._volume_of(disk) == meta.id:
                            return guest, disk
            except DomainGone:
                pass
        found = (await self.attachments()).get(meta.id)
        if found is None:
            raise InvalidState(f"volume {meta.id} is not attached to a running domain")
        return found

    # ---- events and reconciliation ---------------------------------------------------------

    def _lifecycle(self, domain: str, event: int, detail: int) -> None:
        if event in _WATCHED:
            task = asyncio.get_running_loop().create_task(self._refresh_domain(domain, event))
            self._refreshing.add(task)
            task.add_done_callback(self._refreshing.discard)

    async def _refresh_domain(self, domain: str, event: int) -> None:
        """Look again at the volumes a domain used or uses, each under its lock (so a
        volume whose domain vanished mid-operation is freed when that operation ends)."""
        ids = {m.id for m in self.volumes.list_volumes()
               if (m.attachment or {}).get("domain") == domain}
        if event in (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_RESUMED):
            with contextlib.suppress(HypervisorError):
                guest = Guest(self.hypervisor, await self.hypervisor.lookup(domain))
                ids |= {vid for d in await guest.disks() if (vid := self._volume_of(d))}
        for volume_id in sorted(ids):
            try:
                async with self.volumes.locks.volume(volume_id):
                    meta = self.volumes.find(volume_id)
                    if meta is None:
                        continue
                    op = meta.operation or {}
                    if op.get("domain") == domain and str(op.get("name")).startswith("live-") \
                            and await self.running_guest(domain) is None:
                        # its domain is gone and no task follows it any more: finish it now
                        await self.volumes.recover_volume(meta)
                        meta = self.volumes.get_volume(volume_id)
                    await self.observe(meta)
            except Exception as exc:
                log.error("looking again at volume %s after an event of domain %s failed: %s",
                          volume_id, domain, exc, exc_info=not isinstance(exc, HostvoldError))

    async def reconcile(self) -> None:
        """Make every volume's state and attachment match the running domains, then resume
        live operations (after start and after libvirt reconnects)."""
        live = await self.attachments()
        for meta in self.volumes.list_volumes():
            if meta.state not in ("available", "in-use") or meta.operation is not None:
                continue
            files = self.volumes.files_of(meta)
            if meta.id in live:
                guest, disk = live[meta.id]
                attachment = {"domain": guest.name, "target": disk.target}
                if meta.state != "in-use" or meta.attachment != attachment:
                    self.volumes.record(files, meta.evolve(state="in-use",
                                                           attachment=attachment))
            elif meta.state == "in-use":
                self.volumes.record(files, meta.evolve(state="available", attachment=None))
        for meta in self.volumes.list_volumes():
            if meta.operation and str(meta.operation.get("name", "")).startswith("live-") \
                    and not self.volumes.locks.busy(meta.id):  # a running task follows it
                try:
                    async with self.volumes.locks.volume(meta.id):
                        await self.volumes.recover_volume(meta)
                        await self.observe(self.volumes.get_volume(meta.id))
                except Exception as exc:
                    log.error("resuming the live operation of volume %s failed: %s", meta.id,
                              exc, exc_info=not isinstance(exc, HostvoldError))
        for meta in self.volumes.list_volumes():
            leftovers = [sid for sid, extra in meta.snapshots.items() if extra.get("temporary")]
            if leftovers and meta.state == "in-use" and not self.volumes.locks.busy(meta.id):
                try:
                    await self._merge_temporary(meta.id, leftovers)
                except Exception:
                    log.exception("merging temporary snapshots of volume %s failed", meta.id)

    async def _merge_temporary(self, volume_id: str, leftovers: list[str]) -> None:
        """Merge the temporary snapshots an interrupted clone or export left behind."""
        async with self.volumes.locks.volume(volume_id):
            for sid in leftovers:
                log.warning("merging temporary snapshot %s of volume %s left by an "
                            "interrupted copy", sid, volume_id,
                            extra={"VOLUME_ID": volume_id, "SNAPSHOT_ID": sid})
                current = self.volumes.get_volume(volume_id)
                files = self.volumes.files_of(current)
                chain_map, chain = self.volumes.validated_chain(files, current)
                await self.deleter.delete_snapshot(current, files, chain_map, chain, sid)

    # ---- attach and detach ------------------------------------------------------------------

    async def attach(self, volume_id: str, domain: str, target: str | None = None) -> VolumeMeta:
        volume_id = valid_id(volume_id, "volume id")
        async with self.volumes.locks.volume(volume_id):
            meta, users = await self.observe(self.volumes.get_volume(volume_id))
            if users.running is not None:
                raise InUse(f"volume {volume_id} is already attached to "
                            f"{users.running.describe()}")
            Users(tuple(u for u in users.uses if u.domain != domain)).refuse_any(
                f"attach to {domain}", volume_id)
            meta = self.volumes.require_available(volume_id)
            files = self.volumes.files_of(meta)
            _chain_map, chain = self.volumes.validated_chain(files, meta)
            top = chain[0]
            virtual = (await qemuimg.info(files.directory / top.name, layer_format(top),
                                          self.volumes.limits)).virtual_size
            if virtual > meta.size:
                raise InvalidState(f"{top.name} claims {virtual} bytes, more than the "
                                   f"volume's {meta.size}; refused")
            guest = Guest(self.hypervisor, await self.hypervisor.lookup(domain))
            if not await guest.is_running():
                raise InvalidState(f"domain {domain} is not running; hostvold plugs volumes "
                                   "into running domains (start it, then attach)")
            used = {d.target for d in await guest.disks()}
            if target is None:
                target = next(f"sd{c}" for c in "bcdefghijklmnopqrstuvwxyz"
                              if f"sd{c}" not in used)
            elif target in used:
                raise InvalidArgument(f"target {target} is already used in domain {domain}")
            await guest.attach_disk(disk_xml(str(files.directory / top.name), top.format,
                                             target, volume_id))
            log.info("attached volume %s to %s as %s", volume_id, domain, target,
                     extra={"VOLUME_ID": volume_id, "DOMAIN": domain})
            return self.volumes.record(files, meta.evolve(
                state="in-use", attachment={"domain": domain, "target": target}))

    async def detach(self, volume_id: str) -> VolumeMeta:
        volume_id = valid_id(volume_id, "volume id")
        async with self.volumes.locks.volume(volume_id):
            meta, users = await self.observe(self.volumes.get_volume(volume_id))
            if users.running is None:
                named = "; ".join(f"the definition of {u.describe()} still names it (remove "
                                  "it with virsh detach-disk --config)" for u in users.uses)
                raise InvalidState(f"volume {volume_id} is not attached to a running domain"
                                   + (f"; {named}" if named else ""))
            if meta.operation is not None:
                raise InvalidState(f"volume {volume_id} has an interrupted "
                                   f"{meta.operation['name']}; retry it or restart hostvold "
                                   "to finish it, then detach")
            files = self.volumes.files_of(meta)
            guest, disk = await self.locate(meta)
            await guest.detach_disk(disk_xml(disk.source or "", disk.format or "raw",
                                             disk.target, volume_id, disk.bus or "scsi"))
            log.info("detached volume %s from %s", volume_id, guest.name,
                     extra={"VOLUME_ID": volume_id, "DOMAIN": guest.name})
            return self.volumes.record(files, meta.evolve(state="available", attachment=None))

    # ---- live snapshot create ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def point_in_time(self, meta: VolumeMeta, files: VolumeFiles,
                            chain_map: SnapshotMap, chain: list[Layer]) -> AsyncIterator[Layer]:
        """A frozen view of an attached volume for copying out (clone, export): a
        temporary live snapshot whose data is read while the guest goes on writing, then
        merged away. Called under the volume's lock; a temporary snapshot left by a crash
        is merged at the next start."""
        sid = new_id()
        meta = await self.create_snapshot(meta, files, chain_map, chain, sid, temporary=True)
        try:
            yield chain[0]  # the former active file: read-only in QEMU from now on
        finally:
            new_map = read_info(files)
            fmt = meta.format if new_map.active == files.base_name else "qcow2"
            new_chain = validate_chain(files, new_map.active, fmt)
            await uninterrupted(self.deleter.delete_snapshot(
                self.volumes.get_volume(meta.id), files, new_map, new_chain, sid))

    async def create_snapshot(self, meta: VolumeMeta, files: VolumeFiles, chain_map: SnapshotMap,
                              chain: list[Layer], sid: str,
                              temporary: bool = False) -> VolumeMeta:
        """Called under the volume's lock with a validated chain."""
        guest, disk = await self.locate(meta)
        top = chain[0]
        if disk.source != str(files.directory / top.name):
            raise NeedsRepair(f"domain {guest.name} runs volume {meta.id} on {disk.source}, "
                              f"not on {top.name} as its info file says")
        overlay = files.overlay_name(sid)
        path = files.directory / overlay
        others = [d.target for d in await guest.disks() if d.target != disk.target]
        meta = self.volumes.record(files, meta.evolve(operation={
            "name": "live-create-snapshot", "snapshot": sid, "overlay": overlay,
            "domain": guest.name, "target": disk.target, "step": "overlay",
            "temporary": temporary}))
        crash.point("live-create-snapshot:intent")
        try:
            await qemuimg.create(path, "qcow2", meta.size, backing=top.name,
                                 backing_fmt=layer_format(top))
            os.chmod(path, self.volumes.file_mode)
            await asyncio.to_thread(fsync_file, path)
            crash.point("live-create-snapshot:overlay")
            op = dict(meta.operation or {}, step="switch")
            meta = self.volumes.record(files, meta.evolve(operation=op))
            crash.point("live-create-snapshot:switch-recorded")
            quiesced = await self._switch(guest, disk.target, str(path), others)
            crash.point("live-create-snapshot:switched")
            live = await guest.disk(disk.target)
        except BaseException:
            await uninterrupted(self._recover_create(files, meta))
            raise
        if live is None or live.source != str(path):
            await uninterrupted(self._recover_create(files, meta))
            raise Failed(f"domain {guest.name} did not switch to {overlay}")
        return self._finish_create(files, meta, sid, overlay, quiesced, temporary)

    async def _switch(self, guest: Guest, target: str, overlay: str, others: list[str]) -> bool:
        """snapshotCreateXML with the quiesce policy; returns whether the guest was frozen."""
        if self.quiesce == "never":
            await guest.snapshot_disk(target, overlay, others)
            return False
        frozen = False
        try:
            await guest.freeze()
            frozen = True
            crash.point("live-create-snapshot:frozen")
        except HypervisorError as exc:
            if self.quiesce == "require":
                with contextlib.suppress(HypervisorError):
                    await guest.thaw()  # a freeze may have half happened
                raise QuiesceFailed(
                    f"quiesce=require but the guest agent of {guest.name} did not freeze "
                    f"the filesystems: {exc.message}") from None
            log.warning("no freeze for %s (%s): crash-consistent snapshot", guest.name,
                        exc.message, extra={"DOMAIN": guest.name})
        try:
            await guest.snapshot_disk(target, overlay, others)
        finally:
            with contextlib.suppress(HypervisorError):
                await guest.thaw()  # always attempted after a freeze attempt
        return frozen

    def _finish_create(self, files: VolumeFiles, meta: VolumeMeta, sid: str, overlay: str,
                       quiesced: bool, temporary: bool = False) -> VolumeMeta:
        chain_map = read_info(files)
        if chain_map.snapshots.get(sid) != overlay:
            write_info(files, chain_map.with_snapshot(sid, overlay), self.volumes.file_mode)
        crash.point("live-create-snapshot:info")
        return self.volumes.record(files, meta.evolve(
            active=overlay, operation=None,
            snapshots={**meta.snapshots, sid: {"created": utc_now(), "quiesced": quiesced,
                                               **({"temporary": True} if temporary else {})}}))

    async def _recover_create(self, files: VolumeFiles, meta: VolumeMeta) -> None:
        op = meta.operation or {}
        sid, overlay = op["snapshot"], op["overlay"]
        path = files.directory / overlay
        guest = await self.running_guest(op["domain"])  # HypervisorUnavailable: kept
        if guest is not None:
            if op.get("step") == "switch":  # we may have died between freeze and thaw
                try:
                    await guest.thaw()
                    log.warning("thawed domain %s after an interrupted quiesced snapshot",
                                guest.name, extra={"DOMAIN": guest.name})
                except HypervisorError:
                    pass  # not frozen, or no agent: nothing to undo
            live = await guest.disk(op["target"])
            switched = live is not None and live.source == str(path)
        else:  # libvirt says the domain is gone: taken if the guest wrote into it
            switched = path.exists() and not qcow2_is_empty(path)
        if switched:
            self._finish_create(files, meta, sid, overlay, False, bool(op.get("temporary")))
        else:
            unlink_durable(path)
            self.volumes.record(files, meta.evolve(operation=None))
        if guest is None:
            await self.keep_definitions_in_step(files, meta.id)

    async def running_guest(self, domain: str) -> Guest | None:
        """The domain if it runs; None only when libvirt says it is gone or off."""
        try:
            guest = Guest(self.hypervisor, await self.hypervisor.lookup(domain))
        except DomainGone:
            return None
        return guest if await guest.is_running() else None

    # ---- extend -----------------------------------------------------------------------------

    async def extend(self, meta: VolumeMeta, files: VolumeFiles, size: int) -> VolumeMeta:
        guest, disk = await self.locate(meta)
        meta = self.volumes.record(files, meta.evolve(operation={
            "name": "live-extend", "size": size, "domain": guest.name, "target": disk.target}))
        crash.point("live-extend:intent")
        await uninterrupted(guest.resize(disk.target, size))
        return self.volumes.record(files, meta.evolve(size=size, operation=None))

    async def _recover_extend(self, files: VolumeFiles, meta: VolumeMeta) -> None:
        op = meta.operation or {}
        size = int(op["size"])
        guest = await self.running_guest(op["domain"])
        if guest is not None:
            await guest.resize(op["target"], size)
        else:
            await self.volumes.grow(files, meta, size)
        self.volumes.record(files, meta.evolve(size=size, operation=None))


def _names_volume(disk: DiskInfo, files: VolumeFiles, volume_id: str) -> bool:
    """Whether a domain's disk is this volume: its serial, or a file of its chain."""
    if disk.serial == volume_id:
        return True
    return any(Path(p).parent == files.directory and files.is_image(Path(p).name)
               for p in disk.chain)
