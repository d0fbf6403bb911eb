"""Export of the blocks that changed between two points in time of a volume (SPEC 5b).

The export runs as a job holding the volume's lock for as long as its client reads, so no
delete or revert moves the layers it serves. ``to`` = now on an attached volume reads a
temporary live snapshot's frozen layer (never the file QEMU writes) and merges it away
when the client leaves; on a detached volume nothing runs the files but the NBD server.
A restart removes the views a previous run left and merges its temporary snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hostvold.core.chainmap import SnapshotMap
from hostvold.core.changes import ChangeSpan, Extent, changed_bytes, extents, resolve_span
from hostvold.core.ids import new_id
from hostvold.core.images import Layer, layer_format
from hostvold.core.layout import VolumeFiles
from hostvold.core.records import VolumeMeta
from hostvold.storage import changeview

if TYPE_CHECKING:
    from hostvold.ops.operations import Operations

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Export:
    """What the caller gets: the NBD connection, the extent map, and what it covers."""

    fd: int
    runs: list[Extent]
    span: ChangeSpan
    size: int


class ChangeExports:
    def __init__(self, ops: Operations, directory: Path) -> None:
        self.ops = ops
        self.store = ops.store
        self.directory = directory  # private: one subdirectory per export
        changeview.remove_leftovers(directory)

    async def export(self, volume_id: str, since: str | None, to: str | None,
                     full_if_needed: bool, ready: asyncio.Future[Export]) -> int:
        """Serve the changes from ``since`` to ``to`` (None: everything / now); ``ready``
        gets the export once it can be read. Returns, when the client has left, the bytes
        marked changed."""
        ops = self.ops
        async with ops.access.locked(volume_id):
            _meta, files, _users = await ops.access.observe(volume_id)
            meta = self.store.require_idle(volume_id)
            chain_map, chain = await self.store.validated_chain(files, meta, fresh=True)
            span = resolve_span(chain, chain_map, meta.deleted, since, to, full_if_needed)
            async with self._at_rest(meta, files, chain_map, chain, to is None):
                top = files.directory / span.top.name
                fmt = layer_format(span.top)
                workdir = changeview.private_dir(self.directory, new_id())
                try:
                    entries, _ = await asyncio.gather(
                        changeview.map_entries(top, fmt, self.store.limits),
                        changeview.prepare(workdir, top, fmt, meta.size))
                    runs = extents(entries, span)
                    view = await changeview.mark(workdir, runs)
                    fd, server = await changeview.serve(view, workdir)
                    if ready.done():  # the caller went away meanwhile
                        os.close(fd)
                    else:
                        ready.set_result(Export(fd, runs, span, meta.size))
                    log.info("exporting the changes of volume %s from %s to %s (%d bytes)",
                             volume_id, span.since or "the start", to or "now",
                             changed_bytes(runs), extra={"VOLUME_ID": volume_id})
                    try:  # the client reads; the server ends when it leaves
                        said = await changeview.ended(server)
                        if said:
                            log.warning("NBD server of volume %s: %s", volume_id, said,
                                        extra={"VOLUME_ID": volume_id})
                    finally:
                        if server.returncode is None:  # cancelled: the export ends now
                            server.kill()
                            await asyncio.shield(server.wait())
                finally:
                    await asyncio.to_thread(shutil.rmtree, workdir, True)
        return changed_bytes(runs)

    @contextlib.asynccontextmanager
    async def _at_rest(self, meta: VolumeMeta, files: VolumeFiles, chain_map: SnapshotMap,
                       chain: list[Layer], now: bool) -> AsyncIterator[None]:
        """The layers read held still: on an attached volume asked for now, a temporary
        live snapshot (merged away after) stops QEMU writing the top one."""
        if now and meta.state == "in-use":
            async with self.ops.access.require_live().point_in_time(meta, files, chain_map, chain):
                yield
        else:
            yield
