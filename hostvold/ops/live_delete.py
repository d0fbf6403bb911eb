"""Live snapshot delete through libvirt block jobs, event-driven and recorded step by step.

live-delete-snapshot (S; top = info[S], base = its backing)
    strategy ``commit`` (top below the active file): ``blockCommit(top -> base)``;
    ``active-commit`` (top is active): ``blockCommit(ACTIVE)``, READY event, pivot;
    ``pull`` (top is active and base holds more data than top): ``blockRebase`` pulls base
    into top. The cheaper of the last two is chosen from the allocated sizes.
    Steps, each recorded before the libvirt call it names:
    ``job``      before the block job starts (or is followed again);
    ``pivot``    before ``blockJobAbort(PIVOT)`` (active-commit only);
    ``pivoted``  the moment the pivot call returned: from here the guest writes into base.
    Once the file that leaves the chain is gone from the live chain: the info file, then
    that file is removed, then the record cleared (no step of its own: the live chain, or
    with the domain gone the headers, show it; ``finish`` from older records is honoured).

Recovery asks libvirt first; only "no such domain" or "not running" counts as gone, any
other libvirt error leaves the operation recorded for later.
    domain running: the live chain decides: the file still in it: follow the block job
        (or start it again, or pivot a ready one); gone from it: finish.
    domain gone, the file gone from the headers' chain: the job ended; finish.
    domain gone, step ``job``: no pivot was asked, so top (or, for a commit below the
        active file, the active file above it) holds every guest write: commit top into
        base offline (idempotent).
    domain gone, step ``pivoted`` or ``finish``: base holds every guest write and top is
        stale: finish without copying top.
    domain gone, step ``pivot`` (asked, its outcome never recorded): if top and base read
        the same it does not matter; otherwise nothing is guessed: every file is kept, the
        volume gets a problem naming both files, and ``repair`` with ``choice=base`` or
        ``choice=overlay`` resolves it after showing where they differ.

Cancel (Job.Cancel or SIGTERM): a running block job is aborted (libvirt waits for it to end)
and never left running unfollowed. A cancelled pull leaves the snapshot as it was; a
cancelled commit has already changed the snapshot's data, so the delete stays recorded and
is finished by a retry or at the next start. After a pivot, the delete always finishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import libvirt

from hostvold.core import crash, progress
from hostvold.core.aio import quietly_ended, uninterrupted
from hostvold.core.backoff import backoff
from hostvold.core.chainmap import SnapshotMap
from hostvold.core.changes import tombstoned
from hostvold.core.errors import Failed, HypervisorError, NeedsRepair
from hostvold.core.images import Format, Layer
from hostvold.core.layout import VolumeFiles
from hostvold.core.planning import AMBIGUOUS_PIVOT, plan_delete
from hostvold.core.records import VolumeMeta
from hostvold.ops.attachments import Attachments
from hostvold.ops.store import VolumeStore, share_call
from hostvold.storage import qemuimg
from hostvold.storage.atomic import unlink_durable
from hostvold.storage.infofile import read_info, write_info
from hostvold.storage.qcow2 import validate_chain
from hostvold.storage.space import require_space
from hostvold.storage.volumefiles import allocated_in
from hostvold.virt.guest import DiskInfo, Guest
from hostvold.virt.hypervisor import JOB_COMPLETED, JOB_READY, RECONNECTED, Hypervisor

log = logging.getLogger(__name__)




class LiveDelete:
    def __init__(self, store: VolumeStore, hypervisor: Hypervisor, attachments: Attachments,
                 pivot_retries: int) -> None:
        self.store = store
        self.hypervisor = hypervisor
        self.attachments = attachments
        self.pivot_retries = pivot_retries
        store.recoverers["live-delete-snapshot"] = self.resume

    async def delete_snapshot(self, meta: VolumeMeta, files: VolumeFiles,
                              chain_map: SnapshotMap, chain: list[Layer], sid: str) -> None:
        guest, disk = await self.attachments.locate(meta)
        plan = plan_delete(chain, chain_map, sid)
        # the bytes each direction would move: the two layers' allocation, from lstat (the
        # chain itself was read from the headers, checked, under the lock)
        allocated = await share_call(self.store, meta, allocated_in, files.directory,
                                     {plan.top.name, plan.base.name})
        if not plan.top_is_active:
            strategy = "commit"
        elif plan.base.name == files.base_name or meta.snapshots.get(sid, {}).get(
                "temporary") or allocated.get(plan.top.name, 0) <= allocated.get(
                plan.base.name, 0):  # a temporary one: the active file keeps its name
            strategy = "active-commit"
        else:
            strategy = "pull"
        below = None
        if strategy == "pull":
            position = [layer.name for layer in chain].index(plan.base.name)
            below = chain[position + 1].name
        moved = plan.base.name if strategy == "pull" else plan.top.name  # whose data moves
        await require_space(self.store.share_of(meta), allocated.get(moved, 0),
                                       f"deleting snapshot {sid} by {strategy}")
        meta = await self.store.record(files, meta.evolve(operation={
            "name": "live-delete-snapshot", "snapshot": sid, "strategy": strategy,
            "top": plan.top.name, "base": plan.base.name, "below": below,
            "base_format": plan.base.format,
            "domain": guest.name, "target": disk.target, "step": "job"},
            deleted=tombstoned(meta, chain, chain_map, sid)))
        crash.point("live-delete-snapshot:intent")
        log.info("deleting snapshot %s of volume %s live by %s", sid, meta.id, strategy,
                 extra={"VOLUME_ID": meta.id, "SNAPSHOT_ID": sid, "DOMAIN": guest.name})
        await self.resume(files, meta, guest)

    async def resume(self, files: VolumeFiles, meta: VolumeMeta,
                     guest: Guest | None = None) -> None:
        """Run the delete from its recorded step to the end (also the recovery)."""
        op: dict[str, Any] = dict(meta.operation or {})
        if op.get("step") == AMBIGUOUS_PIVOT:
            raise NeedsRepair(f"volume {meta.id}: {'; '.join(meta.problems)}")
        if guest is None:
            guest = await self.attachments.running_guest(op["domain"])
        if guest is None:
            return await self._finish_offline(files, meta, op)
        gone = op["base"] if op["strategy"] == "pull" else op["top"]
        if op["step"] in ("job", "pivot", "pivoted"):
            looked: list[DiskInfo] | None = None  # the live disks, read right after a pivot
            if op["step"] != "pivoted" and gone in await self._live_chain(guest, op["target"]):
                try:
                    meta, looked = await self._run_job(guest, files, meta, op)
                except Failed:
                    if await self.attachments.running_guest(op["domain"]) is not None:
                        raise
                    meta = self.store.get_volume(meta.id)  # the domain died under the job
                    return await self._finish_offline(files, meta, dict(meta.operation or {}))
                op = dict(meta.operation or {})
            crash.point("live-delete-snapshot:job-done")
            disks = looked
            if disks is None:
                # the connection may have been replaced while we waited: ask the new one
                if not guest.on(self.hypervisor):
                    guest = await self.attachments.running_guest(op["domain"])
                disks = await guest.running_disks() if guest is not None else None
            if guest is None or disks is None:
                return await self._finish_offline(files, meta, op)
            disk = next((d for d in disks if d.target == op["target"]), None)
            if disk is None or gone in [Path(p).name for p in disk.chain]:
                raise Failed(f"{gone} is still in the live chain of {guest.name}; the "
                             "operation is kept and resumed at the next start")
            # no record of its own: a recovery sees ``gone`` out of the live chain (or, the
            # domain gone, out of the headers) and finishes the same way
            crash.point("live-delete-snapshot:gone-from-chain")
        await self._finish_delete(files, meta, op)

    async def _live_chain(self, guest: Guest, target: str) -> list[str]:
        disk = await guest.disk(target)
        return [Path(p).name for p in (disk.chain if disk else [])]

    async def _run_job(self, guest: Guest, files: VolumeFiles, meta: VolumeMeta,
                       op: dict[str, Any]) -> tuple[VolumeMeta, list[DiskInfo] | None]:
        """Start (or follow) the block job and wait for libvirt's events; no polling.
        Returns the record as the job left it (``pivoted`` after a pivot) and, after a
        pivot, the live disks read once it was done."""
        looked: list[DiskInfo] | None = None
        directory, target, strategy = files.directory, op["target"], op["strategy"]
        with self.hypervisor.block_job_events(guest.uuid, target) as events:
            device = guest.block(target)
            running = await device.job_info()
            if running is None:
                base = str(directory / op["base"])
                if strategy == "commit":
                    await device.commit(base, str(directory / op["top"]), active=False)
                elif strategy == "active-commit":
                    await device.commit(base, None, active=True)
                else:
                    await device.pull(str(directory / op["below"]) if op["below"] else None)
                crash.point("live-delete-snapshot:job-started")
            ticker = asyncio.get_running_loop().create_task(self._progress(guest, target))
            try:
                ready = running is not None and await device.ready(running)
                while True:
                    if ready and strategy == "active-commit" and \
                            (meta.operation or {}).get("step") != "pivoted":
                        meta, looked = await self._pivot(guest, files, meta)
                    ready = False
                    event = await events.get()
                    if event.status == RECONNECTED:  # libvirtd restarted: look again
                        guest = Guest(self.hypervisor, await self.hypervisor.lookup(guest.name))
                        info = await guest.block(target).job_info()
                        if info is None:
                            return meta, looked  # ended while we were away; the caller checks
                        ready = await guest.block(target).ready(info)
                    elif event.status == JOB_READY:
                        ready = True
                    elif event.status == JOB_COMPLETED:
                        return meta, looked
                    else:
                        raise Failed(f"block job on {guest.name} {target} "
                                     f"{event.status_name}; the chain is unchanged")
            except asyncio.CancelledError:
                meta = await uninterrupted(self._stop(guest, files, meta))
                raise
            finally:
                ticker.cancel()

    async def _pivot(self, guest: Guest, files: VolumeFiles,
                     meta: VolumeMeta) -> tuple[VolumeMeta, list[DiskInfo] | None]:
        """Pivot to the commit's base, recorded before and after; retried while QEMU says
        the copy is still active, up to ``pivot_retries`` times, then the job is aborted
        with the chain intact. Returns the ``pivoted`` record and the live disks, read
        while that record is written (libvirt's pivot returns once the job is gone)."""
        op = dict(meta.operation or {}, step="pivot")
        target = op["target"]
        # whole or not at all: a cancel during this write must not let a later "job" race it
        meta = await uninterrupted(self.store.record(files, meta.evolve(operation=op)))
        crash.point("live-delete-snapshot:pivot-recorded")
        pauses = backoff(0.1, 1.0)
        for attempt in range(self.pivot_retries + 1):
            try:
                await guest.block(target).pivot()
            except HypervisorError as exc:
                if exc.code != libvirt.VIR_ERR_BLOCK_COPY_ACTIVE:
                    raise
                log.warning("pivot of %s %s refused (attempt %d): %s", guest.name, target,
                            attempt + 1, exc.message)
                if attempt < self.pivot_retries:
                    await asyncio.sleep(next(pauses))
                continue
            look = asyncio.ensure_future(guest.running_disks())
            try:  # recorded whatever comes: a cancel must not leave "pivot" behind
                meta = await uninterrupted(self.store.record(
                    files, meta.evolve(operation=dict(op, step="pivoted"))))
            except BaseException:
                look.cancel()
                look.add_done_callback(quietly_ended)
                raise
            crash.point("live-delete-snapshot:pivoted")
            try:
                return meta, await look
            except HypervisorError:  # the caller's own check reads them again
                return meta, None
        await guest.block(target).abort_job()
        await self.store.record(files, meta.evolve(operation=dict(op, step="job")))
        raise Failed(f"pivot of {guest.name} {target} refused {self.pivot_retries + 1} times; "
                     "the block job was aborted and the chain is unchanged")

    async def _stop(self, guest: Guest, files: VolumeFiles, meta: VolumeMeta) -> VolumeMeta:
        """Cancelled: abort the block job (synchronous in libvirt) unless it pivoted. A
        pivot asked for whose outcome the cancel cut off is read from the live chain; if
        that cannot be read the record keeps saying ``pivot`` (never a guess)."""
        meta = self.store.get_volume(meta.id)  # newest: a step may have ended unawaited
        op = dict(meta.operation or {})
        if op.get("step") == "pivoted":
            return meta  # the guest writes into base now: only the bookkeeping is left
        if op.get("step") == "pivot":
            try:
                chain = await self._live_chain(guest, op["target"])
            except HypervisorError:
                return meta
            if not chain or op["base"] not in chain:
                return meta  # the disk is not where it was: still unknown
            if op["top"] not in chain:
                return await self.store.record(
                    files, meta.evolve(operation=dict(op, step="pivoted")))
        with contextlib.suppress(HypervisorError):
            await guest.block(op["target"]).abort_job()
        log.warning("block job of %s %s aborted (cancelled)", guest.name, op["target"],
                    extra={"DOMAIN": guest.name, "VOLUME_ID": meta.id})
        if op["strategy"] == "pull" and op["base"] in await self._live_chain(guest,
                                                                              op["target"]):
            # a pull only adds to top what top already read through: the snapshot is intact
            return await self.store.record(files, meta.evolve(operation=None))
        return await self.store.record(files, meta.evolve(operation=dict(op, step="job")))

    async def _progress(self, guest: Guest, target: str) -> None:
        """Progress for the Job object between events; it decides nothing."""
        while True:
            with contextlib.suppress(HypervisorError):
                info = await guest.block(target).job_info()
                if info is not None and info.end:
                    progress.report(info.cur / info.end)
            await asyncio.sleep(0.5)

    async def _finish_delete(self, files: VolumeFiles, meta: VolumeMeta,
                             op: dict[str, Any]) -> None:
        new_map = await share_call(self.store, meta, _drop_from_chain, files, op,
                                   self.store.file_mode)
        snapshots = {k: v for k, v in meta.snapshots.items() if k != op["snapshot"]}
        await self.store.record(files, meta.evolve(active=new_map.active, snapshots=snapshots,
                                               operation=None, problems=[]))

    async def _finish_offline(self, files: VolumeFiles, meta: VolumeMeta,
                              op: dict[str, Any]) -> None:
        """libvirt says the domain is gone: finish with qemu-img, from what the recorded step
        proves about where the guest's newest writes are."""
        log.warning("domain %s is gone: finishing the delete of snapshot %s offline (step %s)",
                    op["domain"], op["snapshot"], op["step"], extra={"VOLUME_ID": meta.id})
        meta = await self.store.record(files, meta.evolve(state="available", attachment=None))
        chain_map = await share_call(self.store, meta, read_info, files)
        fmt = meta.format if chain_map.active == files.base_name else "qcow2"
        names = [layer.name for layer in await share_call(
            self.store, meta, validate_chain, files, chain_map.active, fmt)]
        gone = op["base"] if op["strategy"] == "pull" else op["top"]
        if op["snapshot"] not in chain_map.snapshots or gone not in names:
            await self._finish_delete(files, meta, op)  # QEMU finished the job before
        elif op["step"] in ("pivoted", "finish"):
            await self._finish_delete(files, meta, op)  # top is stale: base has every write
        elif op["step"] == "pivot":
            await self._undecided_pivot(files, meta, op)
            return
        else:
            await self._commit_offline(files, meta, op)
        await self.attachments.keep_definitions_in_step(files, meta.id)

    async def _commit_offline(self, files: VolumeFiles, meta: VolumeMeta,
                              op: dict[str, Any]) -> None:
        """Top holds the newest data: the offline delete's commit of top into base."""
        chain_map = await share_call(self.store, meta, read_info, files)
        fmt = meta.format if chain_map.active == files.base_name else "qcow2"
        chain = await share_call(self.store, meta, validate_chain, files, chain_map.active, fmt)
        plan = plan_delete(chain, chain_map, op["snapshot"])
        offline = {"name": "delete-snapshot", "snapshot": op["snapshot"], "step": "commit",
                   "top": plan.top.name, "base": plan.base.name,
                   "base_format": plan.base.format,
                   "higher": plan.higher.name if plan.higher else None}
        meta = await self.store.record(files, meta.evolve(operation=offline, problems=[]))
        await self.store.recoverers["delete-snapshot"](files, meta)

    async def _undecided_pivot(self, files: VolumeFiles, meta: VolumeMeta,
                               op: dict[str, Any]) -> None:
        """The pivot was asked for and the domain is gone: no guess."""
        top, base = files.directory / op["top"], files.directory / op["base"]
        difference = await qemuimg.compare(top, "qcow2", base, _fmt(op["base_format"]),
                                           self.store.limits)
        if difference is None:  # the same bytes either way: nothing to choose
            await self._finish_delete(files, meta, op)
            await self.attachments.keep_definitions_in_step(files, meta.id)
            return
        problem = (f"{AMBIGUOUS_PIVOT}: hostvold stopped around the pivot of the live delete of "
                   f"snapshot {op['snapshot']} and domain {op['domain']} is gone; either "
                   f"{op['base']} (the pivot happened) or {op['top']} (it did not) holds the "
                   "guest's newest writes; every file is kept; see `hostvolctl repair` and "
                   "choose base or overlay")
        log.error("volume %s: %s", meta.id, problem, extra={"VOLUME_ID": meta.id})
        await self.store.record(files, meta.evolve(operation=dict(op, step=AMBIGUOUS_PIVOT),
                                               problems=[problem]))

    async def describe_ambiguity(self, files: VolumeFiles, meta: VolumeMeta) -> str:
        """What an operator needs to choose: where the two candidates differ."""
        op = meta.operation or {}
        top, base = files.directory / op["top"], files.directory / op["base"]
        extents = await qemuimg.own_extents(top, "qcow2", self.store.limits)
        difference = await qemuimg.compare(top, "qcow2", base, _fmt(op["base_format"]),
                                           self.store.limits)
        shown = ", ".join(f"{start}+{length}" for start, length in extents[:8])
        more = f" and {len(extents) - 8} more" if len(extents) > 8 else ""
        return (f"the pivot of snapshot {op['snapshot']}'s delete is undecided: "
                f"{op['top']} (choice=overlay: the pivot did not happen) holds its own data "
                f"at {shown or 'no offset'}{more} (offset+length in bytes); "
                f"{op['base']} (choice=base: the pivot happened) is the other candidate; "
                f"qemu-img compare: {difference or 'identical'}. Choose with "
                "`hostvolctl repair VOLUME --choose base|overlay`; nothing was changed")

    async def resolve_ambiguity(self, files: VolumeFiles, meta: VolumeMeta,
                                choice: str) -> str:
        """Finish the delete as the operator chose."""
        op = dict(meta.operation or {})
        if choice == "base":
            await self._finish_delete(files, meta, op)
            done = f"kept {op['base']} as the newest data; {op['top']} removed"
        else:
            await self._commit_offline(files, meta, op)
            done = f"committed {op['top']} into {op['base']}; it holds the newest data"
        await self.attachments.keep_definitions_in_step(files, meta.id)
        return done


def _fmt(name: str) -> Format:
    return "raw" if name == "raw" else "qcow2"


def _drop_from_chain(files: VolumeFiles, op: dict[str, Any], mode: int) -> SnapshotMap:
    """In the share's pool, in one trip: the info file without the snapshot, durable, then
    the file that left the chain removed, durable. Repeatable from either state."""
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
    write_info(files, new_map, mode)
    crash.point("live-delete-snapshot:info")
    unlink_durable(files.directory / gone)
    return new_map
