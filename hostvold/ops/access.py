"""What every use case does before it changes a volume: take its lock (once its share can
answer), read it again from the share, and ask libvirt who uses it now, never trusting our
own record. Single volumes (:mod:`hostvold.ops.operations`), groups and change exports all
build on this one module."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from hostvold.core.errors import HypervisorUnavailable, InfoFileDamaged, InUse, UnsafeFile
from hostvold.core.ids import valid_id
from hostvold.core.layout import VolumeFiles
from hostvold.core.records import VolumeMeta
from hostvold.core.users import NOBODY, Users
from hostvold.ops.live import LiveVolumes
from hostvold.ops.store import VolumeStore
from hostvold.storage.coordination import Coordination
from hostvold.storage.mounts import find_share


class VolumeAccess:
    def __init__(self, store: VolumeStore) -> None:
        self.store = store
        self.live: LiveVolumes | None = None  # set when hostvold runs with libvirt
        self.coordination: Coordination | None = None  # set when hosts share the shares

    @contextlib.asynccontextmanager
    async def locked(self, volume_id: str) -> AsyncIterator[None]:
        """The volume's lock, once its share can answer (a share gone is refused at once;
        a lock another host holds is Busy at once)."""
        known = self.store.find(valid_id(volume_id, "volume id"))
        if known is not None:
            find_share(self.store.shares, known.share).require_reachable()
        async with self.store.locks.volume(volume_id, wait=False):
            yield

    async def observe(self, volume_id: str, damaged_ok: bool = False,
                      top_only: bool = False) -> tuple[VolumeMeta, VolumeFiles, Users]:
        """Under the lock: the volume re-read from its share (another writer may have
        changed it), and as libvirt says it is used now, its record in line. Damaged files
        seen for the first time are raised as such; once recorded, the use case refuses
        with NeedsRepair (``damaged_ok``: a repair, delete or detach goes on). A volume
        attached on another host is that host's to change (InUse). ``top_only``: for a
        snapshot create, which opens nothing below the active file (:func:`observe_chain`)."""
        self.require_session()
        known = self.store.find(volume_id)
        try:
            await self.store.refresh(volume_id, top_only=top_only)
        except (InfoFileDamaged, UnsafeFile):
            if not damaged_ok and (known is None or not known.problems):
                raise
        meta = self.store.get_volume(volume_id)
        users = NOBODY
        if self.live is not None:
            meta, users = await self.live.attachments.observe(meta)
        attachment = meta.attachment or {}
        if meta.state == "migrating":
            raise InUse(f"volume {volume_id} is migrating with domain "
                        f"{attachment.get('domain')} from host {attachment.get('host') or '?'} "
                        f"to host {attachment.get('to') or '?'}; try again once it has landed")
        if attachment.get("host") not in (None, self.store.host_id):
            raise InUse(f"volume {volume_id} is attached to domain {attachment.get('domain')} "
                        f"on host {attachment['host']}; work on it there")
        return meta, self.store.files_of(meta), users

    def require_session(self) -> None:
        """A fenced host (no coordination session) starts nothing that changes data."""
        if self.coordination is not None:
            self.coordination.require()

    async def follow_definitions(self, files: VolumeFiles, volume_id: str) -> None:
        """Domains defined with the volume's old files are told its new ones."""
        if self.live is not None:
            await self.live.attachments.keep_definitions_in_step(files, volume_id)

    def require_live(self) -> LiveVolumes:
        if self.live is None:
            raise HypervisorUnavailable("hostvold runs without libvirt: attached volumes "
                                        "cannot be changed")
        return self.live
