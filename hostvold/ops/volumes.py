"""Volume use cases on files no domain uses: create, import, delete, extend, export.

Called by :mod:`hostvold.ops.operations` under the volume's lock, after libvirt said no
running domain uses the volume. Each multi-step change is recorded before its first side
effect (see :mod:`hostvold.ops.store`); recovery:

``delete``
    ``intent`` (``state=deleting``) -> ``files-removed`` -> done (metadata file removed
    last). Recovery: remove what is left.
``extend``
    ``intent`` (``operation={"name": "extend", "size": N}``) -> ``grown`` -> done.
    Recovery: grow to N again (idempotent), then record the new size.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from hostvold.core import crash
from hostvold.core.aio import uninterrupted
from hostvold.core.errors import InvalidArgument, NoSpace, UnsafeImage
from hostvold.core.ids import new_id
from hostvold.core.images import Format, Layer, layer_format
from hostvold.core.layout import VolumeFiles, temp_name
from hostvold.core.models import MAX_SIZE, CreateVolume, ImportVolume
from hostvold.core.records import VolumeMeta
from hostvold.ops.store import VolumeStore
from hostvold.storage import qemuimg
from hostvold.storage.files import (
    copy_fd_to_new_file,
    create_raw,
    fsync_file,
    grow_raw,
    is_enospc,
)
from hostvold.storage.qcow2 import (
    QCOW2_MAGIC,
    read_head,
    read_qcow2_header,
    standalone_qcow2,
    standalone_qcow2_header,
)
from hostvold.storage.qemuimg import fd_path
from hostvold.storage.safefile import check_caller_fd, open_source
from hostvold.storage.space import measure
from hostvold.storage.volumefiles import remove_volume_files

log = logging.getLogger(__name__)


def image_size(fd: int, source_format: Format | None) -> tuple[Format, int]:
    """The format of an image handed over as ``fd`` (the named one, else qcow2 when its
    magic says so, else raw) and its virtual size, from its header; UnsafeImage for a
    qcow2 image that could reach other files, or one larger than hostvold accepts. Also
    asked when an import call arrives. Reads the file: off the loop."""
    head = read_head(fd)
    fmt: Format = source_format or ("qcow2" if head[:4] == QCOW2_MAGIC else "raw")
    virtual = (standalone_qcow2(head, "the image").size if fmt == "qcow2"
               else os.fstat(fd).st_size)
    if virtual > MAX_SIZE:
        raise UnsafeImage(f"the image claims a virtual size of {virtual} bytes, more than "
                          f"the {MAX_SIZE} hostvold accepts; refused")
    return fmt, virtual


class VolumeOps:
    def __init__(self, store: VolumeStore) -> None:
        self.store = store
        store.recoverers["extend"] = self._recover_extend

    def _default_format(self, asked: Format | None) -> Format:
        return asked or ("qcow2" if self.store.config.volumes.qcow2_volumes else "raw")

    async def create_volume(self, **options: Any) -> VolumeMeta:
        store = self.store
        request: CreateVolume = CreateVolume.parse(**options)
        fmt = self._default_format(request.format)
        thin = store.config.volumes.sparsed_volumes if request.provisioning is None \
            else request.provisioning == "thin"

        async def make(path: Path) -> None:
            if fmt == "raw":  # its thread ends before a cancelled create removes the files
                await uninterrupted(asyncio.to_thread(create_raw, path, request.size, not thin,
                                                      store.file_mode))
            else:
                await qemuimg.create(path, "qcow2", request.size,
                                     preallocation="metadata" if thin else "falloc")

        return await store.create_new(request.id or new_id(), request.size, fmt, thin,
                                      request.share, make, operation="create")

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
        store = self.store
        src_fmt, virtual = await asyncio.to_thread(image_size, fd, request.source_format)
        st = os.fstat(fd)
        if src_fmt == "qcow2":
            needed = 2 * st.st_size + (1 << 20)  # the private copy, then the volume
        else:
            needed = (await qemuimg.measure(fd_path(fd), "raw", request.format or "raw",
                                            store.limits, pass_fds=(fd,))).required
        size = request.size or -(-virtual // 512) * 512
        if size < virtual:
            raise InvalidArgument(f"size {size} is smaller than the image's {virtual} bytes")
        fmt = self._default_format(request.format)

        async def make(path: Path) -> None:
            if src_fmt == "raw":
                await qemuimg.convert(fd_path(fd), "raw", path, fmt, limits=store.limits,
                                      pass_fds=(fd,), src_cache="writeback")
            else:
                copy = temp_name(path)  # one of the new volume's files: removed on failure
                try:
                    await asyncio.to_thread(copy_fd_to_new_file, fd, copy, 0o600)
                    private = await asyncio.to_thread(read_qcow2_header, copy)
                    standalone_qcow2_header(private, "the image")
                    if private.size != virtual:
                        raise UnsafeImage("the image changed while it was imported; refused")
                    await qemuimg.convert(copy, "qcow2", path, fmt, limits=store.limits)
                finally:
                    copy.unlink(missing_ok=True)
            if size > virtual:
                await qemuimg.resize(path, fmt, size, limits=store.limits)
            os.chmod(path, store.file_mode)
            await asyncio.to_thread(fsync_file, path)

        return await store.create_new(request.id or new_id(), size, fmt, True, request.share,
                                      make, space_needed=needed, operation="import")

    async def delete(self, files: VolumeFiles, meta: VolumeMeta) -> None:
        """Every file of the volume, the metadata file last, and nothing else.

        Once begun it is not cut short: a cancel meanwhile lets it finish (the volume is
        gone, never left listed as ``deleting``) and is delivered after it."""
        await uninterrupted(self._delete(files, meta))

    async def _delete(self, files: VolumeFiles, meta: VolumeMeta) -> None:
        await self.store.record(files, meta.evolve(state="deleting"))
        crash.point("delete:intent")
        share = self.store.share_of(meta)
        self.store.locks.check(meta.id)
        share.tally(-await share.io.run(remove_volume_files, files))
        crash.point("delete:files-removed")
        await self.store.forget(meta.id)
        log.info("deleted volume %s", meta.id, extra={"VOLUME_ID": meta.id})

    async def check_growth(self, meta: VolumeMeta, size: int) -> None:
        """Refuse a new size that is not larger, or that the share cannot hold."""
        if size <= meta.size:
            raise InvalidArgument(f"new size {size} must be larger than the current "
                                  f"{meta.size} bytes")
        grow = size - meta.size
        share = self.store.share_of(meta)
        cap = await measure(share, self.store.naming, self.store.volumes.values())
        ratio = self.store.placement.max_over_subscription_ratio
        if cap.provisioned + grow > cap.total * ratio or (
                meta.provisioning == "thick" and grow > cap.free):
            raise NoSpace(f"share {share.spec.address} cannot grow volume {meta.id} by "
                          f"{grow} bytes")

    async def extend(self, files: VolumeFiles, meta: VolumeMeta, size: int) -> VolumeMeta:
        store = self.store
        await store.record(files, meta.evolve(operation={"name": "extend", "size": size}))
        crash.point("extend:intent")
        try:
            await self._grow(files, meta, size)
        except BaseException:
            await store.record(files, meta)
            raise
        crash.point("extend:grown")
        return await store.record(files, meta.evolve(size=size, operation=None))

    async def _recover_extend(self, files: VolumeFiles, meta: VolumeMeta) -> None:
        assert meta.operation is not None
        size = int(meta.operation["size"])
        await self._grow(files, meta, size)
        await self.store.record(files, meta.evolve(size=size, operation=None))

    async def _grow(self, files: VolumeFiles, meta: VolumeMeta, size: int) -> None:
        """Grow the active file to ``size`` offline (idempotent)."""
        top = (await self.store.validated_chain(files, meta))[1][0]
        path = files.directory / top.name
        if top.format == "raw":
            await asyncio.to_thread(grow_raw, path, size, meta.provisioning == "thick")
        else:
            info = await qemuimg.info(path, "qcow2", self.store.limits)
            if info.virtual_size < size:
                await qemuimg.resize(path, "qcow2", size, limits=self.store.limits, preallocation=(
                    "falloc" if meta.provisioning == "thick" else None))

    async def export_layer(self, files: VolumeFiles, top: Layer, fd: int, fmt: Format) -> None:
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
                                  fmt, limits=self.store.limits, pass_fds=(fd,),
                                  dst_cache="writeback")
            await asyncio.to_thread(os.fsync, fd)
        except BaseException as exc:
            if is_enospc(exc):
                raise NoSpace("not enough space for the export") from None
            raise
