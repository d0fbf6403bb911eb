"""``org.hostvold1.Volume`` at ``/org/hostvold1/volumes/<id>``: one volume.

:class:`VolumeProperties` holds what the getters read (a cache made from the volume's
metadata whenever :class:`.objects.Api` syncs the volume); :class:`VolumeInterface` adds
the methods. Every change but CreateSnapshot and Repair runs as a job.
"""

# no "from __future__ import annotations": dbus-fast reads the Annotated signatures
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from dbus_fast import PropertyAccess, Variant
from dbus_fast.annotations import DBusDict, DBusObjectPath, DBusStr, DBusUInt64
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property

from hostvold.core.errors import (
    AlreadyExists,
    InUse,
    InvalidArgument,
    InvalidState,
    NotAuthorized,
    NotFound,
)
from hostvold.core.models import (
    AttachVolume,
    CopyVolume,
    ExportVolume,
    ExtendVolume,
    RepairVolume,
    RevertVolume,
)
from hostvold.core.records import VolumeMeta
from hostvold.server.bus import id_from_path, object_path
from hostvold.server.calls import (
    EXPORT_OPTIONS,
    INT,
    NEW_VOLUME,
    NO_OPTIONS,
    STR,
    ObjectPaths,
    Pair,
    Strings,
    announce_changes,
    caller_fd,
    close_fd,
    keep_fd,
    named_errors,
    read_options,
    refuse_smaller,
)
from hostvold.server.changes import VolumeChanges
from hostvold.server.managed import CachedEntry

if TYPE_CHECKING:
    from hostvold.server.api import Api
    from hostvold.storage.mounts import Share


def _volume_properties(meta: VolumeMeta, api: "Api") -> dict[str, Any]:
    """Every property's value, for the changes an update announces."""
    return {
        "Id": meta.id, "Size": meta.size, "Format": meta.format,
        "Provisioning": meta.provisioning, "Created": meta.created,
        "Share": _share_path(meta, api), "ActiveFile": meta.active, "State": meta.state,
        "Attachment": _attachment(meta), "Host": _host(meta),
        "Snapshots": _snapshot_paths(meta),
        "Problems": list(meta.problems), "ConnectionInfo": _connection_info(meta, api),
    }


def _share_of(meta: VolumeMeta, api: "Api") -> "Share | None":
    return next((s for s in api.store.shares if s.spec.address == meta.share), None)


def _share_path(meta: VolumeMeta, api: "Api") -> str:
    share = _share_of(meta, api)
    return object_path("shares", share.id) if share else "/"


def _attachment(meta: VolumeMeta) -> tuple[str, str]:
    attachment = meta.attachment or {}
    return (str(attachment.get("domain", "")), str(attachment.get("target", "")))


def _host(meta: VolumeMeta) -> str:
    """The host whose libvirt runs the attached domain (during a migration, the one the
    guest comes from); empty when the volume is not attached."""
    return str((meta.attachment or {}).get("host") or "")


def _snapshot_paths(meta: VolumeMeta) -> list[str]:
    """Oldest first."""
    return [object_path("snapshots", sid) for sid in sorted(
        meta.snapshots, key=lambda sid: (meta.snapshots[sid].get("created", ""), sid))]


def _connection_info(meta: VolumeMeta, api: "Api") -> dict[str, Variant]:
    """What another tool needs to open the volume, in the shape of Cinder's
    ``initialize_connection`` for NFS, plus where it is on this host."""
    share = _share_of(meta, api)
    if share is None:
        return {}
    fmt = meta.format if meta.active == api.store.naming.base_name(meta.id) else "qcow2"
    kind = "nfs" if share.spec.fstype.startswith("nfs") else share.spec.fstype
    return {"driver_volume_type": Variant("s", kind), "export": Variant("s", share.spec.address),
            "name": Variant("s", meta.active), "options": Variant("s", share.spec.options),
            "format": Variant("s", fmt), "mount_point": Variant("s", str(share.mount_point)),
            "path": Variant("s", str(share.mount_point / meta.active))}


