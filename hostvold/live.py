"""Volumes attached to running domains: attach, detach, and live snapshot create and delete
through libvirt, event-driven and recorded like the offline operations.

live-create-snapshot (S, overlay O)
    ``overlay``: intent recorded; O is made by hostvold (relative backing, format given).
    ``switch``: recorded before ``snapshotCreateXML`` (disk-only, reuse-ext, no-metadata,
    atomic), with freeze/thaw around it per the quiesce policy; then the live chain must
    show O on top; then the info file, then the metadata.
    Recovery: the live chain decides. O on top (or, with the domain gone, O holding data):
    finish. Otherwise: remove O.

live-delete-snapshot (S; top = info[S], base = its backing)
    strategy ``commit`` (top below the active file): ``blockCommit(top -> base)``;
    ``active-commit`` (top is active): ``blockCommit(ACTIVE)``, READY event, pivot;
    ``pull`` (top is active and base holds more data than top): ``blockRebase`` pulls base
    into top. The cheaper of the last two is chosen from the allocated sizes.
    ``job``: recorded before the libvirt call; completion comes from the BLOCK_JOB_2 event
    and is checked against the live chain. ``finish``: the info file, then the file that
    left the chain is removed.
    Recovery: a block job still running is followed to its end; no job and the file gone
    from the live chain: finish; no job and the file still there: start the job again; the
    domain gone: finish offline with qemu-img.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import libvirt

from hostvold import crash, progress, qemuimg
from hostvold.atomic import unlink_durable
from hostvold.chain import Layer, qcow2_is_empty, validate_chain
from hostvold.config import Config
from hostvold.errors import (
    Failed,
    InvalidArgument,
    InvalidState,
    NeedsRepair,
    NotFound,
    StorageUnavailable,
)
from hostvold.files import fsync_file
from hostvold.guest import DiskInfo, Guest, disk_xml
from hostvold.ids import new_id, valid_id
from hostvold.infofile import SnapshotMap, read_info, write_info
from hostvold.layout import VolumeFiles
from hostvold.metadata import VolumeMeta, utc_now
from hostvold.planning import plan_delete
from hostvold.virt import JOB_COMPLETED, JOB_READY, RECONNECTED, BlockJobEvent, Hypervisor
from hostvold.volumes import VolumeService

log = logging.getLogger(__name__)


class QuiesceFailed(Failed):
    name = "QuiesceFailed"


class LiveVolumes:
    def __init__(self, config: Config, volumes: VolumeService, hypervisor: Hypervisor) -> None:
        self.volumes = volumes
        self.hypervisor = hypervisor
        self.quiesce = config.libvirt.quiesce
        self.pivot_retries = config.libvirt.pivot_retries
        volumes.recoverers.update({"live-create-snapshot": self._recover_create,
                                   "live-delete-snapshot": self._resume_delete})
        hypervisor.on_domain_stopped.append(self._domain_stopped)
        hypervisor.on_reconnect.append(self.reconcile)

    # ---- where volumes are attached --------------------------------------------------------

    async def attachments(self) -> dict[str, tuple[Guest, DiskInfo]]:
        """volume id -> (domain, disk) for every volume a running domain uses, found by
        serial or by any file of its chain, whichever tool attached it."""
        found: dict[str, tuple[Guest, DiskInfo]] = {}
        for domain in await self.hypervisor.running_domains():
            guest = Guest(self.hypervisor, domain)
            for disk in await guest.disks():
                volume_id = self._volume_of(disk)
                if volume_id is not None:
                    found[volume_id] = (guest, disk)
        return found

    def _volume_of(self, disk: DiskInfo) -> str | None:
        if disk.serial:
            try:
                serial = valid_id(disk.serial)
            except InvalidArgument:
                serial = None
            if self.volumes.find(serial) is not None:
                return serial
        for path in disk.chain:
            name = Path(path).name
            volume_id = self.volumes.naming.volume_id_of_image(name)
            meta = self.volumes.find(volume_id)
            if meta is not None:
                try:
                    if self.volumes.files_of(meta).directory == Path(path).parent:
                        return volume_id
                except (NotFound, StorageUnavailable):
                    continue
        return None

    async def locate(self, meta: VolumeMeta) -> tuple[Guest, DiskInfo]:
        """The running domain and disk of an attached volume."""
        attachment = meta.attachment or {}
        if attachment.get("domain"):
            try:
                guest = Guest(self.hypervisor, await self.hypervisor.lookup(
                    attachment["domain"]))
                for disk in await guest.disks():  # a stopped domain's XML fails or differs
                    if self._volume_of(disk) == meta.id and await guest.is_running():
                        return guest, disk
            except (NotFound, libvirt.libvirtError):
                pass
        found = (await self.attachments()).get(meta.id)
        if found is None:
            raise InvalidState(f"volume {meta.id} is not attached to a running domain")
        return found

    async def reconcile(self) -> None:
        """Make every volume's state and attachment match the running domains, then resume
        live operations (after start and after libvirt reconnects)."""
        live = await self.attachments()
        for meta in self.volumes.list_volumes():
            if meta.state not in ("available", "in-use"):
                continue
            files = self.volumes.files_of(meta)
            if meta.id in live:
                guest, disk = live[meta.id]
                attachment = {"domain": guest.name, "target": disk.target}
                if meta.state != "in-use" or meta.attachment != attachment:
                    self.volumes.record(files, meta.evolve(state="in-use",
                                                           attachment=attachment))
            elif meta.state == "in-use" and meta.operation is None:
                self.volumes.record(files, meta.evolve(state="available", attachment=None))
        for meta in self.volumes.list_volumes():
            if meta.operation and str(meta.operation.get("name", "")).startswith("live-") \
                    and not self.volumes.locks.busy(meta.id):  # a running task follows it
                try:
                    async with self.volumes.locks.volume(meta.id):
                        await self.volumes.recover_volume(meta)
                except Exception:
                    log.exception("resuming the live operation of volume %s failed", meta.id)
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
                await self.delete_snapshot(current, files, chain_map, chain, sid)

    def _domain_stopped(self, domain: str) -> None:
        for meta in self.volumes.list_volumes():
            if (meta.attachment or {}).get("domain") == domain and meta.operation is None:
                log.info("domain %s stopped: volume %s is available", domain, meta.id,
                         extra={"VOLUME_ID": meta.id, "DOMAIN": domain})
                self.volumes.record(self.volumes.files_of(meta),
                                    meta.evolve(state="available", attachment=None))

    # ---- attach and detach ------------------------------------------------------------------

    async def attach(self, volume_id: str, domain: str, target: str | None = None) -> VolumeMeta:
        volume_id = valid_id(volume_id, "volume id")
        async with self.volumes.locks.volume(volume_id):
            meta = self.volumes.require_available(volume_id)
            files = self.volumes.files_of(meta)
            _chain_map, chain = self.volumes.validated_chain(files, meta)
            top = chain[0]
            virtual = (await qemuimg.info(files.directory / top.name, _fmt(top),
                                          self.volumes.limits)).virtual_size
            if virtual > meta.size:
                raise InvalidState(f"{top.name} claims {virtual} bytes, more than the "
                                   f"volume's {meta.size}; refused")
            guest = Guest(self.hypervisor, await self.hypervisor.lookup(domain))
            if not await guest.is_running():
                raise InvalidState(f"domain {domain} is not running")
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
            meta = self.volumes.get_volume(volume_id)
            if meta.state != "in-use" or meta.operation is not None:
                raise InvalidState(f"volume {volume_id} is {meta.state}, not attached and idle")
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
            await self.delete_snapshot(self.volumes.get_volume(meta.id), files, new_map,
                                       new_chain, sid)

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
                                 backing_fmt=_fmt(top))
            os.chmod(path, self.volumes.file_mode)
            await asyncio.to_thread(fsync_file, path)
            crash.point("live-create-snapshot:overlay")
            op = dict(meta.operation or {}, step="switch")
            meta = self.volumes.record(files, meta.evolve(operation=op))
            crash.point("live-create-snapshot:switch-recorded")
            quiesced = await self._switch(guest, disk.target, str(path), others)
            crash.point("live-create-snapshot:switched")
        except BaseException:
            await self._recover_create(files, meta)
            raise
        live = await guest.disk(disk.target)
        if live is None or live.source != str(path):
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
        except libvirt.libvirtError as exc:
            if self.quiesce == "require":
                with contextlib.suppress(libvirt.libvirtError):
                    await guest.thaw()  # a freeze may have half happened
                raise QuiesceFailed(
                    f"quiesce=require but the guest agent of {guest.name} did not freeze "
                    f"the filesystems: {exc.get_error_message()}") from None
            log.warning("no freeze for %s (%s): crash-consistent snapshot", guest.name,
                        exc.get_error_message(), extra={"DOMAIN": guest.name})
        try:
            await guest.snapshot_disk(target, overlay, others)
        finally:
            with contextlib.suppress(libvirt.libvirtError):
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
        switched = False
        try:
            guest = Guest(self.hypervisor, await self.hypervisor.lookup(op["domain"]))
            if await guest.is_running():
                live = await guest.disk(op["target"])
                switched = live is not None and live.source == str(path)
            else:
                raise NotFound("not running")
        except (NotFound, StorageUnavailable):
            # the domain is gone: the overlay counts as taken if the guest wrote into it
            switched = path.exists() and not qcow2_is_empty(path)
        if switched:
            self._finish_create(files, meta, sid, overlay, False, bool(op.get("temporary")))
        else:
            unlink_durable(path)
            self.volumes.record(files, meta.evolve(operation=None))

    # ---- live snapshot delete ---------------------------------------------------------------

    async def delete_snapshot(self, meta: VolumeMeta, files: VolumeFiles,
                              chain_map: SnapshotMap, chain: list[Layer], sid: str) -> None:
        guest, disk = await self.locate(meta)
        plan = plan_delete(chain, chain_map, sid)
        # one qemu-img for the whole chain; -U: the running QEMU holds the images' locks
        seen = await qemuimg.info_chain(files.directory / chain[0].name, _fmt(chain[0]),
                                        self.volumes.limits, force_share=True)
        allocated = {Path(layer.filename).name: layer.actual_size for layer in seen}
        if not plan.top_is_active:
            strategy = "commit"
        elif plan.base.name == files.base_name or \
                allocated.get(plan.top.name, 0) <= allocated.get(plan.base.name, 0):
            strategy = "active-commit"
        else:
            strategy = "pull"
        below = None
        if strategy == "pull":
            position = [layer.name for layer in chain].index(plan.base.name)
            below = chain[position + 1].name
        meta = self.volumes.record(files, meta.evolve(operation={
            "name": "live-delete-snapshot", "snapshot": sid, "strategy": strategy,
            "top": plan.top.name, "base": plan.base.name, "below": below,
            "domain": guest.name, "target": disk.target, "step": "job"}))
        crash.point("live-delete-snapshot:intent")
        log.info("deleting snapshot %s of volume %s live by %s", sid, meta.id, strategy,
                 extra={"VOLUME_ID": meta.id, "SNAPSHOT_ID": sid, "DOMAIN": guest.name})
        await self._resume_delete(files, meta, guest)

    async def _resume_delete(self, files: VolumeFiles, meta: VolumeMeta,
                             guest: Guest | None = None) -> None:
        op: dict[str, Any] = dict(meta.operation or {})
        directory = files.directory
        gone = op["base"] if op["strategy"] == "pull" else op["top"]
        if guest is None:
            try:
                guest = Guest(self.hypervisor, await self.hypervisor.lookup(op["domain"]))
                if not await guest.is_running():
                    guest = None
            except (NotFound, StorageUnavailable):
                guest = None
        if guest is None:
            return await self._finish_offline(files, meta, op)
        if op["step"] == "job":
            disk = await guest.disk(op["target"])
            chain_names = [Path(p).name for p in (disk.chain if disk else [])]
            if gone in chain_names:
                await self._run_job(guest, op, directory)
            crash.point("live-delete-snapshot:job-done")
            guest = Guest(self.hypervisor, await self.hypervisor.lookup(guest.name))
            disk = await guest.disk(op["target"])
            if disk is None or gone in [Path(p).name for p in disk.chain]:
                raise Failed(f"{gone} is still in the live chain of {guest.name}; the "
                             "operation is kept and resumed at the next start")
            op["step"] = "finish"
            meta = self.volumes.record(files, meta.evolve(operation=op))
            crash.point("live-delete-snapshot:finish-recorded")
        self._finish_delete(files, meta, op)

    async def _run_job(self, guest: Guest, op: dict[str, Any], directory: Path) -> None:
        """Start (or follow) the block job and wait for libvirt's events; no polling."""
        target, strategy = op["target"], op["strategy"]
        with self.hypervisor.block_job_events(guest.uuid, target) as events:
            running = await guest.job_info(target)
            if running is None:
                if strategy == "commit":
                    await guest.commit(target, str(directory / op["base"]),
                                       str(directory / op["top"]), active=False)
                elif strategy == "active-commit":
                    await guest.commit(target, str(directory / op["base"]), None, active=True)
                else:
                    await guest.pull(target, str(directory / op["below"]) if op["below"]
                                     else None)
                crash.point("live-delete-snapshot:job-started")
            ticker = asyncio.get_running_loop().create_task(self._progress(guest, target))
            try:
                if strategy == "active-commit" and running is not None and \
                        running.end and running.cur == running.end:
                    await self._pivot(guest, target, events)  # it was ready already
                while True:
                    event = await events.get()
                    if event.status == RECONNECTED:  # libvirtd restarted: look again
                        guest = Guest(self.hypervisor, await self.hypervisor.lookup(guest.name))
                        info = await guest.job_info(target)
                        if info is None:
                            return  # ended while we were away; the caller checks the chain
                        if strategy == "active-commit" and info.end and info.cur == info.end:
                            await self._pivot(guest, target, events)
                    elif event.status == JOB_READY and strategy == "active-commit":
                        await self._pivot(guest, target, events)
                    elif event.status == JOB_COMPLETED:
                        return
                    elif event.status != JOB_READY:
                        raise Failed(f"block job on {guest.name} {target} "
                                     f"{event.status_name}; the chain is unchanged")
            finally:
                ticker.cancel()

    async def _pivot(self, guest: Guest, target: str,
                     events: asyncio.Queue[BlockJobEvent]) -> None:
        """Pivot to the commit's base; retried while QEMU says the copy is still active,
        up to ``pivot_retries`` times, then the job is aborted with the chain intact."""
        for attempt in range(self.pivot_retries + 1):
            try:
                await guest.pivot(target)
                return
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_BLOCK_COPY_ACTIVE:
                    raise
                log.warning("pivot of %s %s refused (attempt %d): %s", guest.name, target,
                            attempt + 1, exc.get_error_message())
                if attempt < self.pivot_retries:
                    await asyncio.sleep(0.1 * (attempt + 1))  # back-off before a retry
        await guest.abort_job(target)
        raise Failed(f"pivot of {guest.name} {target} refused {self.pivot_retries + 1} times; "
                     "the block job was aborted and the chain is unchanged")

    async def _progress(self, guest: Guest, target: str) -> None:
        """Progress for the Job object between events; it decides nothing."""
        while True:
            with contextlib.suppress(libvirt.libvirtError, StorageUnavailable):
                info = await guest.job_info(target)
                if info is not None and info.end:
                    progress.report(info.cur / info.end)
            await asyncio.sleep(0.5)

    def _finish_delete(self, files: VolumeFiles, meta: VolumeMeta, op: dict[str, Any]) -> None:
        sid, top, base = op["snapshot"], op["top"], op["base"]
        chain_map = read_info(files)
        if op["strategy"] == "pull":
            # base's data now lives in top: a snapshot whose overlay was base now has top
            snapshots = {k: (top if v == base else v) for k, v in chain_map.snapshots.items()
                         if k != sid}
            new_map, gone = SnapshotMap(chain_map.active, snapshots), base
        else:
            new_map = chain_map.without(sid, active=base if op["strategy"] == "active-commit"
                                        else None)
            gone = top
        write_info(files, new_map, self.volumes.file_mode)
        crash.point("live-delete-snapshot:info")
        unlink_durable(files.directory / gone)
        snapshots = {k: v for k, v in meta.snapshots.items() if k != sid}
        self.volumes.record(files, meta.evolve(active=new_map.active, snapshots=snapshots,
                                               operation=None))

    async def _finish_offline(self, files: VolumeFiles, meta: VolumeMeta,
                              op: dict[str, Any]) -> None:
        """The domain went away mid-delete: finish with qemu-img (a commit of top into
        base whatever the live strategy was; the result is the same snapshot removed)."""
        log.warning("domain %s is gone: finishing the delete of snapshot %s offline",
                    op["domain"], op["snapshot"], extra={"VOLUME_ID": meta.id})
        chain_map = read_info(files)
        if op["snapshot"] not in chain_map.snapshots:
            return self._finish_delete(files, meta, op)
        fmt = meta.format if chain_map.active == files.base_name else "qcow2"
        chain = validate_chain(files, chain_map.active, fmt)
        gone = op["base"] if op["strategy"] == "pull" else op["top"]
        if gone not in [layer.name for layer in chain]:
            return self._finish_delete(files, meta, op)  # QEMU finished the job before
        plan = plan_delete(chain, chain_map, op["snapshot"])
        offline = {"name": "delete-snapshot", "snapshot": op["snapshot"], "step": "commit",
                   "top": plan.top.name, "base": plan.base.name,
                   "base_format": plan.base.format,
                   "higher": plan.higher.name if plan.higher else None}
        meta = self.volumes.record(files, meta.evolve(operation=offline, state="available",
                                                      attachment=None))
        await self.volumes.recoverers["delete-snapshot"](files, meta)

    # ---- extend -----------------------------------------------------------------------------

    async def extend(self, meta: VolumeMeta, files: VolumeFiles, size: int) -> VolumeMeta:
        guest, disk = await self.locate(meta)
        await guest.resize(disk.target, size)
        return self.volumes.record(files, meta.evolve(size=size))


def _fmt(layer: Layer) -> qemuimg.Format:
    return "raw" if layer.format == "raw" else "qcow2"
