"""Group snapshots: one point in time across several volumes (SPEC section 5a).

group-snapshot (group G; on each member V its snapshot S and overlay O)
    ``prepare``: recorded on every member before any side effect, with the whole
    membership; then every overlay is made (empty, durable, linked nowhere); then each
    guest is frozen (quiesce) or every domain paused (``suspend``).
    ``switch``: recorded on every member before the first domain switches. Each
    domain switches all its members in one ``snapshotCreateXML`` (QEMU's transaction),
    then guests are thawed and domains resumed; then each member's info file and record
    gain S, marked with the group and its membership.
    Recovery: :mod:`hostvold.ops.group_recovery`.

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
from hostvold.core.errors import (
    AlreadyExists,
    Busy,
    Failed,
    HypervisorError,
    InvalidArgument,
    NotFound,
)
from hostvold.core.groups import GroupRequest
from hostvold.core.ids import new_id
from hostvold.core.images import Layer
from hostvold.core.layout import VolumeFiles
from hostvold.core.records import VolumeMeta, utc_now
from hostvold.ops.attachments import one_look
from hostvold.ops.group_recovery import NAME, GroupRecovery
from hostvold.ops.store import share_call
from hostvold.storage.files import make_overlay
from hostvold.storage.mounts import find_share
from hostvold.virt.guest import Execution, Guest

if TYPE_CHECKING:
    from hostvold.ops.operations import Operations

LOCK_WAIT = 120  # seconds a group waits for all its members' locks

log = logging.getLogger(__name__)



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
        self.recovery = GroupRecovery(self)

    # ---- locks ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def locked(self, volume_ids: list[str]) -> AsyncIterator[None]:
        """Every member's lock, in volume-id order, each waited for (a group waits its
        turn behind another host's operation; the order rules out a circle), all of them
        within :data:`LOCK_WAIT` seconds, else Busy (an export may hold one for hours)."""
        async with contextlib.AsyncExitStack() as stack:
            waiting = ""
            try:
                async with asyncio.timeout(LOCK_WAIT):
                    for waiting in sorted(set(volume_ids)):
                        known = self.store.find(waiting)
                        if known is not None:
                            find_share(self.store.shares, known.share).require_reachable()
                        await stack.enter_async_context(self.store.locks.volume(waiting))
            except TimeoutError:
                raise Busy(f"volume {waiting} stayed busy for {LOCK_WAIT} s (an export or "
                           "another host's operation holds it); try again later") from None
            yield

    # ---- create -------------------------------------------------------------------------

    async def members_of(self, request: GroupRequest) -> list[str]:
        """The request's volumes, and every hostvold volume the named domains run on."""
        ids = set(request.volumes)
        if request.domains:
            live = self.ops.access.require_live()
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
            with one_look():  # libvirt's domains read once for all members
                planned = list(await asyncio.gather(*(self._plan(v) for v in volume_ids)))
            outcome = await self._take(group_id, planned, request)
        log.info("group snapshot %s of %d volumes (%s)", group_id, len(planned),
                 request.consistency, extra={"GROUP_ID": group_id})
        return outcome

    async def _plan(self, volume_id: str) -> Planned:
        ops = self.ops
        _meta, files, users = await ops.access.observe(volume_id, top_only=True)
        meta = self.store.require_idle(volume_id)
        _chain_map, chain = await self.store.validated_chain(files, meta, fresh=True)
        planned = Planned(meta, files, new_id(), chain)
        if await share_call(self.store, meta, _exists, files.directory / planned.overlay):
            raise AlreadyExists(f"{planned.overlay} already exists")
        if meta.state == "in-use":
            guest, disk, others = await ops.access.require_live().attachments.locate_among(meta)
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
            await uninterrupted(self.recovery.settle(self._current(planned), crashed=False))
            raise
        await asyncio.gather(*(self.recovery.finish(self.store.get_volume(p.meta.id), p.files,
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
                    if guest is not None and not await Execution(guest).is_paused():
                        await Execution(guest).pause()
                        paused.append(guest)
                crash.point("group-snapshot:paused")
                yield
            finally:
                for guest in paused:
                    try:
                        await Execution(guest).resume()
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

    async def recover(self, alive: set[str] | None = None) -> None:
        await self.recovery.recover(alive)


def _by_domain(planned: list[Planned]) -> dict[str, list[Planned]]:
    domains: dict[str, list[Planned]] = {}
    for p in planned:
        if p.guest is not None:
            domains.setdefault(p.guest.name, []).append(p)
    return domains


def _exists(path: Any) -> bool:
    return os.path.lexists(path)


