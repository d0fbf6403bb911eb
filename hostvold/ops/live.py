"""Use cases through libvirt for volumes a running domain uses: attach and detach, live
snapshot create, online extend, and the reconcile after start and reconnect. Who uses a
volume is :mod:`hostvold.ops.attachments`; live snapshot delete is
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

import contextlib
import logging
from collections.abc import AsyncIterator

from hostvold.core import crash
from hostvold.core.aio import uninterrupted
from hostvold.core.chainmap import SnapshotMap
from hostvold.core.config import Config
from hostvold.core.errors import (
    Failed,
    HostvoldError,
    HypervisorError,
    InUse,
    InvalidArgument,
    InvalidState,
    NeedsRepair,
)
from hostvold.core.ids import new_id
from hostvold.core.images import Layer, layer_format
from hostvold.core.layout import VolumeFiles
from hostvold.core.ownership import Here, decide
from hostvold.core.records import VolumeMeta, utc_now
from hostvold.core.users import Users
from hostvold.ops.attachments import OWNED_STATES, Attachments
from hostvold.ops.live_delete import LiveDelete
from hostvold.ops.quiesce import Quiescer
from hostvold.ops.store import VolumeStore, share_call
from hostvold.storage import qemuimg
from hostvold.storage.atomic import unlink_durable
from hostvold.storage.files import make_overlay
from hostvold.storage.infofile import read_info, write_info
from hostvold.storage.qcow2 import qcow2_is_empty, validate_chain
from hostvold.virt.guest import Guest, disk_xml
from hostvold.virt.hypervisor import Hypervisor

log = logging.getLogger(__name__)


class LiveVolumes:
    def __init__(self, config: Config, store: VolumeStore, hypervisor: Hypervisor) -> None:
        self.store = store
        self.hypervisor = hypervisor
        self.quiescer = Quiescer(config.libvirt.quiesce, config.libvirt.quiesce_timeout)
        self.attachments = Attachments(store, hypervisor)
        self.deleter = LiveDelete(store, hypervisor, self.attachments,
                                  config.libvirt.pivot_retries)
        store.recoverers.update({"live-create-snapshot": self._recover_create,
                                 "live-extend": self._recover_extend})
        hypervisor.on_reconnect.append(self.reconcile)

    async def reconcile(self) -> None:
        """Make every volume's state and attachment match the running domains, then resume
        live operations (after start and after libvirt reconnects)."""
        live = await self.attachments.running_disks()
        me = self.store.host_id
        for meta in self.store.list_volumes():
            used = live.get(meta.id)
            if meta.operation is not None or meta.state not in OWNED_STATES:
                continue
            here = Here(used[0].name, used[1].target) if used else None
            steady = decide(meta.state, meta.attachment, me, here) in (
                None, (meta.state, meta.attachment))
            if steady:
                continue  # the record already says what libvirt says: no lock, no question
            try:  # a volume whose share is away is looked at again when it is used
                async with self.store.locks.volume(meta.id, brief=True):
                    fresh = await self.store.refresh(meta.id)  # another host may have moved it
                    if fresh is not None:
                        await self.attachments.observe(fresh)
            except HostvoldError as exc:
                log.warning("volume %s not reconciled with the domains: %s", meta.id, exc)
        for meta in self.store.list_volumes():
            if meta.operation and str(meta.operation.get("name", "")).startswith("live-") \
                    and meta.operation.get("host") in (None, self.store.host_id) \
                    and not self.store.locks.busy(meta.id):  # a running task follows it
                try:
                    async with self.store.locks.volume(meta.id):
                        await self.store.resume(meta)
                        await self.attachments.observe(self.store.get_volume(meta.id))
                except Exception as exc:
                    log.error("resuming the live operation of volume %s failed: %s", meta.id,
                              exc, exc_info=not isinstance(exc, HostvoldError))
        for meta in self.store.list_volumes():
            leftovers = [sid for sid, extra in meta.snapshots.items() if extra.get("temporary")]
            if leftovers and meta.state == "in-use" and not self.store.locks.busy(meta.id):
                try:
                    await self._merge_temporary(meta.id, leftovers)
                except Exception:
                    log.exception("merging temporary snapshots of volume %s failed", meta.id)

    async def _merge_temporary(self, volume_id: str, leftovers: list[str]) -> None:
        """Merge the temporary snapshots an interrupted clone or export left behind."""
        async with self.store.locks.volume(volume_id):
            for sid in leftovers:
                log.warning("merging temporary snapshot %s of volume %s left by an "
                            "interrupted copy", sid, volume_id,
                            extra={"VOLUME_ID": volume_id, "SNAPSHOT_ID": sid})
                current = self.store.get_volume(volume_id)
                files = self.store.files_of(current)
                chain_map, chain = await self.store.validated_chain(files, current)
                await self.deleter.delete_snapshot(current, files, chain_map, chain, sid)

    # ---- attach and detach ----------------------------------------------------------------

    async def attach(self, files: VolumeFiles, meta: VolumeMeta, users: Users, domain: str,
                     target: str | None = None) -> VolumeMeta:
        """Hot-plug the active file of an available volume into a running domain."""
        if users.running is not None:
            raise InUse(f"volume {meta.id} is already attached to {users.running.describe()}")
        Users(tuple(u for u in users.uses if u.domain != domain)).refuse_any(
            f"attach to {domain}", meta.id)
        meta = self.store.require_available(meta.id)
        _chain_map, chain = await self.store.validated_chain(files, meta)
        top = chain[0]
        virtual = (await qemuimg.info(files.directory / top.name, layer_format(top),
                                      self.store.limits)).virtual_size
        if virtual > meta.size:
            raise InvalidState(f"{top.name} claims {virtual} bytes, more than the "
                               f"volume's {meta.size}; refused")
        guest, target = await self.plug_into(domain, target)
        await guest.attach_disk(disk_xml(str(files.directory / top.name), top.format, target,
                                         meta.id))
        log.info("attached volume %s to %s as %s", meta.id, domain, target,
                 extra={"VOLUME_ID": meta.id, "DOMAIN": domain})
        return await self.store.record(files, meta.evolve(
            state="in-use", attachment={"domain": domain, "target": target}))

    async def plug_into(self, domain: str, target: str | None) -> tuple[Guest, str]:
        """The running domain called ``domain`` and a free ``target`` in it (the first free
        ``sdX`` when None). Also asked when an attach call arrives, so that a domain or
        target the call names wrongly is refused then, not in a failed job."""
        guest = Guest(self.hypervisor, await self.hypervisor.lookup(domain))
        if not await guest.is_running():
            raise InvalidState(f"domain {domain} is not running; hostvold plugs volumes "
                               "into running domains (start it, then attach)")
        used = {d.target for d in await guest.disks()}
        if target is None:
            target = next(f"sd{c}" for c in "bcdefghijklmnopqrstuvwxyz" if f"sd{c}" not in used)
        elif target in used:
            raise InvalidArgument(f"target {target} is already used in domain {domain}")
        return guest, target

    async def detach(self, files: VolumeFiles, meta: VolumeMeta, users: Users) -> VolumeMeta:
        """Unplug the volume from the running domain libvirt says uses it."""
        if users.running is None:
            named = "; ".join(f"the definition of {u.describe()} still names it (remove "
                              "it with virsh detach-disk --config)" for u in users.uses)
            raise InvalidState(f"volume {meta.id} is not attached to a running domain"
                               + (f"; {named}" if named else ""))
        if meta.operation is not None:
            raise InvalidState(f"volume {meta.id} has an interrupted {meta.operation['name']}; "
                               "retry it or restart hostvold to finish it, then detach")
        guest, disk = await self.attachments.locate(meta)
        await guest.detach_disk(disk_xml(disk.source or "", disk.format or "raw", disk.target,
                                         meta.id, disk.bus or "scsi"))
        log.info("detached volume %s from %s", meta.id, guest.name,
                 extra={"VOLUME_ID": meta.id, "DOMAIN": guest.name})
        return await self.store.record(files, meta.evolve(state="available", attachment=None))

    # ---- live snapshot create -------------------------------------------------------------

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
            new_map = await share_call(self.store, meta, read_info, files)
            fmt = meta.format if new_map.active == files.base_name else "qcow2"
            new_chain = await share_call(self.store, meta, validate_chain, files,
                                         new_map.active, fmt)
            await uninterrupted(self.deleter.delete_snapshot(
                self.store.get_volume(meta.id), files, new_map, new_chain, sid))

    async def create_snapshot(self, meta: VolumeMeta, files: VolumeFiles, chain_map: SnapshotMap,
                              chain: list[Layer], sid: str,
                              temporary: bool = False) -> VolumeMeta:
        """Called under the volume's lock with a validated chain."""
        guest, disk, others = await self.attachments.locate_among(meta)
        top = chain[0]
        if disk.source != str(files.directory / top.name):
            raise NeedsRepair(f"domain {guest.name} runs volume {meta.id} on {disk.source}, "
                              f"not on {top.name} as its info file says")
        overlay = files.overlay_name(sid)
        path = files.directory / overlay
        # one record before any side effect: recovery asks libvirt whether the domain runs
        # on the overlay (finish) or not (the overlay, whole or partial, is removed)
        meta = await self.store.record(files, meta.evolve(operation={
            "name": "live-create-snapshot", "snapshot": sid, "overlay": overlay,
            "domain": guest.name, "target": disk.target, "step": "switch",
            "temporary": temporary}))
        crash.point("live-create-snapshot:intent")
        try:
            await make_overlay(self.store.share_of(meta).io.run, path, meta.size, top,
                               self.store.file_mode)
            crash.point("live-create-snapshot:overlay")
            quiesced = await self._switch(guest, disk.target, str(path), others)
            crash.point("live-create-snapshot:switched")
            live = await guest.disk(disk.target)
        except BaseException:  # the quiescer saw to the thaw: only a crash leaves one owed
            await uninterrupted(self._recover_create(files, meta, thaw=False))
            raise
        if live is None or live.source != str(path):
            await uninterrupted(self._recover_create(files, meta, thaw=False))
            raise Failed(f"domain {guest.name} did not switch to {overlay}")
        return await self._finish_create(files, meta, sid, overlay, quiesced, temporary,
                                         [Layer(overlay, "qcow2"), *chain])

    async def _switch(self, guest: Guest, target: str, overlay: str, others: list[str]) -> bool:
        """snapshotCreateXML with the quiesce policy; returns whether the guest was frozen."""
        async with self.quiescer.frozen(guest) as frozen:
            await guest.snapshot_disks({target: overlay}, others)
        return frozen

    async def _finish_create(self, files: VolumeFiles, meta: VolumeMeta, sid: str, overlay: str,
                             quiesced: bool, temporary: bool = False,
                             chain: list[Layer] | None = None) -> VolumeMeta:
        """``chain``: the new chain, overlay first, when the caller checked the one below."""
        chain_map = await share_call(self.store, meta, read_info, files)
        if chain_map.snapshots.get(sid) != overlay:
            await share_call(self.store, meta, write_info, files,
                             chain_map.with_snapshot(sid, overlay), self.store.file_mode, chain)
        crash.point("live-create-snapshot:info")
        return await self.store.record(files, meta.evolve(
            active=overlay, operation=None,
            snapshots={**meta.snapshots, sid: {"created": utc_now(), "quiesced": quiesced,
                                               **({"temporary": True} if temporary else {})}}))

    async def _recover_create(self, files: VolumeFiles, meta: VolumeMeta,
                              thaw: bool = True) -> None:
        op = meta.operation or {}
        sid, overlay = op["snapshot"], op["overlay"]
        path = files.directory / overlay
        guest = await self.attachments.running_guest(op["domain"])  # HypervisorUnavailable: kept
        if guest is not None:
            if thaw and op.get("step") == "switch":  # we may have died between freeze and thaw
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
            await self._finish_create(files, meta, sid, overlay, False, bool(op.get("temporary")))
        else:
            await share_call(self.store, meta, unlink_durable, path)
            await self.store.record(files, meta.evolve(operation=None))
        if guest is None:
            await self.attachments.keep_definitions_in_step(files, meta.id)

    # ---- extend -----------------------------------------------------------------------------

    async def extend(self, meta: VolumeMeta, files: VolumeFiles, size: int) -> VolumeMeta:
        guest, disk = await self.attachments.locate(meta)
        meta = await self.store.record(files, meta.evolve(operation={
            "name": "live-extend", "size": size, "domain": guest.name, "target": disk.target}))
        crash.point("live-extend:intent")
        await uninterrupted(guest.block(disk.target).resize(size))
        return await self.store.record(files, meta.evolve(size=size, operation=None))

    async def _recover_extend(self, files: VolumeFiles, meta: VolumeMeta) -> None:
        op = meta.operation or {}
        size = int(op["size"])
        guest = await self.attachments.running_guest(op["domain"])
        if guest is not None:
            await guest.block(op["target"]).resize(size)
            await self.store.record(files, meta.evolve(size=size, operation=None))
        else:  # the domain is gone: the offline extend, through the recovery registry
            offline = meta.evolve(operation={"name": "extend", "size": size})
            await self.store.recoverers["extend"](files, await self.store.record(files, offline))


