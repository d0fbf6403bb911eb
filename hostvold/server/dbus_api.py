"""The D-Bus API (SPEC section 9): Manager, Share, Volume, Snapshot and Job objects.

Thin: every method checks its options when the call arrives (each option's D-Bus type,
then the request model of :mod:`hostvold.core.models`), so a bad call is answered with
``org.hostvold1.Error.InvalidArgument`` and no job is made; then it calls the service and
maps errors to ``org.hostvold1.Error.<Name>``. Long operations return a Job object at once.
File descriptors that come with a call (``ImportVolume``/``Export`` option ``fd``) are
closed when the method returns; a job keeps a ``dup`` of its own. After every
change the affected objects are exported, unexported or announce their changed
properties, so clients never poll. Property getters read cached state only
(``GetManagedObjects`` calls every getter of every object).
"""

# no "from __future__ import annotations": dbus-fast reads the Annotated signatures
import asyncio
import functools
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from dbus_fast import DBusError, Message, MessageType, PropertyAccess, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import (
    DBusBool,
    DBusDict,
    DBusDouble,
    DBusObjectPath,
    DBusSignature,
    DBusStr,
    DBusUInt64,
)
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property, dbus_signal

from hostvold import __version__
from hostvold.core.errors import (
    AlreadyExists,
    HostvoldError,
    InvalidArgument,
    NotAuthorized,
    NotFound,
)
from hostvold.core.models import (
    AttachVolume,
    CopyVolume,
    CreateVolume,
    ExportVolume,
    ExtendVolume,
    ImportVolume,
    RepairVolume,
    RevertVolume,
)
from hostvold.core.records import VolumeMeta
from hostvold.ops.jobs import Job, JobRunner
from hostvold.ops.operations import Operations
from hostvold.ops.store import VolumeStore
from hostvold.server.bus import (
    ERROR_PREFIX,
    ROOT_PATH,
    Authorizer,
    dbus_error,
    id_from_path,
    object_path,
    received_fds,
)
from hostvold.storage.mounts import Share
from hostvold.storage.safefile import check_caller_fd, open_source

log = logging.getLogger(__name__)

ObjectPaths = Annotated[list[str], DBusSignature("ao")]
Strings = Annotated[list[str], DBusSignature("as")]
Pair = Annotated[tuple[str, str], DBusSignature("(ss)")]

T = TypeVar("T")


INT = frozenset("tuxiqn")  # D-Bus integer types a size may come as
STR = frozenset("s")
FD = frozenset("h")
NEW_VOLUME = {"id": STR, "size": INT, "format": STR, "share": STR}
CREATE_OPTIONS = {**NEW_VOLUME, "provisioning": STR}
IMPORT_OPTIONS = {**NEW_VOLUME, "fd": FD, "source": STR, "source_format": STR}
EXPORT_OPTIONS = {"fd": FD, "destination": STR, "format": STR}


def _options(options: dict[str, Variant], accepted: dict[str, frozenset[str]]) -> dict[str, Any]:
    """The options' values, each of a D-Bus type its option accepts; InvalidArgument naming
    the first unknown option or wrong type."""
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = ", ".join(sorted(accepted)) or "no options"
        raise InvalidArgument(f"unknown option {unknown[0]!r}; this method takes {takes}")
    values = {}
    for key, variant in options.items():
        if variant.signature not in accepted[key]:
            wanted = " or ".join(f"'{sig}'" for sig in sorted(accepted[key]))
            raise InvalidArgument(f"option {key}: expected D-Bus type {wanted}, got "
                                  f"'{variant.signature}'")
        values[key] = variant.value
    return values


