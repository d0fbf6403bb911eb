"""The volume use cases for detached volumes: create, import, delete, extend, export, list.

Every multi-step operation records its intent before its first side effect: first a row in
the local index's ``inflight`` table (so a restart knows which volumes to re-read), then
the volume's metadata file on the share (the truth). :meth:`VolumeService.recover` finishes
or undoes what a crash interrupted:

``create``/``import``/``clone``/``create-from-snapshot``
    states: ``intent`` (metadata ``state=creating`` written) -> ``made`` (image written)
    -> done (``state=available``). Recovery: the caller never heard of success, so every
    file of the new volume is removed; the source is never touched.
``delete``
    states: ``intent`` (``state=deleting``) -> ``files-removed`` -> done (metadata file
    removed last). Recovery: remove what is left.
``extend``
    states: ``intent`` (``operation={"name": "extend", "size": N}``) -> ``grown`` -> done.
    Recovery: grow to N again (idempotent), then record the new size.

Snapshot operations (:mod:`hostvold.ops.snapshots`) register their own recovery here.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hostvold.core import crash
from hostvold.core.chainmap import SnapshotMap
from hostvold.core.config import Config
from hostvold.core.errors import (
    AlreadyExists,
    ExternalDataFile,
    Failed,
    HostvoldError,
    HypervisorUnavailable,
    InfoFileDamaged,
    InvalidArgument,
    InvalidState,
    NeedsRepair,
    NoSpace,
    NotFound,
    UnsafeFile,
    UnsafeImage,
    UntrustedRecord,
)
from hostvold.core.ids import new_id, valid_id
from hostvold.core.images import Layer, Qcow2Header
from hostvold.core.layout import Naming, VolumeFiles, record_problems, temp_name
from hostvold.core.models import MAX_SIZE, CreateVolume, ExportVolume, ExtendVolume, ImportVolume
from hostvold.core.planning import chain_problems
from hostvold.core.records import VolumeMeta, utc_now
from hostvold.core.shares import Candidate, Placement, choose_share
from hostvold.core.users import NOBODY, Users
from hostvold.storage import qemuimg
from hostvold.storage.atomic import unlink_durable
from hostvold.storage.files import copy_fd_to_new_file, create_raw, fsync_file, grow_raw, is_enospc
from hostvold.storage.index import VolumeIndex
from hostvold.storage.infofile import read_info
from hostvold.storage.locks import LocalLocks
from hostvold.storage.metadata import read_meta, write_meta
from hostvold.storage.mounts import Share, capacity
from hostvold.storage.qcow2 import (
    QCOW2_KNOWN_SAFE,
    QCOW2_MAGIC,
    parse_qcow2_header,
    read_head,
    read_qcow2_header,
    validate_chain,
)
from hostvold.storage.qemuimg import Format, Limits, fd_path
from hostvold.storage.safefile import check_caller_fd, kind, open_regular, require_regular

if TYPE_CHECKING:
    from hostvold.ops.live import LiveVolumes

log = logging.getLogger(__name__)

Recoverer = Callable[[VolumeFiles, VolumeMeta], Awaitable[None]]


class VolumeService:
    """The use cases, independent of how they are called (D-Bus, tests, tools)."""

    def __init__(self, config: Config, shares: list[Share], index: VolumeIndex,
                 locks: LocalLocks, file_mode: int) -> None:
        self.config = config
        self.shares = shares
        self.index = index
        self.locks = locks
        self.file_mode = file_mode
        self.naming = Naming(config.volumes.volume_name_template)
        self.limits = Limits(config.limits.qemu_img_cpu_seconds,
                             config.limits.qemu_img_address_space)
        self.placement = Placement(config.volumes.reserved_percentage,
                                   config.volumes.max_over_subscription_ratio)
        self._volumes: dict[str, VolumeMeta] = {}
        self.recoverers: dict[str, Recoverer] = {"extend": self._recover_extend}
        # told the id of every volume whose record changed (the D-Bus objects follow)
        self.change_listeners: list[Callable[[str], None]] = []
        self.live: LiveVolumes | None = None  # set when libvirt is connected

    # ---- start-up -------------------------------------------------------------------

    def load_index(self) -> None:
        self._volumes = {meta.id: meta for meta in self.index.load()}

    def rebuild_index(self) -> None:
        """Read every volume on every mounted share into the index: hostvold's metadata
        files, and volumes laid out by Cinder (no metadata file yet), which are adopted."""
        found: dict[str, VolumeMeta] = {}
        for share in self.mounted_shares():
            names = {entry.name for entry in os.scandir(share.mount_point)}
            for name in sorted(names):
                volume_id = self.naming.volume_id_of_meta(name)
                if volume_id is not None:
                    meta = self._read_meta(share, share.mount_point / name, volume_id)
                elif (volume_id := self.naming.volume_id_of_base(name)) is not None and \
                        f"{name}.meta" not in names:
                    meta = self._adopt(VolumeFiles.of(share.mount_point, self.naming, volume_id),
                                       share)
                else:
                    continue
                if meta is not None:
                    found[volume_id] = meta
        self.index.replace_all(found.values())
        self._volumes = found
        log.info("index rebuilt from %d shares: %d volumes",
                 len(self.mounted_shares()), len(found))

    def _read_meta(self, share: Share, path: Path, volume_id: str) -> VolumeMeta | None:
        try:
            meta = read_meta(path)
        except (HostvoldError, OSError) as exc:
            log.error("skipping unreadable metadata %s: %s", path, exc)
            return None
        if meta.id != volume_id:
            log.error("skipping %s: it describes volume %s", path, meta.id)
            return None
        return meta.evolve(share=share.spec.address) if meta.share != share.spec.address \
            else meta

    def _adopt(self, files: VolumeFiles, share: Share) -> VolumeMeta:
        """Describe a volume made by Cinder from its files alone and write its metadata.

        The base format comes from trusted records only: the backing format an overlay
        recorded for it. Bytes a guest could have written never decide it (SPEC section
        13): without such a record the base is raw, and when its first bytes look like a
        qcow2 header that is reported as a problem for an operator to confirm
        (``repair --format``). Problems found on the way are recorded, not fixed.
        """
        present = {p.name for p in files.existing() if files.is_image(p.name)}
        recorded = _recorded_base_format(files, present)
        base_format = recorded or "raw"
        problems: list[str] = []
        if recorded is None:
            claim = header_claim(files.base)
            if claim is not None:
                problems.append(format_problem(files.base_name, claim))
        chain_map = SnapshotMap(files.base_name)
        try:
            require_regular(files.base)
            chain_map = read_info(files)
            fmt = base_format if chain_map.active == files.base_name else "qcow2"
            chain = validate_chain(files, chain_map.active, fmt)
            problems += chain_problems(files, chain, chain_map, present)
            active = files.directory / chain_map.active
            size = read_qcow2_header(active).size if fmt == "qcow2" else active.stat().st_size
        except (InfoFileDamaged, UnsafeImage) as exc:
            problems.append(exc.message)
            size = files.base.lstat().st_size
        except FileNotFoundError as exc:
            problems.append(f"{Path(str(exc.filename)).name}, a file of the chain, is missing")
            size = files.base.lstat().st_size
        st = files.base.lstat()
        meta = VolumeMeta(
            id=self.naming.volume_id_of_base(files.base_name) or "", size=size,
            format="qcow2" if base_format == "qcow2" else "raw",
            provisioning="thick" if st.st_blocks * 512 >= st.st_size else "thin",
            created=file_mtime(files.base), state="available", share=share.spec.address,
            active=chain_map.active, problems=problems,
            snapshots={sid: {"created": file_mtime(files.directory / name), "quiesced": False}
                       for sid, name in chain_map.snapshots.items()
                       if (files.directory / name).exists()})
        log.warning("adopted volume %s from %s (%d snapshots%s)", meta.id, share.spec.address,
                    len(meta.snapshots), f"; problems: {'; '.join(problems)}" if problems else "")
        write_meta(files.meta, meta, self.file_mode)
        return meta

    async def recover(self) -> None:
        """Finish or undo every operation a crash interrupted (see the module docstring)."""
        for volume_id, share_address in self.index.inflight():
            share = next((s for s in self.shares if s.spec.address == share_address), None)
            if share is None or not share.mounted:
                continue  # its share is down; recovered when it comes back
            files = VolumeFiles.of(share.mount_point, self.naming, volume_id)
            if files.meta.exists() or files.meta.is_symlink():
                meta = self._read_meta(share, files.meta, volume_id)
                if meta is not None:
                    self._volumes[volume_id] = meta
            else:  # the crash came before the metadata file was written, or after delete
                await asyncio.to_thread(self.remove_volume_files, files)
                self._forget(volume_id)
        for meta in list(self._volumes.values()):
            if meta.state in ("creating", "deleting") or meta.operation:
                try:
                    await self.recover_volume(meta)
                except Exception as exc:  # one volume's trouble must not stop the others
                    log.error("recovery of volume %s failed, left as it is: %s", meta.id, exc,
                              exc_info=not isinstance(exc, HostvoldError),
                              extra={"VOLUME_ID": meta.id})

    async def recover_volume(self, meta: VolumeMeta) -> None:
        try:
            files = self.files_of(meta)
        except HostvoldError:
            return  # its share is down; recovered when it comes back
        self._remove_temp_files(files)
        if meta.state in ("creating", "deleting"):
            log.warning("recovery: removing volume %s left in state %s", meta.id, meta.state)
            await asyncio.to_thread(self.remove_volume_files, files)
            self._forget(meta.id)
            return
        assert meta.operation is not None
        untrusted = record_problems(files, meta.operation, meta.active)
        if untrusted:  # the record names files that are not the volume's: touch nothing
            if set(untrusted) - set(meta.problems):
                self.record(files, meta.evolve(problems=[*meta.problems, *untrusted]))
            log.error("recovery: volume %s: %s", meta.id, "; ".join(untrusted),
                      extra={"VOLUME_ID": meta.id})
            raise UntrustedRecord(f"volume {meta.id}: {'; '.join(untrusted)}")
        name = str(meta.operation.get("name"))
        log.warning("recovery: volume %s: resuming %s", meta.id, meta.operation,
                    extra={"VOLUME_ID": meta.id})
        recoverer = self.recoverers.get(name)
        if recoverer is None:
            raise Failed(f"unknown interrupted operation {name!r}")
        if self.live is not None and not name.startswith("live-"):
            # an offline step must not run under a domain started since: it waits
            (await self.live.users(files, meta.id)).refuse_live(f"finish {name} on", meta.id)
        await recoverer(files, meta)
        await self.follow_definitions(files, meta.id)

    async def _recover_extend(self, files: VolumeFiles, meta: VolumeMeta) -> None:
        assert meta.operation is not None
        size = int(meta.operation["size"])
        await self.grow(files, meta, size)
        self.record(files, meta.evolve(size=size, operation=None))

    # ---- queries ----------------------------------------------------------------------

    def list_volumes(self) -> list[VolumeMeta]:
        return sorted(self._volumes.values(), key=lambda meta: meta.id)

    def find(self, volume_id: str | None) -> VolumeMeta | None:
        """The volume with this (already valid) id, or None: for lookups that may miss."""
        return self._volumes.get(volume_id) if volume_id else None

    def get_volume(self, volume_id: str) -> VolumeMeta:
        volume_id = valid_id(volume_id, "volume id")
        try:
            return self._volumes[volume_id]
        except KeyError:
            raise NotFound(f"volume {volume_id} does not exist") from None

    def mounted_shares(self) -> list[Share]:
        return [share for share in self.shares if share.mounted]

    def usage(self, share: Share) -> tuple[int, int]:
        """(allocated, provisioned) bytes of the volumes on ``share``."""
        allocated = 0
        with os.scandir(share.mount_point) as entries:
            for entry in entries:
                if self.naming.volume_id_of_image(entry.name) is None:
                    continue
                allocated += entry.stat(follow_symlinks=False).st_size
        provisioned = sum(m.size for m in self._volumes.values() if m.share == share.spec.address)
        return allocated, provisioned

    # ---- use cases --------------------------------------------------------------------

    async def create_volume(self, **options: Any) -> VolumeMeta:
        request: CreateVolume = CreateVolume.parse(**options)
        volume_id = request.id or new_id()
        fmt: Format = request.format or ("qcow2" if self.config.volumes.qcow2_volumes else "raw")
        thin = self.config.volumes.sparsed_volumes if request.provisioning is None \
            else request.provisioning == "thin"

        async def make(path: Path) -> None:
            if fmt == "raw":
                await asyncio.to_thread(create_raw, path, request.size, not thin, self.file_mode)
            else:
                await qemuimg.create(path, "qcow2", request.size,
                                     preallocation="metadata" if thin else "falloc")

        return await self.create_new(volume_id, request.size, fmt, thin, request.share, make,
                                     operation="create")

    async def import_volume(self, **options: Any) -> VolumeMeta:
        """A new volume holding the guest-visible bytes of an image.

        The image is a file descriptor the caller opened (option ``fd``; not closed here)
        or, for root, a ``source`` path opened here without following symbolic links."""
        request: ImportVolume = ImportVolume.parse(**options)
        if request.source is None:
            assert request.fd is not None
            check_caller_fd(request.fd, "fd", write=False)
            return await self._import_fd(request.fd, request)
        fd = await asyncio.to_thread(open_source, request.source)
        try:
            return await self._import_fd(fd, request)
        finally:
            os.close(fd)

    async def _import_fd(self, fd: int, request: ImportVolume) -> VolumeMeta:
        """Import from an open regular file.

        raw: qemu-img reads it as ``-f raw`` through ``/dev/fd/N``: bytes only, nothing in
        them is interpreted. qcow2: the header is checked here (no backing file, no external
        data file, no unknown features), then the file is copied into a private temp file
        beside the new volume, checked again there (the caller could rewrite its own file
        between a check and qemu-img's open), and converted from that copy."""
        head = await asyncio.to_thread(read_head, fd)
        src_fmt: Format = request.source_format or (
            "qcow2" if head[:4] == QCOW2_MAGIC else "raw")
        st = os.fstat(fd)
        if src_fmt == "qcow2":
            header = _standalone_qcow2(head, "the image")
            virtual = header.size
            needed = 2 * st.st_size + (1 << 20)  # the private copy, then the volume
        else:
            virtual = st.st_size
            needed = (await qemuimg.measure(fd_path(fd), "raw", request.format or "raw",
                                            self.limits, pass_fds=(fd,))).required
        if virtual > MAX_SIZE:
            raise UnsafeImage(f"the image claims a virtual size of {virtual} bytes, more than "
                              f"the {MAX_SIZE} hostvold accepts; refused")
        size = request.size or _round_up(virtual, 512)
        if size < virtual:
            raise InvalidArgument(f"size {size} is smaller than the image's {virtual} bytes")
        fmt: Format = request.format or ("qcow2" if self.config.volumes.qcow2_volumes else "raw")

        async def make(path: Path) -> None:
            if src_fmt == "raw":
                await qemuimg.convert(fd_path(fd), "raw", path, fmt, limits=self.limits,
                                      pass_fds=(fd,), src_cache="writeback")
            else:
                copy = temp_name(path)  # one of the new volume's files: removed on failure
                try:
                    await asyncio.to_thread(copy_fd_to_new_file, fd, copy, 0o600)
                    private = await asyncio.to_thread(read_qcow2_header, copy)
                    _standalone_qcow2_header(private, "the image")
                    if private.size != virtual:
                        raise UnsafeImage("the image changed while it was imported; refused")
                    await qemuimg.convert(copy, "qcow2", path, fmt, limits=self.limits)
                finally:
                    copy.unlink(missing_ok=True)
            if size > virtual:
                await qemuimg.resize(path, fmt, size, limits=self.limits)
            os.chmod(path, self.file_mode)
            await asyncio.to_thread(fsync_file, path)

        return await self.create_new(request.id or new_id(), size, fmt, True, request.share,
                                     make, space_needed=needed, operation="import")

    async def delete_volume(self, volume_id: str) -> None:
        volume_id = valid_id(volume_id, "volume id")
        async with self.locks.volume(volume_id):
            meta, users = await self.observe(volume_id)
            users.refuse_any("delete", volume_id)
            if meta.attachment or meta.state == "in-use":
                raise InvalidState(f"volume {volume_id} is attached to "
                                   f"{(meta.attachment or {}).get('domain', 'a domain')}; "
                                   "detach it first")
            files = self.files_of(meta)
            self.record(files, meta.evolve(state="deleting"))
            crash.point("delete:intent")
            await asyncio.to_thread(self.remove_volume_files, files)
            crash.point("delete:files-removed")
            self._forget(volume_id)
            log.info("deleted volume %s", volume_id, extra={"VOLUME_ID": volume_id})

    async def extend_volume(self, volume_id: str, **options: Any) -> VolumeMeta:
        volume_id = valid_id(volume_id, "volume id")
        request: ExtendVolume = ExtendVolume.parse(**options)
        async with self.locks.volume(volume_id):
            _meta, users = await self.observe(volume_id)
            meta = self.require_idle(volume_id)
            if meta.state != "in-use":
                users.refuse_live("extend", volume_id)
            if request.size <= meta.size:
                raise InvalidArgument(f"new size {request.size} must be larger than the "
                                      f"current {meta.size} bytes")
            files = self.files_of(meta)
            self.validated_chain(files, meta)
            grow = request.size - meta.size
            share = self._share_of(meta)
            allocated, provisioned = self.usage(share)
            cap = capacity(share, allocated, provisioned)
            if provisioned + grow > cap.total * self.placement.max_over_subscription_ratio or (
                    meta.provisioning == "thick" and grow > cap.free):
                raise NoSpace(f"share {share.spec.address} cannot grow volume {volume_id} by "
                              f"{grow} bytes")
            if meta.state == "in-use":
                return await self.require_live().extend(meta, files, request.size)
            self.record(files, meta.evolve(operation={"name": "extend", "size": request.size}))
            crash.point("extend:intent")
            try:
                await self.grow(files, meta, request.size)
            except BaseException:
                self.record(files, meta)
                raise
            crash.point("extend:grown")
            return self.record(files, meta.evolve(size=request.size, operation=None))

    async def export_volume(self, volume_id: str, **options: Any) -> Path | None:
        """Flatten the volume's active chain into a standalone image.

        Into ``fd``, a file the caller created and opened for writing (it is truncated and
        written in place; the file is the caller's, who removes it if the export fails), or
        for root into a new file at ``destination`` (created exclusively, never through a
        symbolic link, removed again on failure). Returns the destination, if any."""
        volume_id = valid_id(volume_id, "volume id")
        request: ExportVolume = ExportVolume.parse(**options)
        dest = request.destination
        if request.fd is not None:
            check_caller_fd(request.fd, "fd", write=True)
        elif dest is not None:
            if not dest.parent.is_dir():
                raise NotFound(f"directory {dest.parent} does not exist")
            if dest.exists() or dest.is_symlink():
                raise AlreadyExists(f"{dest} already exists; hostvold never overwrites a file")
        async with self.locks.volume(volume_id):
            await self.observe(volume_id)
            meta = self.require_idle(volume_id)
            files = self.files_of(meta)
            chain_map, chain = self.validated_chain(files, meta)
            fd = request.fd if request.fd is not None else _create_destination(dest)
            try:
                if meta.state == "in-use":  # from a temporary point in time, guest running
                    async with self.require_live().point_in_time(meta, files, chain_map,
                                                                 chain) as frozen:
                        await self._export(files, frozen, fd, request.format)
                else:
                    await self._export(files, chain[0], fd, request.format)
            except BaseException:
                if request.fd is None:
                    _remove_destination(dest, fd)
                raise
            finally:
                if request.fd is None:
                    os.close(fd)
        log.info("exported volume %s to %s", volume_id, dest or "the caller's file",
                 extra={"VOLUME_ID": volume_id})
        return dest

    async def _export(self, files: VolumeFiles, top: Layer, fd: int, fmt: Format) -> None:
        """Flatten ``top`` and what lies below it into the open file ``fd``."""
        st = os.fstat(fd)
        for path in files.existing():
            other = path.lstat()
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                raise InvalidArgument(f"option fd: the file is {path.name}, a file of the "
                                      "volume itself")
        try:
            os.ftruncate(fd, 0)
            await qemuimg.convert(files.directory / top.name, layer_format(top), fd_path(fd),
                                  fmt, limits=self.limits, pass_fds=(fd,),
                                  dst_cache="writeback")
            await asyncio.to_thread(os.fsync, fd)
        except BaseException as exc:
            if is_enospc(exc):
                raise NoSpace("not enough space for the export") from None
            raise

    # ---- internals ----------------------------------------------------------------------

    async def create_new(self, volume_id: str, size: int, fmt: Format, thin: bool,
                         share_name: str | None, make: Callable[[Path], Awaitable[None]], *,
                         operation: str, space_needed: int = 0) -> VolumeMeta:
        """Create a volume whose image ``make`` writes; undone completely on any failure."""
        async with self.locks.volume(volume_id):
            self._require_new(volume_id)
            share = self._pick_share(size, thin, share_name, space_needed)
            files = VolumeFiles.of(share.mount_point, self.naming, volume_id)
            meta = VolumeMeta(id=volume_id, size=size, format=fmt,
                              provisioning="thin" if thin else "thick", created=utc_now(),
                              state="creating", share=share.spec.address,
                              active=files.base_name, operation={"name": operation})
            try:
                self.record(files, meta)  # the durable intent, before the image exists
                crash.point(f"{operation}:intent")
                await make(files.base)
                require_regular(files.base)  # chmod follows links: never someone else's
                os.chmod(files.base, self.file_mode)
                crash.point(f"{operation}:made")
                meta = self.record(files, meta.evolve(state="available", operation=None))
            except BaseException as exc:
                await asyncio.to_thread(self.remove_volume_files, files)
                self._forget(volume_id)
                if is_enospc(exc) and not isinstance(exc, NoSpace):
                    raise NoSpace(f"share {share.spec.address} ran out of space while "
                                  f"creating volume {volume_id}") from None
                raise
            log.info("created volume %s (%d bytes, %s, %s) on %s", volume_id, size, fmt,
                     meta.provisioning, share.spec.address, extra={"VOLUME_ID": volume_id})
            return meta

    def _pick_share(self, size: int, thin: bool, share_name: str | None,
                    space_needed: int) -> Share:
        shares = self.mounted_shares()
        if share_name is not None:
            shares = [s for s in self.shares if share_name in (s.id, s.spec.address)]
            if not shares:
                raise NotFound(f"share {share_name!r} is not configured")
            shares[0].require()
        candidates = []
        for share in shares:
            allocated, provisioned = self.usage(share)
            candidates.append(Candidate(share.spec, capacity(share, allocated, provisioned)))
        chosen = choose_share(candidates, size, not thin, self.placement)
        if space_needed > chosen.capacity.free:
            raise NoSpace(f"share {chosen.spec.address} has {chosen.capacity.free} bytes free; "
                          f"{space_needed} are needed")
        return next(s for s in shares if s.spec == chosen.spec)

    def _require_new(self, volume_id: str) -> None:
        if volume_id in self._volumes:
            raise AlreadyExists(f"volume {volume_id} already exists")
        for share in self.mounted_shares():  # three lookups, not a scan of the share
            files = VolumeFiles.of(share.mount_point, self.naming, volume_id)
            if any(os.path.lexists(path) for path in (files.base, files.info, files.meta)):
                raise AlreadyExists(f"files of volume {volume_id} already exist on "
                                    f"{share.spec.address}")

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

    def require_live(self) -> LiveVolumes:
        if self.live is None:
            raise HypervisorUnavailable("hostvold runs without libvirt: attached volumes "
                                        "cannot be changed")
        return self.live

    async def observe(self, volume_id: str) -> tuple[VolumeMeta, Users]:
        """The volume, with libvirt's word on which domains use its files; the record is
        brought in line. Called under the volume's lock before any step that could change
        or remove its data: our own attachment record is never enough."""
        meta = self.get_volume(volume_id)
        if self.live is None:
            return meta, NOBODY
        return await self.live.observe(meta)

    async def follow_definitions(self, files: VolumeFiles, volume_id: str) -> None:
        """Shut-off domains whose definitions name the volume start on its active file."""
        if self.live is not None:
            await self.live.keep_definitions_in_step(files, volume_id)

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

    def _share_of(self, meta: VolumeMeta) -> Share:
        for share in self.shares:
            if share.spec.address == meta.share:
                share.require()
                return share
        raise NotFound(f"share {meta.share} of volume {meta.id} is not configured")

    def files_of(self, meta: VolumeMeta) -> VolumeFiles:
        return VolumeFiles.of(self._share_of(meta).mount_point, self.naming, meta.id)

    def validated_chain(self, files: VolumeFiles,
                        meta: VolumeMeta) -> tuple[SnapshotMap, list[Layer]]:
        """The info file and the chain from its active file down, checked against each other.

        No process is spawned: the chain is read from the image headers. A mismatch (a
        damaged info file, a missing or foreign layer) is recorded on the volume as a health
        problem and raised as NeedsRepair; nothing else is done.
        """
        try:
            chain_map = read_info(files)
            top_format = meta.format if chain_map.active == files.base_name else "qcow2"
            chain = validate_chain(files, chain_map.active, top_format)
        except (InfoFileDamaged, UnsafeFile) as exc:  # a symlink, a device: a named problem
            self.record(files, meta.evolve(problems=[exc.message]))
            raise
        except FileNotFoundError as exc:
            missing = Path(str(exc.filename)).name
            problems = [f"{missing}, a file of the chain, is missing"]
        else:
            problems = chain_problems(files, chain, chain_map)
        if problems:
            self.record(files, meta.evolve(problems=problems))
            raise NeedsRepair(f"volume {meta.id} needs a repair: {'; '.join(problems)}")
        return chain_map, chain

    async def grow(self, files: VolumeFiles, meta: VolumeMeta, size: int) -> None:
        """Grow the active file to ``size`` offline (idempotent)."""
        top = self.validated_chain(files, meta)[1][0]
        path = files.directory / top.name
        if top.format == "raw":
            await asyncio.to_thread(grow_raw, path, size, meta.provisioning == "thick")
        else:
            info = await qemuimg.info(path, "qcow2", self.limits)
            if info.virtual_size < size:
                await qemuimg.resize(path, "qcow2", size, limits=self.limits, preallocation=(
                    "falloc" if meta.provisioning == "thick" else None))

    def record(self, files: VolumeFiles, meta: VolumeMeta) -> VolumeMeta:
        """Persist ``meta``: an in-flight note in the index first when an operation is under
        way, then the metadata file on the share (atomically), then the index and memory."""
        busy = meta.operation is not None or meta.state in ("creating", "deleting")
        if busy and not self.index.is_inflight(meta.id):
            self.index.mark_inflight(meta.id, meta.share)
        write_meta(files.meta, meta, self.file_mode)
        self.index.put(meta, inflight=busy)
        self._volumes[meta.id] = meta
        self._changed(meta.id)
        return meta

    def _changed(self, volume_id: str) -> None:
        for listener in self.change_listeners:
            try:
                listener(volume_id)
            except Exception:
                log.exception("change listener failed for volume %s", volume_id)

    def _forget(self, volume_id: str) -> None:
        self.index.remove(volume_id)
        self._volumes.pop(volume_id, None)
        self._changed(volume_id)

    @staticmethod
    def remove_volume_files(files: VolumeFiles) -> None:
        """Remove every file of the volume, the metadata file last, and nothing else."""
        for path in files.existing():
            if path != files.meta:
                unlink_durable(path)
        unlink_durable(files.meta)

    @staticmethod
    def _remove_temp_files(files: VolumeFiles) -> None:
        """Leftovers of interrupted atomic writes: never the only copy of anything."""
        for path in files.existing():
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                unlink_durable(path)


def _recorded_base_format(files: VolumeFiles, present: set[str]) -> str | None:
    """The format an overlay recorded for the base file, if any overlay sits on it."""
    for name in sorted(present - {files.base_name}):
        try:
            header = read_qcow2_header(files.directory / name)
        except (UnsafeImage, OSError):
            continue
        if header.backing_file == files.base_name and header.backing_format in ("raw", "qcow2"):
            return header.backing_format
    return None


def file_mtime(path: Path) -> str:
    """A file's modification time as an ISO 8601 UTC string (for adopted records)."""
    return datetime.fromtimestamp(path.lstat().st_mtime, UTC).isoformat(timespec="seconds")


def layer_format(layer: Layer) -> Format:
    """The qemu-img format of a chain layer (only raw and qcow2 ever get this far)."""
    return "raw" if layer.format == "raw" else "qcow2"


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def open_source(path: Path) -> int:
    """Open an image path (root's ``source`` option): a regular file, no symbolic link, no
    device or FIFO (checked before the open: opening those can block or have effects)."""
    try:
        require_regular(path)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                     | os.O_NOCTTY)
    except FileNotFoundError:
        raise NotFound(f"image file {path} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile(f"image file {path} is a symbolic link; give the file itself") \
                from None
        raise InvalidArgument(f"image file {path} cannot be opened: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UnsafeFile(f"image file {path} is {kind(mode)}, not a regular file")
    return fd


def _create_destination(dest: Path | None) -> int:
    """A new file at root's ``destination``: exclusive, never through a symbolic link."""
    assert dest is not None
    try:
        return os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                       | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise AlreadyExists(f"{dest} already exists; hostvold never overwrites a file") \
            from None
    except FileNotFoundError:
        raise NotFound(f"directory {dest.parent} does not exist") from None


def _remove_destination(dest: Path | None, fd: int) -> None:
    """Remove the file a failed export created, if the name still points at it."""
    assert dest is not None
    st = os.fstat(fd)
    try:
        now = dest.lstat()
    except FileNotFoundError:
        return
    if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
        dest.unlink()


def _standalone_qcow2(head: bytes, what: str) -> Qcow2Header:
    return _standalone_qcow2_header(parse_qcow2_header(head, what), what)


def _standalone_qcow2_header(header: Qcow2Header, what: str) -> Qcow2Header:
    """Refuse a qcow2 image that could make qemu-img open anything but itself."""
    if header.backing_file is not None:
        raise UnsafeImage(f"{what} has a backing file {header.backing_file!r}; import a "
                          "standalone image")
    if header.data_file is not None or header.incompatible_features & 4:
        raise ExternalDataFile(f"{what} uses an external data file "
                               f"{header.data_file!r}; refused")
    if header.incompatible_features & ~QCOW2_KNOWN_SAFE:
        raise UnsafeImage(f"{what} uses unknown qcow2 features; refused")
    return header


def header_claim(path: Path) -> str | None:
    """What the first bytes of a file claim to be, if they look like a qcow2 header."""
    try:
        header = read_qcow2_header(path)
    except UnsafeFile:
        return None
    except (UnsafeImage, OSError):
        try:
            fd = open_regular(path)
        except (UnsafeImage, OSError):
            return None
        try:
            magic = os.pread(fd, 4, 0)
        finally:
            os.close(fd)
        return "a qcow2 magic with a malformed header" if magic == QCOW2_MAGIC else None
    backing = f", backing file {header.backing_file!r}" if header.backing_file else ""
    data = f", external data file {header.data_file!r}" if header.data_file else ""
    return f"a qcow2 v{header.version} header, virtual size {header.size} bytes{backing}{data}"


FORMAT_UNCONFIRMED = "FormatUnconfirmed:"


def format_problem(base_name: str, claim: str) -> str:
    return (f"{FORMAT_UNCONFIRMED} {base_name} has no trusted format record and its first bytes "
            f"look like {claim}; adopted as raw. Confirm with `hostvolctl repair VOLUME "
            "--format raw` (keep it raw) or `--format qcow2`")