class VolumeProperties(ServiceInterface, CachedEntry):
    """The Volume interface's properties, read from the volume's record as the store last
    gave it (:meth:`update`); besides, only its marshalled GetManagedObjects entry is kept
    per object (memory per volume, P6), dropped at every update."""

    def __init__(self, api: "Api", meta: VolumeMeta) -> None:
        super().__init__("org.hostvold1.Volume")
        self.api = api
        self.meta = meta

    @property
    def path(self) -> str:
        return object_path("volumes", self.meta.id)

    def update(self, meta: VolumeMeta) -> None:
        if meta is self.meta:
            return
        before = _volume_properties(self.meta, self.api)
        self.meta = meta
        self.managed_entry = None
        announce_changes(self, before, _volume_properties(meta, self.api))

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> DBusStr:
        return self.meta.id

    @dbus_property(access=PropertyAccess.READ)
    def Size(self) -> DBusUInt64:
        return self.meta.size

    @dbus_property(access=PropertyAccess.READ)
    def Format(self) -> DBusStr:
        return self.meta.format

    @dbus_property(access=PropertyAccess.READ)
    def Provisioning(self) -> DBusStr:
        return self.meta.provisioning

    @dbus_property(access=PropertyAccess.READ)
    def Created(self) -> DBusStr:
        return self.meta.created

    @dbus_property(access=PropertyAccess.READ)
    def Share(self) -> DBusObjectPath:
        return _share_path(self.meta, self.api)

    @dbus_property(access=PropertyAccess.READ)
    def ActiveFile(self) -> DBusStr:
        return self.meta.active

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> DBusStr:
        return self.meta.state

    @dbus_property(access=PropertyAccess.READ)
    def Attachment(self) -> Pair:
        """(domain, target device) of the attached volume, both non-empty; ``("", "")``
        (both empty, never absent: the type stays ``(ss)``) when it is not attached."""
        return _attachment(self.meta)

    @dbus_property(access=PropertyAccess.READ)
    def Host(self) -> DBusStr:
        return _host(self.meta)

    @dbus_property(access=PropertyAccess.READ)
    def Snapshots(self) -> ObjectPaths:
        return _snapshot_paths(self.meta)

    @dbus_property(access=PropertyAccess.READ)
    def Problems(self) -> Strings:
        return list(self.meta.problems)

    @dbus_property(access=PropertyAccess.READ)
    def ConnectionInfo(self) -> DBusDict:
        """How to reach the active file: ``driver_volume_type``, ``export``, ``name``,
        ``options``, ``format`` (as Cinder's NFS driver gives them), ``mount_point`` and
        ``path`` on this host."""
        return _connection_info(self.meta, self.api)


