"""New standalone volumes from a chain: a clone of the current content, or a volume holding
a snapshot's point in time. The source is only read; the new volume is made crash-safe by
:meth:`hostvold.ops.store.VolumeStore.create_new`."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from hostvold.core.errors import InvalidArgument
from hostvold.core.ids import new_id
from hostvold.core.images import Format, Layer, layer_format
from hostvold.core.layout import VolumeFiles
from hostvold.core.models import CopyVolume
from hostvold.core.records import VolumeMeta
from hostvold.ops.store import VolumeStore
from hostvold.storage import qemuimg
from hostvold.storage.files import fsync_file, reflink


class CopyOps:
    def __init__(self, store: VolumeStore) -> None:
        self.store = store

    async def source_size(self, files: VolumeFiles, source: Layer) -> int:
        info = await qemuimg.info(files.directory / source.name, layer_format(source),
                                  self.store.limits)
        return info.virtual_size

    async def copy_out(self, files: VolumeFiles, source: Layer, source_size: int,
                        operation: str, options: dict[str, Any]) -> VolumeMeta:
        request: CopyVolume = CopyVolume.parse(**options)
        size = request.size or source_size
        if size < source_size:
            raise InvalidArgument(f"size {size} is smaller than the {source_size} bytes of the "
                                  "source")
        fmt: Format = request.format or (
            "qcow2" if self.store.config.volumes.qcow2_volumes else "raw")
        src_path = files.directory / source.name

        async def make(path: Path) -> None:
            limits = self.store.limits
            # a raw file to a raw file: the filesystem may share the extents outright (one
            # ioctl); anything else, or where it cannot, is qemu-img's (offloaded) copy
            if not (fmt == "raw" and layer_format(source) == "raw" and await asyncio.to_thread(
                    reflink, src_path, path, 0o600)):
                await qemuimg.convert(src_path, layer_format(source), path, fmt, limits=limits)
            if size > source_size:
                await qemuimg.resize(path, fmt, size, limits=limits)
            await asyncio.to_thread(fsync_file, path)

        return await self.store.create_new(request.id or new_id(), size, fmt, True,
                                             request.share, make, operation=operation)