def _errors(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Map hostvold errors to named D-Bus errors; close the call's file descriptors."""
    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        fds = received_fds.get()
        if fds is not None:
            fds.claimed = True
        try:
            return await method(*args, **kwargs)
        except HostvoldError as exc:
            raise dbus_error(exc) from None
        except DBusError:
            raise
        except Exception as exc:  # a bug: the caller still gets a named error
            log.exception("%s failed unexpectedly", method.__name__)
            raise DBusError(f"{ERROR_PREFIX}Failed",
                            f"internal error: {type(exc).__name__}") from None
        finally:
            if fds is not None:
                fds.close()
    return wrapper


def _keep_fd(fd: int | None) -> int | None:
    """A descriptor of the job's own (the call's are closed when the method returns)."""
    return None if fd is None else os.dup(fd)


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


class Api:
    """Owns the exported objects and keeps them in step with the services."""

    def __init__(self, bus: MessageBus, store: VolumeStore, ops: Operations,
                 jobs: JobRunner, authorizer: Authorizer) -> None:
        self.bus = bus
        self.store = store
        self.ops = ops
        self.jobs = jobs
        self.authorizer = authorizer
        self.started = time.monotonic()
        self.manager = ManagerInterface(self)
        self.share_objects: dict[str, ShareInterface] = {}
        self.volume_objects: dict[str, VolumeInterface] = {}
        self.snapshot_objects: dict[str, SnapshotInterface] = {}
        self.job_objects: dict[str, JobInterface] = {}
        self._usage_pending = False
        store.change_listeners.append(self.sync_volume)
        bus.add_message_handler(self._unknown_object)
        jobs.on_added.append(self._job_added)
        jobs.on_removed.append(self._job_removed)
        jobs.listeners.append(self._job_changed)

    def _unknown_object(self, message: Message) -> Message | None:
        """A call of one of our methods on an object that does not exist: NotFound."""
        if (message.message_type != MessageType.METHOD_CALL
                or not (message.interface or "").startswith("org.hostvold1.")
                or message.path == ROOT_PATH):
            return None
        parts = (message.path or "").split("/")
        kinds: dict[str, dict[str, Any]] = {
            "shares": self.share_objects, "volumes": self.volume_objects,
            "snapshots": self.snapshot_objects, "jobs": self.job_objects}
        kind = parts[3] if len(parts) == 5 and parts[:3] == ["", "org", "hostvold1"] else ""
        if parts[-1].replace("_", "-") in kinds.get(kind, {}):
            return None
        return Message.new_error(message, f"{ERROR_PREFIX}NotFound",
                                 f"no object {message.path} (it does not exist or is gone)")

    def check_new_volume(self, volume_id: str | None, share: str | None) -> None:
        """What can be known about a new volume when the call arrives."""
        if volume_id is not None and self.store.find(volume_id) is not None:
            raise AlreadyExists(f"volume {volume_id} already exists")
        if share is not None and not any(share in (s.id, s.spec.address)
                                         for s in self.store.shares):
            raise NotFound(f"share {share!r} is not configured")

    def export_all(self) -> None:
        self.bus.export(ROOT_PATH, self.manager)
        for share in self.store.shares:
            interface = ShareInterface(self, share)
            self.share_objects[share.id] = interface
            self.bus.export(object_path("shares", share.id), interface)
        for meta in self.store.list_volumes():
            self.sync_volume(meta.id)

    # ---- keeping objects in step -------------------------------------------------------

    def sync_volume(self, volume_id: str) -> None:
        """Export, update or unexport one volume and its snapshots."""
        meta = self.store.find(volume_id)
        current = self.volume_objects.get(volume_id)
        if meta is None:
            if current is not None:
                for sid in list(current.meta.snapshots):
                    self._drop_snapshot(sid)
                self.bus.unexport(object_path("volumes", volume_id))
                del self.volume_objects[volume_id]
            self._share_usage_changed()
            return
        exported = set(current.meta.snapshots) if current is not None else set()
        if current is None:
            current = VolumeInterface(self, meta)
            self.volume_objects[volume_id] = current
            self.bus.export(object_path("volumes", volume_id), current)
        else:
            current.update(meta)
        for sid in exported - set(meta.snapshots):
            self._drop_snapshot(sid)
        for sid in meta.snapshots:
            if sid not in self.snapshot_objects:
                snap = SnapshotInterface(self, volume_id, sid)
                self.snapshot_objects[sid] = snap
                self.bus.export(object_path("snapshots", sid), snap)
        self._share_usage_changed()

    def _drop_snapshot(self, sid: str) -> None:
        if self.snapshot_objects.pop(sid, None) is not None:
            self.bus.unexport(object_path("snapshots", sid))

    def _share_usage_changed(self) -> None:
        """Re-measure the shares once, soon: one scan of each share for a burst of
        changes, not one per change (a share may hold thousands of volumes)."""
        if self._usage_pending:
            return
        self._usage_pending = True

        def refresh() -> None:
            self._usage_pending = False
            for share in self.share_objects.values():
                share.refresh()

        asyncio.get_running_loop().call_later(0.2, refresh)

    def _job_added(self, job: Job) -> None:
        interface = JobInterface(self, job)
        self.job_objects[job.id] = interface
        self.bus.export(object_path("jobs", job.id), interface)

    def _job_removed(self, job: Job) -> None:
        if self.job_objects.pop(job.id, None) is not None:
            self.bus.unexport(object_path("jobs", job.id))

    def _job_changed(self, job: Job, names: set[str]) -> None:
        interface = self.job_objects.get(job.id)
        if interface is None:
            return
        if job.state != "running":
            for path in job.objects:  # the objects the job touched are up to date first
                if path.startswith(f"{ROOT_PATH}/volumes/"):
                    self.sync_volume(path.rsplit("/", 1)[1].replace("_", "-"))
        interface.announce(names)
        if job.state != "running" and "State" in names:
            interface.Completed(job.succeeded, job.error_name and
                                f"org.hostvold1.Error.{job.error_name}", job.error_message)

    def start_job(self, operation: str, objects: list[str], work: Callable[[], Awaitable[Any]],
                  bytes_total: int = 0) -> str:
        job = self.jobs.start(operation, objects, work, bytes_total)
        return object_path("jobs", job.id)

    def volume_path_result(self, job_objects: list[str]) -> Callable[[VolumeMeta], VolumeMeta]:
        """Adds the new volume's path to the job's objects when the job ends."""
        def record(meta: VolumeMeta) -> VolumeMeta:
            self.sync_volume(meta.id)
            job_objects.append(object_path("volumes", meta.id))
            return meta
        return record

    def health(self) -> str:
        down = [s.spec.address for s in self.store.shares if not s.mounted]
        sick = [m.id for m in self.store.list_volumes() if m.problems]
        if not down and not sick:
            return "ok"
        parts = []
        if down:
            parts.append(f"{len(down)} share(s) unavailable")
        if sick:
            parts.append(f"{len(sick)} volume(s) need a repair")
        return "degraded: " + ", ".join(parts)


class ManagerInterface(ServiceInterface):
    def __init__(self, api: Api) -> None:
        super().__init__("org.hostvold1.Manager")
        self.api = api

    @dbus_method()
    @_errors
    async def CreateVolume(self, options: DBusDict) -> DBusObjectPath:
        await self.api.authorizer.require_admin("CreateVolume")
        values = _options(options, CREATE_OPTIONS)
        request: CreateVolume = CreateVolume.parse(**values)
        self.api.check_new_volume(request.id, request.share)
        objects: list[str] = []
        done = self.api.volume_path_result(objects)

        async def work() -> VolumeMeta:
            return done(await self.api.ops.create_volume(**values))

        return self.api.start_job("create-volume", objects, work, request.size)

    @dbus_method()
    @_errors
    async def ImportVolume(self, options: DBusDict) -> DBusObjectPath:
        """The image is option ``fd`` (opened by the caller, for reading); the ``source``
        path form is for root only: the daemon never opens a path for other callers."""
        uid = await self.api.authorizer.require_admin("ImportVolume")
        values = _options(options, IMPORT_OPTIONS)
        if "source" in values and uid != 0:
            raise NotAuthorized("option source (a path the daemon opens) is accepted from "
                                "root only; pass the image as a file descriptor (option fd)")
        request: ImportVolume = ImportVolume.parse(**values)
        self.api.check_new_volume(request.id, request.share)
        if request.fd is not None:
            size = check_caller_fd(request.fd, "fd", write=False).st_size
            fd = _keep_fd(request.fd)
        else:
            assert request.source is not None
            fd = await asyncio.to_thread(open_source, request.source)
            size = os.fstat(fd).st_size
            del values["source"]
        values["fd"] = fd
        objects: list[str] = []
        done = self.api.volume_path_result(objects)

        async def work() -> VolumeMeta:
            try:
                return done(await self.api.ops.import_volume(**values))
            finally:
                _close(fd)

        return self.api.start_job("import-volume", objects, work, size)

    @dbus_method()
    def Status(self) -> DBusDict:
        api = self.api
        running = sum(1 for job in api.jobs.jobs.values() if job.state == "running")
        return {
            "version": Variant("s", __version__),
            "host": Variant("s", socket.gethostname()),
            "uptime": Variant("t", int(time.monotonic() - api.started)),
            "volumes": Variant("u", len(api.volume_objects)),
            "snapshots": Variant("u", len(api.snapshot_objects)),
            "shares": Variant("u", len(api.share_objects)),
            "jobs-running": Variant("u", running),
            "health": Variant("s", api.health()),
        }

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> DBusStr:
        return __version__

    @dbus_property(access=PropertyAccess.READ)
    def Health(self) -> DBusStr:
        return self.api.health()


class ShareInterface(ServiceInterface):
    def __init__(self, api: Api, share: Share) -> None:
        super().__init__("org.hostvold1.Share")
        self.api = api
        self.share = share
        self.usage = self._measure()

    def _measure(self) -> dict[str, int]:
        if not self.share.mounted:
            return {"Total": 0, "Free": 0, "Allocated": 0, "Provisioned": 0}
        st = os.statvfs(self.share.mount_point)
        allocated, provisioned = self.api.store.usage(self.share)
        return {"Total": st.f_frsize * st.f_blocks, "Free": st.f_frsize * st.f_bavail,
                "Allocated": allocated, "Provisioned": provisioned}

    def refresh(self) -> None:
        usage = self._measure()
        changed = {k: v for k, v in usage.items() if self.usage.get(k) != v}
        self.usage = usage
        if changed:
            self.emit_properties_changed(changed)

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> DBusStr:
        return self.share.id

    @dbus_property(access=PropertyAccess.READ)
    def Address(self) -> DBusStr:
        return self.share.spec.address

    @dbus_property(access=PropertyAccess.READ)
    def MountPoint(self) -> DBusStr:
        return str(self.share.mount_point)

    @dbus_property(access=PropertyAccess.READ)
    def Mounted(self) -> DBusBool:
        return self.share.mounted

    @dbus_property(access=PropertyAccess.READ)
    def Error(self) -> DBusStr:
        return self.share.error or ""

    @dbus_property(access=PropertyAccess.READ)
    def Total(self) -> DBusUInt64:
        return self.usage["Total"]

    @dbus_property(access=PropertyAccess.READ)
    def Free(self) -> DBusUInt64:
        return self.usage["Free"]

    @dbus_property(access=PropertyAccess.READ)
    def Allocated(self) -> DBusUInt64:
        return self.usage["Allocated"]

    @dbus_property(access=PropertyAccess.READ)
    def Provisioned(self) -> DBusUInt64:
        return self.usage["Provisioned"]

    @dbus_property(access=PropertyAccess.READ)
    def StoragePath(self) -> DBusStr:
        """Reachability of the share's host; local shares have no path to watch."""
        return "local" if self.share.spec.address.startswith("/") else "unknown"


def _volume_properties(meta: VolumeMeta, api: Api) -> dict[str, Any]:
    share = next((s for s in api.store.shares if s.spec.address == meta.share), None)
    attachment = meta.attachment or {}
    return {
        "Id": meta.id, "Size": meta.size, "Format": meta.format,
        "Provisioning": meta.provisioning, "Created": meta.created,
        "Share": object_path("shares", share.id) if share else "/",
        "ActiveFile": meta.active, "State": meta.state,
        "Attachment": (attachment.get("domain", ""), attachment.get("target", "")),
        "Snapshots": [object_path("snapshots", sid) for sid in sorted(
            meta.snapshots, key=lambda sid: (meta.snapshots[sid].get("created", ""), sid))],
        "Problems": list(meta.problems),
    }


class VolumeInterface(ServiceInterface):
    def __init__(self, api: Api, meta: VolumeMeta) -> None:
        super().__init__("org.hostvold1.Volume")
        self.api = api
        self.meta = meta
        self.props = _volume_properties(meta, api)

    @property
    def path(self) -> str:
        return object_path("volumes", self.meta.id)

    def update(self, meta: VolumeMeta) -> None:
        props = _volume_properties(meta, self.api)
        changed = {k: v for k, v in props.items() if self.props.get(k) != v}
        self.meta, self.props = meta, props
        if changed:
            self.emit_properties_changed(changed)

    async def _admin(self, action: str) -> int:
        return await self.api.authorizer.require_admin(f"Volume.{action}")

    @dbus_method()
    @_errors
    async def CreateSnapshot(self, options: DBusDict) -> DBusObjectPath:
        await self._admin("CreateSnapshot")
        values = _options(options, {"id": STR})
        snap = await self.api.ops.create_snapshot(self.meta.id, values.get("id"))
        self.api.sync_volume(self.meta.id)
        return object_path("snapshots", snap.id)

    @dbus_method()
    @_errors
    async def Extend(self, options: DBusDict) -> DBusObjectPath:
        await self._admin("Extend")
        values = _options(options, {"size": INT})
        request: ExtendVolume = ExtendVolume.parse(**values)
        if request.size <= self.meta.size:
            raise InvalidArgument(f"option size: the new size {request.size} must be larger "
                                  f"than the current {self.meta.size} bytes")
        volume_id = self.meta.id

        async def work() -> VolumeMeta:
            return await self.api.ops.extend_volume(volume_id, **values)

        return self.api.start_job("extend", [self.path], work)

    @dbus_method()
    @_errors
    async def Clone(self, options: DBusDict) -> DBusObjectPath:
        await self._admin("Clone")
        values = _options(options, NEW_VOLUME)
        request: CopyVolume = CopyVolume.parse(**values)
        self.api.check_new_volume(request.id, request.share)
        objects = [self.path]
        done = self.api.volume_path_result(objects)
        volume_id = self.meta.id

        async def work() -> VolumeMeta:
            return done(await self.api.ops.clone(volume_id, **values))

        return self.api.start_job("clone", objects, work, self.meta.size)

    @dbus_method()
    @_errors
    async def Export(self, options: DBusDict) -> DBusObjectPath:
        """Into option ``fd``, a new file the caller created and opened for writing (so it
        has the caller's owner and umask); the ``destination`` path form is root's only."""
        uid = await self._admin("Export")
        values = _options(options, EXPORT_OPTIONS)
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
        if request.fd is not None:
            check_caller_fd(request.fd, "fd", write=True)
        fd = _keep_fd(request.fd)
        values["fd"] = fd
        volume_id = self.meta.id

        async def work() -> str:
            try:
                return str(await self.api.ops.export_volume(volume_id, **values) or "")
            finally:
                _close(fd)

        return self.api.start_job("export", [self.path], work, self.meta.size)

    @dbus_method()
    @_errors
    async def Revert(self, options: DBusDict) -> DBusObjectPath:
        await self._admin("Revert")
        values = _options(options, {"snapshot": frozenset("so")})
        snapshot = str(values.get("snapshot", ""))
        if snapshot.startswith("/"):
            try:
                snapshot = id_from_path(snapshot, "snapshots")
            except ValueError as exc:
                raise InvalidArgument(f"option snapshot: {exc}") from None
        sid = RevertVolume.parse(snapshot=snapshot).snapshot
        if sid not in self.meta.snapshots:
            raise NotFound(f"snapshot {sid} of volume {self.meta.id} does not exist")
        volume_id = self.meta.id

        async def work() -> None:
            await self.api.ops.revert(volume_id, sid)

        return self.api.start_job("revert", [self.path], work)

    @dbus_method()
    @_errors
    async def Attach(self, options: DBusDict) -> DBusObjectPath:
        await self._admin("Attach")
        request: AttachVolume = AttachVolume.parse(
            **_options(options, {"domain": STR, "target": STR}))
        domain, target = request.domain, request.target
        volume_id = self.meta.id

        async def work() -> VolumeMeta:
            return await self.api.ops.attach(volume_id, domain, target)

        return self.api.start_job("attach", [self.path], work)

    @dbus_method()
    @_errors
    async def Detach(self, options: DBusDict) -> DBusObjectPath:
        await self._admin("Detach")
        _options(options, {})
        volume_id = self.meta.id

        async def work() -> VolumeMeta:
            return await self.api.ops.detach(volume_id)

        return self.api.start_job("detach", [self.path], work)

    @dbus_method()
    @_errors
    async def Repair(self, options: DBusDict) -> Strings:
        """Option ``format`` (raw|qcow2) confirms the base file's format; ``choice``
        (base|overlay) settles an undecided pivot."""
        await self._admin("Repair")
        choice = options.pop("choice", None)
        if choice is not None and (choice.signature != "s"
                                   or choice.value not in ("base", "overlay")):
            raise InvalidArgument("option choice must be the string 'base' or 'overlay'")
        request: RepairVolume = RepairVolume.parse(**_options(options, {"format": STR}))
        done = await self.api.ops.repair(self.meta.id, request.format,
                                               choice.value if choice is not None else None)
        self.api.sync_volume(self.meta.id)
        return done

    @dbus_method()
    @_errors
    async def Delete(self, options: DBusDict) -> DBusObjectPath:
        await self._admin("Delete")
        _options(options, {})
        volume_id = self.meta.id

        async def work() -> None:
            await self.api.ops.delete_volume(volume_id)

        return self.api.start_job("delete-volume", [self.path], work)

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> DBusStr:
        return str(self.props["Id"])

    @dbus_property(access=PropertyAccess.READ)
    def Size(self) -> DBusUInt64:
        return int(self.props["Size"])

    @dbus_property(access=PropertyAccess.READ)
    def Format(self) -> DBusStr:
        return str(self.props["Format"])

    @dbus_property(access=PropertyAccess.READ)
    def Provisioning(self) -> DBusStr:
        return str(self.props["Provisioning"])

    @dbus_property(access=PropertyAccess.READ)
    def Created(self) -> DBusStr:
        return str(self.props["Created"])

    @dbus_property(access=PropertyAccess.READ)
    def Share(self) -> DBusObjectPath:
        return str(self.props["Share"])

    @dbus_property(access=PropertyAccess.READ)
    def ActiveFile(self) -> DBusStr:
        return str(self.props["ActiveFile"])

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> DBusStr:
        return str(self.props["State"])

    @dbus_property(access=PropertyAccess.READ)
    def Attachment(self) -> Pair:
        domain, target = self.props["Attachment"]
        return (str(domain), str(target))

    @dbus_property(access=PropertyAccess.READ)
    def Snapshots(self) -> ObjectPaths:
        return list(self.props["Snapshots"])

    @dbus_property(access=PropertyAccess.READ)
    def Problems(self) -> Strings:
        return list(self.props["Problems"])


class SnapshotInterface(ServiceInterface):
    def __init__(self, api: Api, volume_id: str, snapshot_id: str) -> None:
        super().__init__("org.hostvold1.Snapshot")
        self.api = api
        self.volume_id = volume_id
        self.snapshot_id = snapshot_id

    def _extra(self) -> dict[str, Any]:
        meta = self.api.store.find(self.volume_id)
        return meta.snapshots.get(self.snapshot_id, {}) if meta else {}

    @dbus_method()
    @_errors
    async def Delete(self, options: DBusDict) -> DBusObjectPath:
        await self.api.authorizer.require_admin("Snapshot.Delete")
        _options(options, {})
        volume_id, sid = self.volume_id, self.snapshot_id

        async def work() -> None:
            await self.api.ops.delete_snapshot(volume_id, sid)

        meta = self.api.store.get_volume(volume_id)
        return self.api.start_job("delete-snapshot", [object_path("volumes", volume_id),
                                                      object_path("snapshots", sid)],
                                  work, meta.size)

    @dbus_method()
    @_errors
    async def CreateVolume(self, options: DBusDict) -> DBusObjectPath:
        await self.api.authorizer.require_admin("Snapshot.CreateVolume")
        values = _options(options, NEW_VOLUME)
        request: CopyVolume = CopyVolume.parse(**values)
        self.api.check_new_volume(request.id, request.share)
        objects = [object_path("snapshots", self.snapshot_id)]
        done = self.api.volume_path_result(objects)
        volume_id, sid = self.volume_id, self.snapshot_id

        async def work() -> VolumeMeta:
            return done(await self.api.ops.create_from_snapshot(volume_id, sid,
                                                                      **values))

        meta = self.api.store.get_volume(volume_id)
        return self.api.start_job("create-volume-from-snapshot", objects, work, meta.size)

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


class JobInterface(ServiceInterface):
    def __init__(self, api: Api, job: Job) -> None:
        super().__init__("org.hostvold1.Job")
        self.api = api
        self.job = job

    def announce(self, names: set[str]) -> None:
        values = {
            "State": self.job.state, "Progress": self.job.fraction,
            "BytesDone": self.job.bytes_done, "Rate": self.job.rate,
            "ExpectedEndTime": int(self.job.expected_end * 1_000_000),
            "Error": self.Error,
            "Objects": list(self.job.objects),
            "CompletedTimestamp": int(self.job.completed * 1_000_000),
            "CompletedTimestampMonotonic": int(self.job.completed_monotonic * 1_000_000),
        }
        self.emit_properties_changed({k: v for k, v in values.items() if k in names})

    @dbus_method()
    @_errors
    async def Cancel(self) -> None:
        await self.api.authorizer.require_admin("Job.Cancel")
        self.api.jobs.cancel(self.job.id)

    @dbus_signal()
    def Completed(self, success: bool, error_name: str,
                  message: str) -> Annotated[tuple[bool, str, str], DBusSignature("bss")]:
        return (success, error_name, message)

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> DBusStr:
        return self.job.id

    @dbus_property(access=PropertyAccess.READ)
    def Operation(self) -> DBusStr:
        return self.job.operation

    @dbus_property(access=PropertyAccess.READ)
    def Objects(self) -> ObjectPaths:
        return list(self.job.objects)

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> DBusStr:
        return self.job.state

    @dbus_property(access=PropertyAccess.READ)
    def Progress(self) -> DBusDouble:
        return self.job.fraction

    @dbus_property(access=PropertyAccess.READ)
    def BytesDone(self) -> DBusUInt64:
        return self.job.bytes_done

    @dbus_property(access=PropertyAccess.READ)
    def BytesTotal(self) -> DBusUInt64:
        return self.job.bytes_total

    @dbus_property(access=PropertyAccess.READ)
    def Rate(self) -> DBusDouble:
        return self.job.rate

    @dbus_property(access=PropertyAccess.READ)
    def ExpectedEndTime(self) -> DBusUInt64:
        """Unix time in microseconds (0: unknown)."""
        return int(self.job.expected_end * 1_000_000)

    @dbus_property(access=PropertyAccess.READ)
    def Error(self) -> Pair:
        name = f"org.hostvold1.Error.{self.job.error_name}" if self.job.error_name else ""
        return (name, self.job.error_message)

    @dbus_property(access=PropertyAccess.READ)
    def CompletedTimestamp(self) -> DBusUInt64:
        return int(self.job.completed * 1_000_000)

    @dbus_property(access=PropertyAccess.READ)
    def CompletedTimestampMonotonic(self) -> DBusUInt64:
        return int(self.job.completed_monotonic * 1_000_000)


__all__ = ["Api", "DBusError"]
