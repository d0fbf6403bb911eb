"""Which domains use a volume, as libvirt says now (never our own record), and the record
kept in line with it: a query under the volume's lock before any step that could change or
remove its data, and lifecycle events that make hostvold look again.

Only libvirt's "no such domain" (or "not running") counts as gone; an unanswered question
(HypervisorUnavailable) is raised, never read as a "no".
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt

from hostvold.core.errors import (
    DomainGone,
    HostvoldError,
    HypervisorError,
    InvalidArgument,
    InvalidState,
)
from hostvold.core.ids import valid_id
from hostvold.core.layout import VolumeFiles
from hostvold.core.ownership import Here, Migration, decide
from hostvold.core.records import VolumeMeta
from hostvold.core.users import Use, Users
from hostvold.ops.store import VolumeStore
from hostvold.storage.infofile import read_info
from hostvold.virt.guest import DiskInfo, Guest
from hostvold.virt.hypervisor import DEVICE_REMOVED, Hypervisor

log = logging.getLogger(__name__)

# lifecycle events after which the volumes of that domain are looked at again
_WATCHED = {libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STOPPED,
            libvirt.VIR_DOMAIN_EVENT_UNDEFINED, libvirt.VIR_DOMAIN_EVENT_RESUMED,
            libvirt.VIR_DOMAIN_EVENT_SUSPENDED, DEVICE_REMOVED}
# the states in which who holds the volume follows libvirt
OWNED_STATES = ("available", "in-use", "migrating")
# the domains as read once for several volumes looked at together (one_look)
_LOOK: contextvars.ContextVar[dict[str, asyncio.Future[Any]] | None] = \
    contextvars.ContextVar("hostvold_one_look", default=None)


@contextlib.contextmanager
def one_look() -> Iterator[None]:
    """Volumes looked at together, under all their locks (a group snapshot's members):
    libvirt's domains are read once for all of them, not once per volume."""
    token = _LOOK.set({})
    try:
        yield
    finally:
        _LOOK.reset(token)




class Attachments:
    def __init__(self, store: VolumeStore, hypervisor: Hypervisor) -> None:
        self.store = store
        self.hypervisor = hypervisor
        hypervisor.on_lifecycle.append(self._lifecycle)
        self._refreshing: set[asyncio.Task[None]] = set()

    async def users(self, files: VolumeFiles, volume_id: str) -> Users:
        """Every domain whose live XML (running) or definition (shut off) names a file of
        the volume, by serial or by path."""
        uses: list[Use] = []
        for guest, disks, running in await self._domains():
            named = [d for d in disks if _names_volume(d, files, volume_id)]
            try:
                saved = bool(named) and not running and await guest.has_managed_save()
            except (DomainGone, libvirt.libvirtError):
                continue  # undefined while we looked
            uses += [Use(guest.name, d.target, d.source, running, saved) for d in named]
        return Users(tuple(uses))

    async def _domains(self) -> list[tuple[Guest, list[DiskInfo], bool]]:
        """Every domain with its disks (live XML if running, else its definition); read
        once for all the volumes of one look (:func:`one_look`)."""
        look = _LOOK.get()
        if look is None:
            return await self._read_domains()
        if look.get("domains") is None:
            look["domains"] = asyncio.ensure_future(self._read_domains())
        return await asyncio.shield(look["domains"])

    async def _read_domains(self) -> list[tuple[Guest, list[DiskInfo], bool]]:
        found = []
        running_now, defined = await self.hypervisor.domains_by_state()
        for domain, running in [(d, True) for d in running_now] + [(d, False) for d in defined]:
            try:
                guest = Guest(self.hypervisor, domain)
                found.append((guest, await (guest.disks() if running else
                                            guest.defined_disks()), running))
            except (DomainGone, libvirt.libvirtError):
                continue  # undefined while we looked
        return found

    async def observe(self, meta: VolumeMeta,
                      left_by_migration: bool = False) -> tuple[VolumeMeta, Users]:
        """Under the volume's lock, with the record just read from the share: ask libvirt
        who uses the volume and make the record say the same (state, attachment, host; see
        :mod:`hostvold.core.ownership`), unless an operation of ours is under way."""
        files = self.store.files_of(meta)
        users = await self.users(files, meta.id)
        if meta.operation is not None or meta.state not in OWNED_STATES:
            return meta, users
        here = await self._here(meta, users.running)
        decided = decide(meta.state, meta.attachment, self.store.host_id, here,
                         left_by_migration)
        if decided is not None and decided != (meta.state, meta.attachment):
            state, attachment = decided
            log.warning("volume %s is %s%s, as libvirt says", meta.id, state,
                        f" ({_describe(attachment)})" if attachment else "",
                        extra={"VOLUME_ID": meta.id})
            meta = await self.store.record(files, meta.evolve(state=state,
                                                              attachment=attachment))
        return meta, users

    async def _here(self, meta: VolumeMeta, use: Use | None) -> Here | None:
        """This host's running domain with the volume open, and whether it is migrating;
        the record already saying so costs no further question."""
        if use is None:
            return None
        steady = {"domain": use.domain, "target": use.target, "host": self.store.host_id}
        if meta.state == "in-use" and meta.attachment == steady:
            return Here(use.domain, use.target)
        try:
            guest = Guest(self.hypervisor, await self.hypervisor.lookup(use.domain))
            return Here(use.domain, use.target, _migration(await guest.migration()))
        except DomainGone:
            return None

    async def keep_definitions_in_step(self, files: VolumeFiles, volume_id: str) -> None:
        """Point every shut-off domain's definition that names a file of the volume at the
        active file, so its next start runs on the newest data."""
        chain_map = read_info(files)
        meta = self.store.get_volume(volume_id)
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

    async def running_disks(self) -> dict[str, tuple[Guest, DiskInfo]]:
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
        candidates += [self.store.naming.volume_id_of_image(Path(p).name) for p in disk.chain]
        for volume_id in candidates:
            try:
                meta = self.store.find(valid_id(volume_id) if volume_id else None)
            except InvalidArgument:
                continue
            if meta is not None:
                with contextlib.suppress(HostvoldError):
                    if _names_volume(disk, self.store.files_of(meta), meta.id):
                        return meta.id
        return None

    async def locate(self, meta: VolumeMeta) -> tuple[Guest, DiskInfo]:
        """The running domain and disk of an attached volume."""
        guest, disk, _ = await self.locate_among(meta)
        return guest, disk

    async def locate_among(self, meta: VolumeMeta) -> tuple[Guest, DiskInfo, list[str]]:
        """As :meth:`locate`, with the targets of the domain's other disks, from the same
        read of the live XML."""
        domain = (meta.attachment or {}).get("domain")
        if _LOOK.get() is not None:  # the look's own read of every domain
            for guest, disks, running in await self._domains():
                for disk in disks if running else ():
                    if self._volume_of(disk) == meta.id:
                        return guest, disk, [d.target for d in disks if d is not disk]
        elif domain:
            try:
                guest = Guest(self.hypervisor, await self.hypervisor.lookup(domain))
                if await guest.is_running():
                    disks = await guest.disks()
                    for disk in disks:
                        if self._volume_of(disk) == meta.id:
                            return guest, disk, [d.target for d in disks if d is not disk]
            except DomainGone:
                pass
        found = (await self.running_disks()).get(meta.id)
        if found is None:
            raise InvalidState(f"volume {meta.id} is not attached to a running domain")
        guest, disk = found
        return guest, disk, [d.target for d in await guest.disks() if d.target != disk.target]

    async def running_guest(self, domain: str) -> Guest | None:
        """The domain if it runs; None only when libvirt says it is gone or off."""
        try:
            guest = Guest(self.hypervisor, await self.hypervisor.lookup(domain))
        except DomainGone:
            return None
        return guest if await guest.is_running() else None

    # ---- events ---------------------------------------------------------------------

    def _lifecycle(self, domain: str, event: int, detail: int) -> None:
        if event in _WATCHED:
            task = asyncio.get_running_loop().create_task(
                self._refresh_domain(domain, event, detail))
            self._refreshing.add(task)
            task.add_done_callback(self._refreshing.discard)

    async def _refresh_domain(self, domain: str, event: int, detail: int) -> None:
        """Look again at the volumes a domain used or uses, each under its lock and read
        again from its share (another host may have claimed it meanwhile), so a volume
        whose domain vanished mid-operation is freed when that operation ends."""
        ids = {m.id for m in self.store.list_volumes()
               if (m.attachment or {}).get("domain") == domain}
        if event in (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_RESUMED,
                     libvirt.VIR_DOMAIN_EVENT_SUSPENDED):
            with contextlib.suppress(HypervisorError):
                guest = Guest(self.hypervisor, await self.hypervisor.lookup(domain))
                ids |= {vid for d in await guest.disks() if (vid := self._volume_of(d))}
        migrated_away = (event == libvirt.VIR_DOMAIN_EVENT_STOPPED
                         and detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED)
        for volume_id in sorted(ids):
            try:
                async with self.store.locks.volume(volume_id, brief=True):
                    meta = await self.store.refresh(volume_id)
                    if meta is None:
                        continue
                    op = meta.operation or {}
                    if op.get("domain") == domain and str(op.get("name")).startswith("live-") \
                            and op.get("host") in (None, self.store.host_id) \
                            and await self.running_guest(domain) is None:
                        # its domain is gone and no task follows it any more: finish it now
                        await self.store.resume(meta)
                        meta = self.store.get_volume(volume_id)
                    await self.observe(meta, left_by_migration=migrated_away)
            except Exception as exc:
                log.error("looking again at volume %s after an event of domain %s failed: %s",
                          volume_id, domain, exc, exc_info=not isinstance(exc, HostvoldError))


def _migration(direction: str | None) -> Migration:
    return "in" if direction == "in" else "out" if direction == "out" else None


def _describe(attachment: dict[str, object]) -> str:
    text = f"domain {attachment.get('domain')} on host {attachment.get('host') or '?'}"
    return text + (f", going to host {attachment['to'] or '?'}" if "to" in attachment else "")


def _names_volume(disk: DiskInfo, files: VolumeFiles, volume_id: str) -> bool:
    """Whether a domain's disk is this volume: its serial, or a file of its chain."""
    if disk.serial == volume_id:
        return True
    return any(Path(p).parent == files.directory and files.is_image(Path(p).name)
               for p in disk.chain)
