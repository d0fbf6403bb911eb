"""Group snapshots: one point in time across several volumes (SPEC section 5a).

group-snapshot (group G; on each member V its snapshot S and overlay O)
    ``prepare``: recorded on every member before any side effect, with the whole
    membership; then every overlay is made (empty, durable, linked nowhere); then each
    guest is frozen (quiesce) or every domain paused (``suspend``).
    ``switch``: recorded on every member; from here the group only goes forward. Each
    domain switches all its members in one ``snapshotCreateXML`` (QEMU's transaction),
    then guests are thawed and domains resumed; then each member's info file and record
    gain S, marked with the group and its membership.
    Recovery, for the whole group under all members' locks in volume-id order: any member
    at ``switch``: forward (a domain still on its old files is switched now, still paused
    under ``suspend``, so the point in time holds; a member whose domain is gone is linked
    offline, as its files are at rest); otherwise back (overlays removed). Thaws and
    resumes owed are always done.

Locks on members are always taken in volume-id order, here and on every host, so two
groups sharing volumes never wait on each other in a circle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hostvold.core import crash
from hostvold.core.aio import uninterrupted
from hostvold.core.chainmap import SnapshotMap
from hostvold.core.errors import (
    AlreadyExists,
    Failed,
    HostvoldError,
    HypervisorError,
    HypervisorUnavailable,
    InvalidArgument,
    NotFound,
)
from hostvold.core.groups import GroupRequest, member_extra
from hostvold.core.ids import new_id
from hostvold.core.images import Layer
from hostvold.core.layout import VolumeFiles
from hostvold.core.records import VolumeMeta, utc_now
from hostvold.ops.store import share_call
from hostvold.storage.atomic import unlink_durable
from hostvold.storage.files import make_overlay
from hostvold.storage.infofile import read_info, write_info
from hostvold.storage.mounts import find_share
from hostvold.storage.qcow2 import qcow2_is_empty
from hostvold.storage.volumefiles import remove_temp_files
from hostvold.virt.guest import DiskInfo, Guest

if TYPE_CHECKING:
    from hostvold.ops.operations import Operations

log = logging.getLogger(__name__)

NAME = "group-snapshot"
_NO_DISK = DiskInfo("", None, None, None, None, None)


@dataclass
class Planned:
    """One member, looked at under its lock."""

    meta: VolumeMeta
    files: VolumeFiles
    snapshot_id: str
    chain: list[Layer]
    guest: Guest | None = None
    target: str | None = None
    others: list[str] = field(default_factory=list)  # the domain's other disk targets

    @property
    def overlay(self) -> str:
        return self.files.overlay_name(self.snapshot_id)


@dataclass
class Outcome:
    """What a group create did, for its caller."""

    group_id: str
    members: dict[str, str]  # volume id -> snapshot id
    quiesced: bool = False
    paused_seconds: float | None = None  # suspend: from the first pause to the last resume


class GroupSnapshots:
    def __init__(self, ops: Operations) -> None:
        self.ops = ops
        self.store = ops.store
        self.store.recoverers[NAME] = self._recover_member
        self.last: Outcome | None = None

    # ---- locks ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def locked(self, volume_ids: list[str]) -> AsyncIterator[None]:
        """Every member's lock, in volume-id order, each waited for (a group waits its
        turn behind another host's operation; the order rules out a circle)."""
        async with contextlib.AsyncExitStack() as stack:
            for volume_id in sorted(set(volume_ids)):
                known = self.store.find(volume_id)
                if known is not None:
                    find_share(self.store.shares, known.share).require_reachable()
                await stack.enter_async_context(self.store.locks.volume(volume_id))
            yield

    # ---- create -------------------------------------------------------------------------

    async def members_of(self, request: GroupRequest) -> list[str]:
        """The request's volumes, and every hostvold volume the named domains run on."""
        ids = set(request.volumes)
        if request.domains:
            live = self.ops.require_live()
            running = await live.attachments.running_disks()
            for domain in request.domains:
                guest = Guest(live.hypervisor, await live.hypervisor.lookup(domain))
                if not await guest.is_running():
                    raise InvalidArgument(f"domain {domain} is not running")
                found = {vid for vid, (g, _d) in running.items() if g.name == domain}
                if not found:
                    raise NotFound(f"domain {domain} runs on no hostvold volume")
                ids |= found
        for volume_id in ids:
            self.store.get_volume(volume_id)  # NotFound now, not under the locks
        return sorted(ids)

    async def create(self, request: GroupRequest, group_id: str | None = None) -> Outcome:
        volume_ids = await self.members_of(request)
        group_id = group_id or new_id()
        async with self.locked(volume_ids):
            planned = list(await asyncio.gather(*(self._plan(v) for v in volume_ids)))
            outcome = await self._take(group_id, planned, request)
        log.info("group snapshot %s of %d volumes (%s)", group_id, len(planned),
                 request.consistency, extra={"GROUP_ID": group_id})
        self.last = outcome
        return outcome

    async def _plan(self, volume_id: str) -> Planned:
        ops = self.ops
        _meta, files, users = await ops.observe(volume_id, top_only=True)
        meta = self.store.require_idle(volume_id)
        _chain_map, chain = await self.store.validated_chain(files, meta, fresh=True)
        planned = Planned(meta, files, new_id(), chain)
        if await share_call(self.store, meta, _exists, files.directory / planned.overlay):
            raise AlreadyExists(f"{planned.overlay} already exists")
        if meta.state == "in-use":
            guest, disk, others = await ops.require_live().attachments.locate_among(meta)
            if disk.source != str(files.directory / chain[0].name):
                raise Failed(f"domain {guest.name} runs volume {volume_id} on {disk.source}, "
                             f"not on {chain[0].name} as its info file says")
            planned.guest, planned.target, planned.others = guest, disk.target, others
        else:
            users.refuse_live("take an offline group snapshot of", volume_id)
        return planned

    async def _take(self, group_id: str, planned: list[Planned],
                    request: GroupRequest) -> Outcome:
        members = {p.meta.id: p.snapshot_id for p in planned}
        domains = _by_domain(planned)
        suspend = sorted(domains) if request.consistency == "suspend" else []
        await self._record_all(planned, lambda p: {
            "name": NAME, "group": group_id, "snapshot": p.snapshot_id, "overlay": p.overlay,
            "members": members, "consistency": request.consistency, "step": "prepare",
            "created": utc_now(), "suspend": suspend,
            **({"domain": p.guest.name, "target": p.target} if p.guest else {})})
        crash.point("group-snapshot:intent")
        outcome = Outcome(group_id, members)
        try:
            await asyncio.gather(*(make_overlay(
                self.store.share_of(p.meta).io.run, p.files.directory / p.overlay,
                p.meta.size, p.chain[0], self.store.file_mode) for p in planned))
            crash.point("group-snapshot:overlays")
            async with self._still(domains, request, suspend, outcome):
                await self._record_all(planned, lambda p: {**self._op(p), "step": "switch"})
                crash.point("group-snapshot:switch")
                for batch in domains.values():
                    await self._switch(batch)
                    crash.point("group-snapshot:switched")
        except BaseException:
            await uninterrupted(self._settle(self._current(planned), crashed=False))
            raise
        await asyncio.gather(*(self._finish(self.store.get_volume(p.meta.id), p.files,
                                            outcome.quiesced, outcome.paused_seconds)
                               for p in planned))
        return outcome

    @contextlib.asynccontextmanager
    async def _still(self, domains: dict[str, list[Planned]], request: GroupRequest,
                     suspend: list[str], outcome: Outcome) -> AsyncIterator[None]:
        """Every guest frozen (by the quiesce policy) and, under ``suspend``, every domain
        paused, for the switch; thawed and resumed after, whatever happened."""
        live = self.ops.live
        policy = request.policy(live.quiescer.policy) if live else "never"
        guests = {name: batch[0].guest for name, batch in domains.items()}
        paused: list[Guest] = []
        async with contextlib.AsyncExitStack() as stack:
            frozen = [await stack.enter_async_context(live.quiescer.frozen(g, policy))
                      for g in guests.values() if g is not None] if live else []
            outcome.quiesced = bool(frozen) and all(frozen)
            started = time.monotonic()
            try:
                for name in suspend:
                    guest = guests[name]
                    if guest is not None and not await guest.is_paused():
                        await guest.suspend()
                        paused.append(guest)
                crash.point("group-snapshot:paused")
                yield
            finally:
                for guest in paused:
                    try:
                        await guest.resume()
                    except HypervisorError as exc:
                        log.error("resuming %s after a group snapshot failed: %s",
                                  guest.name, exc, extra={"DOMAIN": guest.name})
                if suspend:
                    outcome.paused_seconds = time.monotonic() - started

    async def _switch(self, batch: list[Planned]) -> None:
        """One domain's members, switched in one transaction, and checked."""
        guest = batch[0].guest
        assert guest is not None
        targets = {str(p.target): str(p.files.directory / p.overlay) for p in batch}
        others = [t for t in [*batch[0].others, str(batch[0].target)] if t not in targets]
        await guest.snapshot_disks(targets, others)
        live = {d.target: d.source for d in await guest.disks()}
        wrong = [t for t, path in targets.items() if live.get(t) != path]
        if wrong:
            raise Failed(f"domain {guest.name} did not switch {', '.join(wrong)}")

    async def _record_all(self, planned: list[Planned], operation: Any) -> None:
        """One record per member, written side by side (each on its own share)."""
        async def one(p: Planned) -> None:
            p.meta = await self.store.record(p.files, p.meta.evolve(operation=operation(p)))
        await asyncio.gather(*(one(p) for p in planned))

    def _op(self, p: Planned) -> dict[str, Any]:
        return dict(self.store.get_volume(p.meta.id).operation or {})

    def _current(self, planned: list[Planned]) -> list[VolumeMeta]:
        return [m for p in planned if (m := self.store.find(p.meta.id)) is not None
                and (m.operation or {}).get("name") == NAME]

    async def _finish(self, meta: VolumeMeta, files: VolumeFiles, quiesced: bool,
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
            await self.ops.follow_definitions(files, meta.id)

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
                async with self.locked(volume_ids):
                    fresh = [m for vid in volume_ids
                             if (m := await self.store.refresh(vid, ours_too=True)) is not None
                             and (m.operation or {}).get("group") == group_id]
                    for meta in fresh:  # writes the crash cut short
                        await share_call(self.store, meta, remove_temp_files,
                                         self.store.files_of(meta))
                    if fresh:
                        log.warning("recovery: group snapshot %s (%d members unfinished)",
                                    group_id, len(fresh), extra={"GROUP_ID": group_id})
                        await self._settle(fresh)
            except Exception as exc:  # one group's trouble must not stop the others
                log.error("recovery of group snapshot %s failed, left as it is: %s", group_id,
                          exc, exc_info=not isinstance(exc, HostvoldError))

    async def _settle(self, metas: list[VolumeMeta], crashed: bool = True) -> None:
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
                if guest is not None and await guest.is_paused():
                    await guest.resume()
        for guest in guests.values() if crashed else ():
            if guest is not None and live is not None:
                with contextlib.suppress(HypervisorError):
                    await guest.thaw()  # the run that died may have frozen it
        for meta in metas:
            files, op = self.store.files_of(meta), meta.operation or {}
            at_rest = "domain" not in op or guests.get(str(op["domain"])) is None
            if forward:
                await self._finish(meta, files, False, follow=at_rest)
            else:
                await share_call(self.store, meta, unlink_durable, files.directory / op["overlay"])
                await self.store.record(files, meta.evolve(operation=None))
                if "domain" in op and at_rest:  # its definition may name the overlay
                    await self.ops.follow_definitions(files, meta.id)

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


def _by_domain(planned: list[Planned]) -> dict[str, list[Planned]]:
    domains: dict[str, list[Planned]] = {}
    for p in planned:
        if p.guest is not None:
            domains.setdefault(p.guest.name, []).append(p)
    return domains


def _exists(path: Any) -> bool:
    return os.path.lexists(path)


def _written(path: Any) -> bool:
    return os.path.exists(path) and not qcow2_is_empty(path)