class VolumeInterface(VolumeProperties, VolumeChanges):
    """The Volume interface's methods; each checks its caller and options at once."""

    async def _admin(self, action: str) -> int:
        return await self.api.authorizer.require_admin(f"Volume.{action}")

    def _job(self, operation: str, work: Callable[[], Awaitable[Any]],
             bytes_total: int = 0) -> str:
        return self.api.start_job(operation, [self.path], work, bytes_total)

    @dbus_method()
    @named_errors
    async def CreateSnapshot(self, options: DBusDict) -> DBusObjectPath:
        await self._admin("CreateSnapshot")
        values = read_options(options, {"id": STR})
        snap = await self.api.ops.create_snapshot(self.meta.id, values.get("id"))
        self.api.sync_volume(self.meta.id)
        return object_path("snapshots", snap.id)

    def _refuse_attached(self, action: str) -> None:
        """Said when the call arrives: the volume is attached (the use case asks libvirt
        again under the lock before it acts)."""
        attachment = self.meta.attachment or {}
        if attachment or self.meta.state == "in-use":
            where = f" on host {attachment['host']}" if attachment.get("host") else ""
            raise InUse(f"cannot {action} volume {self.meta.id}: it is attached to domain "
                        f"{attachment.get('domain', '?')}{where}; detach it first")

    @dbus_method()
    @named_errors
    async def Extend(self, options: DBusDict) -> DBusObjectPath:
        await self._admin("Extend")
        values = read_options(options, {"size": INT})
        request: ExtendVolume = ExtendVolume.parse(**values)
        self.api.store.require_idle(self.meta.id)  # what can be known now is said now
        if request.size <= self.meta.size:
            raise InvalidArgument(f"option size: the new size {request.size} must be larger "
                                  f"than the current {self.meta.size} bytes")
        volume_id = self.meta.id

        async def work() -> VolumeMeta:
            return await self.api.ops.extend_volume(volume_id, **values)

        return self._job("extend", work)

    @dbus_method()
    @named_errors
    async def Clone(self, options: DBusDict) -> DBusObjectPath:
        values, request = await self.api.admit_new_volume(
            "Volume.Clone", options, NEW_VOLUME, CopyVolume.parse)
        self.api.store.require_idle(self.meta.id)
        refuse_smaller(request.size, self.meta.size, f"volume {self.meta.id}")
        volume_id = self.meta.id

        async def make() -> VolumeMeta:
            return await self.api.ops.clone(volume_id, **values)

        return self.api.start_volume_job("clone", [self.path], make, self.meta.size)

    @dbus_method()
    @named_errors
    async def Export(self, options: DBusDict) -> DBusObjectPath:
        """Into option ``fd``, a new file the caller created and opened for writing (so it
        has the caller's owner and umask); the ``destination`` path form is root's only."""
        uid = await self._admin("Export")
        values = read_options(options, EXPORT_OPTIONS)
        if "destination" in values and uid != 0:
            raise NotAuthorized("option destination (a file the daemon creates) is accepted "
                                "from root only; pass a file descriptor of a file you "
                                "created (option fd)")
        request: ExportVolume = ExportVolume.parse(**values)
        if request.destination is not None:
            if not request.destination.parent.is_dir():
                raise NotFound(f"directory {request.destination.parent} does not exist")
            if os.path.lexists(request.destination):
                raise AlreadyExists(f"{request.destination} already exists; hostvold never "
                                    "overwrites a file")
        self.api.store.require_idle(self.meta.id)
        fd = keep_fd(None if request.fd is None else caller_fd(request.fd, write=True))
        values["fd"] = fd
        volume_id = self.meta.id

        async def work() -> str:
            try:
                return str(await self.api.ops.export_volume(volume_id, **values) or "")
            finally:
                close_fd(fd)

        return self._job("export", work, self.meta.size)

    @dbus_method()
    @named_errors
    async def Revert(self, options: DBusDict) -> DBusObjectPath:
        await self._admin("Revert")
        values = read_options(options, {"snapshot": frozenset("so")})
        snapshot = str(values.get("snapshot", ""))
        if snapshot.startswith("/"):
            try:
                snapshot = id_from_path(snapshot, "snapshots")
            except ValueError as exc:
                raise InvalidArgument(f"option snapshot: {exc}") from None
        sid = RevertVolume.parse(snapshot=snapshot).snapshot
        if sid not in self.meta.snapshots:
            raise NotFound(f"snapshot {sid} of volume {self.meta.id} does not exist")
        self._refuse_attached("revert")
        self.api.store.require_available(self.meta.id)
        volume_id = self.meta.id

        async def work() -> None:
            await self.api.ops.revert(volume_id, sid)

        return self._job("revert", work)

    @dbus_method()
    @named_errors
    async def Attach(self, options: DBusDict) -> DBusObjectPath:
        await self._admin("Attach")
        request: AttachVolume = AttachVolume.parse(
            **read_options(options, {"domain": STR, "target": STR}))
        domain, target = request.domain, request.target
        self._refuse_attached(f"attach to {domain}")
        self.api.store.require_available(self.meta.id)
        if self.api.ops.live is not None:  # an unknown domain or a used target: said now
            await self.api.ops.live.plug_into(domain, target)
        volume_id = self.meta.id

        async def work() -> VolumeMeta:
            return await self.api.ops.attach(volume_id, domain, target)

        return self._job("attach", work)

    @dbus_method()
    @named_errors
    async def Detach(self, options: DBusDict) -> DBusObjectPath:
        await self._admin("Detach")
        read_options(options, NO_OPTIONS)
        if self.meta.state != "in-use" or self.meta.operation is not None:
            raise InvalidState(f"volume {self.meta.id} is {self.meta.state}, not attached and "
                               "idle")
        volume_id = self.meta.id

        async def work() -> VolumeMeta:
            return await self.api.ops.detach(volume_id)

        return self._job("detach", work)

    @dbus_method()
    @named_errors
    async def Repair(self, options: DBusDict) -> Strings:
        """Option ``format`` (raw|qcow2) confirms the base file's format; ``choice``
        (base|overlay) settles an undecided pivot."""
        await self._admin("Repair")
        choice = options.pop("choice", None)
        if choice is not None and (choice.signature != "s"
                                   or choice.value not in ("base", "overlay")):
            raise InvalidArgument("option choice must be the string 'base' or 'overlay'")
        request: RepairVolume = RepairVolume.parse(**read_options(options, {"format": STR}))
        done = await self.api.ops.repair(self.meta.id, request.format,
                                         choice.value if choice is not None else None)
        self.api.sync_volume(self.meta.id)
        return done

    @dbus_method()
    @named_errors
    async def Delete(self, options: DBusDict) -> DBusObjectPath:
        await self._admin("Delete")
        read_options(options, NO_OPTIONS)
        self._refuse_attached("delete")
        volume_id = self.meta.id

        async def work() -> None:
            await self.api.ops.delete_volume(volume_id)

        return self._job("delete-volume", work)
