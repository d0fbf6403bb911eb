"""``org.hostvold1.Manager`` at ``/org/hostvold1``: new volumes, the daemon's status."""

# no "from __future__ import annotations": dbus-fast reads the Annotated signatures
import asyncio
import os
import time
from typing import TYPE_CHECKING, Annotated, Any

from dbus_fast import PropertyAccess, Variant
from dbus_fast.annotations import DBusDict, DBusObjectPath, DBusSignature, DBusStr
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property

from hostvold import __version__
from hostvold.core.errors import InvalidArgument, NotAuthorized
from hostvold.core.groups import GroupRequest
from hostvold.core.models import CreateVolume, ImportVolume
from hostvold.core.records import VolumeMeta
from hostvold.ops.volumes import image_size
from hostvold.server.bus import id_from_path, object_path
from hostvold.server.calls import (
    CREATE_OPTIONS,
    IMPORT_OPTIONS,
    STR,
    ObjectPaths,
    caller_fd,
    close_fd,
    named_errors,
    read_options,
    refuse_smaller,
)
from hostvold.storage.safefile import open_source

if TYPE_CHECKING:
    from hostvold.server.api import Api

# one row a volume: its object path, id, size, format, state, count of snapshots, problems
VolumeRows = Annotated[list[list[Any]], DBusSignature("a(ostssuas)")]
GROUP_OPTIONS = {"domain": STR, "domains": frozenset({"as"}), "consistency": STR,
                 "quiesce": STR}


class ManagerInterface(ServiceInterface):
    def __init__(self, api: "Api") -> None:
        super().__init__("org.hostvold1.Manager")
        self.api = api

    @dbus_method()
    @named_errors
    async def CreateVolume(self, options: DBusDict) -> DBusObjectPath:
        values, request = await self.api.admit_new_volume(
            "CreateVolume", options, CREATE_OPTIONS, CreateVolume.parse)

        async def make() -> VolumeMeta:
            return await self.api.ops.create_volume(**values)

        return self.api.start_volume_job("create-volume", [], make, request.size)

    @dbus_method()
    @named_errors
    async def ImportVolume(self, options: DBusDict) -> DBusObjectPath:
        """The image is option ``fd`` (opened by the caller, for reading); the ``source``
        path form is for root only: the daemon never opens a path for other callers."""
        uid = await self.api.authorizer.require_admin("ImportVolume")
        values = read_options(options, IMPORT_OPTIONS)
        if "source" in values and uid != 0:
            raise NotAuthorized("option source (a path the daemon opens) is accepted from "
                                "root only; pass the image as a file descriptor (option fd)")
        request: ImportVolume = ImportVolume.parse(**values)
        self.api.check_new_volume(request.id, request.share)
        if request.fd is not None:
            fd = os.dup(caller_fd(request.fd, write=False))
            size = os.fstat(fd).st_size
        else:
            assert request.source is not None
            fd = await asyncio.to_thread(open_source, request.source)
            size = os.fstat(fd).st_size
            del values["source"]
        values["fd"] = fd
        try:  # a size below the image's, or an image that must not be used: said now
            _fmt, virtual = await asyncio.to_thread(image_size, fd, request.source_format)
            refuse_smaller(request.size, virtual, "the image")
        except BaseException:
            close_fd(fd)
            raise

        async def make() -> VolumeMeta:
            try:
                return await self.api.ops.import_volume(**values)
            finally:
                close_fd(fd)

        return self.api.start_volume_job("import-volume", [], make, size)

    @dbus_method()
    @named_errors
    async def CreateGroupSnapshot(self, volumes: ObjectPaths,
                                  options: DBusDict) -> DBusObjectPath:
        """One point in time across ``volumes`` and the volumes of options ``domain`` /
        ``domains`` (SPEC section 5a); the job's objects end with the group's path."""
        await self.api.authorizer.require_admin("CreateGroupSnapshot")
        values = read_options(options, GROUP_OPTIONS)
        domains = [*([values.pop("domain")] if "domain" in values else []),
                   *values.pop("domains", [])]
        try:
            ids = [id_from_path(path, "volumes") for path in volumes]
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        request = GroupRequest.parse(volumes=ids, domains=domains, **values)
        groups = self.api.ops.groups
        await groups.members_of(request)  # an unknown volume or domain: said now
        objects = [object_path("volumes", v) for v in request.volumes]

        async def work() -> str:
            outcome = await groups.create(request)
            for volume_id in outcome.members:
                self.api.sync_volume(volume_id)
            objects.append(object_path("groups", outcome.group_id))
            return outcome.group_id

        return self.api.start_job("create-group-snapshot", objects, work)

    @dbus_method()
    @named_errors
    async def Status(self) -> DBusDict:
        await self.api.authorizer.require_read("Manager.Status")
        api = self.api
        running = sum(1 for job in api.jobs.jobs.values() if job.state == "running")
        return {
            "version": Variant("s", __version__),
            "host": Variant("s", api.store.host_id),
            "coordination": Variant("s", api.coordination_state()),
            "uptime": Variant("t", int(time.monotonic() - api.started)),
            "volumes": Variant("u", len(api.volume_objects)),
            "snapshots": Variant("u", len(api.snapshot_objects)),
            "shares": Variant("u", len(api.share_objects)),
            "jobs-running": Variant("u", running),
            "health": Variant("s", api.health()),
        }

    @dbus_method()
    @named_errors
    async def ListVolumes(self, options: DBusDict) -> VolumeRows:
        """What a listing of the volumes shows, one row a volume, sorted by id, in one
        small message: GetManagedObjects carries every property of every object (for 1,000
        volumes 840 KB of variants, most of a listing's time). No options yet."""
        await self.api.authorizer.require_read("Manager.ListVolumes")
        if options:
            raise InvalidArgument(f"unknown option(s): {', '.join(sorted(options))}")
        store = self.api.store
        listed = (store.find(volume_id) for volume_id in sorted(self.api.volume_objects))
        return [[object_path("volumes", meta.id), meta.id, meta.size, meta.format,
                 meta.state, len(meta.snapshots), list(meta.problems)]
                for meta in listed if meta is not None]

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> DBusStr:
        return __version__

    @dbus_property(access=PropertyAccess.READ)
    def Health(self) -> DBusStr:
        return self.api.health()
