"""A thin, typed wrapper over one libvirt domain: the calls hostvold uses, named for what
they do, each turning keyword arguments into libvirt flags. Blocking calls go through the
hypervisor's thread pool. Disk XML is parsed into :class:`DiskInfo`.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import libvirt

from hostvold.core.errors import DomainGone, HypervisorError
from hostvold.virt.hypervisor import Hypervisor


@dataclass(frozen=True)
class DiskInfo:
    target: str
    source: str | None
    format: str | None
    serial: str | None
    alias: str | None
    bus: str | None
    chain: list[str] = field(default_factory=list)  # source first, then its backing files
    mirror_ready: bool = False  # a block job's copy waits for a pivot (libvirt's <mirror>)


@dataclass(frozen=True)
class JobInfo:
    job_type: int
    cur: int
    end: int


def parse_disks(domain_xml: str | ET.Element) -> list[DiskInfo]:
    """Every file disk of a live domain XML, with its backing chain as libvirt sees it."""
    root = ET.fromstring(domain_xml) if isinstance(domain_xml, str) else domain_xml
    disks = []
    for disk in root.iterfind("./devices/disk"):
        target = disk.find("target")
        if target is None or disk.get("device", "disk") != "disk":
            continue
        source = disk.find("source")
        driver = disk.find("driver")
        chain = []
        node: ET.Element | None = disk
        while node is not None:
            src = node.find("source")
            if src is None or src.get("file") is None:
                break
            chain.append(str(src.get("file")))
            node = node.find("backingStore")
        serial = disk.find("serial")
        alias = disk.find("alias")
        mirror = disk.find("mirror")
        disks.append(DiskInfo(
            target=str(target.get("dev")),
            source=source.get("file") if source is not None else None,
            format=driver.get("type") if driver is not None else None,
            serial=serial.text if serial is not None else None,
            alias=alias.get("name") if alias is not None else None,
            bus=target.get("bus"), chain=chain,
            mirror_ready=mirror is not None and mirror.get("ready") == "yes"))
    return disks


def with_disk_source(domain_xml: str, target: str, path: str, fmt: str) -> str:
    """``domain_xml`` with disk ``target`` switched to ``path`` (a chain read from the file's
    own headers when the domain starts: any recorded backing store is dropped)."""
    root = ET.fromstring(domain_xml)
    for disk in root.iterfind("./devices/disk"):
        dev = disk.find("target")
        if dev is None or dev.get("dev") != target:
            continue
        source = disk.find("source")
        if source is None:
            source = ET.SubElement(disk, "source")
        source.attrib.clear()
        source.set("file", path)
        driver = disk.find("driver")
        if driver is not None:
            driver.set("type", fmt)
        for backing in disk.findall("backingStore"):
            disk.remove(backing)
    return ET.tostring(root, encoding="unicode")


def disk_xml(path: str, fmt: str, target: str, serial: str, bus: str = "scsi") -> str:
    return (f"<disk type='file' device='disk'>"
            f"<driver name='qemu' type={quoteattr(fmt)} cache='none'/>"
            f"<source file={quoteattr(path)}/>"
            f"<target dev={quoteattr(target)} bus={quoteattr(bus)}/>"
            f"<serial>{escape(serial)}</serial></disk>")


def snapshot_xml(overlays: dict[str, str], other_targets: list[str]) -> str:
    """External disk-only snapshot of the disks ``overlays`` names (target -> pre-made
    overlay), all in one transaction; the other disks untouched."""
    switched = "".join(f"<disk name={quoteattr(t)} snapshot='external' type='file'>"
                       f"<driver type='qcow2'/><source file={quoteattr(o)}/></disk>"
                       for t, o in overlays.items())
    others = "".join(f"<disk name={quoteattr(t)} snapshot='no'/>" for t in other_targets)
    return f"<domainsnapshot><disks>{switched}{others}</disks></domainsnapshot>"


class Guest:
    def __init__(self, hypervisor: Hypervisor, domain: libvirt.virDomain) -> None:
        self.hypervisor = hypervisor
        self.domain = domain
        self.name: str = domain.name()
        self.uuid: str = domain.UUIDString()

    async def _call(self, method: Any, *args: Any) -> Any:
        return await self.hypervisor.call(method, *args)

    async def disks(self) -> list[DiskInfo]:
        """The disks QEMU has open now (live XML, with the live backing chains)."""
        return parse_disks(await self._call(self.domain.XMLDesc, 0))

    async def running_disks(self) -> list[DiskInfo] | None:
        """The disks QEMU has open now, or None when libvirt says the domain is off or
        gone: one call, as only a running domain's XML carries its ``id``."""
        try:
            xml: str = await self._call(self.domain.XMLDesc, 0)
        except DomainGone:
            return None
        root = ET.fromstring(xml)
        return parse_disks(root) if root.get("id") is not None else None

    def on(self, hypervisor: Hypervisor) -> bool:
        """Whether this handle came through the hypervisor's current connection (after a
        reconnection, handles of the old one answer nothing)."""
        return hypervisor.conn is not None and self.domain.connect() is hypervisor.conn

    async def defined_disks(self) -> list[DiskInfo]:
        """The disks the next start will open (the inactive definition)."""
        return parse_disks(await self._call(self.domain.XMLDesc,
                                            libvirt.VIR_DOMAIN_XML_INACTIVE))

    async def has_managed_save(self) -> bool:
        """A saved state that a start resumes, with the files it had open."""
        return bool(await self._call(self.domain.hasManagedSaveImage, 0))

    async def redefine_disk(self, target: str, path: str, fmt: str) -> None:
        """Point the inactive definition's disk ``target`` at ``path``."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
        xml = await self._call(self.domain.XMLDesc, flags)
        await self.hypervisor.define(with_disk_source(xml, target, path, fmt))

    async def disk(self, target: str) -> DiskInfo | None:
        return next((d for d in await self.disks() if d.target == target), None)

    async def is_running(self) -> bool:
        """False when libvirt says the domain is off or gone; any other error is raised:
        an unanswered question is not a "no"."""
        try:
            return bool(await self._call(self.domain.isActive))
        except DomainGone:
            return False

    async def migration(self) -> str | None:
        """"out" while this domain migrates away, "in" while it arrives (paused, QEMU
        receiving its state), else None. Migration statistics exist on the source only."""
        state, reason = await self._call(self.domain.state, 0)
        try:
            stats: dict[str, Any] = await self._call(self.domain.jobStats, 0)
        except DomainGone:
            raise
        except HypervisorError:
            stats = {}
        if stats.get("operation") == libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT:
            return "out"
        if state == libvirt.VIR_DOMAIN_PAUSED and reason in (
                libvirt.VIR_DOMAIN_PAUSED_MIGRATION, libvirt.VIR_DOMAIN_PAUSED_STARTING_UP):
            return "in"
        return None

    async def _affect(self) -> int:
        """The running domain, and its definition too when it has one."""
        flags: int = libvirt.VIR_DOMAIN_AFFECT_LIVE
        if await self._call(self.domain.isPersistent):
            flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
        return flags

    async def attach_disk(self, xml: str) -> None:
        await self._call(self.domain.attachDeviceFlags, xml, await self._affect())

    async def detach_disk(self, xml: str) -> None:
        await self._call(self.domain.detachDeviceFlags, xml, await self._affect())

    async def freeze(self, timeout: int) -> None:
        """Freeze guest filesystems through the guest agent (HypervisorError without one,
        or when it does not answer within ``timeout`` seconds: libvirt's default waits
        forever). The timeout stays set on the domain for its later agent calls."""
        await self._call(self.domain.agentSetResponseTimeout, timeout, 0)
        await self._call(self.domain.fsFreeze)

    async def thaw(self) -> None:
        await self._call(self.domain.fsThaw)

    async def snapshot_disks(self, overlays: dict[str, str], other_targets: list[str]) -> None:
        """Switch every disk of ``overlays`` to its overlay at one point in time (QEMU
        applies the disks of one call as a transaction: all switch or none)."""
        flags = (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
                 | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
                 | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
                 | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)
        await self._call(self.domain.snapshotCreateXML, snapshot_xml(overlays, other_targets),
                         flags)

    def block(self, target: str) -> BlockDevice:
        """The disk ``target`` of this domain, for block jobs and resize."""
        return BlockDevice(self, target)


class BlockDevice:
    """One disk of a domain, by target: its block jobs and its size."""

    def __init__(self, guest: Guest, target: str) -> None:
        self.guest = guest
        self.target = target

    async def _call(self, method: Any, *args: Any) -> Any:
        return await self.guest.hypervisor.call(method, self.target, *args)

    async def commit(self, base: str, top: str | None, active: bool) -> None:
        """blockCommit with relative backing names; ``active`` commits the active layer."""
        flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_RELATIVE
        if active:
            flags |= libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
        await self._call(self.guest.domain.blockCommit, base, top, 0, flags)

    async def pull(self, base: str | None) -> None:
        """blockRebase: copy everything above ``base`` into the active layer."""
        await self._call(self.guest.domain.blockRebase, base, 0,
                         libvirt.VIR_DOMAIN_BLOCK_REBASE_RELATIVE if base else 0)

    async def job_info(self) -> JobInfo | None:
        info = await self._call(self.guest.domain.blockJobInfo, 0)
        if not info:
            return None
        return JobInfo(int(info["type"]), int(info["cur"]), int(info["end"]))

    async def ready(self, info: JobInfo) -> bool:
        """Whether the job waits for a pivot: its copy caught up, by libvirt's figures or,
        as a writing guest keeps moving those apart, by the live XML's mirror."""
        if info.end and info.cur == info.end:
            return True
        disk = await self.guest.disk(self.target)
        return disk is not None and disk.mirror_ready

    async def pivot(self) -> None:
        await self._call(self.guest.domain.blockJobAbort,
                         libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)

    async def abort_job(self) -> None:
        """Abort the block job; libvirt waits until it has ended."""
        await self._call(self.guest.domain.blockJobAbort, 0)

    async def resize(self, size: int) -> None:
        await self._call(self.guest.domain.blockResize, size,
                         libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)


class Execution:
    """A domain's vCPUs, paused for a moment (several domains at one point in time):
    ``Execution(guest).pause()``."""

    def __init__(self, guest: Guest) -> None:
        self.guest = guest

    async def is_paused(self) -> bool:
        state, _reason = await self.guest._call(self.guest.domain.state)
        return bool(state == libvirt.VIR_DOMAIN_PAUSED)

    async def pause(self) -> None:
        await self.guest._call(self.guest.domain.suspend)

    async def resume(self) -> None:
        await self.guest._call(self.guest.domain.resume)
