"""``org.hostvold1.Share`` at ``/org/hostvold1/shares/<id>``: a share, its mount and its
usage. The usage is measured when the object is made and again when :class:`.objects.Api`
asks after a burst of changes; the getters read that cache only."""

# no "from __future__ import annotations": dbus-fast reads the Annotated signatures
import os
from typing import TYPE_CHECKING

from dbus_fast import PropertyAccess
from dbus_fast.annotations import DBusBool, DBusStr, DBusUInt64
from dbus_fast.service import ServiceInterface, dbus_property

from hostvold.ops.store import share_usage
from hostvold.server.calls import announce_changes
from hostvold.storage.mounts import Share

if TYPE_CHECKING:
    from hostvold.server.objects import Api


class ShareInterface(ServiceInterface):
    def __init__(self, api: "Api", share: Share) -> None:
        super().__init__("org.hostvold1.Share")
        self.api = api
        self.share = share
        self.usage = self._measure()

    def _measure(self) -> dict[str, int]:
        if not self.share.mounted:
            return {"Total": 0, "Free": 0, "Allocated": 0, "Provisioned": 0}
        st = os.statvfs(self.share.mount_point)
        allocated, provisioned = share_usage(self.api.store, self.share)
        return {"Total": st.f_frsize * st.f_blocks, "Free": st.f_frsize * st.f_bavail,
                "Allocated": allocated, "Provisioned": provisioned}

    def refresh(self) -> None:
        before, self.usage = self.usage, self._measure()
        announce_changes(self, before, self.usage)

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
