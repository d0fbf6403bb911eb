"""The volume use cases for detached volumes: create, import, delete, extend, export, list.

Every multi-step operation records its intent in the volume's metadata file before its
first side effect, so :meth:`VolumeService.recover` can finish or undo it after a crash:

``create``/``import``  metadata ``state=creating`` is written first. Recovery: the caller
                       never heard of success, so every file of the volume is removed.
``delete``             metadata ``state=deleting`` first, metadata file removed last.
                       Recovery: remove what is left.
``extend``             ``operation={"name": "extend", "size": N}`` first. Recovery: grow
                       to N again (idempotent), then record the new size.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hostvold import qemuimg
from hostvold.atomic import fsync_dir, is_temp_of, temp_name, unlink_durable
from hostvold.chain import QCOW2_KNOWN_SAFE, Layer, read_qcow2_header, validate_chain
from hostvold.config import Config
from hostvold.errors import (
    AlreadyExists,
    Failed,
    HostvoldError,
    InvalidArgument,
    InvalidState,
    NoSpace,
    NotFound,
    UnsafeImage,
)
from hostvold.files import create_raw, fsync_file, grow_raw, is_enospc
from hostvold.ids import new_id, valid_id
from hostvold.index import VolumeIndex
from hostvold.layout import Naming, VolumeFiles
from hostvold.locks import LocalLocks
from hostvold.metadata import VolumeMeta, read_meta, utc_now, write_meta
from hostvold.models import CreateVolume, ExportVolume, ExtendVolume, ImportVolume
from hostvold.mounts import Share, capacity
from hostvold.qemuimg import Format, Limits
from hostvold.shares import Candidate, Placement, choose_share

log = logging.getLogger(__name__)


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

    # ---- start-up -------------------------------------------------------------------

    def load_index(self) -> None:
        self._volumes = {meta.id: meta for meta in self.index.load()}

    def rebuild_index(self) -> None:
        """Read every metadata file on every mounted share into the index."""
        found: dict[str, VolumeMeta] = {}
        for share in self.mounted_shares():
            for entry in os.scandir(share.mount_point):
                volume_id = self.naming.volume_id_of_meta(entry.name)
                if volume_id is None:
                    continue
                try:
                    meta = read_meta(Path(entry.path))
                except (Failed, OSError) as exc:
                    log.error("skipping unreadable metadata %s: %s", entry.path, exc)
                    continue
                if meta.id != volume_id:
                    log.error("skipping %s: it describes volume %s", entry.path, meta.id)
                    continue
                found[volume_id] = meta.evolve(share=share.spec.address) \
                    if meta.share != share.spec.address else meta
        self.index.replace_all(found.values())
        self._volumes = found
        log.info("index rebuilt from %d shares: %d volumes",
                 len(self.mounted_shares()), len(found))

    async def recover(self) -> None:
        """Finish or undo every operation a crash interrupted (see the module docstring)."""
        for meta in list(self._volumes.values()):
            try:
                share = self._share_of(meta)
            except HostvoldError:
                continue  # its share is down; recovered when it comes back
            files = VolumeFiles.of(share.mount_point, self.naming, meta.id)
            self._remove_temp_files(files)
            if meta.state in ("creating", "deleting"):
                log.warning("recovery: removing volume %s left in state %s", meta.id, meta.state)
                self._remove_volume_files(files)
                self._forget(meta.id)
            elif meta.operation and meta.operation.get("name") == "extend":
                log.warning("recovery: finishing extend of volume %s", meta.id)
                await self._grow(files, meta, int(meta.operation["size"]))
                self._record(files, meta.evolve(size=int(meta.operation["size"]), operation=None))

    # ---- queries ----------------------------------------------------------------------

    def list_volumes(self) -> list[VolumeMeta]:
        return sorted(self._volumes.values(), key=lambda meta: meta.id)

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

        return await self._create(volume_id, request.size, fmt, thin, request.share, make)

    async def import_volume(self, **options: Any) -> VolumeMeta:
        """A new volume holding the guest-visible bytes of an image file."""
        request: ImportVolume = ImportVolume.parse(**options)
        source = request.source
        if not source.is_file():
            raise NotFound(f"image file {source} does not exist or is not a regular file")
        sniffed = await asyncio.to_thread(_sniff_format, source)
        src_fmt: Format = request.source_format or sniffed
        if src_fmt == "qcow2":
            header = await asyncio.to_thread(read_qcow2_header, source)
            if header.backing_file is not None:
                raise UnsafeImage(f"image {source} has a backing file "
                                  f"{header.backing_file!r}; import a standalone image")
            if header.data_file is not None or header.incompatible_features & ~QCOW2_KNOWN_SAFE:
                raise UnsafeImage(f"image {source} uses an external data file or unknown "
                                  "features; refused")
        info = await qemuimg.info(source, src_fmt, self.limits)
        virtual = info.virtual_size
        size = request.size or _round_up(virtual, 512)
        if size < virtual:
            raise InvalidArgument(f"size {size} is smaller than the image's {virtual} bytes")
        fmt: Format = request.format or ("qcow2" if self.config.volumes.qcow2_volumes else "raw")
        needed = (await qemuimg.measure(source, src_fmt, fmt, self.limits)).required

        async def make(path: Path) -> None:
            await qemuimg.convert(source, src_fmt, path, fmt)
            if size > virtual:
                await qemuimg.resize(path, fmt, size)
            os.chmod(path, self.file_mode)
            await asyncio.to_thread(fsync_file, path)

        return await self._create(request.id or new_id(), size, fmt, True, request.share, make,
                                  space_needed=needed)

    async def delete_volume(self, volume_id: str) -> None:
        volume_id = valid_id(volume_id, "volume id")
        async with self.locks.volume(volume_id):
            meta = self.get_volume(volume_id)
            if meta.attachment or meta.state == "in-use":
                raise InvalidState(f"volume {volume_id} is attached to "
                                   f"{(meta.attachment or {}).get('domain', 'a domain')}; "
                                   "detach it first")
            files = self._files(meta)
            self._record(files, meta.evolve(state="deleting"))
            await asyncio.to_thread(self._remove_volume_files, files)
            self._forget(volume_id)
            log.info("deleted volume %s", volume_id)

    async def extend_volume(self, volume_id: str, **options: Any) -> VolumeMeta:
        volume_id = valid_id(volume_id, "volume id")
        request: ExtendVolume = ExtendVolume.parse(**options)
        async with self.locks.volume(volume_id):
            meta = self._require_available(volume_id)
            if request.size <= meta.size:
                raise InvalidArgument(f"new size {request.size} must be larger than the "
                                      f"current {meta.size} bytes")
            files = self._files(meta)
            self._validated_chain(files, meta)
            grow = request.size - meta.size
            share = self._share_of(meta)
            allocated, provisioned = self.usage(share)
            cap = capacity(share, allocated, provisioned)
            if provisioned + grow > cap.total * self.placement.max_over_subscription_ratio or (
                    meta.provisioning == "thick" and grow > cap.free):
                raise NoSpace(f"share {share.spec.address} cannot grow volume {volume_id} by "
                              f"{grow} bytes")
            self._record(files, meta.evolve(operation={"name": "extend", "size": request.size}))
            try:
                await self._grow(files, meta, request.size)
            except BaseException:
                self._record(files, meta)
                raise
            return self._record(files, meta.evolve(size=request.size, operation=None))

    async def export_volume(self, volume_id: str, **options: Any) -> Path:
        """Flatten the volume's active chain into a new standalone image file."""
        volume_id = valid_id(volume_id, "volume id")
        request: ExportVolume = ExportVolume.parse(**options)
        dest = request.destination
        if not dest.parent.is_dir():
            raise NotFound(f"directory {dest.parent} does not exist")
        if dest.exists() or dest.is_symlink():
            raise AlreadyExists(f"{dest} already exists; hostvold never overwrites a file")
        async with self.locks.volume(volume_id):
            meta = self._require_available(volume_id)
            files = self._files(meta)
            top = self._validated_chain(files, meta)[0]
            tmp = temp_name(dest)
            try:
                await qemuimg.convert(files.directory / top.name, _fmt(top), tmp, request.format)
                await asyncio.to_thread(fsync_file, tmp)
                os.rename(tmp, dest)
                await asyncio.to_thread(fsync_dir, dest.parent)
            except BaseException as exc:
                tmp.unlink(missing_ok=True)
                if is_enospc(exc):
                    raise NoSpace(f"not enough space in {dest.parent} for the export") from None
                raise
        log.info("exported volume %s to %s", volume_id, dest)
        return dest

    # ---- internals ----------------------------------------------------------------------

    async def _create(self, volume_id: str, size: int, fmt: Format, thin: bool,
                      share_name: str | None, make: Callable[[Path], Any],
                      space_needed: int = 0) -> VolumeMeta:
        async with self.locks.volume(volume_id):
            self._require_new(volume_id)
            share = self._pick_share(size, thin, share_name, space_needed)
            files = VolumeFiles.of(share.mount_point, self.naming, volume_id)
            meta = VolumeMeta(id=volume_id, size=size, format=fmt,
                              provisioning="thin" if thin else "thick", created=utc_now(),
                              state="creating", share=share.spec.address,
                              active=files.base_name, operation={"name": "create"})
            try:
                self._record(files, meta)  # the durable intent, before the image exists
                await make(files.base)
                os.chmod(files.base, self.file_mode)
                meta = self._record(files, meta.evolve(state="available", operation=None))
            except BaseException as exc:
                await asyncio.to_thread(self._remove_volume_files, files)
                self._forget(volume_id)
                if is_enospc(exc) and not isinstance(exc, NoSpace):
                    raise NoSpace(f"share {share.spec.address} ran out of space while "
                                  f"creating volume {volume_id}") from None
                raise
            log.info("created volume %s (%d bytes, %s, %s) on %s", volume_id, size, fmt,
                     meta.provisioning, share.spec.address)
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
        for share in self.mounted_shares():
            if VolumeFiles.of(share.mount_point, self.naming, volume_id).existing():
                raise AlreadyExists(f"files of volume {volume_id} already exist on "
                                    f"{share.spec.address}")

    def _require_available(self, volume_id: str) -> VolumeMeta:
        meta = self.get_volume(volume_id)
        if meta.state != "available":
            raise InvalidState(f"volume {volume_id} is {meta.state}; this needs an "
                               "available (detached, idle) volume")
        return meta

    def _share_of(self, meta: VolumeMeta) -> Share:
        for share in self.shares:
            if share.spec.address == meta.share:
                share.require()
                return share
        raise NotFound(f"share {meta.share} of volume {meta.id} is not configured")

    def _files(self, meta: VolumeMeta) -> VolumeFiles:
        return VolumeFiles.of(self._share_of(meta).mount_point, self.naming, meta.id)

    def _validated_chain(self, files: VolumeFiles, meta: VolumeMeta) -> list[Layer]:
        top_format = meta.format if meta.active == files.base_name else "qcow2"
        return validate_chain(files, meta.active, top_format)

    async def _grow(self, files: VolumeFiles, meta: VolumeMeta, size: int) -> None:
        top = self._validated_chain(files, meta)[0]
        path = files.directory / top.name
        if top.format == "raw":
            await asyncio.to_thread(grow_raw, path, size, meta.provisioning == "thick")
        else:
            info = await qemuimg.info(path, "qcow2", self.limits)
            if info.virtual_size < size:
                await qemuimg.resize(path, "qcow2", size, preallocation=(
                    "falloc" if meta.provisioning == "thick" else None))

    def _record(self, files: VolumeFiles, meta: VolumeMeta) -> VolumeMeta:
        """Persist ``meta`` on the share (atomically), then in the index and memory."""
        write_meta(files.meta, meta, self.file_mode)
        self.index.put(meta)
        self._volumes[meta.id] = meta
        return meta

    def _forget(self, volume_id: str) -> None:
        self.index.remove(volume_id)
        self._volumes.pop(volume_id, None)

    @staticmethod
    def _remove_volume_files(files: VolumeFiles) -> None:
        """Remove every file of the volume, the metadata file last, and nothing else."""
        for path in files.existing():
            if path != files.meta:
                unlink_durable(path)
        unlink_durable(files.meta)

    @staticmethod
    def _remove_temp_files(files: VolumeFiles) -> None:
        for path in files.existing():
            if path.name.startswith(".") and path.name.endswith(".tmp") and any(
                    is_temp_of(path.name, target) or path.name.startswith(f".{target}.")
                    for target in (files.base_name,)):
                unlink_durable(path)


def _fmt(layer: Layer) -> Format:
    return "raw" if layer.format == "raw" else "qcow2"


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def _sniff_format(path: Path) -> Format:
    """Decide between raw and qcow2 from the magic only: nothing else is trusted."""
    with open(path, "rb") as image:
        return "qcow2" if image.read(4) == b"QFI\xfb" else "raw"
