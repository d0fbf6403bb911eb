"""``org.hostvold1.GroupSnapshot`` at ``/org/hostvold1/groups/<id>``: one point in time
across several volumes (SPEC section 5a). Its properties are read from the members'
records (:func:`hostvold.core.groups.collect_groups`); the registry refreshes them."""

# no "from __future__ import annotations": dbus-fast reads the Annotated signatures
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from dbus_fast import PropertyAccess
from dbus_fast.annotations import DBusBool, DBusDict, DBusDouble, DBusObjectPath, DBusStr
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property

from hostvold.core.groups import GroupView
from hostvold.core.models import CopyVolume
from hostvold.server.bus import object_path
from hostvold.server.calls import (
    NO_OPTIONS,
    STR,
    ObjectPaths,
    Strings,
    announce_changes,
    named_errors,
    read_options,
)

if TYPE_CHECKING:
    from hostvold.server.api import Api


def group_properties(view: GroupView) -> dict[str, Any]:
    return {
        "Id": view.id,
        "Volumes": [object_path("volumes", m.volume_id) for m in view.members],
        "Snapshots": [object_path("snapshots", m.snapshot_id) for m in view.members
                      if m.volume_id in view.present],
        "Created": view.created, "Consistency": view.consistency,
        "Quiesced": view.quiesced, "Paused": view.paused, "Problems": list(view.problems),
    }


class GroupSnapshotInterface(ServiceInterface):
    def __init__(self, api: "Api", view: GroupView) -> None:
        super().__init__("org.hostvold1.GroupSnapshot")
        self.api = api
        self.view = view

    def update(self, view: GroupView) -> None:
        before = group_properties(self.view)
        self.view = view
        announce_changes(self, before, group_properties(view))

    def _objects(self) -> list[str]:
        return [object_path("groups", self.view.id)]

    async def _whole_group_job(self, method: str, options: DBusDict,
                               check: Callable[[str], object],
                               run: Callable[[str], Awaitable[None]], operation: str) -> str:
        """What Delete and Revert share: the caller's right, no options, the group checked
        as it stands when the call arrives, then one job."""
        await self.api.authorizer.require_admin(f"GroupSnapshot.{method}")
        read_options(options, NO_OPTIONS)
        group_id = self.view.id
        check(group_id)

        async def work() -> None:
            await run(group_id)

        return self.api.start_job(operation, self._objects(), work)

    @dbus_method()
    @named_errors
    async def Delete(self, options: DBusDict) -> DBusObjectPath:
        """Every member, each by its cheapest strategy (live or offline)."""
        changes = self.api.ops.group_changes
        return await self._whole_group_job("Delete", options, changes.view, changes.delete,
                                           "delete-group-snapshot")

    @dbus_method()
    @named_errors
    async def Revert(self, options: DBusDict) -> DBusObjectPath:
        """Every member (all detached) back to the group's point in time: all or none."""
        changes = self.api.ops.group_changes
        return await self._whole_group_job("Revert", options, changes.whole, changes.revert,
                                           "revert-group-snapshot")

    @dbus_method()
    @named_errors
    async def CreateVolumes(self, options: DBusDict) -> DBusObjectPath:
        """A new standalone volume of each member's point in time, in one job; the new
        volumes' paths join the job's objects."""
        await self.api.authorizer.require_admin("GroupSnapshot.CreateVolumes")
        values = read_options(options, {"share": STR})
        CopyVolume.parse(**values)
        self.api.check_new_volume(None, values.get("share"))
        changes, group_id = self.api.ops.group_changes, self.view.id
        changes.whole(group_id)
        objects = self._objects()

        async def work() -> list[str]:
            made = await changes.create_volumes(group_id, **values)
            for meta in made:
                self.api.sync_volume(meta.id)
                objects.append(object_path("volumes", meta.id))
            return [meta.id for meta in made]

        return self.api.start_job("create-volumes-from-group", objects, work)

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> DBusStr:
        return self.view.id

    @dbus_property(access=PropertyAccess.READ)
    def Volumes(self) -> ObjectPaths:
        return [object_path("volumes", m.volume_id) for m in self.view.members]

    @dbus_property(access=PropertyAccess.READ)
    def Snapshots(self) -> ObjectPaths:
        return [object_path("snapshots", m.snapshot_id) for m in self.view.members
                if m.volume_id in self.view.present]

    @dbus_property(access=PropertyAccess.READ)
    def Created(self) -> DBusStr:
        return self.view.created

    @dbus_property(access=PropertyAccess.READ)
    def Consistency(self) -> DBusStr:
        return self.view.consistency

    @dbus_property(access=PropertyAccess.READ)
    def Quiesced(self) -> DBusBool:
        return self.view.quiesced

    @dbus_property(access=PropertyAccess.READ)
    def Paused(self) -> DBusDouble:
        """Under ``suspend``: how long the domains were paused, in seconds (else 0)."""
        return self.view.paused

    @dbus_property(access=PropertyAccess.READ)
    def Problems(self) -> Strings:
        return list(self.view.problems)
