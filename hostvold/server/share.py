"""``org.hostvold1.Share`` at ``/org/hostvold1/shares/<id>``: a share, its mount, the state
of its storage path and its usage. The usage is measured in the share's own pool (never on
the event loop: the share may hang) after a burst of changes; the getters read that cache
only, so a dead share never stops a property read or ``GetManagedObjects``."""

# no "from __future__ import annotations": dbus-fast reads the Annotated signatures
import logging
from typing import TYPE_CHECKING

from dbus_fast import PropertyAccess
from dbus_fast.annotations import DBusBool, DBusStr, DBusUInt64
from dbus_fast.service import ServiceInterface, dbus_property

from hostvold.core.errors import HostvoldError
from hostvold.server.calls import announce_changes
from hostvold.storage.mounts import Share
from hostvold.storage.space import measure

if TYPE_CHECKING:
    from hostvold.server.api import Api

log = logging.getLogger(__name__)
EMPTY = {"Total": 0, "Free": 0, "Allocated": 0, "Provisioned": 0}


class ShareInterface(ServiceInterface):
    def __init__(self, api: "Api", share: Share) -> None:
        super().__init__("org.hostvold1.Share")
        self.api = api
        self.share = share
        self.usage = dict(EMPTY)
        self.state = self._state()
        share.listeners.append(self._share_changed)

    def _state(self) -> dict[str, object]:
        return {"Mounted": self.share.mounted, "Error": self.share.error or self.share.hung
                or "", "StoragePath": self.share.path}

    def _share_changed(self, _share: Share) -> None:
        before, self.state = self.state, self._state()
        announce_changes(self, before, self.state)

    async def refresh(self) -> None:
        """Measure the share again, in its own pool; a share that cannot answer keeps
        its last figures (its state says why)."""
        if not self.share.mounted:
            return
        try:
            store = self.api.store
            capacity = await measure(self.share, store.naming, store.volumes.values())
        except (HostvoldError, OSError) as exc:
            log.warning("share %s not measured: %s", self.share.spec.address, exc)
            return
        before, self.usage = self.usage, {
            "Total": capacity.total, "Free": capacity.free, "Allocated": capacity.allocated,
            "Provisioned": capacity.provisioned}
        announce_changes(self, before, self.usage)
        self._share_changed(self.share)

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
        return bool(self.state["Mounted"])

    @dbus_property(access=PropertyAccess.READ)
    def Error(self) -> DBusStr:
        """Why the share cannot be used now: a failed mount, a share that stopped
        answering; empty when it is healthy."""
        return str(self.state["Error"])

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
        """The network path to the share's host, as the kernel's routes say (SPEC section
        10): ``up``, ``unreachable``, or ``local`` (no network path to watch)."""
        return str(self.state["StoragePath"])
