"""``org.hostvold1.Snapshot`` at ``/org/hostvold1/snapshots/<id>``: one snapshot of a
volume. Its properties are read from the volume's metadata the services keep."""

# no "from __future__ import annotations": dbus-fast reads the Annotated signatures
import os
from typing import TYPE_CHECKING, Any

from dbus_fast import PropertyAccess
from dbus_fast.annotations import DBusBool, DBusDict, DBusObjectPath, DBusStr
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property

from hostvold.core.errors import HostvoldError
from hostvold.core.images import layer_format
from hostvold.core.models import CopyVolume
from hostvold.core.planning import snapshot_data
from hostvold.core.records import VolumeMeta
from hostvold.server.bus import object_path
from hostvold.server.calls import (
    NEW_VOLUME,
    NO_OPTIONS,
    named_errors,
    read_options,
    refuse_smaller,
)
from hostvold.server.managed import CachedEntry
from hostvold.storage.infofile import read_info
from hostvold.storage.qcow2 import read_qcow2_header, validate_chain

if TYPE_CHECKING:
    from hostvold.server.api import Api


class SnapshotInterface(ServiceInterface, CachedEntry):
    def __init__(self, api: "Api", volume_id: str, snapshot_id: str) -> None:
        super().__init__("org.hostvold1.Snapshot")
        self.api = api
        self.volume_id = volume_id
        self.snapshot_id = snapshot_id

    def _extra(self) -> dict[str, Any]:
        meta = self.api.store.find(self.volume_id)
        return meta.snapshots.get(self.snapshot_id, {}) if meta else {}

    @dbus_method()
    @named_errors
    async def Delete(self, options: DBusDict) -> DBusObjectPath:
        await self.api.authorizer.require_admin("Snapshot.Delete")
        read_options(options, NO_OPTIONS)
        volume_id, sid = self.volume_id, self.snapshot_id

        async def work() -> None:
            await self.api.ops.delete_snapshot(volume_id, sid)

        meta = self.api.store.get_volume(volume_id)
        return self.api.start_job("delete-snapshot", [object_path("volumes", volume_id),
                                                      object_path("snapshots", sid)],
                                  work, meta.size)

    @dbus_method()
    @named_errors
    async def CreateVolume(self, options: DBusDict) -> DBusObjectPath:
        values, request = await self.api.admit_new_volume(
            "Snapshot.CreateVolume", options, NEW_VOLUME, CopyVolume.parse)
        self.api.store.require_idle(self.volume_id)
        if request.size is not None:
            refuse_smaller(request.size, await self._virtual_size(),
                           f"snapshot {self.snapshot_id}")
        volume_id, sid = self.volume_id, self.snapshot_id

        async def make() -> VolumeMeta:
            return await self.api.ops.create_from_snapshot(volume_id, sid, **values)

        meta = self.api.store.get_volume(volume_id)
        return self.api.start_volume_job("create-volume-from-snapshot",
                                         [object_path("snapshots", sid)], make, meta.size)

    async def _virtual_size(self) -> int | None:
        """The snapshot's size (the volume's when it was taken), read from the headers of
        the chain in the share's pool, no process spawned; None when it cannot be read now
        (the job then finds out)."""
        store = self.api.store
        meta = store.get_volume(self.volume_id)

        def read() -> int:
            chain_map = read_info(files)
            top_format = meta.format if chain_map.active == files.base_name else "qcow2"
            chain = validate_chain(files, chain_map.active, top_format)
            layer = snapshot_data(chain, chain_map, self.snapshot_id)
            path = files.directory / layer.name
            if layer_format(layer) == "raw":
                return os.stat(path).st_size
            return read_qcow2_header(path).size

        try:
            files = store.files_of(meta)
            return await store.share_of(meta).io.run(read)
        except (HostvoldError, OSError):
            return None

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> DBusStr:
        return self.snapshot_id

    @dbus_property(access=PropertyAccess.READ)
    def Volume(self) -> DBusObjectPath:
        return object_path("volumes", self.volume_id)

    @dbus_property(access=PropertyAccess.READ)
    def File(self) -> DBusStr:
        meta = self.api.store.find(self.volume_id)
        if meta is None:
            return ""
        return f"{self.api.store.naming.base_name(meta.id)}.{self.snapshot_id}"

    @dbus_property(access=PropertyAccess.READ)
    def Created(self) -> DBusStr:
        return str(self._extra().get("created", ""))

    @dbus_property(access=PropertyAccess.READ)
    def Quiesced(self) -> DBusBool:
        return bool(self._extra().get("quiesced", False))
